"""A rule's taught false alarms (``not_like``): does this window sound like one of them?

``nearest_negative`` is the pure decision; ``NotLike`` finds each rule's bank (read again when the
file changes) and the embedding of the window the rule's model scored.

A window is suppressed for a rule when its cosine distance to the nearest example taught as
``not:<rule>`` is at most ``margin`` **and** smaller than its distance to the nearest example of
the rule's own label in the same bank (when there is one). Both conditions keep recall: only
windows close to a taught false alarm are suppressed, and never one closer to a taught true alarm.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from monitord.teaching.bank import Bank, BankFile, negative
from monitord.types import Scores

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Match:
    """The taught false alarm a window was closest to."""

    id: int
    source: str
    distance: float
    """Cosine distance (1 - cosine similarity) of the window to it."""
    positive_distance: float | None
    """Distance to the nearest example of the rule's label (None: the bank holds none)."""

    def to_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "distance": round(self.distance, 4),
                "positive_distance": None if self.positive_distance is None else round(self.positive_distance, 4)}


def nearest_negative(embedding: np.ndarray, bank: Bank, rule_id: str, label: str, margin: float) -> Match | None:
    """The rule's taught false alarm the window is within ``margin`` of, and closer to than to any
    example of ``label``; None when there is none (the window counts for the rule)."""
    candidates, negatives = bank.of(negative(rule_id))
    if not len(candidates):
        return None
    x = embedding.astype(np.float32) / max(float(np.linalg.norm(embedding)), 1e-12)
    distances = 1.0 - negatives @ x
    i = int(candidates[np.argmin(distances)])
    d_neg = float(distances.min())
    _, positives = bank.of(label)
    d_pos = float((1.0 - positives @ x).min()) if len(positives) else None
    if d_neg > margin or (d_pos is not None and d_neg >= d_pos):
        return None
    return Match(int(bank.ids[i]), str(bank.sources[i]), d_neg, d_pos)


def embedder_id(model_id: str) -> str:
    """The embedding model behind a Scores' model id (an examples model's id names its embedder)."""
    return model_id.removeprefix("examples:")


class NotLike:
    """Each rule's ``not_like`` bank, read again whenever its file changes."""

    def __init__(self) -> None:
        self._files: dict[str, BankFile] = {}
        self._warned: set[tuple[str, str]] = set()

    def matches(self, rules: Iterable, outcome_scores: Scores | None) -> dict[str, Match]:
        """{rule id: match} for the rules on this model whose taught false alarms the window is like."""
        if outcome_scores is None:
            return {}
        found = {}
        for rule in rules:
            not_like = getattr(rule, "not_like", None)
            if not_like is None or rule.model != outcome_scores.model:
                continue
            bank = self._files.setdefault(not_like.bank, BankFile(not_like.bank)).get()
            if bank is None or not len(bank):
                continue
            embedding = outcome_scores.embedding
            if embedding is None or embedding.shape != (bank.embedder.dim,) or \
                    embedder_id(outcome_scores.model_id) != bank.embedder.model_id:
                self._warn(rule.id, f"rule {rule.id}: not_like bank {not_like.bank} holds embeddings of "
                                    f"{bank.embedder.model_id}; model {rule.model} gives "
                                    f"{'none' if embedding is None else embedder_id(outcome_scores.model_id)}: "
                                    f"nothing is suppressed")
                continue
            window = getattr(outcome_scores, "window", None)
            if window is not None and abs(len(window.samples) / window.sample_rate - bank.embedder.window_s) > \
                    1.5 / window.sample_rate:
                self._warn(rule.id, f"rule {rule.id}: not_like bank {not_like.bank} holds embeddings of "
                                    f"{bank.embedder.window_s:g} s windows, these are "
                                    f"{len(window.samples) / window.sample_rate:g} s: nothing is suppressed "
                                    f"(teach it again with this config)")
                continue
            match = nearest_negative(embedding, bank, rule.id, rule.label, not_like.margin)
            if match is not None:
                found[rule.id] = match
        return found

    def _warn(self, rule_id: str, message: str) -> None:
        if (rule_id, message) not in self._warned:
            self._warned.add((rule_id, message))
            log.warning("%s", message)


def suppressed_event(window, rule, score: float, match: Match, model_id: str, host: str):
    """The status event of a window that would have raised ``rule``'s onset but is like one of its
    taught false alarms: logged (with a seq), so it can be reviewed and taught back."""
    from monitord.types import Event, iso_utc

    return Event(kind="status", source=window.source, time=iso_utc(window.wall_start), host=host, rule=rule.id,
                 label=rule.label, score=round(score, 6), model=model_id, model_name=rule.model, status="suppressed",
                 detail=f"rule {rule.id}: not raised, like taught false alarm {match.id} ({match.source}, "
                        f"distance {match.distance:.3f})",
                 stream_start=round(window.stream_start, 6), stream_end=round(window.stream_end, 6),
                 facts=window.facts.to_dict(), extra={"suppressed_by": match.to_dict()})
