"""What flows between the stages: one module, imported by every stage, importing none of them.

source -> ring -> windowing + gate --Window--> inference --ScoredWindow--> alerts --Event--> output

- ``WindowFacts``: what the gate measured on a window (levels, clipping, speech share per VAD).
- ``Window``: a stretch of one source's sound, with each model's gate ``Verdict``. Immutable: its
  samples are read-only and every mapping is frozen, so it can cross threads freely.
- ``Scores``: one model's probabilities (and embedding) for one window.
- ``Outcome`` / ``ScoredWindow``: what became of a window for each model (scored, quiet, skipped).
- ``Event``: an alert, a status change or a window's scores; the only place the JSON schema lives.
- ``StageState``: what a supervisor reads off every stage.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from enum import Enum
from types import MappingProxyType
from typing import Any

import numpy as np

SCHEMA = "monitord.event/1"
SILENCE_DBFS = -240.0

EMPTY: Mapping[Any, Any] = MappingProxyType({})


def frozen_mapping(data: Mapping[Any, Any] | None) -> Mapping[Any, Any]:
    return MappingProxyType(dict(data)) if data else EMPTY


def read_only(samples: np.ndarray) -> np.ndarray:
    """The array itself, flagged read-only (a window's samples are shared across threads)."""
    samples.flags.writeable = False
    return samples


class Verdict(str, Enum):
    """What became of a window for one model."""

    PASSED = "passed"
    """Its gate passed it; inference turns this into SCORED, CASCADE or FAILED."""
    SCORED = "scored"
    QUIET = "quiet"
    """Its gate found nothing worth scoring (silence, no speech): may end an alert, never start one."""
    SAMPLED_OUT = "sampled_out"
    """Sound, but periodic sampling skipped it: neither starts nor ends an alert."""
    CASCADE = "cascade"
    """The cascade's first model did not hear its labels: may end an alert, never start one."""
    FAILED = "failed"
    """The model raised on it (reported with a model_error status): no evidence either way."""
    UNAVAILABLE = "unavailable"
    """The model could not be reached (remote inference down): no evidence either way."""

    @property
    def ends_alerts(self) -> bool:
        """Whether an unscored window with this verdict counts as "the sound is gone"."""
        return self in (Verdict.QUIET, Verdict.CASCADE)


@dataclass(frozen=True)
class WindowFacts:
    """What the gate measured (levels in dBFS: 20*log10 of RMS against a full scale of 1.0)."""

    rms_dbfs: float
    peak_frame_dbfs: float
    median_frame_dbfs: float
    clipped_ratio: float
    non_finite: int
    """Samples that were NaN, Inf or past ±64 (garbage, not sound) and were replaced by zero."""
    dc_offset: float
    """Mean removed from the window (0.0 when below the limit and left alone)."""
    speech: Mapping[str, float] = field(default_factory=lambda: EMPTY)
    """Share of VAD frames called speech, per VAD that measured it ("silero", "webrtc")."""

    @property
    def speech_ratio(self) -> float | None:
        """silero's share where it measured (it tells speech from other sound), else webrtc's."""
        return self.speech.get("silero", self.speech.get("webrtc"))

    def with_speech(self, vad: str, ratio: float) -> "WindowFacts":
        return replace(self, speech=frozen_mapping({**self.speech, vad: ratio}))

    def to_dict(self) -> dict[str, Any]:
        return {
            "rms_dbfs": round(self.rms_dbfs, 2),
            "peak_frame_dbfs": round(self.peak_frame_dbfs, 2),
            "clipped_ratio": round(self.clipped_ratio, 5),
            "non_finite": self.non_finite,
            "dc_offset": round(self.dc_offset, 5),
            "speech_ratio": None if self.speech_ratio is None else round(self.speech_ratio, 3),
            "speech": {vad: round(r, 3) for vad, r in self.speech.items()},
        }


@dataclass(frozen=True, eq=False)
class Window:
    """A stretch of one source's sound with each model's gate verdict, ready for the models."""

    source: str
    start_index: int
    """Absolute index of the first sample since the source started."""
    sample_rate: int
    samples: np.ndarray
    """Mono float32 at ``sample_rate``, cleaned (no NaN/Inf, no large DC offset); read-only."""
    valid: int
    """Samples that are real sound; the rest (end of a file) is zero padding."""
    wall_start: float
    """Epoch seconds of the first sample."""
    ready_at: float
    """Epoch seconds when the last sample had arrived: latency is measured from here."""
    facts: WindowFacts
    gates: Mapping[str, Verdict] = field(default_factory=lambda: EMPTY)
    """Per model: PASSED, QUIET or SAMPLED_OUT, from the model's own gate or the source's."""
    resampled: Mapping[int, np.ndarray] = field(default_factory=lambda: EMPTY)
    """The samples at the models' rates, computed once by the windowing stage (read-only)."""

    @property
    def stream_start(self) -> float:
        return self.start_index / self.sample_rate

    @property
    def stream_end(self) -> float:
        return (self.start_index + self.valid) / self.sample_rate

    @property
    def passed(self) -> bool:
        """Whether any model will be asked to score it."""
        return any(v is Verdict.PASSED for v in self.gates.values())

    def passes(self, model: str) -> bool:
        return self.gates.get(model) is Verdict.PASSED

    def at_rate(self, sample_rate: int) -> np.ndarray:
        """The samples at another rate: precomputed where the windowing stage knew the rate."""
        if sample_rate == self.sample_rate:
            return self.samples
        cached = self.resampled.get(sample_rate)
        if cached is not None:
            return cached
        from monitord.audio import resample

        return read_only(resample(self.samples, self.sample_rate, sample_rate))


@dataclass(frozen=True, eq=False)
class FrameScores:
    """The frames of one window: probabilities over the model's labels (columns in its label order)."""

    start_s: float
    """Stream time of the first frame's centre (the centre of its convolutional receptive field)."""
    hop_s: float
    """Seconds between frames: the product of the encoder's conv strides over its sample rate (0.02)."""
    values: np.ndarray
    """(n_frames, n_labels) float32; each row sums to 1."""

    def __len__(self) -> int:
        return len(self.values)

    @property
    def times(self) -> np.ndarray:
        """Stream time of each frame's centre (float64)."""
        return self.start_s + self.hop_s * np.arange(len(self.values), dtype=np.float64)


@dataclass(frozen=True, eq=False)
class Scores:
    """One model's verdict on one window."""

    window: Window
    model: str
    """The model's name in the config."""
    model_id: str
    """HF id or local path the weights came from."""
    probabilities: Mapping[str, float]
    embedding: np.ndarray | None = None
    frames: FrameScores | None = None
    """Frame-level models: the probabilities of every ~20 ms frame of the window, same labels."""

    def top(self, k: int) -> list[tuple[str, float]]:
        return sorted(self.probabilities.items(), key=lambda kv: -kv[1])[:k]


@dataclass(frozen=True, eq=False)
class Outcome:
    """What became of one window for one model."""

    model: str
    verdict: Verdict
    scores: Scores | None = None
    """Set when ``verdict`` is SCORED."""


@dataclass(frozen=True, eq=False)
class ScoredWindow:
    """A window and what became of it for some of the models (all of them, for local inference)."""

    window: Window
    outcomes: tuple[Outcome, ...]

    def scores(self) -> dict[str, Scores]:
        return {o.model: o.scores for o in self.outcomes if o.scores is not None}

    def verdict(self, model: str) -> Verdict | None:
        return next((o.verdict for o in self.outcomes if o.model == model), None)


@dataclass(frozen=True)
class StreamEnd:
    """A source's stream has ended (a file read to its end, a source stopped): it follows the
    source's last window through the queues, so alerts still open on it end, in order."""

    source: str
    stream_time: float
    """Seconds of stream covered by the source's windows."""


@dataclass(frozen=True)
class RulesChange:
    """New rules from a reload, taking effect right after the windows scored with the old labels:
    the inference stage puts it between two batches, the alerts stage applies it and hands it on
    to the output stage, whose sinks follow (MQTT discovery, notification rules)."""

    rules: tuple[Any, ...]
    """The new ``RuleConfig``s."""


@dataclass(frozen=True, eq=False)
class Publication:
    """An event on its way to the output stage."""

    event: Event
    ready_at: float | None = None
    """When the window's last sample arrived (latency is measured from here)."""
    logged: bool = True
    """Logged events get a seq and land in the event log first; score streams are neither (they may be lost)."""
    broadcast: bool = True
    """Sent to subscribers; False: only the dashboard sees it (scores nobody asked to publish)."""
    clip_span: tuple[int, int] | None = None
    """Onset alerts: the window's sample span in its source's ring, for a clip around it."""


class StageState(str, Enum):
    STARTING = "starting"
    RUNNING = "running"
    DEGRADED = "degraded"
    """Working, but not fully (a source waiting for its device, a model moved to the CPU)."""
    FAILED = "failed"
    STOPPED = "stopped"


def iso_utc(epoch_s: float) -> str:
    """Epoch seconds as ``2026-11-22T02:31:07.512Z``."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Event:
    """An alert transition (kind "alert"), a status change (kind "status"), or one window's scores
    (kind "scores": published only with ``publish.scores``, never logged, no seq).

    A frame-level model's frames ride in ``extra["frames"]`` (``hop_s``, ``labels``, ``times``,
    ``values``), each frame in exactly one event: the score event of the window that made it final,
    or, where that window was not scored or the stream ended, a kind "frames" event (no alert, no
    scores; stream_start/stream_end its first and last frame) on the same ``scores.`` topic.

    ``seq`` and ``id`` are assigned by the output stage, so they are 0/"" until published.
    ``time`` is the wall-clock time of the window's first sample for alerts, and the time of
    the change for status events. ``latency_ms`` runs from the window's last sample to publishing.
    """

    kind: str
    source: str
    time: str
    host: str
    seq: int = 0
    id: str = ""
    rule: str | None = None
    label: str | None = None
    phase: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    model: str | None = None
    """The model's id (HF id or path)."""
    model_name: str | None = None
    """The model's name in the config."""
    stream_start: float | None = None
    stream_end: float | None = None
    latency_ms: float | None = None
    clip: str | None = None
    status: str | None = None
    """Status events: up, down, eof, error, overload, model_error, stage_failed, reload_failed, ..."""
    detail: str | None = None
    facts: dict[str, Any] | None = None
    """Alert events: what the gate measured on the window (level, clipping, speech share)."""
    schema: str = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def topic(self) -> str:
        if self.kind == "alert":
            return f"alert.{self.source}.{self.rule}"
        if self.kind in ("scores", "frames"):  # a model's frames are one stream, whichever event carries them
            return f"scores.{self.source}.{self.model_name}"
        return f"{self.kind}.{self.source}"

    def with_sequence(self, seq: int, event_id: str, latency_ms: float | None) -> "Event":
        return replace(self, seq=seq, id=event_id, latency_ms=latency_ms)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        ordered = {"schema": data.pop("schema"), "seq": data.pop("seq"), "id": data.pop("id"), "kind": data.pop("kind")}
        ordered.update(data)
        ordered.update(extra)
        return ordered

    def to_json(self) -> str:
        """Compact JSON that encodes as UTF-8; a non-finite number anywhere becomes null (JSON has no NaN)."""
        data = self.to_dict()
        try:
            text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        except ValueError:
            data = _finite(data)
            text = json.dumps(data, separators=(",", ":"), ensure_ascii=False, allow_nan=False)
        try:
            text.encode()
        except UnicodeEncodeError:
            # a lone surrogate (a file name's undecodable bytes, as Python keeps them) cannot be
            # UTF-8: escaped, it can (an event that cannot be written would stop the output stage for good)
            text = json.dumps(data, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
        return text

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Event":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} event: schema={data.get('schema')!r}")
        return cls(**{k: v for k, v in data.items() if k in known}, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def from_json(cls, text: str | bytes) -> "Event":
        return cls.from_dict(json.loads(text))


def _finite(value: Any) -> Any:
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value

