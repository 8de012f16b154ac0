"""The remote hop measured against local inference, on the same model and machine, in one run.

    python bench/serve.py [--tiny] [--model DIR] [--rounds 4] [--json OUT]

Three ways to score batches of 8 fresh 2 s windows, measured in interleaved rounds so that all
three see the same machine load (this box is shared; figures drift 10-30 % otherwise):

- local: ``ClapZeroShot.score`` in this process, on a thread of its own (as the daemon's worker), torch on 2 threads;
- ``one``: a Serve application with 1 replica holding both CPUs (2 torch threads), reached through
  ``RemoteModel`` -> HTTP -> Serve's proxy -> ``@serve.batch`` -> the model;
- ``two``: the same with 2 replicas of 1 CPU each.

Per window at batch 8: latency p50/p99 of local and ``one`` (one batch at a time), and the hop
itself (each round trip less the time the replica's service spent on it: encoding, HTTP, the
proxy, Ray's hand-over, decoding); windows/s of local (one batch at a time, as the worker does),
and of ``one`` and ``two`` with 4 batches in the air.

Without --model the clap-htsat-unfused architecture with random weights (compute does not depend
on weight values), float32, saved to a temporary folder so replicas load it as a checkpoint;
--tiny uses a tiny CLAP instead (the hop dominates then). The client, the proxy and the replicas
share this machine's CPUs. It reports; it asserts nothing.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from monitord.inference import wire  # noqa: E402

RATE = 48000
LABELS = ("glass breaking", "dog barking", "speech", "music")
BATCH = 8


class Windows:
    """Fresh windows every call (new start indices: no request looks like a retry)."""

    def __init__(self, seed: int = 0):
        self.rng = np.random.default_rng(seed)
        self.next_start = 0
        self.t = np.arange(2 * RATE) / RATE

    def batch(self, n: int = BATCH):
        out = []
        for _ in range(n):
            x = 0.2 * np.sin(2 * np.pi * self.rng.uniform(100, 4000) * self.t) + 0.05 * self.rng.standard_normal(self.t.size)
            meta = wire.WindowMeta("bench", self.next_start, RATE, 2 * RATE, time.time(), time.time())
            out.append(wire.make_window(meta, x.astype(np.float32), RATE))
            self.next_start += RATE // 2
        return out


def save_full_size(folder: Path) -> Path:
    """The clap-htsat-unfused architecture, random weights, saved like a checkpoint."""
    from monitord.tools.bench import build_model

    model, processor = build_model(None, "cpu")
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def percentiles(per_window_ms: list[float]) -> dict[str, float]:
    return {"p50_ms": round(float(np.percentile(per_window_ms, 50)), 1), "p99_ms": round(float(np.percentile(per_window_ms, 99)), 1)}


def throughput(score, windows: Windows, seconds: float, in_flight: int) -> float:
    """Windows/s with ``in_flight`` batches in the air (1: one after the other) for ``seconds``."""
    from monitord.inference.remote import InFlight

    flight = InFlight(in_flight)
    done = 0
    began = time.perf_counter()
    while time.perf_counter() - began < seconds:
        batch = windows.batch()
        flight.submit(lambda b=batch: score(b))
        done += sum(len(o.result()) for o in flight.ready())
    done += sum(len(o.result()) for o in flight.drain())
    took = time.perf_counter() - began
    flight.close()
    return done / took


def config_file(folder: Path, model: Path) -> Path:
    path = folder / "serve.yaml"
    path.write_text(f"""
models:
  clap: {{kind: clap, model: {model}, labels: [{", ".join(LABELS)}], dtype: float32, batch_max: {BATCH}, batch_wait_ms: 5}}
serve: {{canary_every_s: 3600, max_ongoing_requests: 16}}
""")
    return path


def measure(model_dir: Path, folder: Path, rounds: int, batches: int, seconds: float, in_flight: int) -> dict:
    import ray
    import torch
    from ray import serve

    from monitord.config import ClapModelConfig, InferenceConfig
    from monitord.inference.models import build_model
    from monitord.inference.remote import RemoteModel
    from monitord.serve.deployment import build_app
    from tests.conftest import free_port

    windows = Windows()
    entry = ClapModelConfig(model=str(model_dir), labels=LABELS, dtype="float32", batch_max=BATCH, batch_wait_ms=5)
    torch.set_num_threads(2)  # what the one-replica application's replica gets
    local = build_model("clap", entry)
    port = free_port()
    began = time.monotonic()
    # 4 logical CPUs on this 2-core machine: both applications stay deployed, and are measured in turn
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING, log_to_driver=False)
    out: dict = {"ray_init_s": round(time.monotonic() - began, 1)}
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        config = str(config_file(folder, model_dir))
        remotes = {}
        for name, replicas, cpus in (("one", 1, 2.0), ("two", 2, 1.0)):
            t = time.monotonic()
            serve.run(build_app(config, replicas=replicas, cpus_per_replica=cpus), name=name, route_prefix=f"/{name}")
            out[f"{name}_deploy_s"] = round(time.monotonic() - t, 1)
            url = f"http://127.0.0.1:{port}/{name}"
            remotes[name] = RemoteModel("clap", entry, InferenceConfig(url=url, models=("clap",), timeout_s=300))
            throughput(remotes[name].score, windows, 0.01, 2 * replicas)  # every replica warmed up
        local.score(windows.batch())
        lat: dict[str, list[float]] = {"local": [], "one": []}
        hop: list[float] = []
        rate: dict[str, list[float]] = {"local": [], "one": [], "two": []}
        worker = concurrent.futures.ThreadPoolExecutor(1)  # local scoring on a thread of its own, as the daemon's worker
        scorers = {"local": lambda b: worker.submit(local.score, b).result(), "one": remotes["one"].score, "two": remotes["two"].score}
        for r in range(rounds):
            for name in ("local", "one")[:: 1 if r % 2 == 0 else -1]:
                for _ in range(batches):
                    batch = windows.batch()
                    t = time.perf_counter()
                    scorers[name](batch)
                    lat[name].append((time.perf_counter() - t) * 1000 / BATCH)
            hop += [h * 1000 / BATCH for h in list(remotes["one"].stats.hop_seconds)[-batches:]]
            for name in ("local", "one", "two")[:: 1 if r % 2 == 0 else -1]:
                rate[name].append(throughput(scorers[name], windows, seconds, 1 if name == "local" else in_flight))
            print(f"round {r + 1}/{rounds}: local {lat['local'][-1]:.0f} ms/window; windows/s local {rate['local'][-1]:.2f}, "
                  f"one {rate['one'][-1]:.2f}, two {rate['two'][-1]:.2f}", flush=True)
        out.update(
            latency_ms_per_window={"local": percentiles(lat["local"]), "one_replica": percentiles(lat["one"])},
            hop_ms_per_window=percentiles(hop),
            windows_per_s={name: round(float(np.median(v)), 2) for name, v in rate.items()},
            forward_pass_sizes={name: dict(sorted(m.stats.batch_sizes.items())) for name, m in remotes.items()},
        )
        out["remote_one_over_local"] = round(out["windows_per_s"]["one"] / out["windows_per_s"]["local"], 3)
        for name in ("one", "two"):
            serve.delete(name)
    finally:
        serve.shutdown()
        ray.shutdown()
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tiny", action="store_true", help="a tiny CLAP instead of the full-size architecture")
    parser.add_argument("--model", help="a CLAP checkpoint directory instead of the random full-size one")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--batches", type=int, default=3, help="batches per latency segment")
    parser.add_argument("--seconds", type=float, default=6.0, help="seconds per throughput segment")
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument("--json", help="write the figures here too")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    with tempfile.TemporaryDirectory() as scratch:
        folder = Path(scratch)
        if args.model:
            model, what = Path(args.model), f"checkpoint {args.model}"
        elif args.tiny:
            from tests.tiny_models import build_clap

            model, what = build_clap(folder / "tiny"), "tiny CLAP (random weights)"
        else:
            model, what = save_full_size(folder / "full"), "clap-htsat-unfused architecture, random weights"
        report: dict = {"model": f"{what}, float32", "batch": BATCH,
                        "machine": f"{os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.1f} at start"}
        print(f"{report['model']}; {report['machine']}", flush=True)
        report.update(measure(model, folder, args.rounds, args.batches, args.seconds, args.in_flight))
    print(json.dumps(report, indent=1))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
