"""Real capture: a tone played into the PulseAudio null sink, captured by the daemon's device source."""

from __future__ import annotations

import time

import numpy as np
import pytest

from monitord.sources import SourceError
from monitord.sources.device import DeviceSource, resolve_device
from monitord.config import SourceConfig
from tests.conftest import dominant_frequency, play, rms_dbfs, silence, tone, write_wav

pytestmark = pytest.mark.sound
RATE = 48000


def test_captured_windows_hold_the_played_tone_at_the_right_time(sound_server, tmp_path):
    played = np.concatenate([tone(1000, 1.0, RATE, dbfs=-12), silence(0.3, RATE)])
    path = write_wav(tmp_path / "tone.wav", played, RATE)
    statuses = []
    source = DeviceSource(SourceConfig(id="mic", device="default", sample_rate=RATE), 10.0, lambda *a: statuses.append(a))
    source.start()
    try:
        assert source.ring.wait_for(RATE // 5, timeout=5), "no audio captured"
        launched_at = source.ring.written  # the stream index when playback was asked for
        player = play(path, sound_server)
        assert player.wait(timeout=15) == 0
        time.sleep(0.3)
        end = source.ring.written
        captured = source.ring.read(launched_at, end - launched_at)
    finally:
        source.stop()
    assert source.stats.blocks > 0 and source.stats.input_overflows == 0
    envelope = np.sqrt(np.convolve(captured.astype(np.float64) ** 2, np.ones(480) / 480, mode="same"))
    loud = np.flatnonzero(envelope > 10 ** (-24 / 20))
    assert loud.size, f"the tone never arrived (peak {envelope.max():.4f})"
    onset_s = loud[0] / RATE
    duration_s = (loud[-1] - loud[0]) / RATE
    assert 0.0 <= onset_s < 1.0, onset_s  # after playback was asked for, within the sound server's latency
    assert abs(duration_s - 1.0) < 0.03, duration_s
    middle = captured[loud[0] + RATE // 4 : loud[0] + 3 * RATE // 4]
    assert abs(dominant_frequency(middle, RATE) - 1000) < 3
    assert abs(rms_dbfs(middle) - (-12)) < 1.0
    assert [s[1] for s in statuses] == ["up"]


def test_an_unknown_device_lists_what_is_there(sound_server):
    with pytest.raises(SourceError) as info:
        resolve_device("no such microphone")
    assert "available input devices" in str(info.value) and "pulse" in str(info.value)
    assert resolve_device("default")["channels"] >= 1
