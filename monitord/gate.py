"""Activity gate: which windows are worth a model's time.

Facts about a window (level, onset, clipping, speech share) are measured once; the
decision is a pure function of those facts and the gate config.

``speech`` mode needs the energy gate and a share of speech frames from a VAD:

- ``silero`` (default): silero-vad's neural model (weights inside its wheel, MIT), 32 ms
  frames at 16 kHz. Measured on real recordings it passes acted speech (best 2 s window
  0.73-0.92 speech frames) and calls engines, rain, applause, trains, tones and noise 0.00.
- ``webrtc``: webrtcvad separates sound from silence, not speech from other sound: measured
  here it calls pure tones, white noise, engines, rain and applause speech in nearly every
  30 ms frame, in all of its modes. Cheap, but only a silence filter.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import numpy as np
import soxr

from monitord.config import GateConfig

FRAME_S = 0.02
VAD_RATE = 16000
VAD_FRAME = 480  # 30 ms at 16 kHz
CLIP_LEVEL = 0.999
DC_LIMIT = 0.01
SILENCE_DBFS = -240.0


@dataclass(frozen=True)
class WindowFacts:
    """What the gate measured (levels in dBFS: 20*log10 of RMS against a full scale of 1.0)."""

    rms_dbfs: float
    peak_frame_dbfs: float
    median_frame_dbfs: float
    clipped_ratio: float
    non_finite: int
    """Samples that were NaN or Inf and were replaced by zero."""
    dc_offset: float
    """Mean removed from the window (0.0 when below DC_LIMIT and left alone)."""
    speech_ratio: float | None = None
    """Share of VAD frames called speech; None when not measured."""

    def to_dict(self) -> dict[str, float | int | None]:
        return {
            "rms_dbfs": round(self.rms_dbfs, 2),
            "peak_frame_dbfs": round(self.peak_frame_dbfs, 2),
            "clipped_ratio": round(self.clipped_ratio, 5),
            "non_finite": self.non_finite,
            "dc_offset": round(self.dc_offset, 5),
            "speech_ratio": None if self.speech_ratio is None else round(self.speech_ratio, 3),
        }


def dbfs(rms: float) -> float:
    return 20.0 * math.log10(rms) if rms > 0 else SILENCE_DBFS


def clean(samples: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Replace NaN/Inf by zero and remove a significant DC offset, in place on a copy we own."""
    finite = np.isfinite(samples)
    non_finite = int(samples.size - np.count_nonzero(finite))
    if non_finite:
        samples = np.where(finite, samples, np.float32(0.0)).astype(np.float32)
    dc = float(samples.mean()) if samples.size else 0.0
    if abs(dc) >= DC_LIMIT:
        samples = samples - np.float32(dc)
    else:
        dc = 0.0
    return samples, non_finite, dc


def measure(samples: np.ndarray, sample_rate: int, non_finite: int = 0, dc_offset: float = 0.0) -> WindowFacts:
    """Level, per-frame level and clipping of a clean mono window."""
    x = samples.astype(np.float64, copy=False)
    rms = float(np.sqrt(np.mean(x * x))) if x.size else 0.0
    frame = max(1, int(sample_rate * FRAME_S))
    n_frames = x.size // frame
    if n_frames:
        frame_rms = np.sqrt(np.mean(x[: n_frames * frame].reshape(n_frames, frame) ** 2, axis=1))
        frame_db = 20.0 * np.log10(np.maximum(frame_rms, 1e-12))
        peak, median = float(frame_db.max()), float(np.median(frame_db))
    else:
        peak = median = dbfs(rms)
    clipped = float(np.count_nonzero(np.abs(x) >= CLIP_LEVEL)) / x.size if x.size else 0.0
    return WindowFacts(dbfs(rms), max(peak, SILENCE_DBFS), max(median, SILENCE_DBFS), clipped, non_finite, dc_offset)


def energy_passes(facts: WindowFacts, gate: GateConfig) -> bool:
    """Loud enough over the window, or one 20 ms frame jumps out of it (a bang)."""
    return facts.rms_dbfs >= gate.threshold_dbfs or is_onset(facts, gate)


def is_onset(facts: WindowFacts, gate: GateConfig) -> bool:
    """One 20 ms frame above the threshold and ``onset_db`` above the window's median frame."""
    return facts.peak_frame_dbfs >= gate.threshold_dbfs and facts.peak_frame_dbfs - facts.median_frame_dbfs >= gate.onset_db


def decide(facts: WindowFacts, gate: GateConfig, since_last_pass_s: float | None = None) -> bool:
    """The gate's verdict; speech mode needs speech_ratio measured, periodic mode the stream time
    since the last window it passed (None: none yet)."""
    if gate.mode == "always":
        return True
    if not energy_passes(facts, gate):
        return False
    if gate.mode == "energy":
        return True
    if gate.mode == "periodic":
        return since_last_pass_s is None or since_last_pass_s >= gate.every_s or is_onset(facts, gate)
    return facts.speech_ratio is not None and facts.speech_ratio >= gate.speech_ratio


class WebrtcSpeechMeter:
    """Share of 30 ms frames at 16 kHz that webrtcvad calls speech."""

    def __init__(self, aggressiveness: int):
        import webrtcvad

        self._vad = webrtcvad.Vad(aggressiveness)

    def __call__(self, samples: np.ndarray, sample_rate: int) -> float:
        audio = samples if sample_rate == VAD_RATE else soxr.resample(samples, sample_rate, VAD_RATE)
        pcm = (np.clip(audio, -1.0, 1.0) * 32767.0).astype("<i2")
        n_frames = pcm.size // VAD_FRAME
        if n_frames == 0:
            return 0.0
        speech = sum(
            self._vad.is_speech(pcm[i * VAD_FRAME : (i + 1) * VAD_FRAME].tobytes(), VAD_RATE) for i in range(n_frames)
        )
        return speech / n_frames


class SileroSpeechMeter:
    """Share of 32 ms frames at 16 kHz that silero-vad scores above ``threshold``."""

    CHUNK = 512

    def __init__(self, threshold: float):
        import torch
        from silero_vad import load_silero_vad

        self._torch = torch
        self._model = load_silero_vad()
        self.threshold = threshold

    def __call__(self, samples: np.ndarray, sample_rate: int) -> float:
        audio = samples if sample_rate == VAD_RATE else soxr.resample(samples, sample_rate, VAD_RATE)
        n_chunks = len(audio) // self.CHUNK
        if n_chunks == 0:
            return 0.0
        chunks = self._torch.from_numpy(np.ascontiguousarray(audio[: n_chunks * self.CHUNK], dtype=np.float32))
        self._model.reset_states()  # each window is judged on its own
        with self._torch.inference_mode():
            probs = [float(self._model(chunk, VAD_RATE)) for chunk in chunks.view(n_chunks, self.CHUNK)]
        return sum(p > self.threshold for p in probs) / n_chunks


def speech_meter(config: GateConfig):
    if config.vad == "silero":
        return SileroSpeechMeter(config.vad_threshold)
    return WebrtcSpeechMeter(config.vad_aggressiveness)


class Gate:
    """Measures a window and decides; one per source (VAD state is not shared across threads)."""

    def __init__(self, config: GateConfig):
        self.config = config
        self._speech = speech_meter(config) if config.mode == "speech" else None
        self._last_pass_t: float | None = None  # periodic mode: stream time of the last window passed
        self.sampled_out = False
        """Whether the last window judged had sound but was skipped by periodic sampling: not quiet,
        just not scored, so alerts should neither start nor end on it."""

    def inspect(self, raw: np.ndarray, sample_rate: int, t: float = 0.0) -> tuple[np.ndarray, WindowFacts, bool]:
        """Clean the window (starting at stream time ``t``), measure it, and say whether it passes."""
        samples, non_finite, dc = clean(raw)
        facts, passed = self.judge(samples, sample_rate, measure(samples, sample_rate, non_finite, dc), t)
        return samples, facts, passed

    def judge(self, samples: np.ndarray, sample_rate: int, facts: WindowFacts, t: float = 0.0) -> tuple[WindowFacts, bool]:
        """This gate's verdict on a cleaned, measured window (measuring speech if it needs to)."""
        if self._speech is not None and facts.speech_ratio is None and energy_passes(facts, self.config):
            facts = replace(facts, speech_ratio=self._speech(samples, sample_rate))
        since = None if self._last_pass_t is None else t - self._last_pass_t
        passed = decide(facts, self.config, since)
        periodic = self.config.mode == "periodic"
        if passed and periodic:
            self._last_pass_t = t
        self.sampled_out = periodic and not passed and energy_passes(facts, self.config)
        return facts, passed

