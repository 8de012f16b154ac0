"""Speech share per clip for both speech gates, on real recordings (../shared/audio by default).

    python bench/gates.py [AUDIO_DIR]

For each clip: the best 2 s window's share of frames each VAD calls speech (0.5 s hop).
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import soundfile as sf

from monitord.config import GateConfig
from monitord.windowing.gate import speech_meter
from monitord.audio import resample
from monitord.windowing.tiling import window_starts

RATE = 16000


def best_ratio(meter, audio: np.ndarray) -> float:
    return max(meter(audio[s : s + 2 * RATE], RATE) for s in window_starts(len(audio), 2 * RATE, RATE // 2))


def main() -> None:
    folder = Path(sys.argv[1]) if len(sys.argv) > 1 else Path(__file__).resolve().parents[2] / "shared" / "audio"
    meters = {
        "webrtc-2": speech_meter(GateConfig(vad="webrtc", vad_aggressiveness=2)),
        "webrtc-3": speech_meter(GateConfig(vad="webrtc", vad_aggressiveness=3)),
        "silero": speech_meter(GateConfig(vad="silero")),
    }
    rows = []
    for clip in sorted(folder.glob("*/*.wav")):
        data, rate = sf.read(str(clip), dtype="float32", always_2d=True)
        audio = resample(data.mean(axis=1), rate, RATE)
        rows.append((clip.parent.name, {name: best_ratio(m, audio) for name, m in meters.items()}))
    print(f"{'clip':<18}" + "".join(f"{n:>10}" for n in meters))
    for name, ratios in rows:
        print(f"{name:<18}" + "".join(f"{ratios[n]:>10.2f}" for n in meters))
    for group, members in (("speech", [r for n, r in rows if n.startswith("speech_")]), ("non-speech", [r for n, r in rows if not n.startswith("speech_")])):
        summary = "  ".join(f"{n}: {min(r[n] for r in members):.2f}-{max(r[n] for r in members):.2f} (median {np.median([r[n] for r in members]):.2f})" for n in meters)
        print(f"{group} ({len(members)} clips): {summary}")


if __name__ == "__main__":
    main()
