"""A rule's taught false alarms (``not_like``): does this window sound like one of them?

``judge`` is the pure decision; ``NotLike`` finds each rule's bank (read again when the file
changes), its references, and the embedding of the window the rule's model scored.

A window is suppressed for a rule when its cosine distance to the nearest example taught as
``not:<rule>`` is at most ``margin`` **and** smaller than its distance to every positive of the
rule: its reference recordings (``references``) and the examples of its own label in the bank
("yes, this"). So a window nearer to the rule's own sound than to anything taught away is never
suppressed, whatever was taught: teaching removes repeats of a sound, not a class of sounds.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np

from monitord.teaching.bank import Bank, BankFile, negative
from monitord.teaching.references import References
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
    """Distance to the nearest positive of the rule (None: it has none)."""

    def to_dict(self) -> dict:
        return {"id": self.id, "source": self.source, "distance": round(self.distance, 4),
                "positive_distance": None if self.positive_distance is None else round(self.positive_distance, 4)}


def nearest_distance(x: np.ndarray, rows: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(Q, D) normalised windows against (N, D) normalised rows: the distance to the nearest row and
    its index ((Q,) inf and -1 where there are no rows)."""
    if rows is None or not len(rows):
        return np.full(len(x), np.inf), np.full(len(x), -1)
    distances = 1.0 - x @ rows.T
    nearest = np.argmin(distances, axis=1)
    return distances[np.arange(len(x)), nearest], nearest


def judge(x: np.ndarray, negatives: np.ndarray, positives: np.ndarray | None | tuple, margin: float) -> tuple[np.ndarray, ...]:
    """Which of the windows ``x`` (Q, D) are suppressed: within ``margin`` of a negative and nearer
    to it than to every positive (``positives``: rows, or a tuple of row sets, none copied). Returns
    (suppressed (Q,) bool, nearest negative (Q,), its distance (Q,), the nearest positive's distance
    (Q,), inf without positives)."""
    d_neg, nearest = nearest_distance(x, negatives)
    d_pos = np.full(len(x), np.inf)
    for rows in positives if isinstance(positives, tuple) else (positives,):
        d_pos = np.minimum(d_pos, nearest_distance(x, rows)[0])
    return (d_neg <= margin) & (d_neg < d_pos), nearest, d_neg, d_pos


def normalised(embedding: np.ndarray) -> np.ndarray:
    x = np.asarray(embedding, dtype=np.float32).reshape(1, -1)
    return x / max(float(np.linalg.norm(x)), 1e-12)


def nearest_negative(embedding: np.ndarray, bank: Bank, rule_id: str, label: str, margin: float,
                     references: np.ndarray | None = None) -> Match | None:
    """The rule's taught false alarm the window is within ``margin`` of, and nearer to than to any
    positive (``references``, the bank's examples of ``label``); None when there is none (the
    window counts for the rule)."""
    candidates, negatives = bank.of(negative(rule_id))
    if not len(candidates):
        return None
    _, taught = bank.of(label)
    # the references and "yes, this" as they are, not copied into one array per window
    suppressed, nearest, d_neg, d_pos = judge(normalised(embedding), negatives, (references, taught), margin)
    if not suppressed[0]:
        return None
    i = int(candidates[nearest[0]])
    return Match(int(bank.ids[i]), str(bank.sources[i]), float(d_neg[0]), None if np.isinf(d_pos[0]) else float(d_pos[0]))


def embedder_id(model_id: str) -> str:
    """The embedding model behind a Scores' model id (an examples model's id names its embedder)."""
    return model_id.removeprefix("examples:")


class NotLike:
    """Each rule's ``not_like`` bank, read again whenever its file changes, and its references."""

    def __init__(self, references: Mapping[str, References] | None = None) -> None:
        self.references: dict[str, References] = dict(references or {})
        """{rule id: its reference positives, embedded} (``references.for_rules``)."""
        self._files: dict[str, BankFile] = {}
        self._warned: set[tuple[str, str]] = set()

    def matches(self, rules: Iterable, outcome_scores: Scores | None, source: str | None = None) -> dict[str, Match]:
        """{rule id: match} for the rules on this model (watching ``source``, when given) whose taught
        false alarms the window is like."""
        if outcome_scores is None:
            return {}
        found = {}
        for rule in rules:
            not_like = getattr(rule, "not_like", None)
            if not_like is None or rule.model != outcome_scores.model:
                continue
            if source is not None and rule.sources is not None and source not in rule.sources:
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
            references = self.references.get(rule.id)
            named = getattr(not_like, "reference", None)
            if references is not None and getattr(references, "name", named) != named:
                references = None  # another reference's (a reload in flight: the old rule, the new references)
            if named is not None and references is None:  # being embedded (at start, a reload)
                self._warn(rule.id, f"rule {rule.id}: its references ({not_like.reference}) are not embedded yet: "
                                    f"nothing is suppressed until they are")
                continue
            if references is not None and len(references.embeddings) and \
                    np.shape(references.embeddings)[1:] != embedding.shape:  # another model's (a reload in flight)
                self._warn(rule.id, f"rule {rule.id}: its references ({not_like.reference}) are not embeddings of "
                                    f"{embedder_id(outcome_scores.model_id)}: nothing is suppressed until they are")
                continue
            match = nearest_negative(embedding, bank, rule.id, rule.label, not_like.margin,
                                     None if references is None else references.embeddings)
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
