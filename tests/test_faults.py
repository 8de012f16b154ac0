"""Faults injected for real where this machine allows it: lost devices, slow and failing models,
overflows, bad audio files."""

from __future__ import annotations

import json
import subprocess
import time
from types import SimpleNamespace

import numpy as np
import pytest

from monitord.capture import BlockWriter
from monitord.ringbuffer import RingBuffer
from tests.conftest import REPO, free_port, monitord_cmd, play, silence, tone, write_wav
from tests.test_e2e import is_alert, read_log, start_daemon, stop_daemon, write_config


def wait_log(path, predicate, timeout: float, proc=None) -> dict | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return None
        if path.exists():
            for event in read_log(path):
                if predicate(event):
                    return event
        time.sleep(0.1)
    return None


def status_is(name: str, after_seq: int = 0):
    return lambda e: e["kind"] == "status" and e["status"] == name and e["seq"] > after_seq


def test_overflow_flags_are_counted_in_the_callback():
    writer = BlockWriter(RingBuffer(4800, 48000), channels=2)
    block = np.ones((480, 2), dtype=np.float32)
    writer(block, 480, None, SimpleNamespace(input_overflow=True, input_underflow=False, __bool__=lambda self: True))
    writer(block, 480, None, None)
    assert writer.stats.input_overflows == 1 and writer.stats.blocks == 2 and writer.ring.written == 960


@pytest.mark.sound
def test_a_restarted_sound_server_is_reconnected_and_the_gap_recorded(tiny_clap, tmp_path, sound_server):
    write_wav(tmp_path / "tone.wav", np.concatenate([tone(1000, 1.5, 48000, -12), silence(0.5, 48000)]), 48000)
    config = write_config(tmp_path, tiny_clap, "{id: mic, device: default, sample_rate: 48000, watchdog_s: 1.0}", free_port())
    log = tmp_path / "events.jsonl"
    proc = start_daemon(config, sound_server)
    try:
        assert wait_log(log, status_is("up"), 60, proc), "never came up"
        time.sleep(1.0)
        first_play = time.time()
        assert play(tmp_path / "tone.wav", sound_server).wait(timeout=15) == 0
        first = wait_log(log, is_alert("tone", "onset"), 20, proc)
        assert first, "no alert before the restart"
        restart = subprocess.run(["bash", str(REPO / "tests" / "sound-server.sh"), "restart"], capture_output=True, text=True, timeout=60)
        assert restart.returncode == 0, restart.stderr
        down = wait_log(log, status_is("down", first["seq"]), 20, proc)
        up = wait_log(log, status_is("up", first["seq"]), 60, proc)
        assert down and up, "no down/up status around the restart"
        time.sleep(1.5)
        second_play = time.time()
        assert play(tmp_path / "tone.wav", sound_server).wait(timeout=15) == 0
        second = wait_log(log, lambda e: is_alert("tone", "onset")(e) and e["seq"] > up["seq"], 20, proc)
    finally:
        code, _, err = stop_daemon(proc)
        import sounddevice as sd

        sd._terminate()  # this process's PortAudio saw the old server too
        sd._initialize()
    assert second, f"no alert after reconnecting\n{err[-3000:]}"
    assert code == 0
    # silence stands in for the outage, so stream time kept pace with the wall clock
    drift = (second["stream_end"] - first["stream_end"]) - (second_play - first_play)
    print(f"stream vs wall clock across the outage: {drift:+.2f} s")
    assert abs(drift) < 1.0


def test_a_missing_device_lists_devices_or_is_retried(tiny_clap, tmp_path):
    config = write_config(tmp_path, tiny_clap, "{id: mic, device: no-such-microphone}", free_port())
    out = subprocess.run(monitord_cmd("run", "-c", str(config)), cwd=REPO, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "no input device matching 'no-such-microphone'" in out.stderr and "Traceback" not in out.stderr
    config.write_text(config.read_text().replace("device: no-such-microphone}", "device: no-such-microphone, retry: true}"))
    proc = start_daemon(config)
    try:
        waiting = wait_log(tmp_path / "events.jsonl", status_is("down"), 60, proc)
        time.sleep(1.5)
        assert proc.poll() is None
    finally:
        code, _, err = stop_daemon(proc)
    assert waiting and "waiting for input device" in waiting["detail"], err[-2000:]
    assert code == 0
