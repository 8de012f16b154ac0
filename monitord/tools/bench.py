"""``monitord bench``: the CLAP path measured against transformers' pipeline, side by side, in one run.

On the same 2 s windows, same model, same machine, like against like:
  1. pipeline("zero-shot-audio-classification"), one window per call (what the seed dashboards do),
     in float32 and in the default precision (bfloat16 where this machine runs it faster);
  2. the bare batched audio-encoder forward on precomputed features (the limit);
  3. monitord's own path, window queue -> inference -> alerts -> output (log, loopback PUB), in the
     same precision as the pipeline it is compared with; each pair timed the same way, in
     interleaved rounds, medians;
  for torch in float32 and its default precision, then for every other engine installed (OpenVINO,
  ONNX Runtime: the audio tower converted once, cached), each against the pipeline in the precision
  that engine runs in. The fastest path ("best") is the one run live, with a slow log, and measured
  for memory; its figures make the last line (``engine=``, ``vs_torch_encoder=``: against torch's
  fastest bare batched encoder).
Then: the largest probability difference to the pipeline, relative to how much the probabilities
move between windows (so it can fail on a model whose outputs move); how many live streams at 1 s
hop it really keeps up with (run, not derived: no window dropped, p99 window end -> event below
1 s; ``tools/streams.py``); the cost of a slow event log (fsync, 50 ms per write) on inference
throughput; RSS; the capture callback; last, the live cascade (``tools/cascade.py``: N streams of a
real-audio mix through YAMNet gating this CLAP, ``cascade_streams_hop1=``); before all of it, the
shipped config's start to its dashboard URL (``first_start_s=``). Full-size architecture with random weights unless --model is given: compute does
not depend on weight values. It reports; it asserts nothing about speed.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import logging
import resource
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from monitord.config import ClapModelConfig, Config, PipelineConfig, PublishConfig, RuleConfig, SourceConfig
from monitord.sources.device import BlockWriter
from monitord.sources.ring import RingBuffer
from monitord.tools.mixing import DEFAULT_AUDIO
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
        self.published = 0

    def start(self) -> None:
        pass

    def deliver(self, event: Event) -> None:
        if event.kind == "scores":
            self.published += 1
            self.latencies_ms.append(event.latency_ms)
            self.probabilities[event.stream_start] = event.scores

    def stop(self, timeout: float) -> None:
        pass


class WorkerPath:
    """monitord's own stages after windowing: window queue, inference, alerts, output (log, loopback PUB)."""

    def __init__(self, clap, workdir: Path, thresholds: dict[str, float] | None = None, fsync: bool = False,
                 queue_max_windows: int = 64):
        from monitord.daemon import Daemon

        workdir.mkdir(parents=True, exist_ok=True)
        thresholds = thresholds or {LABELS[0]: 0.3}
        config = Config(
            sources=(SourceConfig(id="bench", device="default"),),
            models={"clap": ClapModelConfig(labels=LABELS, batch_max=clap.batch_max)},
            rules=tuple(RuleConfig(id=f"rule{i}", model="clap", label=label, threshold=t, release=t)
                        for i, (label, t) in enumerate(thresholds.items())),
            publish=PublishConfig(endpoint="tcp://127.0.0.1:*", event_log=str(workdir / "events.jsonl"), scores=True,
                                  fsync=fsync),
            pipeline=PipelineConfig(queue_max_windows=queue_max_windows),
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

    def wait_published(self, n: int, timeout: float) -> bool:
        """Until ``n`` windows in all were scored and their events reached the sink."""
        deadline = time.monotonic() + timeout
        while self.recorder.published < n and time.monotonic() < deadline:
            time.sleep(0.002)
        return self.recorder.published >= n

    def throughput(self, windows: list[Window]) -> float:
        """Windows per second with every window queued at once."""
        start = self.recorder.published
        began = time.perf_counter()
        for w in windows:
            self.daemon.queue.put(_fresh(w), live=False)
        self.wait_published(start + len(windows), timeout=3600)
        return len(windows) / (time.perf_counter() - began)

    def live(self, windows: list[Window], streams: int, hop_s: float, seconds: float) -> tuple[int, int, list[float], int]:
        """``streams`` sources each yielding a window every ``hop_s``, evenly staggered, for ``seconds``:
        (windows yielded, windows dropped, latencies in ms from window end to published event,
        windows neither dropped nor published)."""
        from monitord.tools.streams import paced, wait_idle

        self.recorder.latencies_ms.clear()
        start = self.recorder.published
        dropped_before = sum(self.daemon.queue.dropped.values())
        count = max(1, int(seconds / hop_s * streams))
        paced(count, hop_s / streams, lambda i, due: self.daemon.queue.put(_fresh(windows[i % len(windows)], i, due), live=True))
        dropped = sum(self.daemon.queue.dropped.values()) - dropped_before
        wait_idle(self.daemon)
        return count, dropped, list(self.recorder.latencies_ms), count - dropped - (self.recorder.published - start)

    def logged(self) -> int:
        return self.daemon.publisher.seq

    def close(self) -> None:
        self.daemon.stop(drain_timeout_s=0.0)


class SlowLog:
    """An event log on a slow disk: every write takes ``delay_s`` longer (the output stage's problem)."""

    def __init__(self, path: WorkerPath, delay_s: float):
        log_ = path.daemon.publisher.event_log
        real = log_.append

        def append(line: bytes) -> None:
            time.sleep(delay_s)
            real(line)

        log_.append = append


def _fresh(window: Window, index: int | None = None, due: float | None = None) -> Window:
    """The window as if its last sample had just arrived (or arrives at ``due``, epoch seconds)."""
    from dataclasses import replace

    now = time.time() if due is None else due
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


def pipeline_rate(pipe, windows: list[Window]) -> tuple[float, list[dict[str, float]]]:
    """Windows per second of the pipeline, one window per call, and its probabilities."""
    call = lambda w: pipe(w.samples, candidate_labels=list(LABELS), hypothesis_template="This is a sound of {}.")  # noqa: E731
    began = time.perf_counter()
    results = [{r["label"]: r["score"] for r in call(w)} for w in windows]
    return len(windows) / (time.perf_counter() - began), results


def relative_difference(ours: list[dict[str, float]], theirs: list[dict[str, float]]) -> tuple[float, float, float]:
    """(largest |difference|, spread of the probabilities across windows, their ratio): a difference is
    only small if it is small against how much the outputs move with the input."""
    diff = max(abs(p[k] - q[k]) for p, q in zip(ours, theirs) for k in LABELS)
    spread = max(max(q[k] for q in theirs) - min(q[k] for q in theirs) for k in LABELS)
    return diff, spread, diff / spread if spread > 0 else float("inf")


def realtime_streams(clap, windows: list[Window], workdir: Path, estimate: int, seconds: float, quick: bool) -> tuple[int, list]:
    """The most live streams at 1 s hop that held (no window dropped, p99 window end -> event below
    1 s) twice, searched around ``estimate`` (the measured windows/s); and the trials. Each trial on
    a daemon of its own, whose queue holds 2 s of every stream's windows."""
    from monitord.tools.streams import GRID, QUICK_GRID, measured, search

    runs = itertools.count()

    def trial(n: int):
        path = WorkerPath(clap, workdir / f"live-{next(runs)}-{n}", queue_max_windows=max(64, 2 * n))
        try:
            time.sleep(1.0)  # settle: the previous trial's threads gone, the allocator quiet
            stats = path.daemon.inference.stats
            return measured(n, lambda: path.live(windows, n, hop_s=1.0, seconds=seconds),
                            work=lambda: (stats.model_seconds["clap"], stats.scored["clap"]))
        finally:
            path.close()

    return search(trial, estimate, grid=QUICK_GRID if quick else GRID, extra=1 if quick else 3)


class EngineNotLoaded(RuntimeError):
    pass


def build_clap(model, processor, precision: str, engine: str, batch: int, device: str, engine_cache: Path | None):
    """monitord's CLAP on the shared model (float32 again first: an earlier variant may have moved it),
    its config, and the seconds its construction took (a conversion, where one was not cached)."""
    from monitord.inference.models.clap import ClapZeroShot

    model.float()
    config = ClapModelConfig(labels=LABELS, dtype=precision, batch_max=batch, device=device, engine=engine)
    began = time.perf_counter()
    clap = ClapZeroShot("clap", config, model=model, processor=processor, engine_cache=engine_cache)
    return clap, config, time.perf_counter() - began


def measure_pair(model, processor, precision: str, windows: list[Window], n_pipe: int, n_ours: int, rounds: int,
                 batch: int, device: str, workdir: Path, engine: str = "torch", engine_cache: Path | None = None):
    """Pipeline and monitord in one precision (the one monitord's engine runs in), interleaved rounds, medians."""
    import torch
    from transformers import pipeline

    clap, _, load_s = build_clap(model, processor, precision, engine, batch, device, engine_cache)
    if clap.engine != engine:
        raise EngineNotLoaded(f"{engine}: did not load (the WARNING above says why); left out")
    if clap.dtype != torch.float32:
        model.to(clap.dtype)  # the pipeline runs the whole model, text tower too, in the same precision
    pipe = pipeline("zero-shot-audio-classification", model=model, feature_extractor=processor.feature_extractor,
                    tokenizer=processor.tokenizer, device=device)
    path = WorkerPath(clap, workdir / f"{engine}-{precision}")
    pipeline_rate(pipe, windows[:1])
    path.throughput(windows[: 2 * batch])  # warm-ups
    pipes, ours, enc = [], [], []
    for _ in range(rounds):  # this machine's speed drifts by 10-30 % from minute to minute
        rate, pipe_probs = pipeline_rate(pipe, windows[:n_pipe])
        pipes.append(rate)
        ours.append(path.throughput(windows[:n_ours]))
        enc.append(encoder_limit(clap, windows, repeats=max(2, n_ours // batch)))
    mine = [path.probabilities[w.start_index] for w in windows[:n_pipe]]
    diff, spread, relative = relative_difference(mine, pipe_probs)
    result = dict(dtype=str(clap.dtype).removeprefix("torch."), reason=clap.dtype_reason, pipe_wps=float(np.median(pipes)),
                  ours_wps=float(np.median(ours)), enc_wps=float(np.median(enc)), diff=diff, spread=spread, relative=relative,
                  engine=engine, precision=precision, load_s=load_s,
                  converted=bool(getattr(clap.encoder, "converted", False)))
    return clap, path, result


def installed_engines(requested: str | None) -> list[str]:
    """The engines to compare with torch: those asked for, or every one installed here."""
    from monitord.inference.engines import ENGINES, PACKAGE, _importable

    names = [e.strip() for e in requested.split(",")] if requested else [e for e in ENGINES if e != "torch"]
    unknown = [e for e in names if e not in ENGINES]
    if unknown:
        raise SystemExit(f"bench: unknown engine(s) {', '.join(unknown)}; choose from {', '.join(ENGINES)}")
    chosen = []
    for engine in names:
        if engine == "torch":
            continue
        if _importable(PACKAGE[engine]) is not None:
            print(f"bench: {engine} is not installed (pip install 'monitord[{engine}]'): left out")
            continue
        chosen.append(engine)
    return chosen


def main(args: argparse.Namespace) -> int:
    import torch

    from monitord.config import state_dir
    from monitord.inference.engine_cache import cache_root

    logging.getLogger("monitord").setLevel(logging.WARNING)
    logging.getLogger("monitord.inference.engine_cache").setLevel(logging.INFO)  # a first conversion takes minutes
    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else ("cpu" if args.device == "auto" else args.device)
    n_pipe = args.pipeline_windows or (4 if args.quick else 16)
    n_ours = args.windows or (32 if args.quick else 96)
    rounds = args.rounds or (2 if args.quick else 3)
    live_s = args.live_seconds or (6.0 if args.quick else 30.0)
    engines = installed_engines(args.engines) if device == "cpu" else []
    if not 0.0 < args.cascade_share <= 1.0:
        raise SystemExit(f"bench: --cascade-share {args.cascade_share}: a share of windows, above 0 and at most 1")
    audio_dir = None if args.no_cascade else recordings_folder(args.audio)
    windows = make_windows(max(n_pipe, n_ours))
    began = time.perf_counter()
    starts = measure_first_start()  # first, on a machine nothing else of the bench keeps busy yet
    rss_start = rss_mb()
    model, processor = build_model(args.model, device)
    rss_full = rss_mb()
    # a checkpoint's conversions are cached where the daemon caches them; the random model's in the state directory
    engine_cache = cache_root(args.model) if args.model else state_dir() / "engine-cache" / "bench-clap-htsat-unfused-random"
    rows: list[tuple[str, Any]] = []
    variants: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as scratch:
        workdir = Path(scratch)
        precisions = ["float32", args.dtype] if args.dtype != "float32" else ["float32"]
        plan = [("torch", p) for p in precisions] + [(engine, args.dtype) for engine in engines]
        left_out: list[str] = []
        for engine, precision in plan:
            try:
                clap, path, result = measure_pair(model, processor, precision, windows, n_pipe, n_ours, rounds, args.batch,
                                                  device, workdir, engine=engine, engine_cache=engine_cache)
            except EngineNotLoaded as exc:  # reported, not fatal: the other engines still compare
                left_out.append(str(exc))
                continue
            variants.append(result)
            path.close()
            del clap, path
            gc.collect()
        torch_default = [v for v in variants if v["engine"] == "torch"][-1]
        best = max(variants[len(precisions) - 1:], key=lambda v: v["ours_wps"])  # torch in its default precision, or an engine
        # the best path again (cached, so no conversion): live streams, a slow log, memory
        clap, clap_config, _ = build_clap(model, processor, best["precision"], best["engine"], args.batch, device, engine_cache)
        path = WorkerPath(clap, workdir / "best")
        path.throughput(windows[: 2 * args.batch])
        probabilities = path.probabilities
        path.close()
        streams, trials = realtime_streams(clap, windows, workdir, int(best["ours_wps"]), live_s, args.quick)
        # a rule per label at its median: thresholds the windows keep crossing, so events every few windows
        medians = {label: float(np.median([probabilities[w.start_index][label] for w in windows[: 2 * args.batch]]))
                   for label in LABELS}
        fast = WorkerPath(clap, workdir / "fast-log", thresholds=medians, fsync=True)
        slow = WorkerPath(clap, workdir / "slow-log", thresholds=medians, fsync=True)
        SlowLog(slow, 0.05)
        fast_wps, slow_wps = [], []
        for _ in range(rounds):
            fast_wps.append(fast.throughput(windows[:n_ours]))
            slow_wps.append(slow.throughput(windows[:n_ours]))
        logged_slow = slow.logged()
        fast.close()
        slow.close()
        del model
        gc.collect()
        rss_best = rss_mb()
        # the live cascade last, on the same CLAP (no model beside it), gated by YAMNet for the run
        cascade = None
        if audio_dir is not None:
            from monitord.tools.cascade import run_cascade

            cascade = run_cascade(clap, clap_config, audio_dir, workdir, live_s, args.cascade_share, args.quick)
        del clap, path, fast, slow
        gc.collect()
    capture_us, overflows = capture_cost(blocks=5000 if args.quick else 20000)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024

    fp32 = variants[0]
    headline = best["ours_wps"] / fp32["pipe_wps"]
    same = best["ours_wps"] / best["pipe_wps"]
    torch_encoder = max(v["enc_wps"] for v in variants if v["engine"] == "torch")
    float32_diff = max(v["relative"] for v in variants if v["dtype"] == "float32")
    rows.append(("device", f"{device} ({torch.get_num_threads()} torch threads)"))
    rows.append(("model", args.model or "clap-htsat-unfused architecture, random weights"))
    rows.append(("windows", f"{n_pipe} through the pipeline, {n_ours} through monitord, 2 s at 48 kHz, {len(LABELS)} labels; "
                            f"{rounds} interleaved rounds, medians"))
    rows.append(("engines", ", ".join(["torch", *engines]) + ("" if device == "cpu" else " (other engines run on the CPU only)")))
    for reason in left_out:
        rows.append(("   left out", reason))
    for r in variants:
        rows.append((f"-- {r['engine']} {r['precision']} -> {r['dtype']}", r["reason"]))
        if r["engine"] != "torch":
            rows.append(("   load", f"{r['load_s']:.1f} s ({'converted, now cached' if r['converted'] else 'from the cache'})"))
        rows.append((f"1 pipeline ({r['dtype']}), one window per call", f"{r['pipe_wps']:8.2f} windows/s"))
        rows.append((f"2 bare audio encoder, batch {args.batch}", f"{r['enc_wps']:8.2f} windows/s"))
        rows.append(("3 monitord window -> event", f"{r['ours_wps']:8.2f} windows/s"))
        rows.append(("   3/1 same precision", f"{r['ours_wps'] / r['pipe_wps']:8.2f} x"))
        rows.append(("   3/2 efficiency vs encoder", f"{r['ours_wps'] / r['enc_wps']:8.2f}"))
        rows.append(("   3 vs torch's best bare encoder", f"{r['ours_wps'] / torch_encoder:8.2f}"))
        rows.append(("   max |p(3) - p(1)| / spread across windows", f"{r['diff']:.2e} / {r['spread']:.2e} = {r['relative']:.2e}"))
    rows.append(("best path (live runs, logs, memory below)", f"{best['engine']} {best['dtype']}"))
    rows.append((f"monitord {best['engine']} {best['dtype']} vs pipeline float32 (the headline)", f"{headline:8.2f} x"))
    rows.append((f"monitord {best['engine']} vs torch {torch_default['dtype']} window -> event",
                 f"{best['ours_wps'] / torch_default['ours_wps']:8.2f} x"))
    rows.append(("   below float32, a difference is rounding against how little a random model's outputs move",
                 "(relative error is meaningful in float32, where both compute the same thing)"))
    rows.append((f"live streams at hop 1 s, run {live_s:g} s each (held: 0 dropped, p99 < 1 s)", trials[0].line()))
    rows.extend(("", t.line()) for t in trials[1:])
    rows.append(("   the most that held every time it ran (twice at least)", f"{streams}"))
    if cascade is None:
        rows.append(("live cascade YAMNet -> CLAP", "left out (--no-cascade)" if args.no_cascade else
                     f"left out: no recordings (--audio DIR: a folder per kind of sound, WAV files inside; {DEFAULT_AUDIO} is absent)"))
    else:
        rows.append(("live cascade YAMNet -> CLAP at hop 1 s",
                     f"a {cascade.mix_seconds / 60:g} min mix: {cascade.placements} sounds drawn from {cascade.recordings} real "
                     f"recordings over a -40 dBFS bed, 48 kHz; stream k starts 17 k s into it (modulo its length); "
                     f"{cascade.estimate} windows/s with all queued"))
        rows.append(("   energy gate passed / YAMNet sent on to CLAP",
                     f"{cascade.gate_share:.0%} of the mix's windows / {cascade.clap_share:.0%} of the windows YAMNet scored in "
                     f"the trials (threshold {cascade.threshold:.3f} on its event group, calibrated to {cascade.target_share:.0%})"))
        rows.append((f"   trials, run {live_s:g} s each", cascade.trials[0].line()))
        rows.extend(("", t.line()) for t in cascade.trials[1:])
        rows.append(("   the most that held every time it ran (twice at least)", f"{cascade.streams}"))
    rows.append(("inference with an fsynced log on a 50 ms disk / a fast one",
                 f"{float(np.median(slow_wps)):.2f} / {float(np.median(fast_wps)):.2f} windows/s = "
                 f"{float(np.median(slow_wps)) / float(np.median(fast_wps)):.2f} ({logged_slow} events went through the slow log)"))
    rows.append(("RSS: imports / full model loaded / best path only (before the cascade; peak: the whole run)",
                 f"{rss_start:.0f} / {rss_full:.0f} / {rss_best:.0f} MB (peak {peak_rss:.0f} MB)"))
    rows.append(("capture callback, 480-frame stereo block", f"{capture_us:.1f} us per block, {overflows} overflows"))
    rows.append(("shipped config: start -> dashboard URL, no hub, no microphone (first / second run)",
                 f"{starts[0]:.2f} / {starts[1]:.2f} s (tools/first_start.py)"))
    rows.append(("bench wall time", f"{time.perf_counter() - began:.1f} s"))
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"{key:<{width}}  {value}")
    print(f"engine={best['engine']} speedup_vs_pipeline={headline:.2f} speedup_same_precision={same:.2f} "
          f"efficiency_vs_encoder={best['ours_wps'] / best['enc_wps']:.2f} vs_torch_encoder={best['ours_wps'] / torch_encoder:.2f} "
          f"max_prob_diff={float32_diff:.2e} realtime_streams_hop1={streams} "
          f"cascade_streams_hop1={cascade.streams if cascade is not None else 'n/a'} first_start_s={starts[0]:.2f}")
    return 0


def measure_first_start() -> tuple[float, float]:
    """The shipped config's start to its dashboard URL (``tools/first_start.py``), twice: the first
    run pays for what the OS had not cached yet; the second is what a restart costs."""
    from monitord.tools.first_start import first_start

    with tempfile.TemporaryDirectory() as scratch:
        return first_start(Path(scratch) / "first"), first_start(Path(scratch) / "second")


def recordings_folder(given: str | None) -> Path | None:
    """The recordings the live cascade mixes: ``--audio``, else ../shared/audio beside the checkout
    where it exists (None: the cascade is left out)."""
    if given:
        folder = Path(given)
        if not any(folder.glob("*/*.wav")):
            raise SystemExit(f"bench: --audio {given}: no <kind>/*.wav recordings there")
        return folder
    return DEFAULT_AUDIO if any(DEFAULT_AUDIO.glob("*/*.wav")) else None


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="fewer windows, shorter live runs (a few minutes on 2 cores)")
    parser.add_argument("--model", help="a CLAP checkpoint (HF id or directory) instead of random full-size weights")
    parser.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    parser.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    parser.add_argument("--batch", type=int, default=8, help="batch_max of monitord's worker")
    parser.add_argument("--windows", type=int, help="windows through monitord's path")
    parser.add_argument("--pipeline-windows", type=int, help="windows through the pipeline")
    parser.add_argument("--engines", help="comma-separated engines to compare with torch (default: every one installed)")
    parser.add_argument("--rounds", type=int, help="interleaved rounds (default 3, 2 with --quick)")
    parser.add_argument("--audio", help="recordings for the live cascade, a folder per kind of sound (default ../shared/audio)")
    parser.add_argument("--no-cascade", action="store_true", help="leave the live cascade out")
    parser.add_argument("--cascade-share", type=float, default=0.25,
                        help="share of the mix's windows YAMNet sends on to CLAP (its gate threshold is calibrated to it)")
    parser.add_argument("--live-seconds", type=float, help="seconds each live-streams trial runs (default 30, 6 with --quick)")

