"""kNN cosine scores of taught labels, calibrated so that 0.5 means the same for every label.

For a label L and a window embedding x (both L2-normalised):

- ``s_pos``: the mean cosine similarity of x to its k nearest examples of L;
- ``s_neg``: the same over every other example of the bank (other labels and ``not:`` negatives);
- the score is ``sigmoid((s_pos - s_neg) / T_L)``.

So **0.5 is the kNN decision boundary for every label**: the window is as close to L's examples as
to the nearest of everything else taught. ``T_L`` sets how fast the score leaves 0.5 and comes from
the bank itself: the median margin ``s_pos - s_neg`` of L's own examples, each scored leaving out
every example cut from the same recording (overlapping windows of one recording would make the
margin look larger than a new window's). A typical taught example of a label therefore scores
``sigmoid(1) = 0.73`` where that median margin is positive, and ``sigmoid(-1) = 0.27`` where it is
negative (a diffuse label, its examples nearer another label's than each other: ``T_L`` is the
median of the margins' magnitudes); a threshold of 0.5-0.6 means "more like L than like anything else". A label
with no other examples in the bank (nothing to compare against) is scored against the least
typical of its own examples instead: ``s_neg`` is the 10th percentile of its leave-one-recording-out
``s_pos``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from monitord.teaching.bank import Bank

DEFAULT_T = 0.05
"""The temperature of a label whose examples all come from one recording (no margin to measure)."""
MIN_T = 0.01
CALIBRATION_SAMPLE = 1000
"""At most this many of a label's examples are scored leaving their recording out (the median margin)."""
CALIBRATION_CHUNK = 64


def top_k_mean(similarities: np.ndarray, k: int) -> np.ndarray:
    """Mean of the k largest values of each row ((Q, N) -> (Q,)); -1 for a row with no columns."""
    if similarities.shape[1] == 0:
        return np.full(similarities.shape[0], -1.0)
    n = similarities.shape[1]
    k = min(k, n)
    return np.partition(similarities, n - k, axis=1)[:, n - k :].mean(axis=1)


def recording_of(source: str) -> str:
    """The recording an example's source names (``file:PATH@12.5`` -> ``file:PATH``)."""
    return source.rsplit("@", 1)[0]


@dataclass(frozen=True, eq=False)
class LabelModel:
    label: str
    positives: np.ndarray
    """(P, D) the label's examples."""
    others: np.ndarray
    """(O, D) every other example."""
    temperature: float
    floor: float | None
    """s_neg when there are no other examples."""


@dataclass(frozen=True, eq=False)
class Calibrated:
    """A bank ready to score: one LabelModel per label."""

    labels: dict[str, LabelModel]
    k: int

    def score(self, x: np.ndarray) -> dict[str, np.ndarray]:
        """(Q, D) normalised embeddings -> {label: (Q,) probabilities}."""
        out = {}
        # a zero (or non-finite) embedding is like nothing: 0, not the 0.5 of s_pos == s_neg == 0
        blank = ~np.all(np.isfinite(x), axis=1) | ~np.any(x, axis=1)
        x = np.where(blank[:, None], 0.0, x).astype(np.float32)
        for label, m in self.labels.items():
            s_pos = top_k_mean(x @ m.positives.T, self.k)
            s_neg = top_k_mean(x @ m.others.T, self.k) if len(m.others) else np.full(len(x), m.floor)
            out[label] = np.where(blank, 0.0, 1.0 / (1.0 + np.exp(-(s_pos - s_neg) / m.temperature)))
        return out


def calibrate(bank: Bank, labels: list[str], k: int) -> Calibrated:
    """Per-label temperatures (and floors) from leave-one-recording-out margins on the bank."""
    recordings = np.array([recording_of(s) for s in bank.sources.tolist()])
    models = {}
    for label in labels:
        mine = bank.where(label)
        positives, others = bank.embeddings[mine], bank.embeddings[~mine]
        if not mine.any():
            continue
        own_recordings = recordings[mine]
        # the margins of at most CALIBRATION_SAMPLE of the label's examples (evenly spread), a few rows
        # at a time: a P x P similarity matrix of a bank taught from hours of sound took gigabytes and
        # stalled the inference thread it is computed on (the temperature is a median: a sample will do)
        rows = np.arange(len(positives)) if len(positives) <= CALIBRATION_SAMPLE else \
            np.unique(np.linspace(0, len(positives) - 1, CALIBRATION_SAMPLE).round().astype(np.int64))
        loo_pos = np.full(len(rows), np.nan)
        s_neg = np.full(len(rows), np.nan)
        for c in range(0, len(rows), CALIBRATION_CHUNK):
            chunk = rows[c : c + CALIBRATION_CHUNK]
            sims = positives[chunk] @ positives.T
            for j, i in enumerate(chunk):
                keep = own_recordings != own_recordings[i]
                if keep.any():
                    loo_pos[c + j] = top_k_mean(sims[j : j + 1, keep], k)[0]
            if len(others):
                s_neg[c : c + len(chunk)] = top_k_mean(positives[chunk] @ others.T, k)
        measured = loo_pos[np.isfinite(loo_pos)]
        floor = None
        if len(others):
            margins = measured - s_neg[np.isfinite(loo_pos)]
        else:
            floor = float(np.percentile(measured, 10)) if len(measured) else 0.9
            margins = measured - floor
        temperature = float(max(np.median(np.abs(margins)), MIN_T)) if len(margins) else DEFAULT_T
        models[label] = LabelModel(label, positives, others, temperature, floor)
    return Calibrated(models, k)
