"""Ring buffer, windowing and resampling."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitord.audio import resample
from monitord.config import GateConfig
from monitord.sources.ring import Overrun, RingBuffer
from monitord.windowing.tiling import Tiler, window_starts
from tests.conftest import dominant_frequency, file_windows, noise, silence, tone, write_wav


def test_window_starts_cover_the_stream():
    assert list(window_starts(10, 4, 2)) == [0, 2, 4, 6]
    assert list(window_starts(11, 4, 2)) == [0, 2, 4, 6, 7]  # a final window aligned to the end
    assert list(window_starts(3, 4, 2)) == [0]
    assert list(window_starts(0, 4, 2)) == []


def test_the_live_tiler_gives_the_offline_starts_whatever_the_arrival_steps():
    import random

    rng = random.Random(3)
    for total, length, hop in ((10, 4, 2), (11, 4, 2), (3, 4, 2), (1000, 96, 24), (1001, 96, 25), (96, 96, 24)):
        tiler, available, live = Tiler(length, hop), 0, []
        while available < total:
            available = min(total, available + rng.randint(1, 40))
            live += tiler.take(available, ended=available == total)
        assert live == window_starts(total, length, hop), (total, length, hop)


def test_ring_buffer_wraps_and_detects_overrun():
    ring = RingBuffer(10, 1)
    ring.write(np.arange(7, dtype=np.float32))
    ring.write(np.arange(7, 14, dtype=np.float32))
    assert ring.written == 14
    np.testing.assert_array_equal(ring.read(6, 8), np.arange(6, 14, dtype=np.float32))
    with pytest.raises(Overrun):
        ring.read(2, 4)
    with pytest.raises(ValueError):
        ring.read(12, 5)


def test_resampling_keeps_frequency_and_length():
    x = tone(1000, 2.0, 44100, dbfs=-12)
    y = resample(x, 44100, 48000)
    assert len(y) == 96000
    assert abs(dominant_frequency(y, 48000) - 1000) < 1.0
    assert abs(20 * np.log10(y[1000:-1000].std()) + 12) < 0.2


def run_file_windows(path, realtime=False, block_s=None, hop_s=0.5):
    import monitord.sources.file as file_source

    old = file_source.FILE_BLOCK_S
    if block_s is not None:
        file_source.FILE_BLOCK_S = block_s
    try:
        _, windows, statuses = file_windows(path, GateConfig(mode="energy", threshold_dbfs=-50), hop_s=hop_s,
                                            ring_seconds=4.0, realtime=realtime)
    finally:
        file_source.FILE_BLOCK_S = old
    return windows, [s[0] for s in statuses]


def test_file_windows_have_exact_stream_times_and_gate_verdicts(tmp_path):
    rate = 16000
    audio = np.concatenate([silence(3.0, rate), tone(1000, 1.0, rate, dbfs=-20), silence(2.3, rate)])
    windows, statuses = run_file_windows(write_wav(tmp_path / "a.wav", audio, rate))
    starts = [w.stream_start for w in windows]
    assert starts == [i * 0.5 for i in range(9)] + [4.3]  # 6.3 s: every hop, then one aligned to the end
    passed = [(w.stream_start, w.stream_end) for w in windows if w.passed]
    assert passed == [(1.5, 3.5), (2.0, 4.0), (2.5, 4.5), (3.0, 5.0), (3.5, 5.5)]
    assert statuses == ["up", "eof"]
    # every window of one rate has one length, resampled for the model
    assert {len(w.at_rate(48000)) for w in windows if w.passed} == {96000}


def test_windows_do_not_depend_on_block_size(tmp_path):
    rate = 22050
    audio = np.concatenate([noise(1.3, rate, -30), tone(700, 2.0, rate, -10), noise(1.0, rate, -40, seed=2)])
    path = write_wav(tmp_path / "b.wav", audio, rate)
    a, _ = run_file_windows(path, block_s=0.013)
    b, _ = run_file_windows(path, block_s=0.37)
    assert [w.start_index for w in a] == [w.start_index for w in b]
    for wa, wb in zip(a, b):
        np.testing.assert_array_equal(wa.samples, wb.samples)


def test_short_file_gives_one_padded_window(tmp_path):
    rate = 16000
    windows, _ = run_file_windows(write_wav(tmp_path / "c.wav", tone(500, 0.7, rate), rate))
    assert len(windows) == 1
    w = windows[0]
    assert w.stream_start == 0.0 and w.stream_end == pytest.approx(0.7) and len(w.samples) == 2 * rate


@given(st.integers(0, 5000), st.integers(1, 800), st.integers(1, 800))
@settings(max_examples=400, deadline=None)
def test_window_count_is_the_number_of_window_starts(total, length, hop):
    from monitord.windowing.tiling import window_count

    assert window_count(total, length, hop) == len(window_starts(total, length, hop))


@pytest.mark.parametrize("rate,hop_s", [(8000, 0.05), (22050, 0.02), (44100, 0.05), (48000, 0.25)])
def test_the_smallest_ring_the_config_accepts_never_holds_a_file_up(tmp_path, rate, hop_s):
    """A file source waits for room for a whole 0.1 s block; the windowing stage frees a window's
    samples once it is whole. With a 2.05 s ring at a 0.05 s hop (accepted before) both waited
    for good, while their heartbeats said running."""
    from monitord.config import ConfigError, parse_config

    def config(ring: float) -> str:
        return (f"sources: [{{id: a, device: default}}]\nmodels: {{yam: {{kind: yamnet}}}}\n"
                f"window: {{seconds: 2.0, hop_s: {hop_s}}}\npipeline: {{ring_seconds: {ring}}}\n")

    smallest = 2.0 + max(hop_s, 0.1)
    parse_config(config(smallest), tmp_path)
    if hop_s < 0.1:
        parse_config(config(1.4).replace("seconds: 2.0", "seconds: 1.3"), tmp_path)  # 1.3 + 0.1 is 1.4000000000000001
    with pytest.raises(ConfigError, match="pipeline.ring_seconds: must be at least"):
        parse_config(config(round(2.0 + hop_s, 3) if hop_s < 0.1 else smallest - 0.01), tmp_path)
    path = write_wav(tmp_path / "a.wav", noise(4.0, rate, -20), rate)
    _, windows, statuses = file_windows(path, GateConfig(mode="energy", threshold_dbfs=-50), rates=(16000,),
                                        hop_s=hop_s, ring_seconds=smallest)
    assert [s for s, _ in statuses] == ["up", "eof"] and windows[-1].stream_end == pytest.approx(4.0)
