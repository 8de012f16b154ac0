"""What every model produces, and the interface the worker relies on."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np

from monitord.config import CascadeConfig
from monitord.frames import FrameScores
from monitord.windows import Window


class ModelUnavailable(Exception):
    """Weights or processor files cannot be found; the message says where to get them."""


@dataclass(frozen=True, eq=False)
class Scores:
    """One model's verdict on one window."""

    window: Window
    model: str
    """The model's name in the config."""
    model_id: str
    """HF id or local path the weights came from."""
    probabilities: dict[str, float]
    embedding: np.ndarray | None = None
    frames: FrameScores | None = None
    """Frame-level models: the probabilities of every ~20 ms frame of the window, same labels."""

    def top(self, k: int) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]


def adopt_settings(model: object, name: str, config: object) -> None:
    """The settings every model kind carries over from its config entry."""
    model.name = name
    model.batch_max = config.batch_max
    model.batch_wait_ms = config.batch_wait_ms
    model.gated_by = config.gated_by


class Model(Protocol):
    name: str
    model_id: str
    sample_rate: int
    labels: tuple[str, ...]
    batch_max: int
    batch_wait_ms: float
    gated_by: CascadeConfig | None
    """Score only windows where another model's listed labels reached a threshold."""

    def score(self, windows: Sequence[Window]) -> list[Scores]: ...

    def set_labels(self, labels: Sequence[str], prompt: str) -> None: ...
