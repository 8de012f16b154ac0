"""Soak: an hour (or more) of mixed audio through the real daemon, as fast as it goes.

    python bench/soak.py [--hours 1.0] [--model DIR]

Builds the audio (silence, tones, noise, espeak-ng speech, in random stretches), starts
`monitord run --until-done` on it as a file source, samples the daemon's RSS once a second,
and reports events, windows scored and dropped, and RSS at start, after warm-up and at the end.
Without --model it uses the clap-htsat-unfused architecture with random weights (saved to a
temporary folder), so the compute is the real thing.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import soundfile as sf

RATE = 16000


def speech_clips(folder: Path) -> list[np.ndarray]:
    sentences = ["The quick brown fox jumps over the lazy dog.", "Please check the compressor in hall two.",
                 "Someone is at the front door.", "That was an amazing round, well played!"]
    clips = []
    if shutil.which("espeak-ng") is None:
        return clips
    for i, text in enumerate(sentences):
        path = folder / f"speech{i}.wav"
        subprocess.run(["espeak-ng", "-w", str(path), text], check=True)
        data, rate = sf.read(str(path), dtype="float32")
        import soxr

        clips.append(soxr.resample(data, rate, RATE).astype(np.float32))
    return clips


def write_mix(path: Path, seconds: float, clips: list[np.ndarray], seed: int = 0) -> dict[str, float]:
    """Stream the mix to disk in stretches of 1-20 s; returns seconds per kind."""
    rng = np.random.default_rng(seed)
    totals = {"silence": 0.0, "tone": 0.0, "noise": 0.0, "speech": 0.0}
    written = 0
    with sf.SoundFile(str(path), "w", RATE, 1, subtype="PCM_16") as f:
        while written < seconds * RATE:
            kind = rng.choice(list(totals) if clips else ["silence", "tone", "noise"])
            n = int(rng.uniform(1, 20) * RATE)
            t = np.arange(n) / RATE
            if kind == "silence":
                x = np.zeros(n)
            elif kind == "tone":
                x = 0.3 * np.sin(2 * np.pi * rng.uniform(200, 3000) * t)
            elif kind == "noise":
                x = 0.05 * rng.standard_normal(n)
            else:
                x = np.tile(clips[rng.integers(len(clips))], n // 16000 + 2)[:n]
            f.write(x.astype(np.float32))
            written += n
            totals[kind] += n / RATE
    return totals


def save_random_clap(folder: Path) -> Path:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from monitord.bench import build_model

    model, processor = build_model(None, "cpu")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hours", type=float, default=1.0)
    parser.add_argument("--model", help="CLAP checkpoint directory (default: full-size random weights)")
    parser.add_argument("--tiny", action="store_true", help="the tests' tiny CLAP trained on tones vs noise: alerts that mean something")
    args = parser.parse_args()
    import psutil

    with tempfile.TemporaryDirectory() as scratch:
        work = Path(scratch)
        began = time.time()
        totals = write_mix(work / "soak.wav", args.hours * 3600, speech_clips(work))
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
            from tests.tiny_models import build_clap, train_clap

            model = str(train_clap(build_clap(work / "clap")))
        else:
            model = args.model or str(save_random_clap(work / "clap"))
        print(f"audio: {args.hours:g} h ({', '.join(f'{k} {v / 60:.1f} min' for k, v in totals.items())}), built in {time.time() - began:.0f} s")
        (work / "soak.yaml").write_text(f"""
sources: [{{id: soak, file: soak.wav}}]
gate: {{mode: energy, threshold_dbfs: -45}}
window: {{seconds: 2.0, hop_s: 0.5}}
models:
  clap: {{kind: clap, model: {model}, labels: [tone, noise, speech, music, silence]}}
rules:
  - {{id: tone, model: clap, label: tone, threshold: 0.6, release: 0.4}}
  - {{id: noise, model: clap, label: noise, threshold: 0.6, release: 0.4, min_windows: 2, of_windows: 3}}
publish: {{endpoint: "tcp://127.0.0.1:*", event_log: events.jsonl, scores: true}}
""")
        started = time.time()
        log_file = (work / "daemon.log").open("w")  # a file, not a pipe: a full pipe would stall the daemon
        proc = subprocess.Popen([sys.executable, "-m", "monitord", "run", "-c", str(work / "soak.yaml"), "--until-done"],
                                stderr=log_file, text=True)
        ps = psutil.Process(proc.pid)
        samples: list[tuple[float, float]] = []
        while proc.poll() is None:
            try:
                rss = ps.memory_info().rss / 2**20
                if rss > 100:  # the interpreter is up
                    samples.append((time.time() - started, rss))
            except psutil.NoSuchProcess:
                break
            time.sleep(1.0)
        log_file.close()
        err = (work / "daemon.log").read_text()
        elapsed = time.time() - started
        events = [json.loads(line) for line in (work / "events.jsonl").read_text().splitlines()]
    if proc.returncode != 0:
        print(err[-3000:])
        return 1
    alerts = [e for e in events if e["kind"] == "alert"]
    overloads = [e for e in events if e["kind"] == "status" and e["status"] == "overload"]
    seqs = [e["seq"] for e in events]
    loaded = [r for t, r in samples if t > 30] or [r for _, r in samples]
    warm, end = loaded[0], samples[-1][1]
    print(f"daemon: {elapsed:.0f} s for {args.hours:g} h of audio ({args.hours * 3600 / elapsed:.0f}x real time)")
    print(f"events: {len(events)} ({len(alerts)} alerts: {sum(e['phase'] == 'onset' for e in alerts)} onsets), "
          f"seq gapless: {seqs == list(range(1, len(seqs) + 1))}, overload statuses: {len(overloads)}")
    print(f"daemon summary: {scored_line(err)}")
    print(f"RSS: start {samples[0][1]:.0f} MB, after warm-up {warm:.0f} MB, peak {max(r for _, r in samples):.0f} MB, "
          f"end {end:.0f} MB, growth after warm-up {100 * (end - warm) / warm:+.1f} %")
    return 0


def scored_line(err: str) -> str:
    lines = [line for line in err.splitlines() if "stopped:" in line]
    return lines[-1].split("stopped: ", 1)[1] if lines else "(no summary line)"


if __name__ == "__main__":
    sys.exit(main())
