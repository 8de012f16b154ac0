"""``monitord bench``: the CLAP path measured against transformers' pipeline, side by side, in one run.

On the same 2 s windows, same model, same machine:
  1. pipeline("zero-shot-audio-classification"), one window per call (what the seed dashboards do);
  2. the bare batched audio-encoder forward on precomputed features (the limit);
  3. monitord's own path, window -> queue -> worker (features, batching) -> alert engine -> published event.
Full-size architecture with random weights unless --model is given: compute does not depend on
weight values. It reports; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import gc
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from monitord.config import ClapModelConfig, Config, PublishConfig, RuleConfig, SourceConfig
from monitord.sources.device import BlockWriter
from monitord.sources.ring import RingBuffer
from monitord.types import Event, Verdict, Window, WindowFacts, frozen_mapping

log = logging.getLogger(__name__)

RATE = 48000
LABELS = ("glass breaking", "dog barking", "speech", "music")


def make_windows(n: int, seed: int = 0) -> list[Window]:
    """Varied 2 s windows at 48 kHz: tones, noise, tone bursts, chirps."""
    rng = np.random.default_rng(seed)
    t = np.arange(2 * RATE) / RATE
    facts = WindowFacts(-20.0, -10.0, -25.0, 0.0, 0, 0.0)
    windows = []
    for i in range(n):
        kind = i % 4
        if kind == 0:
            x = 0.3 * np.sin(2 * np.pi * rng.uniform(100, 4000) * t)
        elif kind == 1:
            x = 0.1 * rng.standard_normal(t.size)
        elif kind == 2:
            x = 0.5 * np.sin(2 * np.pi * 1000 * t) * (rng.uniform(0, 1.5) < t) * (t < 1.8) + 0.01 * rng.standard_normal(t.size)
        else:
            x = 0.3 * np.sin(2 * np.pi * (200 + 1500 * t) * t)
        now = time.time()
        windows.append(Window("bench", i * RATE, RATE, x.astype(np.float32), 2 * RATE, now, now, facts,
                              gates=frozen_mapping({"clap": Verdict.PASSED})))
    return windows


def build_model(model_path: str | None, device: str):
    """(ClapModel, ClapProcessor): a checkpoint, or the clap-htsat-unfused architecture with random weights."""
    import torch
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel, ClapProcessor

    if model_path:
        from monitord.inference.models.loading import load_pretrained

        return (load_pretrained(ClapModel, model_path, "CLAP model").to(device).eval(),
                load_pretrained(ClapProcessor, model_path, "CLAP processor"))
    from monitord.inference.models.offline import train_roberta_tokenizer

    with tempfile.TemporaryDirectory() as scratch:
        tokenizer = train_roberta_tokenizer(Path(scratch))
    torch.manual_seed(0)
    model = ClapModel(ClapConfig()).to(device).eval()  # defaults = laion/clap-htsat-unfused
    extractor = ClapFeatureExtractor(truncation="rand_trunc", padding="repeatpad", frequency_min=50, frequency_max=14000)
    return model, ClapProcessor(feature_extractor=extractor, tokenizer=tokenizer)


def run_pipeline(model, processor, windows: list[Window], device: str) -> tuple[float, list[dict[str, float]]]:
    """Seconds per window and probabilities, one pipeline call per window (after one warm-up call)."""
    from transformers import pipeline

    pipe = pipeline("zero-shot-audio-classification", model=model, feature_extractor=processor.feature_extractor,
                    tokenizer=processor.tokenizer, device=device)
    call = lambda w: pipe(w.samples, candidate_labels=list(LABELS), hypothesis_template="This is a sound of {}.")  # noqa: E731
    call(windows[0])
    began = time.perf_counter()
    results = [{r["label"]: r["score"] for r in call(w)} for w in windows]
    return (time.perf_counter() - began) / len(windows), results


def encoder_limit(clap, windows: list[Window], repeats: int) -> float:
    """Windows per second of the bare audio-encoder forward at batch_max on precomputed features
    (mean over ``repeats`` batches after a warm-up, measured like monitord's path)."""
    batch = windows[: clap.batch_max]
    features, is_longer = clap.features(batch)
    clap._encode(features, is_longer)
    began = time.perf_counter()
    for _ in range(repeats):
        clap._encode(features, is_longer)
    return repeats * len(batch) / (time.perf_counter() - began)


class Recorder:
    """A sink that keeps what the output stage published: each window's probabilities and latency."""

    name = "bench"

    def __init__(self) -> None:
        self.latencies_ms: list[float] = []
        self.probabilities: dict[float, dict[str, float]] = {}

    def start(self) -> None:
        pass

    def deliver(self, event: Event) -> None:
        if event.kind == "scores":
            self.latencies_ms.append(event.latency_ms)
            self.probabilities[event.stream_start] = event.scores

    def stop(self, timeout: float) -> None:
        pass


class WorkerPath:
    """monitord's own stages after windowing: window queue, inference, alerts, output (log, loopback PUB)."""

    def __init__(self, clap, workdir: Path):
        from monitord.daemon import Daemon

        config = Config(
            sources=(SourceConfig(id="bench", device="default"),),
            models={"clap": ClapModelConfig(labels=LABELS, batch_max=clap.batch_max)},
            rules=(RuleConfig(id="glass", model="clap", label=LABELS[0], threshold=0.3, release=0.2),),
            publish=PublishConfig(endpoint="tcp://127.0.0.1:*", event_log=str(workdir / "events.jsonl"), scores=True),
        )
        self.recorder = Recorder()
        self.daemon = Daemon(config, {"clap": clap}, sinks=[self.recorder])
        self.daemon.start(open_sources=False)

    @property
    def latencies_ms(self) -> list[float]:
        return self.recorder.latencies_ms

    @property
    def probabilities(self) -> dict[int, dict[str, float]]:
        return {round(t * RATE): p for t, p in self.recorder.probabilities.items()}

    def scored(self) -> int:
        return self.daemon.inference.stats.scored["clap"]

    def wait_scored(self, n: int, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while (self.scored() < n or self.daemon.output_inbox) and time.monotonic() < deadline:
            time.sleep(0.002)
        return self.scored() >= n

    def throughput(self, windows: list[Window]) -> float:
        """Windows per second with every window queued at once."""
        start = self.scored()
        began = time.perf_counter()
        for w in windows:
            self.daemon.queue.put(_fresh(w), live=False)
        self.wait_scored(start + len(windows), timeout=3600)
        return len(windows) / (time.perf_counter() - began)

    def live(self, windows: list[Window], streams: int, hop_s: float, seconds: float) -> tuple[list[float], int]:
        """``streams`` sources each yielding a window every ``hop_s``, evenly staggered, for ``seconds``:
        latencies (ms) from window end to published event, and windows dropped."""
        self.recorder.latencies_ms.clear()
        start = self.scored()
        interval = hop_s / streams
        count = max(1, int(seconds / interval))
        t0 = time.perf_counter()
        for i in range(count):
            delay = t0 + i * interval - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            self.daemon.queue.put(_fresh(windows[i % len(windows)], i), live=True)
        dropped = sum(self.daemon.queue.dropped.values())
        self.wait_scored(start + count - dropped, timeout=120)
        return list(self.recorder.latencies_ms), dropped

    def close(self) -> None:
        self.daemon.stop(drain_timeout_s=0.0)


def _fresh(window: Window, index: int | None = None) -> Window:
    """The window as if its last sample had just arrived."""
    from dataclasses import replace

    now = time.time()
    start = window.start_index if index is None else index * RATE
    return replace(window, start_index=start, wall_start=now - 2.0, ready_at=now)


def capture_cost(blocks: int = 20000, frames: int = 480, channels: int = 2) -> tuple[float, int]:
    """Microseconds per callback block of the capture path (stereo mixdown into the ring), and overflows."""
    writer = BlockWriter(RingBuffer(10 * RATE, RATE), channels)
    block = np.random.default_rng(0).standard_normal((frames, channels)).astype(np.float32)
    for _ in range(blocks):
        writer(block, frames, None, None)
    return writer.stats.callback_seconds / blocks * 1e6, writer.stats.input_overflows


def rss_mb() -> float:
    """Resident memory now, after handing freed heap pages back to the OS (glibc keeps them otherwise)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**20


def main(args: argparse.Namespace) -> int:
    import torch

    from monitord.inference.models.clap import ClapZeroShot

    logging.getLogger("monitord").setLevel(logging.WARNING)
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    n_pipe = args.pipeline_windows or (4 if args.quick else 16)
    n_ours = args.windows or (32 if args.quick else 96)
    windows = make_windows(max(n_pipe, n_ours))
    began = time.perf_counter()
    rss_start = rss_mb()

    model, processor = build_model(args.model, device)
    rss_full = rss_mb()
    pipe_s, pipe_probs = run_pipeline(model, processor, windows[:n_pipe], device)
    gc.collect()

    rows: list[tuple[str, Any]] = []
    results: dict[str, dict[str, float]] = {}
    dtypes = [args.dtype] if args.quick or args.dtype != "auto" else ["float32", "auto"]
    rss_audio_only = float("nan")
    rounds = 2 if args.quick else 3
    with tempfile.TemporaryDirectory() as workdir:
        for dtype in dtypes:  # float32 first: "auto" may turn the shared audio tower to bfloat16 in place
            clap = ClapZeroShot("clap", ClapModelConfig(labels=LABELS, dtype=dtype, batch_max=args.batch, device=device),
                                model=model, processor=processor)
            if dtype == dtypes[-1]:
                del model  # the worker now holds the only reference: the audio tower
                gc.collect()
                rss_audio_only = rss_mb()
            path = WorkerPath(clap, Path(workdir) / dtype)
            path.throughput(windows[: 2 * clap.batch_max])  # warm-up
            # interleaved rounds, medians: this machine's speed drifts by 10-30 % from minute to minute
            ours, enc = [], []
            for _ in range(rounds):
                ours.append(path.throughput(windows[:n_ours]))
                enc.append(encoder_limit(clap, windows, repeats=max(2, n_ours // clap.batch_max)))
            ours_wps, enc_wps = float(np.median(ours)), float(np.median(enc))
            probs = [path.probabilities[w.start_index] for w in windows[:n_pipe]]
            diff = max(abs(p[k] - q[k]) for p, q in zip(probs, pipe_probs) for k in LABELS)
            streams_hop1 = int(ours_wps * 1.0)
            live_streams = max(1, int(0.8 * streams_hop1))
            latencies, dropped = path.live(windows, live_streams, hop_s=1.0, seconds=4.0 if args.quick else 15.0)
            path.close()
            name = str(clap.dtype).removeprefix("torch.")
            results[dtype] = dict(
                dtype=name, reason=clap.dtype_reason, ours_wps=ours_wps, enc_wps=enc_wps, diff=diff,
                speedup=ours_wps * pipe_s, efficiency=ours_wps / enc_wps, streams_hop1=streams_hop1,
                streams_hop05=int(ours_wps * 0.5), live_streams=live_streams, dropped=dropped,
                p50=float(np.percentile(latencies, 50)) if latencies else float("nan"),
                p99=float(np.percentile(latencies, 99)) if latencies else float("nan"),
            )
            del clap, path
            gc.collect()
    capture_us, overflows = capture_cost(blocks=5000 if args.quick else 20000)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    main_result = results[dtypes[-1]]
    rows.append(("device", f"{device} ({torch.get_num_threads()} torch threads)"))
    rows.append(("model", args.model or "clap-htsat-unfused architecture, random weights"))
    rows.append(("windows", f"{n_pipe} through the pipeline, {n_ours} through monitord, 2 s at 48 kHz, {len(LABELS)} labels"))
    rows.append(("1 pipeline (fp32, one window per call)", f"{1 / pipe_s:8.2f} windows/s  ({pipe_s * 1000:.0f} ms per window)"))
    for dtype, r in results.items():
        rows.append((f"-- monitord, dtype {dtype} -> {r['dtype']}", r["reason"]))
        rows.append(("2 bare audio encoder, batch %d" % args.batch, f"{r['enc_wps']:8.2f} windows/s"))
        rows.append(("3 monitord window -> event", f"{r['ours_wps']:8.2f} windows/s"))
        rows.append(("   3/1 speedup vs pipeline", f"{r['speedup']:8.2f} x"))
        rows.append(("   3/2 efficiency vs encoder", f"{r['efficiency']:8.2f}"))
        rows.append(("   max |p(3) - p(1)|", f"{r['diff']:.2e}"))
        rows.append(("   real-time streams at hop 1.0 s / 0.5 s", f"{r['streams_hop1']} / {r['streams_hop05']}"))
        rows.append((f"   latency window end -> event, {r['live_streams']} live streams at hop 1 s",
                     f"p50 {r['p50']:.0f} ms, p99 {r['p99']:.0f} ms, {r['dropped']} windows dropped"))
    rows.append(("RSS: imports / full model loaded / audio tower only", f"{rss_start:.0f} / {rss_full:.0f} / {rss_audio_only:.0f} MB (peak {peak_rss:.0f} MB)"))
    rows.append(("capture callback, 480-frame stereo block", f"{capture_us:.1f} us per block, {overflows} overflows"))
    rows.append(("bench wall time", f"{time.perf_counter() - began:.1f} s"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    r = main_result
    print(f"speedup_vs_pipeline={r['speedup']:.2f} efficiency_vs_encoder={r['efficiency']:.2f} "
          f"max_prob_diff={r['diff']:.2e} realtime_streams_hop1={r['streams_hop1']}")
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer windows, default precision only (< 60 s on 2 cores)")
    parser.add_argument("--model", help="a CLAP checkpoint (HF id or directory) instead of random full-size weights")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=8, help="batch_max of monitord's worker")
    parser.add_argument("--windows", type=int, help="windows through monitord's path")
    parser.add_argument("--pipeline-windows", type=int, help="windows through the pipeline")

