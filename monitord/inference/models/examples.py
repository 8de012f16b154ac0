"""``kind: examples``: labels taught by example, scored by kNN cosine similarity on another
model's window embeddings (YAMNet's by default, CLAP's where the config names a clap model).

The bank (``monitord teach``) is read again whenever its file changes, so a taught example counts
from the next batch on, with no restart. See ``monitord.teaching.knn`` for the scores and what
0.5 means.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import numpy as np

from monitord.config import ExamplesModelConfig
from monitord.teaching.bank import Bank, BankError, BankFile, Embedder
from monitord.teaching.knn import Calibrated, calibrate
from monitord.inference.models.base import ModelBase, ModelUnavailable
from monitord.types import Scores, Window, frozen_mapping

log = logging.getLogger(__name__)


class ExamplesModel(ModelBase):
    sample_rate = 0  # works on embeddings, not audio

    def __init__(self, name: str, config: ExamplesModelConfig, embedder, window_seconds: float):
        super().__init__(name, config)
        self.depends_on = config.embedding_model
        self.sample_rate = embedder.sample_rate
        self.labels = tuple(config.labels)
        self.k = config.k
        self.model_id = f"examples:{embedder.model_id}"
        self.embedder = Embedder(embedder.model_id, 0, embedder.sample_rate, window_seconds)
        self.bank = BankFile(config.bank)
        self._calibrated: tuple[Bank, Calibrated] | None = None
        self._refused: Bank | None = None
        bank = self.bank.get()
        if bank is None:
            log.warning("model %s: bank %s has no examples yet (teach some with `monitord teach`): its labels score 0",
                        name, config.bank)
        else:
            try:
                self._check(bank)
            except BankError as exc:
                raise ModelUnavailable(str(exc), missing=f"a bank of {embedder.model_id} embeddings at {config.bank}",
                                       fix=f"monitord teach -c CONFIG --bank {config.bank} ... (a new bank)") from None
        log.info("model %s: examples of %s on %s embeddings", name, ", ".join(self.labels), self.depends_on)

    def _check(self, bank: Bank) -> None:
        bank.check(Embedder(self.embedder.model_id, bank.embedder.dim, self.embedder.sample_rate, self.embedder.window_s),
                   f"models.{self.name}.bank")

    def calibrated(self) -> Calibrated | None:
        """The bank as it is now, calibrated (again only when it changed); None: nothing usable."""
        bank = self.bank.get()
        if bank is None:
            return None
        if self._calibrated is not None and self._calibrated[0] is bank:
            return self._calibrated[1]
        try:
            self._check(bank)
        except BankError as exc:
            if self._refused is not bank:
                log.warning("%s", exc)
                self._refused = bank
            return self._calibrated[1] if self._calibrated is not None else None
        self._calibrated = (bank, calibrate(bank, list(self.labels), self.k))
        return self._calibrated[1]

    def prepare_labels(self, labels: Sequence[str], prompt: str) -> tuple[str, ...]:
        """Taught labels are free to change (a reload): nothing to compute ahead."""
        return tuple(labels)

    def use_labels(self, prepared: tuple[str, ...]) -> None:
        self.labels = prepared
        self._calibrated = None  # calibrated again for the new labels on the next batch

    def score(self, windows: Sequence[Window], upstream: Sequence[Scores] | None = None) -> list[Scores]:
        if upstream is None or len(upstream) != len(windows):
            raise ValueError(f"model {self.name} scores {self.depends_on}'s embeddings: none were given")
        if any(s.embedding is None for s in upstream):
            raise ValueError(f"model {self.depends_on} gave no embedding for model {self.name}")
        model = self.calibrated()
        x = np.stack([s.embedding for s in upstream]).astype(np.float32)
        x /= np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        scored = model.score(x) if model is not None and x.shape[1] == self._calibrated[0].embedder.dim else {}
        out = []
        for i, (window, scores) in enumerate(zip(windows, upstream)):
            probabilities = {label: float(scored[label][i]) if label in scored else 0.0 for label in self.labels}
            out.append(Scores(window=window, model=self.name, model_id=self.model_id,
                              probabilities=frozen_mapping(probabilities), embedding=scores.embedding))
        return out
