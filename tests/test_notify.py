"""Push notifications through Apprise, to a local HTTP receiver started by the tests (Apprise's json:// target)."""

from __future__ import annotations

import base64
import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest

from monitord.config import NotifyConfig, RuleConfig, load_config
from monitord.output.notify import Notifier
from monitord.types import Event
from tests.conftest import free_port, require, silence, time_scale, tone, wait_until, write_wav
from tests.test_e2e import read_log
from tests.test_faults import ScriptedModel

require("apprise", "pip install 'monitord[notify]'")

RATE = 16000


class Receiver:
    """An HTTP server on a free loopback port that keeps every POST; answers with ``codes`` in turn
    (then 200), after ``delay_s``."""

    def __init__(self, codes: tuple[int, ...] = (), delay_s: float = 0.0):
        self.requests: list[dict] = []
        self.codes = list(codes)
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                time.sleep(delay_s)
                code = outer.codes.pop(0) if outer.codes else 200
                outer.requests.append({"path": self.path, "code": code, "at": time.monotonic(),
                                       "body": json.loads(body) if body else None})
                self.send_response(code)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                return None

        self.server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"json://127.0.0.1:{self.port}/hook"

    def accepted(self) -> list[dict]:
        return [r for r in self.requests if r["code"] == 200]

    def wait(self, count: int, timeout: float) -> list[dict]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and len(self.accepted()) < count:
            time.sleep(0.05)
        return self.accepted()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver():
    r = Receiver()
    yield r
    r.close()


def run_daemon(tmp_path: Path, audio: np.ndarray, notify: str, extra: str = "", cooldown_s: float = 0.0,
               wait_for=None) -> tuple[object, list[dict], float]:
    from monitord.daemon import Daemon

    write_wav(tmp_path / "in.wav", audio, RATE)
    (tmp_path / "c.yaml").write_text(f"""
sources: [{{id: rec, file: in.wav}}]
gate: {{mode: energy, threshold_dbfs: -60}}
models: {{clap: {{kind: clap, model: unused, labels: [tone, noise]}}}}
rules:
  - {{id: tone, model: clap, label: tone, threshold: 0.5, cooldown_s: {cooldown_s}}}
  - {{id: other, model: clap, label: noise, threshold: 0.5}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl, host: test-host}}
notify:
{notify}
{extra}""")
    daemon = Daemon(load_config(tmp_path / "c.yaml"), {"clap": ScriptedModel()})
    daemon.start()
    began = time.monotonic()
    daemon.wait(threading.Event(), until_done=True)
    took = time.monotonic() - began
    if wait_for is not None:
        wait_for()
    daemon.stop()
    return daemon, read_log(tmp_path / "events.jsonl"), took


def burst_file(count: int, period_s: float) -> np.ndarray:
    one = np.concatenate([tone(500, 0.5, RATE, -12), silence(period_s - 0.5, RATE)])
    return np.concatenate([silence(1.0, RATE), *[one] * count, silence(2.0, RATE)])


def test_an_onset_is_pushed_with_its_clip(tmp_path, receiver):
    http_port = free_port()
    daemon, events, _ = run_daemon(
        tmp_path, burst_file(1, 4.0),
        f"  - {{url: '{receiver.url}', rules: [tone], attach_clip: true}}",
        f"clips: {{enabled: true, dir: clips, pre_s: 0.5, post_s: 0.5, format: flac}}\nhttp: {{bind: '127.0.0.1:{http_port}'}}\n",
        wait_for=lambda: receiver.wait(1, 30))
    got = receiver.accepted()
    assert len(got) == 1, receiver.requests
    onset = next(e for e in events if e["kind"] == "alert" and e["phase"] == "onset")
    clip = next(e for e in events if e["kind"] == "status" and e["status"] == "clip")
    assert clip["onset_seq"] == onset["seq"]
    body = got[0]["body"]
    assert body["title"] == "monitord: tone on rec"
    message = body["message"]
    assert f'tone on rec: "tone" scored {onset["score"]:.2f}' in message
    assert onset["time"] in message and f"event #{onset['seq']}" in message and "host test-host" in message
    assert f"dashboard: http://127.0.0.1:{http_port}/" in message
    (attachment,) = body["attachments"]
    assert attachment["filename"] == Path(clip["clip"]).name and attachment["filename"].endswith(".flac")
    assert base64.b64decode(attachment["base64"]) == Path(clip["clip"]).read_bytes()
    assert daemon.sinks[0].sent == 1 and got[0]["at"] >= 0


def test_messages_follow_the_rules_cooldown_and_only_the_listed_rules():
    """Unit level, with a stand-in for Apprise and the clock: onsets of the same source and rule within
    cooldown_s of the last message are not sent, and the next message says how many were left out."""
    import monitord.output.notify as notify

    sent: list[tuple[str, str]] = []

    class FakeApprise:
        def notify(self, body, title, attach=None):
            sent.append((title, body))
            return True

    now = [1000.0]
    rules = {"tone": RuleConfig(id="tone", model="m", label="tone", threshold=0.5, cooldown_s=30),
             "other": RuleConfig(id="other", model="m", label="x", threshold=0.5)}
    notifier = Notifier(NotifyConfig(url="json://x", rules=("tone",)), 0, rules, "h", None, lambda *a, **k: None,
                        apprise_factory=lambda url: (FakeApprise(), "json://x"))
    original = notify.time.monotonic
    notify.time.monotonic = lambda: now[0]
    try:
        def onset(seq: int, rule: str = "tone", source: str = "a", phase: str = "onset") -> Event:
            return Event(kind="alert", source=source, time="2026-01-01T00:00:00.000Z", host="h", seq=seq, rule=rule,
                         label="tone", phase=phase, score=0.9)

        notifier.deliver(onset(1))
        notifier.deliver(onset(2, phase="offset"))  # offsets never notify
        now[0] += 10
        notifier.deliver(onset(3))  # within 30 s: left out
        notifier.deliver(onset(4))
        notifier.deliver(onset(5, source="b"))  # another source: its own cooldown
        notifier.deliver(onset(6, rule="other"))  # not one of this entry's rules
        now[0] += 25
        notifier.deliver(onset(7))  # 35 s after the first message
    finally:
        notify.time.monotonic = original
    jobs = []
    while not notifier.queue.empty():
        jobs.append(notifier.queue.get_nowait())
    assert [(j.event.seq, j.suppressed) for j in jobs] == [(1, 0), (5, 0), (7, 2)]
    title, body = notifier.message(jobs[2])
    assert title == "monitord: tone on a" and "2 more onset(s) of this rule here within its cooldown were not sent" in body


def test_a_message_dropped_from_a_full_queue_starts_no_cooldown():
    """With the sending thread stuck (queue full), a dropped onset must not silence the rule: the next
    onset of the same source and rule, once there is room, is sent even within the cooldown."""
    import monitord.output.notify as notify

    rules = {"tone": RuleConfig(id="tone", model="m", label="tone", threshold=0.5, cooldown_s=60)}
    notifier = Notifier(NotifyConfig(url="json://x"), 0, rules, "h", None, lambda *a, **k: None,
                        apprise_factory=lambda url: (object(), "json://x"))

    def onset(seq: int, source: str) -> Event:
        return Event(kind="alert", source=source, time="2026-01-01T00:00:00.000Z", host="h", seq=seq, rule="tone",
                     label="tone", phase="onset", score=0.9)

    for i in range(notify.QUEUE_MAX):  # other sources fill the queue
        notifier.deliver(onset(i, f"s{i}"))
    notifier.deliver(onset(1000, "door"))
    assert notifier.dropped == 1
    notifier.queue.get_nowait()  # the sender takes one
    notifier.deliver(onset(1001, "door"))
    jobs = [notifier.queue.get_nowait() for _ in range(notifier.queue.qsize())]
    assert jobs[-1].event.seq == 1001 and notifier.dropped == 1


def test_a_reload_brings_new_rules_and_their_cooldowns_to_the_notifier():
    rules = {"tone": RuleConfig(id="tone", model="m", label="tone", threshold=0.5, cooldown_s=60)}
    notifier = Notifier(NotifyConfig(url="json://x"), 0, rules, "h", None, lambda *a, **k: None,
                        apprise_factory=lambda url: (object(), "json://x"))

    def onset(seq: int, rule: str) -> Event:
        return Event(kind="alert", source="a", time="2026-01-01T00:00:00.000Z", host="h", seq=seq, rule=rule,
                     label="tone", phase="onset", score=0.9)

    notifier.deliver(onset(1, "door"))  # not a rule yet
    notifier.deliver(onset(2, "tone"))
    notifier.on_rules((RuleConfig(id="tone", model="m", label="tone", threshold=0.5, cooldown_s=0),
                       RuleConfig(id="door", model="m", label="door", threshold=0.5)))
    notifier.deliver(onset(3, "door"))
    notifier.deliver(onset(4, "tone"))  # the new cooldown (0 s) applies
    jobs = [notifier.queue.get_nowait().event.seq for _ in range(notifier.queue.qsize())]
    assert jobs == [2, 3, 4]


def test_a_daemon_run_sends_one_message_per_cooldown(tmp_path, receiver):
    # four onsets 11 s of stream apart (the engine's stream-time cooldown of 10 s lets each through),
    # read in a few wall-clock seconds: one message
    daemon, events, _ = run_daemon(tmp_path, burst_file(4, 11.0), f"  - {{url: '{receiver.url}', rules: [tone]}}",
                                   cooldown_s=10.0, wait_for=lambda: receiver.wait(1, 30))
    onsets = [e for e in events if e["kind"] == "alert" and e["rule"] == "tone" and e["phase"] == "onset"]
    assert len(onsets) == 4
    time.sleep(0.5)
    assert len(receiver.accepted()) == 1 and daemon.sinks[0].sent == 1


def test_failures_are_retried_with_backoff_and_reported(tmp_path):
    flaky = Receiver(codes=(500, 503))
    try:
        _, events, _ = run_daemon(tmp_path, burst_file(1, 4.0), f"  - {{url: '{flaky.url}'}}",
                                  wait_for=lambda: flaky.wait(1, 30))
    finally:
        flaky.close()
    assert [r["code"] for r in flaky.requests] == [500, 503, 200]
    gaps = [b["at"] - a["at"] for a, b in zip(flaky.requests, flaky.requests[1:])]
    assert 0.8 < gaps[0] < gaps[1] < 4.0 * time_scale(), gaps  # 1 s, then 2 s
    errors = [e for e in events if e["kind"] == "status" and e["status"] == "notify_error"]
    assert len(errors) == 1 and errors[0]["source"] == "daemon" and errors[0]["attempt"] == 1
    assert "failed (attempt 1 of 5)" in errors[0]["detail"] and "retrying in 1 s" in errors[0]["detail"]
    assert "127.0.0.1" in errors[0]["detail"]


def test_a_dead_service_is_given_up_on_and_never_blocks_the_pipeline(tmp_path):
    dead = Receiver(codes=(500,) * 10, delay_s=1.5)
    try:
        def gave_up() -> bool:  # the status is in the event log (the daemon's own, written as published)
            log = tmp_path / "events.jsonl"
            return log.exists() and "gave up" in log.read_text(errors="replace")

        daemon, events, took = run_daemon(tmp_path, burst_file(3, 4.0), f"  - {{url: '{dead.url}', retries: 1}}",
                                          wait_for=lambda: wait_until(gave_up, 60))
    finally:
        dead.close()
    onsets = [e for e in events if e["kind"] == "alert" and e["phase"] == "onset"]
    assert len(onsets) == 3
    assert took < 4.0 * time_scale(), took  # 13 s of audio scored while every send hung 1.5 s and failed
    errors = [e for e in events if e["kind"] == "status" and e["status"] == "notify_error"]
    assert errors and errors[0]["attempt"] == 1
    assert any("gave up" in e["detail"] and e["attempt"] == 2 for e in errors), [e["detail"] for e in errors]
    assert daemon.sinks[0].failed >= 1


def test_a_notify_url_from_a_file_that_is_not_apprise_is_a_clear_error(tmp_path):
    from monitord.daemon import Daemon
    from monitord.output.publish import PublishError

    (tmp_path / "url.secret").write_text("nope://not-a-service\n")
    write_wav(tmp_path / "in.wav", silence(1.0, RATE), RATE)
    (tmp_path / "c.yaml").write_text(f"""
sources: [{{id: rec, file: in.wav}}]
models: {{clap: {{kind: clap, model: unused, labels: [tone, noise]}}}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
notify: [{{url_file: url.secret}}]
""")
    with pytest.raises(PublishError, match=r"notify\.0\.url_file: not an Apprise URL"):
        Daemon(load_config(tmp_path / "c.yaml"), {"clap": ScriptedModel()})
