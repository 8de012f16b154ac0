"""Activity gate: which windows are worth a model's time.

Facts about a window (level, onset, clipping, speech share) are measured once per window; each
gate's decision is a pure function of those facts and its config.

``speech`` mode needs the energy gate and a share of speech frames from the gate's own VAD:

- ``silero`` (default): silero-vad's neural model (weights inside its wheel, MIT), 32 ms
  frames at 16 kHz. Measured on real recordings it passes acted speech (best 2 s window
  0.73-0.92 speech frames) and calls engines, rain, applause, trains, tones and noise 0.00.
- ``webrtc``: webrtcvad separates sound from silence, not speech from other sound: measured
  here it calls pure tones, white noise, engines, rain and applause speech in nearly every
  30 ms frame, in all of its modes. Cheap, but only a silence filter.

Every gate measures with its own VAD: a model gated on silero never reuses a webrtc share that
another gate measured on the same window. Measurements are shared per VAD (kind and setting)
within one window, so two gates on silero cost one silero pass.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np

from monitord.audio import resample
from monitord.config import GateConfig
from monitord.types import SILENCE_DBFS, Verdict, WindowFacts

FRAME_S = 0.02
VAD_RATE = 16000
VAD_FRAME = 480  # 30 ms at 16 kHz
CLIP_LEVEL = 0.999
DC_LIMIT = 0.01
"""An offset this large is taken out of what the models get; levels are always measured without it."""
GARBAGE_LEVEL = 64.0
"""A float sample past this (36 dB over full scale) is no sound: a corrupt or mislabelled float file's
random bits reach 3e38, overflow every sum (a level of +745 dBFS that passed the gate) and reached
the models as Inf and NaN after resampling."""


def dbfs(rms: float) -> float:
    return 20.0 * math.log10(rms) if rms > 0 else SILENCE_DBFS


def clean(samples: np.ndarray) -> tuple[np.ndarray, int, float]:
    """Replace NaN, Inf and samples past ±GARBAGE_LEVEL by zero, and remove a significant DC offset,
    on a copy when anything changes."""
    sound = np.abs(samples) <= GARBAGE_LEVEL  # False for NaN too
    non_finite = int(samples.size - np.count_nonzero(sound))
    if non_finite:
        samples = np.where(sound, samples, np.float32(0.0)).astype(np.float32)
    dc = float(samples.mean(dtype=np.float64)) if samples.size else 0.0
    if abs(dc) >= DC_LIMIT:
        samples = samples - np.float32(dc)
    else:
        dc = 0.0
    return samples, non_finite, dc


def measure(samples: np.ndarray, sample_rate: int, non_finite: int = 0, dc_offset: float = 0.0) -> WindowFacts:
    """Level, per-frame level and clipping of a clean mono window. Levels leave its mean out: a
    converter's offset under DC_LIMIT is no sound (silence at 0.009 measured -41 dBFS and passed a
    -50 dBFS gate, while 0.01, taken out, measured quiet)."""
    raw = samples.astype(np.float64, copy=False)
    x = raw - raw.mean() if raw.size else raw
    rms = float(np.sqrt(np.mean(x * x))) if x.size else 0.0
    frame = max(1, int(sample_rate * FRAME_S))
    n_frames = x.size // frame
    if n_frames:
        frame_rms = np.sqrt(np.mean(x[: n_frames * frame].reshape(n_frames, frame) ** 2, axis=1))
        frame_db = 20.0 * np.log10(np.maximum(frame_rms, 1e-12))
        peak, median = float(frame_db.max()), float(np.median(frame_db))
    else:
        peak = median = dbfs(rms)
    clipped = float(np.count_nonzero(np.abs(raw) >= CLIP_LEVEL)) / raw.size if raw.size else 0.0
    return WindowFacts(dbfs(rms), max(peak, SILENCE_DBFS), max(median, SILENCE_DBFS), clipped, non_finite, dc_offset)


def energy_passes(facts: WindowFacts, gate: GateConfig) -> bool:
    """Loud enough over the window, or one 20 ms frame jumps out of it (a bang)."""
    return facts.rms_dbfs >= gate.threshold_dbfs or is_onset(facts, gate)


def is_onset(facts: WindowFacts, gate: GateConfig) -> bool:
    """One 20 ms frame above the threshold and ``onset_db`` above the window's median frame."""
    return facts.peak_frame_dbfs >= gate.threshold_dbfs and facts.peak_frame_dbfs - facts.median_frame_dbfs >= gate.onset_db


def decide(facts: WindowFacts, gate: GateConfig, speech_ratio: float | None = None,
           since_last_pass_s: float | None = None) -> Verdict:
    """The gate's verdict: PASSED, QUIET, or (periodic mode) SAMPLED_OUT.

    Speech mode needs ``speech_ratio`` from the gate's own VAD; periodic mode the stream time
    since the last window it passed (None: none yet)."""
    if gate.mode == "always":
        return Verdict.PASSED
    if not energy_passes(facts, gate):
        return Verdict.QUIET
    if gate.mode == "energy":
        return Verdict.PASSED
    if gate.mode == "periodic":
        due = since_last_pass_s is None or since_last_pass_s >= gate.every_s or is_onset(facts, gate)
        return Verdict.PASSED if due else Verdict.SAMPLED_OUT
    return Verdict.PASSED if speech_ratio is not None and speech_ratio >= gate.speech_ratio else Verdict.QUIET


def vad_key(gate: GateConfig) -> str:
    """The name a VAD's measurement goes by in a window's facts: its kind, and its setting when not the default."""
    if gate.vad == "silero":
        return "silero" if gate.vad_threshold == 0.5 else f"silero:{gate.vad_threshold:g}"
    return "webrtc" if gate.vad_aggressiveness == 2 else f"webrtc:{gate.vad_aggressiveness}"


class WebrtcSpeechMeter:
    """Share of 30 ms frames at 16 kHz that webrtcvad calls speech."""

    def __init__(self, aggressiveness: int):
        import webrtcvad

        self._vad = webrtcvad.Vad(aggressiveness)

    def __call__(self, samples: np.ndarray, sample_rate: int) -> float:
        audio = resample(samples, sample_rate, VAD_RATE)
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
        audio = resample(samples, sample_rate, VAD_RATE)
        n_chunks = len(audio) // self.CHUNK
        if n_chunks == 0:
            return 0.0
        chunks = self._torch.from_numpy(np.array(audio[: n_chunks * self.CHUNK], dtype=np.float32))
        self._model.reset_states()  # each window is judged on its own
        with self._torch.inference_mode():
            probs = [float(self._model(chunk, VAD_RATE)) for chunk in chunks.view(n_chunks, self.CHUNK)]
        return sum(p > self.threshold for p in probs) / n_chunks


SpeechMeter = Callable[[np.ndarray, int], float]


def speech_meter(config: GateConfig) -> SpeechMeter:
    if config.vad == "silero":
        return SileroSpeechMeter(config.vad_threshold)
    return WebrtcSpeechMeter(config.vad_aggressiveness)


class Gate:
    """One gate's state (periodic sampling) and its verdict on measured windows.

    Not thread-safe: one per source and gate, used by that source's windowing thread.
    """

    def __init__(self, config: GateConfig):
        self.config = config
        self.vad = vad_key(config) if config.mode == "speech" else None
        self._last_pass_t: float | None = None  # periodic mode: stream time of the last window passed

    def judge(self, facts: WindowFacts, t: float, speech: Callable[[str], float]) -> tuple[WindowFacts, Verdict]:
        """The verdict on a window starting at stream time ``t``; ``speech(vad)`` measures (or
        recalls) this gate's VAD share when the window is loud enough to need it."""
        ratio = None
        if self.vad is not None and energy_passes(facts, self.config):
            if self.vad not in facts.speech:
                facts = facts.with_speech(self.vad, speech(self.vad))
            ratio = facts.speech[self.vad]
        since = None if self._last_pass_t is None else t - self._last_pass_t
        verdict = decide(facts, self.config, ratio, since)
        if verdict is Verdict.PASSED and self.config.mode == "periodic":
            self._last_pass_t = t
        return facts, verdict


def inspect(raw: np.ndarray, sample_rate: int, config: GateConfig, meters: dict[str, SpeechMeter] | None = None,
            gate: Gate | None = None, t: float = 0.0) -> tuple[np.ndarray, WindowFacts, Verdict]:
    """Clean, measure and judge one window with one gate (for tests and one-off checks)."""
    samples, non_finite, dc = clean(raw)
    facts = measure(samples, sample_rate, non_finite, dc)
    meters = {} if meters is None else meters
    gate = gate or Gate(config)

    def speech(vad: str) -> float:
        if vad not in meters:
            meters[vad] = speech_meter(config)
        return meters[vad](samples, sample_rate)

    facts, verdict = gate.judge(facts, t, speech)
    return samples, facts, verdict
