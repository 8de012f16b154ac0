"""The supervisor and its stages: a dead stage is never healthy, it is named in a status event and
restarted (or ends the daemon), the watchdog goes quiet meanwhile, and nothing is lost."""

from __future__ import annotations

import errno
import json
import socket
import threading
import time

import numpy as np
import pytest

from monitord.config import load_config
from monitord.daemon import Daemon
from monitord.sdnotify import Watchdog
from monitord.types import StageState
from tests.conftest import free_port, silence, tone, wait_until, write_wav
from tests.test_e2e import read_log
from tests.test_faults import ScriptedModel

RATE = 16000


def beeps(count: int) -> np.ndarray:
    """A 0.8 s beep every 2 s: an onset and an offset of rule "tone" every 2 s."""
    return np.concatenate([np.concatenate([silence(1.2, RATE), tone(500, 0.8, RATE, -12)]) for _ in range(count)])


def make_daemon(tmp_path, model=None, count=30, realtime=True, extra="") -> Daemon:
    write_wav(tmp_path / "in.wav", beeps(count), RATE)
    (tmp_path / "c.yaml").write_text(f"""
sources: [{{id: rec, file: in.wav, realtime: {str(realtime).lower()}}}]
gate: {{mode: energy, threshold_dbfs: -60}}
window: {{seconds: 1.0, hop_s: 0.5}}
models: {{clap: {{kind: clap, model: unused, labels: [tone, noise]}}}}
rules: [{{id: tone, model: clap, label: tone, threshold: 0.5}}]
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
{extra}""")
    return Daemon(load_config(tmp_path / "c.yaml"), {"clap": model or ScriptedModel()})


class Supervised:
    """The daemon's supervising loop on a thread of its own, as `monitord run` runs it on the main thread."""

    def __init__(self, daemon: Daemon, watchdog: Watchdog | None = None, until_done: bool = False):
        self.daemon, self.stop = daemon, threading.Event()
        daemon.start()
        self.thread = threading.Thread(target=daemon.wait, args=(self.stop, until_done, watchdog), daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        self.daemon.stop()


def events(tmp_path) -> list[dict]:
    path = tmp_path / "events.jsonl"
    return read_log(path) if path.exists() else []




STAGES = ["output", "alerts", "inference", "windowing-rec", "file-rec"]


@pytest.mark.parametrize("stage_name", STAGES)
def test_a_killed_stage_is_unhealthy_named_in_a_status_and_restarted_and_the_pipeline_goes_on(tmp_path, stage_name):
    daemon = make_daemon(tmp_path)
    run = Supervised(daemon)
    try:
        assert wait_until(lambda: any(e.get("phase") == "onset" for e in events(tmp_path)), 20), "no alert before the fault"
        assert wait_until(daemon.healthy, 5)
        stage = next(s for s in daemon.stages if s.name == stage_name)
        stage.inject_failure(RuntimeError(f"injected into {stage_name}"))
        assert wait_until(lambda: stage.state is StageState.FAILED, 5), stage.state
        assert not daemon.healthy() and not daemon.health()[stage_name].ok
        assert wait_until(lambda: stage.restarts == 1 and stage.state in (StageState.RUNNING, StageState.DEGRADED), 10)
        assert wait_until(daemon.healthy, 5), daemon.health()
        failed_at = max(e["seq"] for e in events(tmp_path))
        assert wait_until(lambda: any(e.get("phase") == "onset" and e["seq"] > failed_at for e in events(tmp_path)), 20), \
            "no alert after the restart"
    finally:
        run.close()
    logged = events(tmp_path)
    failed = [e for e in logged if e["kind"] == "status" and e["status"] == "stage_failed"]
    assert len(failed) == 1 and failed[0]["stage"] == stage_name and f"injected into {stage_name}" in failed[0]["detail"]
    assert any(e.get("status") == "stage_restarted" and e["stage"] == stage_name for e in logged)
    assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1))  # nothing lost, no seq skipped
    phases = [e["phase"] for e in logged if e["kind"] == "alert"]
    assert phases == ["onset", "offset"] * (len(phases) // 2)  # every onset got its offset, even across the restart


def test_a_stage_that_keeps_dying_ends_the_daemon_with_exit_status_1(tmp_path, monkeypatch):
    import monitord.daemon as supervisor

    monkeypatch.setattr(supervisor, "RESTART_WINDOW_S", 60.0)
    daemon = make_daemon(tmp_path)
    run = Supervised(daemon)
    try:
        for attempt in range(supervisor.MAX_RESTARTS + 1):
            assert wait_until(lambda: daemon.inference.state is StageState.RUNNING, 20), attempt
            daemon.inference.inject_failure(RuntimeError(f"fault {attempt}"))
            assert wait_until(lambda: daemon.inference.state is StageState.FAILED or daemon.fatal, 5)
        run.thread.join(20)
        assert not run.thread.is_alive(), "the supervising loop went on after too many failures"
        assert daemon.exit_code == 1 and "stage inference failed" in daemon.fatal
    finally:
        run.close()
    fatal = [e for e in events(tmp_path) if e.get("status") == "fatal"]
    assert fatal and fatal[0]["stage"] == "inference"


def test_the_watchdog_goes_quiet_while_a_stage_is_dead(tmp_path, monkeypatch):
    """While a stage is dead (waiting out its restart backoff, 1 s after a first failure) the
    watchdog is not pinged, so a daemon whose stage never comes back is restarted by systemd;
    once the stage is running again the pings resume."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(str(tmp_path / "notify.sock"))
    listener.settimeout(0.05)
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "notify.sock"))
    monkeypatch.setenv("WATCHDOG_USEC", "400000")  # pings every 0.2 s while healthy
    daemon = make_daemon(tmp_path)
    run = Supervised(daemon, watchdog=Watchdog())
    pings: list[float] = []
    listening = threading.Event()

    def collect() -> None:  # on a thread of its own: a ping's time is when it came, never when a wait ended
        while not listening.is_set():
            try:
                if listener.recv(64) == b"WATCHDOG=1":
                    pings.append(time.monotonic())
            except socket.timeout:
                pass

    collector = threading.Thread(target=collect, daemon=True)
    collector.start()
    try:
        assert wait_until(lambda: len(pings) >= 5, 20), "no pings while healthy"
        daemon.alerts.inject_failure(RuntimeError("injected"))  # it fails at the stage's next beat
        assert wait_until(lambda: daemon.alerts.state is StageState.FAILED, 20)
        died = time.monotonic()
        assert wait_until(lambda: daemon.alerts.state is StageState.RUNNING, 20), "the stage was not restarted"
        restarted = time.monotonic()
        assert wait_until(lambda: any(t > restarted for t in pings), 20), "no pings once the stage ran again"
    finally:
        listening.set()
        collector.join(10)
        run.close()
        listener.close()
    # one ping decided a moment before the death may arrive after it; at 0.2 s, a second of them would be five
    while_dead = [round(t - died, 3) for t in pings if died < t < restarted]
    assert len(while_dead) <= 1, f"the watchdog was pinged while a stage was dead: {while_dead} s after it died"
    assert restarted - died > 0.5  # (the restart backoff: there was time for pings)


def test_until_done_ends_even_when_a_stage_is_dead_for_good(tmp_path, monkeypatch):
    """The old daemon hung in --until-done with a dead worker; now it stops with exit status 1."""
    import monitord.daemon as supervisor

    monkeypatch.setattr(supervisor, "MAX_RESTARTS", 0)
    daemon = make_daemon(tmp_path, count=3, realtime=False)
    daemon.start()
    daemon.inference.inject_failure(RuntimeError("dead for good"))
    finished = threading.Event()
    thread = threading.Thread(target=lambda: (daemon.wait(threading.Event(), until_done=True), finished.set()), daemon=True)
    thread.start()
    assert finished.wait(20), "--until-done hung on a dead inference stage"
    daemon.stop()
    assert daemon.exit_code == 1


def test_a_reload_whose_labels_cannot_be_prepared_is_refused_and_the_old_labels_keep_scoring(tmp_path):
    class LabelledModel(ScriptedModel):
        def prepare_labels(self, labels, prompt):
            raise OSError("the text tower's files are gone")

    daemon = make_daemon(tmp_path, LabelledModel())
    run = Supervised(daemon)
    try:
        assert wait_until(lambda: any(e.get("phase") == "onset" for e in events(tmp_path)), 20)
        new = load_config(tmp_path / "c.yaml").model_copy()
        text = (tmp_path / "c.yaml").read_text().replace("labels: [tone, noise]", "labels: [tone, noise, hum]")
        (tmp_path / "c2.yaml").write_text(text)
        new = load_config(tmp_path / "c2.yaml")
        assert daemon.apply_reload(new) is False
        seen = max(e["seq"] for e in events(tmp_path))
        assert daemon.inference.alive and daemon.healthy()
        assert wait_until(lambda: any(e.get("phase") == "onset" and e["seq"] > seen for e in events(tmp_path)), 20)
        assert daemon.models["clap"].labels == ("tone", "noise")
    finally:
        run.close()
    refused = [e for e in events(tmp_path) if e.get("status") == "reload_failed"]
    assert len(refused) == 1 and "text tower's files are gone" in refused[0]["detail"]


@pytest.mark.parametrize("section, value", [("clips", "clips: {enabled: true}"), ("metrics", "metrics: {bind: '127.0.0.1:1'}"),
                                            ("http", "http: {bind: '127.0.0.1:1'}")])
def test_a_reload_that_changes_what_needs_a_restart_is_refused_naming_the_keys(tmp_path, section, value):
    daemon = make_daemon(tmp_path)
    run = Supervised(daemon)
    try:
        (tmp_path / "c2.yaml").write_text((tmp_path / "c.yaml").read_text() + value + "\n")
        assert daemon.apply_reload(load_config(tmp_path / "c2.yaml")) is False
        assert getattr(daemon.config, section) == getattr(load_config(tmp_path / "c.yaml"), section)
    finally:
        run.close()
    refused = [e for e in events(tmp_path) if e.get("status") == "reload_failed"]
    assert len(refused) == 1 and refused[0]["detail"].startswith(f"{section} changed: restart monitord")
    assert not any(e.get("status") == "reloaded" for e in events(tmp_path))


def test_an_event_log_that_cannot_be_written_for_a_while_loses_nothing_and_never_stalls_inference(tmp_path, monkeypatch):
    import os

    import monitord.output.eventlog as eventlog

    daemon = make_daemon(tmp_path, count=12, realtime=False)
    failing = threading.Event()
    real_write = os.write
    failures = []

    def write(fd, data):
        if failing.is_set():
            failures.append(len(data))
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(eventlog.os, "write", write)
    failing.set()  # the disk is full from the start
    daemon.start()
    try:
        assert wait_until(lambda: daemon.output.state is StageState.DEGRADED, 10), daemon.output.state
        assert wait_until(lambda: daemon.inference.stats.scored["clap"] >= 20, 20), "inference waited on the disk"
        assert daemon.healthy(), "a degraded output stage that keeps retrying is alive, not dead"
        failing.clear()  # space again
        assert wait_until(lambda: daemon.output.state is StageState.RUNNING, 10)
        daemon.wait(threading.Event(), until_done=True)
    finally:
        daemon.stop()
    logged = events(tmp_path)
    assert failures, "the fault was never hit"
    assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1))
    phases = [e["phase"] for e in logged if e["kind"] == "alert"]
    assert phases.count("onset") == 12 and phases.count("offset") == 12


def test_a_file_that_breaks_mid_way_says_error_and_not_eof(tmp_path):
    import soundfile as sf

    sf.write(str(tmp_path / "good.flac"), beeps(3), RATE, subtype="PCM_16")
    data = bytearray((tmp_path / "good.flac").read_bytes())
    middle = len(data) // 2
    data[middle : middle + 4000] = bytes([0x00, 0xFF]) * 2000  # garbage in the middle of the stream
    (tmp_path / "bad.flac").write_bytes(bytes(data))
    daemon = make_daemon(tmp_path, count=3, realtime=False)
    source = daemon.config.sources[0].model_copy(update={"file": str(tmp_path / "bad.flac")})
    daemon.config = daemon.config.model_copy(update={"sources": (source,)})
    daemon.start()
    daemon.wait(threading.Event(), until_done=True)
    daemon.stop()
    statuses = [(e["status"], e["detail"]) for e in events(tmp_path) if e["kind"] == "status"]
    assert [s for s, _ in statuses] == ["up", "error"], statuses
    assert "decoding failed after" in statuses[1][1]


def test_the_stage_states_are_visible_over_json(tmp_path):
    daemon = make_daemon(tmp_path)
    run = Supervised(daemon)
    try:
        assert wait_until(daemon.healthy, 10)
        health = daemon.health()
        assert set(health) == set(STAGES) and all(h.ok for h in health.values())
        json.dumps({k: v.__dict__ for k, v in health.items()})
    finally:
        run.close()


def test_a_source_waiting_out_a_long_backoff_stays_healthy(tmp_path):
    """Waiting for a microphone that is not there, with a backoff longer than the stall bound, is
    being degraded, not stuck: the watchdog must keep being pinged."""
    (tmp_path / "c.yaml").write_text(f"""
sources: [{{id: mic, device: no-such-microphone, retry: true, backoff_max_s: 60}}]
models: {{clap: {{kind: clap, model: unused, labels: [tone, noise]}}}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
""")
    daemon = Daemon(load_config(tmp_path / "c.yaml"), {"clap": ScriptedModel()})
    daemon.start()
    source = daemon.sources[0]
    source.stall_s = 1.0  # shorter than the backoffs it will sit out (0.5, 1, 2, 4 s)
    try:
        deadline = time.monotonic() + 8
        while time.monotonic() < deadline:
            assert daemon.health()[source.name].ok, daemon.health()[source.name]
            time.sleep(0.2)
        assert source.state is StageState.DEGRADED and "waiting for a microphone" in source.detail
    finally:
        daemon.stop()


def test_a_dead_replay_server_thread_makes_the_daemon_unhealthy(tmp_path, monkeypatch):
    """The threads the output stage relies on count too: replay dying (here by an error no handler
    catches) stops the watchdog pings like a dead stage does."""
    import zmq

    from monitord.output.publish import ReplayServer

    class Fatal(BaseException):
        pass

    def explode(self, request):
        raise Fatal("the replay thread dies")

    daemon = make_daemon(tmp_path)
    replay = f"tcp://127.0.0.1:{free_port()}"
    daemon.config = daemon.config.model_copy(update={"publish": daemon.config.publish.model_copy(
        update={"replay_endpoint": replay})})
    from monitord.output.publish import Publisher

    daemon.publisher = Publisher(daemon.config.publish)
    run = Supervised(daemon)
    try:
        assert wait_until(daemon.healthy, 10)
        monkeypatch.setattr(ReplayServer, "answer", explode)
        req = zmq.Context.instance().socket(zmq.REQ)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(replay)
        req.send(b'{"since": 0}')
        assert wait_until(lambda: not daemon.publisher.replay.alive, 5)
        req.close()
        health = daemon.health()
        assert not health["replay"].ok and not daemon.healthy()
    finally:
        run.close()
