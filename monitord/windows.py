"""Cutting the stream into overlapping windows: one Windower thread per source."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field

import numpy as np
import soxr

from monitord.config import GateConfig, WindowConfig
from monitord.gate import Gate, WindowFacts
from monitord.ringbuffer import Overrun, RingBuffer

log = logging.getLogger(__name__)


@dataclass(frozen=True, eq=False)
class Window:
    """A stretch of one source's sound, gated and ready for the models."""

    source: str
    start_index: int
    """Absolute index of the first sample since the source started."""
    sample_rate: int
    samples: np.ndarray
    """Mono float32 at ``sample_rate``, cleaned (no NaN/Inf, no large DC offset)."""
    valid: int
    """Samples that are real sound; the rest (end of a file) is zero padding."""
    wall_start: float
    """Epoch seconds of the first sample."""
    ready_at: float
    """Epoch seconds when the last sample had arrived: latency is measured from here."""
    facts: WindowFacts
    passed: bool = True
    """Whether any model will score it; windows no gate passes still travel (unscored) so alerts end in order."""
    resampled: dict[int, np.ndarray] = field(default_factory=dict)
    model_passed: dict[str, bool] = field(default_factory=dict)
    """Verdicts of models that have their own gate; the others follow the source's gate."""
    source_passed: bool = True
    sampled_out: frozenset[str] = frozenset()
    """Models ("*" for the source gate) that skipped this sounding window by periodic sampling:
    their rules neither start nor end on it."""
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    """Embeddings models produced for this window (model name -> vector), for models that build on them."""

    @property
    def stream_start(self) -> float:
        return self.start_index / self.sample_rate

    @property
    def stream_end(self) -> float:
        return (self.start_index + self.valid) / self.sample_rate

    def passes(self, model: str) -> bool:
        return self.model_passed.get(model, self.source_passed)

    def unsampled(self, model: str | None) -> bool:
        """Skipped by periodic sampling (for ``model``, or for the source when None): not a quiet window."""
        gate = model if model is not None and model in self.model_passed else "*"
        return gate in self.sampled_out

    def at_rate(self, sample_rate: int) -> np.ndarray:
        """The samples at another rate (soxr, high quality); computed once per rate."""
        if sample_rate == self.sample_rate:
            return self.samples
        cached = self.resampled.get(sample_rate)
        if cached is None:
            cached = resample(self.samples, self.sample_rate, sample_rate)
            self.resampled[sample_rate] = cached
        return cached


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    if from_rate == to_rate:
        return samples
    out = soxr.resample(samples, from_rate, to_rate, quality="HQ")
    expected = round(len(samples) * to_rate / from_rate)
    if len(out) != expected:  # keep every window of one length at one rate
        out = np.pad(out, (0, max(0, expected - len(out))))[:expected]
    return out.astype(np.float32, copy=False)


def window_starts(total: int, length: int, hop: int) -> Iterator[int]:
    """Start indices covering ``total`` samples: every hop, plus one final window aligned to the end.

    A stream shorter than one window gets one window at 0 (padded by the caller).
    """
    if total <= 0:
        return
    if total <= length:
        yield 0
        return
    start = 0
    while start + length <= total:
        yield start
        start += hop
    last = start - hop
    if last + length < total:
        yield total - length


class WindowCutter:
    """Turns raw samples at a start index into a gated Window (shared by live and offline paths)."""

    def __init__(
        self,
        source: str,
        sample_rate: int,
        window: WindowConfig,
        gate: GateConfig,
        model_rates: Iterable[int],
        model_gates: Mapping[str, GateConfig] | None = None,
    ):
        self.source = source
        self.sample_rate = sample_rate
        self.length = max(1, round(window.seconds * sample_rate))
        self.hop = max(1, round(window.hop_s * sample_rate))
        self.gate = Gate(gate)
        self.model_gates = {name: Gate(g) for name, g in (model_gates or {}).items()}
        self.model_rates = tuple(sorted(set(model_rates)))

    def cut(self, raw: np.ndarray, start_index: int, wall_start: float, ready_at: float) -> Window:
        """The window for ``raw`` (padded to full length), with the gates' verdicts."""
        valid = min(len(raw), self.length)
        if len(raw) < self.length:
            raw = np.pad(raw, (0, self.length - len(raw)))
        t = start_index / self.sample_rate
        samples, facts, source_passed = self.gate.inspect(raw[: self.length], self.sample_rate, t)
        sampled_out = {"*"} if self.gate.sampled_out else set()
        model_passed = {}
        for name, gate in self.model_gates.items():
            facts, model_passed[name] = gate.judge(samples, self.sample_rate, facts, t)
            if gate.sampled_out:
                sampled_out.add(name)
        passed = source_passed or any(model_passed.values())
        window = Window(self.source, start_index, self.sample_rate, samples, valid, wall_start, ready_at, facts,
                        passed, model_passed=model_passed, source_passed=source_passed, sampled_out=frozenset(sampled_out))
        if passed:
            for rate in self.model_rates:  # resample here, on the source's thread, not the model worker's
                window.at_rate(rate)
        return window


@dataclass
class WindowerStats:
    cut: int = 0
    passed: int = 0
    overruns: int = 0


class Windower:
    """Reads a source's ring buffer and hands every window, passed or not, to ``sink``.

    ``sink`` decides what happens when the worker is behind (drop or wait); this thread
    only waits on the ring buffer and on ``sink``.
    """

    def __init__(
        self,
        ring: RingBuffer,
        cutter: WindowCutter,
        sink: Callable[[Window], None],
        stop: threading.Event,
        on_finished: Callable[[], None] = lambda: None,
    ):
        self.ring = ring
        self.cutter = cutter
        self.sink = sink
        self.stop_event = stop
        self.on_finished = on_finished
        self.stats = WindowerStats()
        self.crashed = False
        self._thread = threading.Thread(target=self._run, name=f"windower-{cutter.source}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        try:
            self._loop()
        except Exception:
            self.crashed = True
            log.exception("windower for source %s failed", self.cutter.source)
        finally:
            self.on_finished()

    def _loop(self) -> None:
        length, hop = self.cutter.length, self.cutter.hop
        next_start = 0
        last_end = 0  # end of the last window cut, to know whether a final partial window is due
        while not self.stop_event.is_set():
            if not self.ring.wait_for(next_start + length, timeout=0.2):
                if self.ring.closed:
                    break
                continue
            try:
                raw = self.ring.read(next_start, length)
            except Overrun:
                # The producer lapped us (we were stalled): skip to the freshest full window.
                skipped_to = self.ring.written - length
                log.warning("source %s: windows skipped, reader fell behind (%d samples)", self.cutter.source, skipped_to - next_start)
                self.stats.overruns += 1
                next_start = skipped_to - (skipped_to % hop)
                continue
            self._emit(raw, next_start)
            last_end = next_start + length
            next_start += hop
            self.ring.release(next_start)
        if self.ring.closed and not self.stop_event.is_set():
            self._flush_tail(last_end)

    def _flush_tail(self, last_end: int) -> None:
        """At end of stream, one last window aligned to the end so the final samples are scored."""
        total = self.ring.written
        if total <= last_end or total == 0:
            return
        start = max(0, total - self.cutter.length)
        try:
            raw = self.ring.read(start, total - start)
        except Overrun:
            return
        self._emit(raw, start)

    def _emit(self, raw: np.ndarray, start: int) -> None:
        wall_start = self.ring.wall_time(start)
        window = self.cutter.cut(raw, start, wall_start, time.time())
        self.stats.cut += 1
        self.stats.passed += window.passed
        self.sink(window)
