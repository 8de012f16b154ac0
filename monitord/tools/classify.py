"""Offline scoring of files through the daemon's own windowing, gates and inference (``monitord classify``)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitord.audio import AudioFileError, audio_file_info, read_mono
from monitord.config import Config
from monitord.inference.build import model_inputs
from monitord.inference.models import Model
from monitord.inference.scoring import Scorer
from monitord.types import FrameScores, ScoredWindow, Verdict, Window
from monitord.windowing.tiling import WindowCutter, window_count, window_starts

__all__ = ["AudioFileError", "WindowResult", "audio_files", "classify_file", "classify_samples", "count_windows", "read_mono"]


@dataclass(frozen=True, eq=False)
class WindowResult:
    """One window of a file and what each model made of it."""

    scored: ScoredWindow

    @property
    def window(self) -> Window:
        return self.scored.window

    @property
    def passed(self) -> bool:
        return self.scored.window.passed

    @property
    def scores(self) -> dict[str, dict[str, float]]:
        """model name -> label -> probability, for the models that scored the window."""
        return {name: dict(s.probabilities) for name, s in self.scored.scores().items()}

    @property
    def frames(self) -> dict[str, FrameScores]:
        """Frame-level models: the window's frames (model name -> FrameScores)."""
        return {name: s.frames for name, s in self.scored.scores().items() if s.frames is not None}

    @property
    def embeddings(self) -> dict[str, np.ndarray]:
        return {name: s.embedding for name, s in self.scored.scores().items() if s.embedding is not None}

    def verdicts(self) -> dict[str, str]:
        return {o.model: o.verdict.value for o in self.scored.outcomes}

    def to_dict(self) -> dict[str, Any]:
        w = self.window
        return {
            "source": w.source,
            "stream_start": round(w.stream_start, 6),
            "stream_end": round(w.stream_end, 6),
            "gate": {"passed": self.passed, **w.facts.to_dict()},
            "verdicts": self.verdicts(),
            "scores": {m: {k: round(v, 6) for k, v in p.items()} for m, p in self.scores.items()},
        }

    def to_text(self, top: int) -> str:
        w = self.window
        head = f"{w.stream_start:8.2f}-{w.stream_end:8.2f}s"
        scores = self.scores
        if not scores:
            why = ", ".join(sorted({v for v in self.verdicts().values() if v != Verdict.SCORED.value}))
            return f"{head}  (not scored: {why}; {w.facts.rms_dbfs:.1f} dBFS)"
        parts = []
        for model, probs in scores.items():
            best = sorted(probs.items(), key=lambda kv: -kv[1])[:top]
            labels = "  ".join(f"{label} {p:.3f}" for label, p in best)
            parts.append(f"[{model}] {labels}" if len(scores) > 1 else labels)
        return f"{head}  " + "  ".join(parts)


def count_windows(path: Path, config: Config) -> tuple[int, float]:
    """How many windows a file gives, and its duration in seconds, as its header says (a damaged
    one can say more than the file holds: the file is read until it ends, not for this long)."""
    info = audio_file_info(path)
    length, hop = round(config.window.seconds * info.samplerate), round(config.window.hop_s * info.samplerate)
    return window_count(info.frames, length, hop), info.frames / info.samplerate


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


class ModelFailed(AudioFileError):
    """A model failed on a window of the file (offline there is no dropping it quietly)."""


def classify_file(path: Path, config: Config, models: Mapping[str, Model]) -> Iterator[WindowResult]:
    """One WindowResult per window of the file, in order; windows no model scored included.

    Windows go through the daemon's own cutter (gates, resampling) and scorer (batching, cascades)."""
    samples, rate = read_mono(path)
    yield from classify_samples(samples, rate, path.stem, config, models)


def classify_samples(samples: np.ndarray, rate: int, source: str, config: Config,
                     models: Mapping[str, Model]) -> Iterator[WindowResult]:
    """``classify_file`` on audio already in memory (mono float32 at ``rate``)."""
    cutter = WindowCutter(source, rate, config.window, config.gate, model_inputs(config, models))

    def failed(source: str, status: str, detail: str) -> None:
        raise ModelFailed(detail)

    scorer = Scorer(list(models.values()), status=failed)
    pending: list[Window] = []
    for start in window_starts(len(samples), cutter.length, cutter.hop):
        pending.append(cutter.cut(samples[start : start + cutter.length], start, start / rate, (start + cutter.length) / rate))
        if sum(w.passed for w in pending) >= scorer.batch_max:
            yield from (WindowResult(s) for s in scorer.process(pending))
            pending = []
    yield from (WindowResult(s) for s in scorer.process(pending))
