"""The live cascade of `monitord bench`: real recordings mixed over a bed, cut and gated by the
daemon's own windowing code, YAMNet (the real model) gating a CLAP checkpoint in the real daemon."""

from __future__ import annotations

import numpy as np

from monitord.config import CascadeConfig, ClapModelConfig
from monitord.tools.cascade import RATE, WINDOW_S, CascadePath, build_mix, calibrate, cutter, stream_offsets, yamnet_model
from monitord.types import Verdict
from tests.conftest import AUDIO, shared_path
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
