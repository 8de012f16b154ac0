"""Real recordings mixed into a long stream for the benchmarks: each piece at a random peak level
(-24 to -6 dBFS), dry or with a simple reverb (exponentially decaying noise, RT60 0.3 or 0.6 s),
1-4 s apart, over a quiet bed (a background recording at -40 dBFS RMS).

``../shared/audio`` (a folder per kind of sound, WAV files inside) is what the project's own
benchmarks use; the recordings are not shipped with monitord.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from monitord.audio import read_mono, resample, reverb

DEFAULT_AUDIO = Path(__file__).resolve().parents[2].parent / "shared" / "audio"
"""Where the project's recordings are when the repository sits beside ``shared/`` (the workplace, CI)."""


def load_recordings(folder: Path, rate: int) -> dict[str, list[np.ndarray]]:
    """Every ``<kind>/*.wav`` under ``folder``, mono float32 at ``rate``, by kind."""
    out: dict[str, list[np.ndarray]] = {}
    for path in sorted(folder.glob("*/*.wav")):
        samples, file_rate = read_mono(path)
        out.setdefault(path.parent.name, []).append(resample(samples, file_rate, rate).astype(np.float32))
    return out


def placed(x: np.ndarray, rng: np.random.Generator, rate: int) -> np.ndarray:
    """At a random peak level (-24 to -6 dBFS), dry or reverberant."""
    y = reverb(x, float(rng.choice([0.0, 0.3, 0.6])), rng, rate)
    peak = max(float(np.abs(y).max()), 1e-6)
    return (y / peak * 10 ** (rng.uniform(-24, -6) / 20)).astype(np.float32)


@dataclass
class Mix:
    audio: np.ndarray
    events: list[tuple[int, int]]
    """Sample spans of the inserted sounds."""
    rate: int


def mix(pieces: list[np.ndarray], beds: list[np.ndarray], minutes: float, rng: np.random.Generator, rate: int,
        gap_s: tuple[float, float] = (1.0, 4.0)) -> Mix:
    total = int(minutes * 60 * rate)
    audio = np.zeros(total, np.float32)
    bed = np.concatenate([beds[int(rng.integers(len(beds)))] for _ in range(total // min(len(b) for b in beds) + 2)])[:total]
    audio += bed / max(float(np.sqrt(np.mean(bed**2))), 1e-9) * 10 ** (-40 / 20)
    events, at = [], int(rng.uniform(1, 3) * rate)
    while True:
        piece = placed(pieces[int(rng.integers(len(pieces)))], rng, rate)
        if at + len(piece) >= total:
            break
        audio[at : at + len(piece)] += piece
        events.append((at, at + len(piece)))
        at += len(piece) + int(rng.uniform(*gap_s) * rate)
    return Mix(audio, events, rate)
