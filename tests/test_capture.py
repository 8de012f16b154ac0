"""Real capture: a tone played into the PulseAudio null sink, captured by the daemon's device source."""

from __future__ import annotations


import numpy as np
import pytest

from monitord.sources import SourceError
from monitord.sources.device import DeviceSource, resolve_device
from monitord.config import SourceConfig
from tests.conftest import dominant_frequency, play, rms_dbfs, silence, time_scale, tone, write_wav

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
        assert player.wait(timeout=15 * time_scale()) == 0
        # 0.5 s more of captured stream, not of wall time: capture behind on a loaded box still ends here
        assert source.ring.wait_for(source.ring.written + RATE // 2, timeout=10 * time_scale())
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
    # after playback was asked for, within the player's start and the sound server's latency
    assert 0.0 <= onset_s < 1.0 * time_scale(), onset_s
    assert abs(duration_s - 1.0) < 0.03, duration_s
    middle = captured[loud[0] + RATE // 4 : loud[0] + 3 * RATE // 4]
    assert abs(dominant_frequency(middle, RATE) - 1000) < 3
    assert abs(rms_dbfs(middle) - (-12)) < 1.0
    assert [s[1] for s in statuses] == ["up"]


TWO_MICROPHONES = """
from monitord.config import SourceConfig
from monitord.sources.device import DeviceSource

# no source threads: this script plays the part of a's (lost, not yet disconnected) and b's (reconnecting)
a = DeviceSource(SourceConfig(id="a", device="default", sample_rate=48000), 5.0, lambda *s: None)
b = DeviceSource(SourceConfig(id="b", device="default", sample_rate=48000), 5.0, lambda *s: None)
a._stream.start()
assert a.ring.wait_for(4800, timeout=10), "a captured nothing"
a._stream.stop()  # a's stream is lost: open, not running
b.disconnect()
b.connect()  # b reconnects meanwhile: PortAudio must not be re-initialised under a's open stream
a._stream.start()  # a's stream is still PortAudio's: it runs again
written = a.ring.written
assert a.ring.wait_for(written + 4800, timeout=10), "a's stream did not run again"
assert b.ring.wait_for(4800, timeout=10), "b captured nothing"
a.disconnect()
b.disconnect()
print("OK", flush=True)
"""


def test_a_microphone_reconnecting_leaves_another_microphones_open_stream_alone(sound_server, tmp_path):
    """Two device sources: one reconnects while the other's stream is open but not running (lost, its
    thread not yet at its disconnect). Re-initialising PortAudio then would close that stream under
    it, a dangling pointer in its thread (a segfault); in a process of its own, since that would end it."""
    import subprocess
    import sys

    from tests.conftest import REPO, time_scale

    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", TWO_MICROPHONES], cwd=REPO,
                         env={**__import__("os").environ, **sound_server}, capture_output=True, text=True,
                         timeout=120 * time_scale())
    assert out.returncode == 0 and out.stdout.strip() == "OK", (out.returncode, out.stderr[-3000:])


AN_UNCLOSABLE_STREAM = """
from monitord.config import SourceConfig
from monitord.sources.device import DeviceSource

a = DeviceSource(SourceConfig(id="a", device="default", sample_rate=48000), 5.0, lambda *s: None)
b = DeviceSource(SourceConfig(id="b", device="default", sample_rate=48000), 5.0, lambda *s: None)
stream = a._stream


def refuse(ignore_errors=True):  # PortAudio refusing to close (a hung sound server): it keeps the stream
    raise a._sd.PortAudioError("Unanticipated host error", -9999)


stream.close = refuse
a.disconnect()
assert a._stream is None and DeviceSource._unclosed == [stream], DeviceSource._unclosed
b.disconnect()
b.connect()  # b reconnects: PortAudio must not be re-initialised while it still holds a's stream
stream.start()  # still PortAudio's: it runs (a re-initialisation would have freed it under us)
assert a.ring.wait_for(4800, timeout=10), "the kept stream did not run"
assert b.ring.wait_for(4800, timeout=10), "b captured nothing"
b.disconnect()
print("OK", flush=True)
"""


def test_a_stream_portaudio_would_not_close_is_kept_and_portaudio_not_reinitialised_under_it(sound_server):
    """A stream whose close PortAudio refused is still PortAudio's (and may still call its callback):
    another source reconnecting re-initialised PortAudio regardless, freeing it under its owner. It is
    kept, and no re-initialisation happens while it is; in a process of its own (a crash ends it)."""
    import os
    import subprocess
    import sys

    from tests.conftest import REPO, time_scale

    out = subprocess.run([sys.executable, "-X", "faulthandler", "-c", AN_UNCLOSABLE_STREAM], cwd=REPO,
                         env={**os.environ, **sound_server}, capture_output=True, text=True, timeout=120 * time_scale())
    assert out.returncode == 0 and out.stdout.strip() == "OK", (out.returncode, out.stderr[-3000:])


def test_a_device_source_stops_within_its_bound_while_portaudio_is_busy_elsewhere(sound_server, monkeypatch, caplog):
    """PortAudio hung in another source's close (a dead sound server) holds its lock: a stopping
    source waited for it for good, and with it the daemon's stop. It waits STOP_WAIT_S, says so,
    and goes on."""
    import logging
    import threading

    from monitord.sources import device

    monkeypatch.setattr(device, "STOP_WAIT_S", 0.5)
    source = DeviceSource(SourceConfig(id="mic", device="default", sample_rate=RATE), 5.0, lambda *a: None)
    source.start()
    assert source.ring.wait_for(RATE // 10, timeout=30), "no audio captured"
    stopper = threading.Thread(target=source.stop, daemon=True)
    with caplog.at_level(logging.WARNING, logger="monitord.sources.device"):
        DeviceSource._portaudio_lock.acquire()  # the source hung elsewhere
        try:
            stopper.start()
            stopper.join(60)
            stopped = not stopper.is_alive()
        finally:
            DeviceSource._portaudio_lock.release()
    stopper.join(60)
    assert source.join(60)
    assert stopped, "the stop waited on PortAudio's lock past its bound"
    assert "PortAudio is busy elsewhere" in caplog.text


def test_an_unknown_device_lists_what_is_there(sound_server):
    with pytest.raises(SourceError) as info:
        resolve_device("no such microphone")
    assert "available input devices" in str(info.value) and "pulse" in str(info.value)
    assert resolve_device("default")["channels"] >= 1


def test_the_sound_server_and_its_keep_alive_stop_when_the_session_ends(tmp_path):
    """A test session that used the sound server leaves no PulseAudio and no keep-alive reader behind."""
    import os
    import shutil
    import subprocess
    import sys

    import psutil

    from tests.conftest import REPO, need

    need(shutil.which("pulseaudio") is not None, "PulseAudio is not installed (tests/sound-server.sh install)")
    env = {k: v for k, v in os.environ.items() if k != "XDG_RUNTIME_DIR"} | {"TMPDIR": str(tmp_path)}
    inner = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                            "tests/test_capture.py::test_an_unknown_device_lists_what_is_there"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=180)

    def started_there(p: psutil.Process) -> bool:  # the server names its runtime dir; the keep-alive has it in its environment
        try:
            return p.status() != psutil.STATUS_ZOMBIE and (
                any(str(tmp_path) in arg for arg in p.cmdline()) or str(tmp_path) in p.environ().get("XDG_RUNTIME_DIR", ""))
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            return False

    left = [p for p in psutil.process_iter() if started_there(p)]
    described = [f"{p.pid} {' '.join(p.cmdline())}" for p in left]
    for p in left:
        p.kill()
    assert inner.returncode == 0, inner.stdout[-3000:] + inner.stderr[-3000:]
    assert "1 passed" in inner.stdout, inner.stdout[-3000:]
    assert not left, described


KILL_AFTER_THE_TEST = """
import os
import signal


def pytest_runtest_logreport(report):  # the test has run; as a crashed worker ends, no fixture's teardown runs
    if report.when == "call":
        os.kill(os.getpid(), signal.SIGKILL)
"""


def test_a_test_process_killed_mid_session_leaves_no_sound_server_behind(tmp_path):
    """The session's own stop never runs in a killed process (a crashed pytest-xdist worker): the
    watcher sound-server.sh leaves stops the server and its keep-alive once that process is gone."""
    import os
    import shutil
    import subprocess
    import sys

    import psutil

    from tests.conftest import REPO, need, time_scale, wait_until

    need(shutil.which("pulseaudio") is not None, "PulseAudio is not installed (tests/sound-server.sh install)")
    (tmp_path / "plugin").mkdir()
    (tmp_path / "plugin" / "kill_after_the_test.py").write_text(KILL_AFTER_THE_TEST)
    env = {k: v for k, v in os.environ.items() if k not in ("XDG_RUNTIME_DIR", "MONITORD_SOUND_OWNER")} | {
        "TMPDIR": str(tmp_path), "PYTHONPATH": str(tmp_path / "plugin")}
    inner = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "kill_after_the_test",
                            "tests/test_capture.py::test_an_unknown_device_lists_what_is_there"],
                           cwd=REPO, env=env, capture_output=True, text=True, timeout=180)
    assert inner.returncode == -9, inner.stdout[-3000:] + inner.stderr[-3000:]

    def started_there() -> list[psutil.Process]:
        found = []
        for p in psutil.process_iter():
            try:
                if p.status() != psutil.STATUS_ZOMBIE and (any(str(tmp_path) in arg for arg in p.cmdline())
                                                           or str(tmp_path) in p.environ().get("XDG_RUNTIME_DIR", "")):
                    found.append(p)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                pass
        return found

    gone = wait_until(lambda: not started_there(), 30 * time_scale())
    left = started_there()
    described = [f"{p.pid} {' '.join(p.cmdline())}" for p in left]
    for p in left:
        p.kill()
    assert gone, described
