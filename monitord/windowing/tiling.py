"""Cutting a stream into gated windows: where windows start (one tiling, live and offline alike)
and what a window is once cut (cleaned, measured, judged by every model's gate, resampled)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import numpy as np

from monitord.audio import resample
from monitord.config import GateConfig, WindowConfig
from monitord.types import Verdict, Window, frozen_mapping, read_only
from monitord.windowing.gate import Gate, SpeechMeter, clean, measure, speech_meter


class Tiler:
    """Window starts over a stream that grows: every ``hop`` while a whole window fits, and at the
    end of the stream one final window aligned to its end (or one at 0 for a stream shorter than
    a window), so the last samples are scored. Offline, ``take(total, ended=True)`` gives them all at once."""

    def __init__(self, length: int, hop: int):
        self.length, self.hop = length, hop
        self.next_start = 0
        self.covered = 0
        """End of the last window handed out."""
        self.finished = False

    def take(self, available: int, ended: bool) -> list[int]:
        """The starts that ``available`` samples allow now; with ``ended``, the tail too (once)."""
        starts = []
        while self.next_start + self.length <= available:
            starts.append(self.next_start)
            self.covered = self.next_start + self.length
            self.next_start += self.hop
        if ended and not self.finished:
            self.finished = True
            if available > self.covered:
                starts.append(max(0, available - self.length))
                self.covered = available
        return starts

    def skip_to(self, index: int) -> None:
        """Resume at the first hop-aligned start at or after ``index`` (the reader fell behind)."""
        if index > self.next_start:
            self.next_start = -(-index // self.hop) * self.hop


def window_starts(total: int, length: int, hop: int) -> list[int]:
    """Start indices covering ``total`` samples (see ``Tiler``)."""
    return Tiler(length, hop).take(total, ended=True) if total > 0 else []


def window_count(total: int, length: int, hop: int) -> int:
    """``len(window_starts(total, length, hop))``, worked out without listing them."""
    if total <= 0:
        return 0
    if total <= length:
        return 1
    whole = (total - length) // hop + 1
    return whole + (total > (whole - 1) * hop + length)


@dataclass(frozen=True)
class ModelInput:
    """What the windowing stage needs to know of a model: its rate, and its own gate if it has one."""

    sample_rate: int
    gate: GateConfig | None = None


class WindowCutter:
    """Turns raw samples at a start index into a Window with every model's gate verdict.

    Models without a gate of their own share the source's gate (one verdict, judged once);
    each model gate keeps its own state (periodic sampling) and its own VAD.
    """

    def __init__(self, source: str, sample_rate: int, window: WindowConfig, gate: GateConfig,
                 models: Mapping[str, ModelInput]):
        self.source = source
        self.sample_rate = sample_rate
        self.length = max(1, round(window.seconds * sample_rate))
        self.hop = max(1, round(window.hop_s * sample_rate))
        self.source_gate = Gate(gate)
        self._meters: dict[str, SpeechMeter] = {}
        self._models: tuple[dict[str, ModelInput], dict[str, Gate], dict] = ({}, {}, {})
        self._use(dict(models), {name: Gate(m.gate) for name, m in models.items() if m.gate is not None})

    @property
    def models(self) -> dict[str, ModelInput]:
        return self._models[0]

    @property
    def model_gates(self) -> dict[str, Gate]:
        return self._models[1]

    def _use(self, models: dict[str, ModelInput], gates: dict[str, Gate]) -> None:
        meter_configs = {g.vad: g.config for g in [self.source_gate, *gates.values()] if g.vad}
        self._models = (models, gates, meter_configs)  # one assignment: ``cut`` sees the old three or the new

    def add_model(self, name: str, model: ModelInput) -> None:
        """Judge and resample for one more model from the next window on (one loaded after the start);
        safe from another thread than the one cutting."""
        models, gates, _ = self._models
        gates = {**gates, name: Gate(model.gate)} if model.gate is not None else gates
        self._use({**models, name: model}, gates)

    def remove_model(self, name: str) -> None:
        """Undo ``add_model`` (a model that could not join the pipeline): no verdict, no resampling for
        it from the next window on. Nothing where it was never added."""
        models, gates, _ = self._models
        self._use({k: v for k, v in models.items() if k != name}, {k: v for k, v in gates.items() if k != name})

    def cut(self, raw: np.ndarray, start_index: int, wall_start: float, ready_at: float) -> Window:
        """The window for ``raw`` (padded to full length), judged and resampled for the models that will score it."""
        valid = min(len(raw), self.length)
        if len(raw) < self.length:
            raw = np.pad(raw, (0, self.length - len(raw)))
        samples, non_finite, dc = clean(np.array(raw[: self.length], dtype=np.float32))  # a copy of our own
        facts = measure(samples, self.sample_rate, non_finite, dc)
        t = start_index / self.sample_rate
        models, model_gates, meter_configs = self._models  # read once: a model added meanwhile counts from the next window

        def speech(vad: str) -> float:
            if vad not in self._meters:
                self._meters[vad] = speech_meter(meter_configs[vad])
            return self._meters[vad](samples, self.sample_rate)

        facts, source_verdict = self.source_gate.judge(facts, t, speech)
        gates: dict[str, Verdict] = {}
        for name in models:
            gate = model_gates.get(name)
            if gate is None:
                gates[name] = source_verdict
            else:
                facts, gates[name] = gate.judge(facts, t, speech)
        rates = {m.sample_rate for name, m in models.items() if gates[name] is Verdict.PASSED}
        resampled = {rate: read_only(resample(samples, self.sample_rate, rate)) for rate in rates if rate != self.sample_rate}
        return Window(self.source, start_index, self.sample_rate, read_only(samples), valid, wall_start, ready_at, facts,
                      gates=frozen_mapping(gates), resampled=frozen_mapping(resampled))
