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

    mixed = build_mix(shared_path(AUDIO), minutes=1.0)
    assert len(mixed.events) >= 5 and mixed.audio.dtype == np.float32 and len(mixed.audio) == 60 * RATE
    yam = yamnet_model()
    threshold, gate_share = calibrate(yam, mixed.audio, share=0.4)
    assert gate_share > 0.8  # the bed is above the energy gate: YAMNet hears nearly every window
    gated_by = CascadeConfig(model="yam", labels=("event",), threshold=threshold)
    config = ClapModelConfig(model=str(tiny_clap), labels=TRAIN_LABELS, engine="torch", gated_by=gated_by)
    clap = ClapZeroShot("clap", config)
    streams, seconds = 3, 8.0
    path = CascadePath(yam, clap, config, threshold, tmp_path, streams)
    try:
        windows, dropped, latencies = path.run(mixed.audio, streams, seconds)
    finally:
        path.close()
    assert windows == 24 and dropped == 0
    heard = path.recorder.reached_yamnet
    assert len(latencies) == len(heard) > 0 and all(ms > 0 for ms in latencies)  # each window published, once

    # the same windows scored offline: CLAP got those at or over the threshold, and only those
    offsets = stream_offsets(len(mixed.audio), streams, seconds)
    length = round(WINDOW_S * RATE)
    cut = cutter("check", {"yam": yam})
    expected = set()
    for source, stream_start in heard:
        start = offsets[int(source.removeprefix("stream"))] + round(stream_start * RATE)
        window = cut.cut(mixed.audio[start : start + length], 0, 0.0, 0.0)
        assert window.gates["yam"] is Verdict.PASSED
        if yam.score([window])[0].probabilities["event"] >= threshold:
            expected.add((source, stream_start))
    assert path.recorder.reached_clap == expected
    assert 0 < len(expected) < len(heard)  # some went on to CLAP and some did not: the gate decided
