"""Machine health: "does this sound like it did when it was healthy?", from enrolled embeddings.

Enrolment (``monitord enroll``) stores the CLAP audio embeddings of windows of normal
operation in a bank, with where each came from (recording, start sample) and its leave-one-out
distance: the mean cosine distance to its k nearest enrolled windows that share no audio with it.
Windows overlap (a 2 s window every 0.5 s shares 75 % of its sound with the next), and a new
window shares audio with no enrolled one, so an overlapping neighbour would make the reference
too small and nearly every normal window look abnormal.
A new window's distance d is the mean cosine distance to its k nearest enrolled embeddings;
its score is ``d / (d + ref)``, where ``ref`` is the bank's 95th percentile leave-one-out
distance. So 0.5 means "as far from normal as the least typical 5 % of the normal windows",
0.67 twice as far, and scores approach 1 far from anything enrolled. It is exposed as the label
``anomaly``, so ordinary rules, hysteresis and k-of-n apply.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitord.config import AnomalyModelConfig
from monitord.inference.models.base import ModelBase, ModelUnavailable
from monitord.types import Scores, Window, frozen_mapping

log = logging.getLogger(__name__)

REFERENCE_PERCENTILE = 95.0


@dataclass(frozen=True)
class Bank:
    embeddings: np.ndarray
    """(N, D), L2-normalised."""
    model_id: str
    sample_rate: int
    window_seconds: float
    hop_s: float
    k: int
    loo: np.ndarray
    """Each enrolled window's mean distance to its k nearest enrolled windows that do not overlap it."""
    reference: float
    created: str
    recordings: np.ndarray
    """(N,) str: the recording each window was cut from (a file path, or a source id)."""
    starts: np.ndarray
    """(N,) int64: each window's first sample in its recording, at ``sample_rate``."""

    def distance(self, queries: np.ndarray) -> np.ndarray:
        """Mean cosine distance of each query to its k nearest enrolled embeddings."""
        distances = 1.0 - queries @ self.embeddings.T
        k = min(self.k, len(self.embeddings))
        return np.sort(distances, axis=1)[:, :k].mean(axis=1)

    def score(self, queries: np.ndarray) -> np.ndarray:
        d = np.maximum(self.distance(queries), 0.0)
        return d / (d + self.reference)

    def save(self, path: str | Path) -> None:
        np.savez(path, embeddings=self.embeddings, model_id=self.model_id, sample_rate=self.sample_rate,
                 window_seconds=self.window_seconds, hop_s=self.hop_s, k=self.k, loo=self.loo,
                 reference=self.reference, created=self.created, recordings=self.recordings, starts=self.starts)

    @classmethod
    def load(cls, path: str | Path) -> "Bank":
        try:
            with np.load(path, allow_pickle=False) as data:
                if "embeddings" in data and "recordings" not in data:
                    raise ModelUnavailable(f"anomaly bank {path} was enrolled by an older monitord, whose reference "
                                           "counted overlapping windows as neighbours (normal sound scored too high): "
                                           "enrol again with `monitord enroll`")
                return cls(data["embeddings"].astype(np.float32), str(data["model_id"]), int(data["sample_rate"]),
                           float(data["window_seconds"]), float(data["hop_s"]), int(data["k"]), data["loo"],
                           float(data["reference"]), str(data["created"]), data["recordings"].astype(str),
                           data["starts"].astype(np.int64))
        except FileNotFoundError:
            raise ModelUnavailable(f"anomaly bank {path} does not exist: record one with `monitord enroll`") from None
        except (OSError, KeyError, ValueError) as exc:
            raise ModelUnavailable(f"anomaly bank {path} is not a monitord bank ({exc})") from None


def build_bank(embeddings: np.ndarray, model_id: str, sample_rate: int, window_seconds: float, hop_s: float, k: int,
               recordings: Sequence[str], starts: Sequence[int]) -> Bank:
    """A bank from embeddings of normal windows, with its leave-one-out statistics.

    ``recordings`` and ``starts`` (first sample at ``sample_rate``) say where each window was cut:
    windows of one recording less than a window length apart share audio and are not each
    other's neighbours."""
    e = embeddings / np.linalg.norm(embeddings, axis=1, keepdims=True)
    recordings, starts = np.asarray(recordings, dtype=str), np.asarray(starts, dtype=np.int64)
    if not len(recordings) == len(starts) == len(e):
        raise ValueError(f"{len(e)} embeddings, but {len(recordings)} recordings and {len(starts)} starts")
    shares_audio = _overlaps(recordings, starts, round(window_seconds * sample_rate))
    fewest = int((~shares_audio).sum(axis=1).min()) if len(e) else 0
    if fewest < k:
        raise ValueError(f"an anomaly bank needs, for every window, more than k={k} enrolled windows that share no audio "
                         f"with it; got {len(e)} windows, some with only {fewest}: enrol more or longer recordings")
    distances = 1.0 - e @ e.T
    distances[shares_audio] = np.inf
    loo = np.sort(distances, axis=1)[:, :k].mean(axis=1)
    reference = float(max(np.percentile(loo, REFERENCE_PERCENTILE), 1e-6))
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return Bank(e.astype(np.float32), model_id, sample_rate, window_seconds, hop_s, k, loo, reference, created,
                recordings, starts)


def _overlaps(recordings: np.ndarray, starts: np.ndarray, length: int) -> np.ndarray:
    """(N, N) bool: windows i and j share audio (same recording, starts less than ``length`` apart; i == j included)."""
    _, codes = np.unique(recordings, return_inverse=True)
    same = codes[:, None] == codes[None, :]
    return same & (np.abs(starts[:, None] - starts[None, :]) < length)


class AnomalyDetector(ModelBase):
    """Scores windows by their distance to the bank of their source, from another model's embeddings."""

    labels = ("anomaly",)
    sample_rate = 0  # works on embeddings, not audio

    def __init__(self, name: str, config: AnomalyModelConfig, embedder, window_seconds: float, hop_s: float):
        super().__init__(name, config)
        self.depends_on = config.embedding_model
        self.sample_rate = embedder.sample_rate
        paths = dict(config.banks)
        self.default_bank = Bank.load(config.bank) if config.bank else None
        self.banks = {source: Bank.load(path) for source, path in paths.items()}
        self.model_id = f"anomaly:{embedder.model_id}"
        for where, bank in [("bank", self.default_bank), *self.banks.items()]:
            if bank is None:
                continue
            if bank.model_id != embedder.model_id:
                raise ModelUnavailable(f"models.{name}: the {where} was enrolled with {bank.model_id}, "
                                       f"but {self.depends_on} is {embedder.model_id}: enrol again with this model")
            if (bank.window_seconds, bank.hop_s) != (window_seconds, hop_s) or bank.sample_rate != embedder.sample_rate:
                raise ModelUnavailable(f"models.{name}: the {where} was enrolled with {bank.window_seconds} s windows at "
                                       f"{bank.sample_rate} Hz; this config uses {window_seconds} s at {embedder.sample_rate} Hz")
        log.info("model %s: anomaly on %s embeddings, banks: %s", name, self.depends_on,
                 {s: len(b.embeddings) for s, b in self.banks.items()} | ({"*": len(self.default_bank.embeddings)} if self.default_bank else {}))

    def bank_for(self, source: str) -> Bank | None:
        return self.banks.get(source, self.default_bank)

    def accepts(self, window: Window) -> bool:
        return self.bank_for(window.source) is not None

    def score(self, windows: Sequence[Window], upstream: Sequence[Scores] | None = None) -> list[Scores]:
        if upstream is None or len(upstream) != len(windows):
            raise ValueError(f"model {self.name} scores {self.depends_on}'s embeddings: none were given")
        out = []
        for window, scores in zip(windows, upstream):
            bank = self.bank_for(window.source)
            embedding = scores.embedding
            if embedding is None:
                raise ValueError(f"model {self.depends_on} gave no embedding for model {self.name}")
            value = float(bank.score(embedding[None, :] / np.linalg.norm(embedding))[0])
            out.append(Scores(window=window, model=self.name, model_id=self.model_id,
                              probabilities=frozen_mapping({"anomaly": value})))
        return out


def roc_auc(labels: np.ndarray, scores: np.ndarray, max_fpr: float | None = None) -> float:
    """Area under the ROC curve (1 = abnormal, higher score = more abnormal). With ``max_fpr``, the
    partial AUC over FPR in [0, max_fpr] with McClish's standardisation, as DCASE's anomalous-sound
    task computes pAUC (sklearn's roc_auc_score(max_fpr=0.1)): 0.5 is chance, 1 is perfect."""
    labels = np.asarray(labels, dtype=bool)
    scores = np.asarray(scores, dtype=np.float64)
    positives, negatives = labels.sum(), (~labels).sum()
    if positives == 0 or negatives == 0:
        raise ValueError("AUC needs both normal and abnormal examples")
    order = np.argsort(-scores, kind="mergesort")
    s, y = scores[order], labels[order]
    distinct = np.r_[np.flatnonzero(np.diff(s)), len(s) - 1]
    tpr = np.r_[0.0, np.cumsum(y)[distinct] / positives]
    fpr = np.r_[0.0, np.cumsum(~y)[distinct] / negatives]
    if max_fpr is None or max_fpr >= 1:
        return float(np.trapezoid(tpr, fpr))
    stop = np.searchsorted(fpr, max_fpr, side="right")
    x = np.r_[fpr[:stop], max_fpr]
    yv = np.r_[tpr[:stop], np.interp(max_fpr, fpr, tpr)]
    partial = float(np.trapezoid(yv, x))
    min_area, max_area = 0.5 * max_fpr**2, max_fpr
    return 0.5 * (1 + (partial - min_area) / (max_area - min_area))
