"""Offline scoring of a file through the same gate, windows and models as the daemon."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from monitord.config import Config
from monitord.frames import FrameScores
from monitord.models import Model, Scores
from monitord.windowqueue import WindowQueue
from monitord.windows import Window, WindowCutter, window_starts
from monitord.worker import ModelWorker


class AudioFileError(Exception):
    """The file cannot be decoded as audio."""


def read_mono(path: Path) -> tuple[np.ndarray, int]:
    """The whole file as mono float32 and its sample rate."""
    import soundfile as sf

    try:
        data, rate = sf.read(str(path), dtype="float32", always_2d=True)
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise AudioFileError(f"cannot read audio file {path}: {exc}") from None
    if data.shape[0] == 0:
        raise AudioFileError(f"audio file {path} holds no samples")
    mono = data[:, 0] if data.shape[1] == 1 else data.mean(axis=1, dtype=np.float32)
    return np.ascontiguousarray(mono), int(rate)


@dataclass(frozen=True)
class WindowResult:
    window: Window
    passed: bool
    scores: dict[str, dict[str, float]]
    """model name -> label -> probability (empty when the gate rejected the window)."""
    embeddings: dict[str, np.ndarray] = field(default_factory=dict)
    frames: dict[str, FrameScores] = field(default_factory=dict)
    """Frame-level models: the window's frames (model name -> FrameScores)."""

    def to_dict(self) -> dict[str, Any]:
        w = self.window
        return {
            "source": w.source,
            "stream_start": round(w.stream_start, 6),
            "stream_end": round(w.stream_end, 6),
            "gate": {"passed": self.passed, **w.facts.to_dict()},
            "scores": {m: {k: round(v, 6) for k, v in p.items()} for m, p in self.scores.items()},
        }

    def to_text(self, top: int) -> str:
        w = self.window
        head = f"{w.stream_start:8.2f}-{w.stream_end:8.2f}s"
        if not self.passed:
            return f"{head}  (gated out: {w.facts.rms_dbfs:.1f} dBFS)"
        parts = []
        for model, probs in self.scores.items():
            best = sorted(probs.items(), key=lambda kv: -kv[1])[:top]
            labels = "  ".join(f"{label} {p:.3f}" for label, p in best)
            parts.append(f"[{model}] {labels}" if len(self.scores) > 1 else labels)
        return f"{head}  " + "  ".join(parts)


def count_windows(path: Path, config: Config) -> tuple[int, float]:
    """How many windows a file gives, and its duration in seconds (from the header)."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise AudioFileError(f"cannot read audio file {path}: {exc}") from None
    length, hop = round(config.window.seconds * info.samplerate), round(config.window.hop_s * info.samplerate)
    return sum(1 for _ in window_starts(info.frames, length, hop)), info.frames / info.samplerate


def audio_files(paths: list[Path]) -> list[Path]:
    """Files as given, and the audio files inside given folders (sorted)."""
    import soundfile as sf

    known = {f".{ext.lower()}" for ext in sf.available_formats()} | {".mp3", ".oga", ".opus"}
    out: list[Path] = []
    for path in paths:
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in known)
        else:
            out.append(path)
    return out


def classify_file(path: Path, config: Config, models: Mapping[str, Model]) -> Iterator[WindowResult]:
    """One WindowResult per window of the file, in order; gated-out windows included.

    Windows go through the daemon's own cutter (gate, resampling) and worker (batching, cascades).
    """
    samples, rate = read_mono(path)
    cutter = WindowCutter(path.stem, rate, config.window, config.gate, {m.sample_rate for m in models.values()}, config.model_gates())
    scored: dict[int, dict[str, Scores]] = {}

    def keep(scores: Scores) -> None:
        scored.setdefault(id(scores.window), {})[scores.model] = scores

    def failed(model: Model, windows: list[Window], status: str, detail: str) -> None:
        raise AudioFileError(detail)

    worker = ModelWorker(WindowQueue(1), list(models.values()), keep, failed)
    pending: list[Window] = []

    def flush() -> Iterator[WindowResult]:
        worker.process(pending)
        for window in pending:
            by_model = scored.pop(id(window), {})
            yield WindowResult(window, window.passed, {m: s.probabilities for m, s in by_model.items()},
                               {m: s.embedding for m, s in by_model.items() if s.embedding is not None},
                               {m: s.frames for m, s in by_model.items() if s.frames is not None})
        pending.clear()

    for start in window_starts(len(samples), cutter.length, cutter.hop):
        pending.append(cutter.cut(samples[start : start + cutter.length], start, start / rate, (start + cutter.length) / rate))
        if sum(w.passed for w in pending) >= worker.batch_max:
            yield from flush()
    yield from flush()
