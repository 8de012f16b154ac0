"""The live cascade of `monitord bench`: real recordings mixed over a bed, cut and gated by the
daemon's own windowing code, YAMNet (the real model) gating a CLAP checkpoint in the real daemon."""

from __future__ import annotations

import threading

import numpy as np

from monitord.config import CascadeConfig, ClapModelConfig
from monitord.tools.cascade import RATE, WINDOW_S, CascadePath, build_mix, calibrate, cutter, stream_offsets, yamnet_model
from monitord.types import Verdict
from tests.conftest import AUDIO, shared_path, time_scale
from tests.tiny_models import TRAIN_LABELS


def test_yamnet_sends_on_to_clap_exactly_the_windows_whose_event_group_reaches_the_threshold(tiny_clap, tmp_path):
    from monitord.inference.models.clap import ClapZeroShot

    mixed, recordings = build_mix(shared_path(AUDIO), minutes=1.0)
    assert recordings >= 20 and len(mixed.events) >= 5 and mixed.audio.dtype == np.float32 and len(mixed.audio) == 60 * RATE
    yam = yamnet_model()
    threshold, gate_share = calibrate(yam, mixed.audio, share=0.4)
    assert gate_share > 0.8  # the bed is above the energy gate: YAMNet hears nearly every window
    gated_by = CascadeConfig(model="yam", labels=("event",), threshold=threshold)
    config = ClapModelConfig(model=str(tiny_clap), labels=TRAIN_LABELS, engine="torch", gated_by=gated_by)
    clap = ClapZeroShot("clap", config)
    streams, seconds = 3, 8.0
    path = CascadePath(yam, clap, config, tmp_path, streams)
    try:
        windows, dropped, latencies, unpublished = path.run(mixed.audio, streams, seconds)
    finally:
        path.close()
    assert windows == 24 and dropped == 0 and unpublished == 0

    # the same windows cut and scored offline: every one that passed the gate was published, once,
    # with its latency; CLAP got those whose event group reached the threshold, and only those
    offsets = stream_offsets(len(mixed.audio), streams, seconds)
    length = round(WINDOW_S * RATE)
    cut = cutter("check", {"yam": yam})
    passed, expected = set(), set()
    for k in range(streams):
        for j in range(int(seconds)):
            start = offsets[k] + j * RATE
            window = cut.cut(mixed.audio[start : start + length], 0, 0.0, 0.0)
            if window.gates["yam"] is Verdict.PASSED:
                passed.add((f"stream{k}", float(j)))
                if yam.score([window])[0].probabilities["event"] >= threshold:
                    expected.add((f"stream{k}", float(j)))
    assert path.recorder.reached_yamnet == passed and len(latencies) == len(passed)
    assert all(0 < ms < 2000 for ms in latencies)  # from the window's end (from its start it would be over 2 s)
    assert set(path.recorder.events.values()) == {1}  # one scores event per window and model
    assert path.recorder.reached_clap == expected
    assert 0 < len(expected) < len(passed)  # some went on to CLAP and some did not: the gate decided


class _FirstTierCalls:
    """How many calls the first tier (YAMNet) has begun, for a second tier that waits on it."""

    def __init__(self) -> None:
        self.changed = threading.Condition()
        self.began = 0


class _Watched:
    """The real YAMNet, counting the calls it begins."""

    def __init__(self, model, calls: _FirstTierCalls):
        self._model, self._calls = model, calls

    def __getattr__(self, name):
        return getattr(self._model, name)

    def score(self, windows, upstream=None):
        with self._calls.changed:
            self._calls.began += 1
            self._calls.changed.notify_all()
        return self._model.score(windows, upstream)


class _HeldUntilTheFirstTierGoesOn:
    """The real CLAP, whose first calls finish only once YAMNet has begun another batch (or a bound
    passes): with one thread for both, YAMNet cannot begin while CLAP holds it, and they never overlap."""

    def __init__(self, model, calls: _FirstTierCalls, hold: int, bound_s: float):
        self._model, self._calls, self._hold, self._bound_s = model, calls, hold, bound_s
        self.waited: list[bool] = []

    def __getattr__(self, name):
        return getattr(self._model, name)

    def score(self, windows, upstream=None):
        if len(self.waited) < self._hold:
            with self._calls.changed:
                seen = self._calls.began
                self.waited.append(self._calls.changed.wait_for(lambda: self._calls.began > seen, self._bound_s))
        return self._model.score(windows, upstream)


def test_the_second_tier_scores_one_batch_while_the_first_scores_the_next_and_each_window_is_published_once(tiny_clap, tmp_path):
    from monitord.inference.models.clap import ClapZeroShot

    mixed, _ = build_mix(shared_path(AUDIO), minutes=1.0)
    calls = _FirstTierCalls()
    yam = _Watched(yamnet_model(), calls)
    gated_by = CascadeConfig(model="yam", labels=("event",), threshold=0.0)  # every window YAMNet scores goes on
    config = ClapModelConfig(model=str(tiny_clap), labels=TRAIN_LABELS, engine="torch", gated_by=gated_by)
    clap = _HeldUntilTheFirstTierGoesOn(ClapZeroShot("clap", config), calls, hold=3, bound_s=5.0 * time_scale())
    streams, seconds = 3, 6.0
    path = CascadePath(yam, clap, config, tmp_path, streams)
    try:
        windows, dropped, _, unpublished = path.run(mixed.audio, streams, seconds)
        spans = list(path.daemon.inference.stats.spans)
    finally:
        path.close()
    assert windows == 18 and dropped == 0 and unpublished == 0
    assert set(path.recorder.events.values()) == {1}  # one scores event per window and model, tiers or not
    assert path.recorder.reached_clap == path.recorder.reached_yamnet and len(path.recorder.reached_clap) > 6

    # read from the times the stage recorded: YAMNet began a batch while CLAP was still on the one before
    yam_spans = [s for s in spans if s.model == "yam"]
    clap_spans = [s for s in spans if s.model == "clap"]
    overlapping = [(c, y) for c in clap_spans for y in yam_spans if c.began < y.began < c.ended]
    assert overlapping, (clap.waited, spans)
    assert clap.waited[0]
