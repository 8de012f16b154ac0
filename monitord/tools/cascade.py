"""The live cascade in ``monitord bench``: N streams of a real-audio mix through YAMNet, which gates
CLAP, at a 1 s hop.

The mix: every recording of the audio folder (``../shared/audio``: crowds, animals, engines,
weather, alarms, emotional speech), each at a random level, dry or reverberant, 1-4 s apart, over a
quiet bed (rain, engine or train at -40 dBFS), at 48 kHz like a microphone. Stream k plays it from
its own offset. Each window is cut, gated (energy gate, -50 dBFS) and resampled by the daemon's own
windowing code (``WindowCutter``) at the moment its last sample is due, then queued like a live
source's; YAMNet scores every window that passed the gate; CLAP scores the windows where YAMNet's
``event`` group (sound events the mix holds: alarms, animals, crowds, horns, thunder) reaches a
threshold, calibrated on the mix so that a stated share of windows reach CLAP; alert rules run on
both; every window's scores are published. Latency: the window's last sample due -> its scores
published.
"""

from __future__ import annotations

import itertools
import time
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from monitord.config import (CascadeConfig, Config, GateConfig, PipelineConfig, PublishConfig, RuleConfig, SourceConfig,
                             WindowConfig, YamnetModelConfig)
from monitord.tools.mixing import Mix, load_recordings, mix
from monitord.tools.streams import Trial, measured, paced, wait_idle
from monitord.types import Event
from monitord.windowing.tiling import ModelInput, WindowCutter

RATE = 48000
WINDOW_S = 2.0
HOP_S = 1.0
MIX_MINUTES = 5.0
BEDS = ("rain", "engine", "train")
EVENT_CLASSES = ("Alarm clock", "Alarm", "Beep, bleep", "Siren", "Vehicle horn, car horn, honking", "Cat", "Meow",
                 "Dog", "Bark", "Applause", "Cheering", "Crowd", "Thunder", "Thunderstorm", "Glass", "Shatter",
                 "Smash, crash", "Screaming", "Baby cry, infant cry", "Snoring", "Cough")
"""What sends a window on to CLAP: the best of these YAMNet classes (the ``event`` group)."""
GATE = GateConfig(mode="energy", threshold_dbfs=-50.0)
LENGTH, HOP = round(WINDOW_S * RATE), round(HOP_S * RATE)


def build_mix(folder: Path, minutes: float = MIX_MINUTES, seed: int = 0) -> tuple[Mix, int]:
    """The mix, and how many recordings it draws its pieces from."""
    recordings = load_recordings(folder, RATE)
    if not recordings:
        raise FileNotFoundError(f"no <kind>/*.wav recordings under {folder}")
    pieces = [x for kind in sorted(recordings) for x in recordings[kind]]
    beds = [x for kind in BEDS for x in recordings.get(kind, [])] or pieces
    return mix(pieces, beds, minutes, np.random.default_rng(seed), RATE), len(pieces)


def yamnet_model():
    from monitord.inference.models.yamnet import YamnetClassifier

    return YamnetClassifier("yam", YamnetModelConfig(kind="yamnet", groups={"event": EVENT_CLASSES}))


def cutter(source: str, models: Mapping[str, object]) -> WindowCutter:
    inputs = {name: ModelInput(m.sample_rate) for name, m in models.items()}
    return WindowCutter(source, RATE, WindowConfig(seconds=WINDOW_S, hop_s=HOP_S), GATE, inputs)


def calibrate(yam, audio: np.ndarray, share: float) -> tuple[float, float]:
    """(threshold on the ``event`` group that sends ``share`` of the mix's gated windows to CLAP,
    share of windows the energy gate passed)."""
    from monitord.types import Verdict

    cut = cutter("calibration", {"yam": yam})
    windows = [cut.cut(audio[s : s + LENGTH], s, 0.0, 0.0) for s in range(0, len(audio) - LENGTH + 1, HOP)]
    passed = [w for w in windows if w.gates["yam"] is Verdict.PASSED]
    scores = [s.probabilities["event"] for s in yam.score(passed)]
    return float(np.quantile(scores, 1.0 - share)), len(passed) / max(1, len(windows))


def stream_offsets(samples: int, streams: int, seconds: float) -> list[int]:
    """Where in the mix each stream starts: 17 s apart, wrapping so that ``seconds`` of windows fit."""
    span = samples - LENGTH - HOP * (int(seconds / HOP_S) + 1)
    return [(k * 17 * RATE) % max(1, span) for k in range(streams)]


def overlapped(spans, model: str, other: str) -> float:
    """The share of ``model``'s calls' time during which ``other`` was scoring too (the tiers
    overlapping), from the spans the inference stage recorded."""
    mine = [(s.began, s.ended) for s in spans if s.model == model]
    theirs = sorted((s.began, s.ended) for s in spans if s.model == other)
    total = sum(end - begin for begin, end in mine)
    shared = sum(max(0.0, min(end, e) - max(begin, b)) for begin, end in mine for b, e in theirs if b < end and e > begin)
    return shared / total if total > 0 else 0.0


@dataclass
class CascadeOutcome:
    streams: int
    trials: list[Trial]
    threshold: float
    target_share: float
    gate_share: float
    """Windows of the whole mix (1 s hop) the energy gate passed: YAMNet scores these."""
    clap_share: float
    """Windows that reached CLAP in the live trials, of those YAMNet scored."""
    estimate: int
    mix_seconds: float
    placements: int
    """Sounds placed in the mix."""
    recordings: int
    """Recordings they were drawn from."""


class _Recorder:
    name = "cascade"

    def __init__(self) -> None:
        self.latency_ms: dict[tuple[str, float], float] = {}
        """(source, window start) -> window end to its last scores event."""
        self.events: Counter[tuple[str, float, str]] = Counter()
        """Scores events per (source, window start, model): each should be 1."""

    def reached(self, model: str) -> set[tuple[str, float]]:
        """The windows (source, start) ``model`` scored."""
        return {(source, start) for source, start, name in self.events if name == model}

    @property
    def reached_yamnet(self) -> set[tuple[str, float]]:
        return self.reached("yam")

    @property
    def reached_clap(self) -> set[tuple[str, float]]:
        return self.reached("clap")

    def start(self) -> None:
        pass

    def deliver(self, event: Event) -> None:
        if event.kind == "scores":
            key = (event.source, event.stream_start)
            self.events[(*key, event.model_name)] += 1
            self.latency_ms[key] = max(self.latency_ms.get(key, 0.0), event.latency_ms)

    def stop(self, timeout: float) -> None:
        pass


class CascadePath:
    """The daemon with YAMNet gating CLAP (both already loaded) and live sources fed from the mix."""

    def __init__(self, yam, clap, clap_config, workdir: Path, streams: int):
        from monitord.daemon import Daemon

        workdir.mkdir(parents=True, exist_ok=True)
        config = Config(
            sources=(SourceConfig(id="bench", device="default"),),
            gate=GATE,
            window=WindowConfig(seconds=WINDOW_S, hop_s=HOP_S),
            models={"yam": YamnetModelConfig(kind="yamnet", groups={"event": EVENT_CLASSES}), "clap": clap_config},
            rules=(RuleConfig(id="event", model="yam", label="event", threshold=clap_config.gated_by.threshold, min_windows=2,
                              of_windows=3),
                   RuleConfig(id="confirmed", model="clap", label=clap.labels[0], threshold=0.5)),
            publish=PublishConfig(endpoint="tcp://127.0.0.1:*", event_log=str(workdir / "events.jsonl"), scores=True),
            pipeline=PipelineConfig(queue_max_windows=max(64, 2 * streams)),  # 2 s of every stream's windows
        )
        self.recorder = _Recorder()
        self.models = {"yam": yam, "clap": clap}
        self.daemon = Daemon(config, self.models, sinks=[self.recorder])
        self.daemon.start(open_sources=False)
        self._calls = 0

    def run(self, audio: np.ndarray, streams: int, seconds: float) -> tuple[int, int, list[float], int]:
        """``streams`` live sources, evenly staggered, for ``seconds``: (windows, dropped, latencies,
        windows that passed the gate, were not dropped and yet were not published)."""
        from monitord.types import Verdict

        offsets = stream_offsets(len(audio), streams, seconds)
        cutters = [cutter(f"stream{k}", self.models) for k in range(streams)]
        count = max(1, int(seconds / HOP_S * streams))
        due_for_yamnet = 0  # windows that passed the gate and were not dropped
        dropped_before = sum(self.daemon.queue.dropped.values())

        def put(i: int, due: float) -> None:
            nonlocal due_for_yamnet
            k, j = i % streams, i // streams
            start = offsets[k] + j * HOP
            window = cutters[k].cut(audio[start : start + LENGTH], j * HOP, due - WINDOW_S, due)
            due_for_yamnet += window.gates["yam"] is Verdict.PASSED
            gone = self.daemon.queue.put(window, live=True)
            if gone is not None and gone.gates["yam"] is Verdict.PASSED:
                due_for_yamnet -= 1

        published_before = self.published()
        paced(count, HOP_S / streams, put)
        dropped = sum(self.daemon.queue.dropped.values()) - dropped_before
        wait_idle(self.daemon)
        return count, dropped, list(self.recorder.latency_ms.values()), due_for_yamnet - (self.published() - published_before)

    def published(self) -> int:
        """Windows whose YAMNet scores reached the sink."""
        return len(self.recorder.reached_yamnet)

    def throughput(self, audio: np.ndarray, windows: int) -> float:
        """Windows per second through the cascade with ``windows`` of the mix queued at once."""
        self._calls += 1
        cut = cutter(f"throughput{self._calls}", self.models)
        now = time.time()
        batch = [cut.cut(audio[s : s + LENGTH], s, now, now) for s in range(0, windows * HOP, HOP)]
        began = time.perf_counter()
        for w in batch:
            self.daemon.queue.put(w, live=False)
        wait_idle(self.daemon)
        return len(batch) / (time.perf_counter() - began)

    def close(self) -> None:
        self.daemon.stop(drain_timeout_s=0.0)


def run_cascade(clap, clap_config, audio_dir: Path, workdir: Path, seconds: float, share: float, quick: bool) -> CascadeOutcome:
    """The bench's best CLAP path (``clap``, built from ``clap_config``), gated by YAMNet for the run."""
    from monitord.tools.streams import GRID, QUICK_GRID, search

    built, recordings = build_mix(audio_dir, minutes=2.0 if quick else MIX_MINUTES)
    yam = yamnet_model()
    threshold, gate_share = calibrate(yam, built.audio, share)
    gated_by = CascadeConfig(model="yam", labels=("event",), threshold=threshold)
    config = clap_config.model_copy(update={"gated_by": gated_by})
    ungated, clap.gated_by = clap.gated_by, gated_by
    try:
        warm = CascadePath(yam, clap, config, workdir / "cascade-warm", 64)
        try:
            warm.throughput(built.audio, 16)  # warm-up
            rate = warm.throughput(built.audio, 32 if quick else 96)
        finally:
            warm.close()
        reached = [0, 0]
        runs = itertools.count()

        def trial(n: int) -> Trial:
            path = CascadePath(yam, clap, config, workdir / f"cascade-{next(runs)}-{n}", n)
            try:
                time.sleep(1.0)  # settle: the previous trial's threads gone, the allocator quiet
                stats = path.daemon.inference.stats
                result = measured(n, lambda: path.run(built.audio, n, seconds),
                                  work=lambda: (sum(stats.model_seconds.values()), stats.scored["yam"]))
                result = replace(
                    result, note=f"YAMNet busy during {overlapped(stats.spans, 'clap', 'yam'):.0%} of CLAP's time")
                reached[0] += len(path.recorder.reached_clap)
                reached[1] += len(path.recorder.reached_yamnet)
                return result
            finally:
                path.close()

        estimate = int(rate * HOP_S)
        best, trials = search(trial, estimate, grid=QUICK_GRID if quick else GRID, extra=1 if quick else 3)
    finally:
        clap.gated_by = ungated
    return CascadeOutcome(best, trials, threshold, share, gate_share, reached[0] / max(1, reached[1]), estimate,
                          len(built.audio) / RATE, len(built.events), recordings)
