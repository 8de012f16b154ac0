"""Small audio helpers every stage shares: mono mix-down, resampling, reading a file, and a room's
reverberation for the sounds the references and benchmarks place in one."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import soxr


MIN_SAMPLE_RATE = 8_000
MAX_SAMPLE_RATE = 384_000
"""The sample rates monitord takes from any source (a device, a file, an upload): a header that
claims more would size rings and windows by its claim."""
MAX_CHANNELS = 256


class AudioFileError(Exception):
    """The file cannot be decoded as audio."""


def check_format(rate: int, channels: int, name: str) -> None:
    """AudioFileError naming ``name`` where a file's rate or channel count is outside what monitord takes."""
    if not MIN_SAMPLE_RATE <= rate <= MAX_SAMPLE_RATE:
        raise AudioFileError(f"{name}: sample rate {rate} Hz is outside {MIN_SAMPLE_RATE}-{MAX_SAMPLE_RATE} Hz")
    if not 1 <= channels <= MAX_CHANNELS:
        raise AudioFileError(f"{name}: {channels} channels (at most {MAX_CHANNELS})")


def audio_file_info(path: str | Path):
    """soundfile's info on an audio file monitord can read as a source; AudioFileError naming the file
    where it cannot be read, holds a rate or channel count outside what monitord takes, or no samples."""
    import soundfile as sf

    try:
        info = sf.info(str(path))
    except (RuntimeError, sf.LibsndfileError) as exc:
        raise AudioFileError(f"cannot read audio file {path}: {exc}") from None
    check_format(int(info.samplerate), int(info.channels), f"audio file {path}")
    if info.frames == 0:
        raise AudioFileError(f"audio file {path} holds no samples")
    return info


def to_mono(frames: np.ndarray, out: np.ndarray | None = None) -> np.ndarray:
    """(frames, channels) -> (frames,) float32, the mean of the channels; a 1-D input is returned as it is.

    With ``out`` (float32, at least ``len(frames)`` long) nothing is allocated: the capture
    callback's path. One channel gives a view of the input, not a copy.
    """
    if frames.ndim == 1:
        return frames
    if frames.shape[1] == 1:
        return frames[:, 0]  # a view: whoever keeps it copies it (the ring buffer does)
    if out is None:
        return frames.mean(axis=1, dtype=np.float32)
    target = out[: frames.shape[0]]
    np.mean(frames, axis=1, out=target)
    return target


def resample(samples: np.ndarray, from_rate: int, to_rate: int) -> np.ndarray:
    """soxr, high quality; the length is always round(len * to / from), so every window of one
    length has one length at the new rate."""
    if from_rate == to_rate:
        return samples
    out = soxr.resample(samples, from_rate, to_rate, quality="HQ")
    expected = round(len(samples) * to_rate / from_rate)
    if len(out) != expected:
        out = np.pad(out, (0, max(0, expected - len(out))))[:expected]
    return out.astype(np.float32, copy=False)


def read_mono(source: Path | bytes, max_seconds: float | None = None) -> tuple[np.ndarray, int]:
    """A whole file (a path, or its bytes), or its first ``max_seconds``, as mono float32 and its
    sample rate; AudioFileError if unreadable."""
    import soundfile as sf

    name = "the upload" if isinstance(source, bytes) else str(source)
    chunks = []
    try:
        with sf.SoundFile(io.BytesIO(source) if isinstance(source, bytes) else str(source)) as f:
            check_format(int(f.samplerate), int(f.channels), name)
            rate = int(f.samplerate)
            left = math.inf if max_seconds is None else math.ceil(max_seconds * rate)
            # read until a read gives nothing, not for as long as the header says: a damaged header
            # can claim days of audio (a 13 KB MP3 claiming 29 days asked for 4.5 TiB at once)
            while left > 0 and len(chunk := f.read(int(min(left, READ_BLOCK)), dtype="float32", always_2d=True)):
                chunks.append(to_mono(chunk))
                left -= len(chunk)
    except (RuntimeError, sf.LibsndfileError, TypeError) as exc:
        raise AudioFileError(f"cannot read audio file {name}: {exc}") from None
    except MemoryError:
        raise AudioFileError(f"audio file {name} is too long to hold in memory "
                             f"({sum(map(len, chunks)) / rate / 3600:.1f} h read so far)") from None
    if not chunks:
        raise AudioFileError(f"audio file {name} holds no samples")
    return np.ascontiguousarray(np.concatenate(chunks), dtype=np.float32), rate


READ_BLOCK = 1 << 20
"""Frames ``read_mono`` decodes at a time (22 s at 48 kHz)."""



def reverb(x: np.ndarray, rt60: float, rng: np.random.Generator, rate: int) -> np.ndarray:
    """``x`` heard in a room: convolved with exponentially decaying noise that falls 60 dB in ``rt60``
    seconds (the direct sound kept at the start), at the same energy; ``rt60`` 0 is the dry sound."""
    if rt60 <= 0:
        return x
    n = int(rt60 * rate)
    ir = rng.standard_normal(n) * np.exp(-6.9 * np.arange(n) / n)  # -60 dB at rt60
    ir[0] = 1.0
    ir /= np.sqrt(np.sum(ir**2))
    size = len(x) + n - 1
    y = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), size)[: len(x)]
    return y.astype(np.float32)


def pink_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` samples of pink (1/f) noise at unit RMS."""
    spectrum = np.fft.rfft(rng.standard_normal(n))
    spectrum /= np.sqrt(np.maximum(np.arange(len(spectrum)), 1.0))
    y = np.fft.irfft(spectrum, n)
    return (y / max(float(np.sqrt(np.mean(y**2))), 1e-12)).astype(np.float32)
