"""Review 2: failing tests for faults found in the MQTT and notification sinks, optional models and
remote inference. Each test names the fault it shows."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import pytest

from monitord.config import MqttConfig
from monitord.output.eventlog import EventLog
from monitord.output.mqtt import MqttSink, Topics
from monitord.types import Event
from tests.conftest import require, wait_until

require("paho.mqtt.client", "pip install 'monitord[mqtt]'")


class _Reason:
    def __init__(self, value: int = 0):
        self.value = value
        self.is_failure = value >= 0x80

    def __str__(self) -> str:
        return f"reason {self.value}"


class _Info:
    def __init__(self, mid: int):
        self.mid = mid

    def wait_for_publish(self, timeout: float) -> None:
        return None


class FakeBroker:
    """Stands in for paho and a broker: ``up`` decides whether a connection succeeds; every publish
    is kept and acknowledged at once (unless ``hold_acks``)."""

    def __init__(self):
        self._up = False
        self.downs = 0
        """Times the broker went down: a client connected before a down stays disconnected (tests bring
        the broker back as soon as the sink noticed, which may be before its connect has returned)."""
        self.published: list[tuple[str, str, bool]] = []
        self.lock = threading.Lock()
        self.mid = 0

    @property
    def up(self) -> bool:
        return self._up

    @up.setter
    def up(self, value: bool) -> None:
        if self._up and not value:
            self.downs += 1
        self._up = value

    def factory(self):
        broker = self

        class Client:
            on_connect = on_disconnect = on_publish = None

            def __init__(self):
                self.connected = False
                self.downs = broker.downs

            def connect(self, host, port, keepalive):
                if not broker.up:
                    raise ConnectionRefusedError(111, "Connection refused")
                self.downs = broker.downs

            def loop_start(self):
                self.connected = True
                self.on_connect(self, None, None, _Reason(0), None)

            def loop_stop(self):
                pass

            def disconnect(self):
                self.connected = False

            def is_connected(self):
                return self.connected and broker.up and self.downs == broker.downs

            def publish(self, topic, payload, qos=0, retain=False):
                with broker.lock:
                    broker.mid += 1
                    mid = broker.mid
                    broker.published.append((topic, payload if isinstance(payload, str) else payload.decode(), retain))
                self.on_publish(self, None, mid, _Reason(0), None)
                return _Info(mid)

        return Client()

    def event_seqs(self, prefix: str = "m") -> list[int]:
        with self.lock:
            return [json.loads(p)["seq"] for t, p, r in self.published
                    if t.startswith(prefix + "/") and not t.endswith(("/state", "/level")) and t != f"{prefix}/availability"]


def status_event(seq: int) -> Event:
    return Event(kind="status", source="rec", time="2026-01-01T00:00:00.000Z", host="h", seq=seq, id=f"id{seq}",
                 status="overload", detail="x" * 200)


def make_sink(tmp_path: Path, broker: FakeBroker, log: EventLog | None, statuses: list, **mqtt) -> MqttSink:
    config = MqttConfig(host="127.0.0.1", port=1, topic_prefix="m", backoff_max_s=1.0, **mqtt)
    topics = Topics(config, "h", [("rec", "tone")], ["rec"])
    return MqttSink(config, topics, log, lambda *a, **k: statuses.append((a, k)),
                    state_path=tmp_path / "events.jsonl.mqtt-state.json", client_factory=broker.factory)




# --- MQTT -------------------------------------------------------------------------------------


def test_mqtt_sink_thread_dies_silently_on_a_password_file_that_is_not_utf8(tmp_path):
    """A password file in another encoding (Latin-1 'é') raises UnicodeDecodeError (a ValueError, not the
    OSError _connect catches) on the sink's thread: the thread dies, nothing says so, no retry ever
    follows, and the daemon stays healthy while no event reaches the broker again."""
    from monitord.output.mqtt import MqttSink as RealSink

    password = tmp_path / "pw"
    password.write_bytes("caf\u00e9\n".encode("latin-1"))
    statuses: list = []
    config = MqttConfig(host="127.0.0.1", port=1, username="u", password_file=str(password), topic_prefix="m")
    sink = RealSink(config, Topics(config, "h", [], []), None, lambda *a, **k: statuses.append((a, k)))
    sink.start()
    try:
        time.sleep(1.0)
        assert sink._thread.is_alive(), "the MQTT sink's thread died; nothing reported it"
    finally:
        sink.stop(0.5)


def test_mqtt_events_still_in_memory_are_lost_when_the_log_rotated_while_the_broker_was_down(tmp_path):
    """Broker down; 1500 events logged (the log keeps only its last few hundred: rotation) and handed
    over (the sink holds the last 1000 in memory). When the broker is back the sink asks the log
    first, which starts hundreds of seqs later than what it holds: the events only memory had
    are skipped, and nothing says events were lost."""
    log = EventLog(tmp_path / "events.jsonl", max_bytes=80_000, keep=1)
    log.open()
    broker, statuses = FakeBroker(), []
    sink = make_sink(tmp_path, broker, log, statuses)
    sink.start()
    try:
        for seq in range(1, 1501):
            event = status_event(seq)
            log.append(event.to_json().encode())
            sink.deliver(event)
        oldest_logged = json.loads(EventLog(tmp_path / "events.jsonl", keep=1).read_since(0, 1)[0][0])["seq"]
        assert oldest_logged > 501  # the log no longer has what only memory holds
        broker.up = True
        assert wait_until(lambda: 1500 in broker.event_seqs(), 20)
        sent = broker.event_seqs()
        lost = sorted(set(range(501, 1501)) - set(sent))
        assert not lost, f"{len(lost)} events held in memory never sent (seqs {lost[0]}..{lost[-1]})"
    finally:
        sink.stop(1.0)
        log.close()


def test_mqtt_events_rotated_out_of_the_log_while_the_broker_was_down_are_lost_without_a_word(tmp_path):
    """Restart with a state file whose acknowledged seq is older than anything the log still keeps
    (rotated away while the broker was down): the sink jumps the gap and no status says that events
    1..N never reached the broker (the module promises 'nothing is lost while the broker is away')."""
    log = EventLog(tmp_path / "events.jsonl", max_bytes=20_000, keep=1)
    log.open()
    for seq in range(1, 301):
        log.append(status_event(seq).to_json().encode())
    (tmp_path / "events.jsonl.mqtt-state.json").write_text('{"acked_seq": 10}\n')
    oldest = log.read_since(0, 1)[1]
    assert oldest > 11
    broker, statuses = FakeBroker(), []
    broker.up = True
    sink = make_sink(tmp_path, broker, log, statuses)
    sink.start()
    try:
        assert wait_until(lambda: 300 in broker.event_seqs(), 20)
        said = [a for a, k in statuses if a[1] not in ("mqtt_up",)]
        assert said, f"events 11..{oldest - 1} never reached the broker and no status said so: {statuses}"
    finally:
        sink.stop(1.0)
        log.close()


def test_mqtt_replaying_a_backlog_from_the_log_is_quadratic(tmp_path, monkeypatch):
    """After an outage the sink reads the log back LOG_BATCH (200) events at a time, and every
    read_since parses the current file from its first line: replaying N events parses ~N^2/400
    lines (a day's outage at 64 MB per file: minutes to tens of minutes during which live alerts,
    sent in seq order behind the backlog, do not reach Home Assistant). Counted in lines parsed,
    not seconds: a linear replay parses each line a small number of times."""
    import monitord.output.eventlog as eventlog

    n = 10_000
    log = EventLog(tmp_path / "events.jsonl")
    log.open()
    for seq in range(1, n + 1):
        log.append(status_event(seq).to_json().encode())
    (tmp_path / "events.jsonl.mqtt-state.json").write_text('{"acked_seq": 0}\n')
    parsed = [0]
    real = eventlog._seq_of

    def counting(line):
        parsed[0] += 1
        return real(line)

    monkeypatch.setattr(eventlog, "_seq_of", counting)
    broker, statuses = FakeBroker(), []
    broker.up = True
    sink = make_sink(tmp_path, broker, log, statuses)
    sink.start()
    try:
        assert wait_until(lambda: sink.acked_seq >= n, 120)
    finally:
        sink.stop(1.0)
        log.close()
    assert parsed[0] < 5 * n, f"{parsed[0]} log lines parsed to replay {n} events"


def alert_event(seq: int, phase: str) -> Event:
    return Event(kind="alert", source="rec", rule="tone", label="tone", phase=phase, score=0.9,
                 time="2026-01-01T00:00:00.000Z", host="h", seq=seq, id=f"id{seq}")


def test_mqtt_retained_state_stays_on_after_a_crash_with_an_unacknowledged_onset(tmp_path):
    """The broker was away when an onset was logged, then the process died (power loss, OOM kill:
    no offset at stop). At the next start the sink publishes OFF, then replays the old onset,
    which sets the retained state ON: nothing in this run will ever send its offset (the engine
    starts with no open alert), so Home Assistant shows the alarm on until the rule fires again."""
    log = EventLog(tmp_path / "events.jsonl")
    log.open()
    log.append(status_event(1).to_json().encode())
    log.append(alert_event(2, "onset").to_json().encode())
    (tmp_path / "events.jsonl.mqtt-state.json").write_text('{"acked_seq": 1}\n')
    broker, statuses = FakeBroker(), []
    broker.up = True
    sink = make_sink(tmp_path, broker, log, statuses)
    sink.start()
    try:
        assert wait_until(lambda: 2 in broker.event_seqs(), 10)
    finally:
        sink.stop(1.0)
        log.close()
    states = [p for t, p, r in broker.published if t == "m/rec/tone/state"]
    assert states[-1] == "OFF", f"retained alert state after the restart: {states}"


def test_home_assistant_discovery_gives_two_alerts_one_entity_when_ids_hold_underscores(tmp_path):
    """Source and rule ids may hold '_': source 'front_door' with rule 'bark' and source 'front' with
    rule 'door_bark' get the same object id, discovery topic and unique_id, so the second config
    overwrites the first (retained) and Home Assistant shows one sensor for two alarms. The config
    check does not catch it."""
    from monitord.config import ConfigError, parse_config

    topics = Topics(MqttConfig(host="h"), "node", [("front_door", "bark"), ("front", "door_bark")], ["front_door", "front"])
    messages = topics.discovery()
    binary = [m for m in messages if "/binary_sensor/" in m.topic]
    unique = {json.loads(m.payload)["uniq_id"] for m in binary}
    if len(unique) == len(binary) and len({m.topic for m in binary}) == len(binary):
        return
    text = ("sources: [{id: front_door, device: default}, {id: front, device: default}]\n"
            "models: {yam: {kind: yamnet, groups: {dog: [Dog]}}}\n"
            "rules: [{id: bark, model: yam, label: dog, threshold: 0.3, sources: [front_door]},\n"
            "        {id: door_bark, model: yam, label: dog, threshold: 0.3, sources: [front]}]\n"
            "publish: {mqtt: {host: h, discovery: true}}\n")
    try:
        parse_config(text, tmp_path)
        found = []
    except ConfigError as exc:
        found = [str(p) for p in exc.problems]
    assert any("publish.mqtt" in p or p.startswith("rules.") for p in found), \
        f"two binary_sensors share unique_id {unique} and the config check says nothing: {found}"


# --- notifications ----------------------------------------------------------------------------


def test_a_service_that_refuses_attachments_never_gets_the_alert(tmp_path):
    """attach_clip on a service that refuses the attachment (a self-hosted ntfy without an
    attachment cache answers 400, ntfy.sh 413 past its size limit, Pushover above 5 MB): every
    retry sends the same message with the same clip, all are refused, and the alarm is never
    delivered, not even as text."""
    require("apprise", "pip install 'monitord[notify]'")
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    from monitord.config import NotifyConfig, RuleConfig
    from monitord.output.notify import Notifier
    from tests.conftest import free_port

    got: list[tuple[int, dict]] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self):  # noqa: N802
            body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
            code = 413 if body.get("attachments") else 200
            got.append((code, body))
            self.send_response(code)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args):
            return None

    server = ThreadingHTTPServer(("127.0.0.1", free_port()), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    clip = tmp_path / "clip.flac"
    clip.write_bytes(b"\0" * 1000)
    config = NotifyConfig(url=f"json://127.0.0.1:{server.server_address[1]}/hook", attach_clip=True, retries=1, clip_wait_s=1)
    rules = {"tone": RuleConfig(id="tone", model="m", label="tone", threshold=0.5)}
    notifier = Notifier(config, 0, rules, "h", None, lambda *a, **k: None)
    notifier.start()
    try:
        onset = Event(kind="alert", source="rec", rule="tone", label="tone", phase="onset", score=0.9,
                      time="2026-01-01T00:00:00.000Z", host="h", seq=7, id="x", clip=str(clip))
        notifier.deliver(onset)
        notifier.deliver(Event(kind="status", source="rec", time=onset.time, host="h", seq=8, status="clip",
                               extra={"clip": str(clip), "onset_seq": 7}))
        wait_until(lambda: any(code == 200 for code, _ in got) or notifier.failed, 10)
    finally:
        notifier.stop(1.0)
        server.shutdown()
        server.server_close()
    assert any(code == 200 for code, _ in got), f"the alert never arrived: {[code for code, _ in got]}"


# --- remote inference -------------------------------------------------------------------------


def test_windows_held_for_a_down_cluster_are_unbounded_when_later_windows_need_no_remote_answer():
    """max_waiting_windows counts only windows that still wait for a remote answer. With the
    cluster down, one window waits at the head of the line; every later batch of a live source
    whose windows the remote model need not score (its cascade gate said no: the usual case, quiet
    windows) becomes a job that is done at once but is held behind the head, samples and all, for
    as long as the cluster is down: memory grows by every window of the source (~190 kB per second
    of 48 kHz audio), without bound and without a drop."""
    from types import SimpleNamespace

    from monitord.config import CascadeConfig
    from monitord.inference.models import ModelBase
    from monitord.windowing.queue import WindowQueue
    from monitord.inference.worker import InferenceStage, _Job
    from monitord.inference.scoring import Scorer
    from monitord.inference.remote import InferenceUnavailable
    from monitord.stage import Channel
    from monitord.types import WindowFacts
    from tests.test_remote_stage import RATE, LocalTier, loud_window

    class Down(ModelBase):
        device, model_id, sample_rate, labels = "remote", "r", RATE, ("tone", "noise")

        def __init__(self):
            super().__init__("clap", SimpleNamespace(batch_max=4, batch_wait_ms=1,
                                                     gated_by=CascadeConfig(model="yam", labels=("tone",), threshold=0.5)))

        def score(self, windows, upstream=None):
            raise InferenceUnavailable("the cluster is down")

    def quiet_window(i: int):
        from dataclasses import replace

        window = loud_window("a", i)
        return replace(window, facts=WindowFacts(-80.0, -80.0, -80.0, 0.0, 0, 0.0))

    yam = LocalTier("yam", SimpleNamespace(batch_max=4, batch_wait_ms=1, gated_by=None))
    queue, out = WindowQueue(64), Channel(100_000)
    stage = InferenceStage(queue, Scorer([Down(), yam]), out, max_in_flight=1, max_waiting_windows=8,
                           retry_backoff_s=0.01, retry_backoff_max_s=0.05)
    stage.start()
    try:
        queue.put(loud_window("a", 0), live=True)
        for start in range(1, 401, 20):
            for i in range(start, start + 20):
                queue.put(quiet_window(i), live=True)
            assert wait_until(lambda: len(queue) == 0 and not stage._in_hand, 5)
        time.sleep(0.2)
        held = sum(len(j.state.windows) for j in list(stage._pending) if isinstance(j, _Job))
        assert held <= 8 + 4, f"{held} windows held in memory for a down cluster (bound: max_waiting_windows=8)"
    finally:
        stage.finish(0.5)
        stage.join(5)


# --- optional models, first start -------------------------------------------------------------


def test_a_download_that_breaks_off_is_not_model_unavailable_so_an_optional_model_stops_the_daemon(monkeypatch):
    """huggingface_hub 1.x+ speaks httpx, whose errors are not OSError: a hub that accepts the TCP probe
    but then drops the connection (a proxy, a captive portal, a reset mid-download) raises
    httpx.RemoteProtocolError out of load_pretrained (seen for real against a socket that accepts and
    closes, after ~30 s of huggingface_hub's retries). load_models only leaves out an optional model on
    ModelUnavailable, so the daemon does not start at all."""
    httpx = require("httpx", "a dependency of huggingface_hub")
    import monitord.inference.models.loading as loading
    from monitord.inference.models.base import ModelUnavailable

    class Loader:
        @staticmethod
        def from_pretrained(ref, **kwargs):
            if kwargs.get("local_files_only"):
                raise OSError(f"{ref} is not in the cache")
            return "weights"

    def dropped(ref, what):
        raise httpx.RemoteProtocolError("Server disconnected without sending a response.")

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setattr(loading, "probe_hub", lambda *a, **k: None)
    monkeypatch.setattr(loading, "download", dropped)
    with pytest.raises(ModelUnavailable):
        loading.load_pretrained(Loader, "org/model", "model x")


def test_an_answer_with_nan_or_out_of_range_probabilities_is_refused_not_used():
    import numpy as np

    from monitord.inference import wire

    def answer(values):
        return wire.encode_response(wire.ScoreResponse("r", "clap", ("tone", "noise"), (("a", 0),),
                                                       np.array([values], dtype=np.float64), None, (1,)))

    assert wire.decode_response(answer([0.25, 0.75])).probabilities.shape == (1, 2)
    for bad in ([float("nan"), 0.5], [1.5, -0.5], [float("inf"), 0.0]):
        with pytest.raises(wire.WireError, match="finite and within"):
            wire.decode_response(answer(bad))


def test_an_answer_bigger_than_any_batch_is_refused_unread():
    import http.server
    import threading

    from monitord.inference.remote import MAX_ANSWER_BYTES, HttpTransport, InferenceRefused
    from tests.conftest import free_port

    class Huge(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_POST(self):
            self.rfile.read(int(self.headers.get("content-length", 0)))
            self.send_response(200)
            self.send_header("Content-Length", str(100 * 2**30))  # 100 GiB promised
            self.end_headers()
            try:
                self.wfile.write(b"\0" * 65536)
            except (BrokenPipeError, ConnectionResetError):
                pass

    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), Huge)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        with pytest.raises(InferenceRefused, match=f"at most {MAX_ANSWER_BYTES}"):
            HttpTransport(f"http://127.0.0.1:{port}/monitord", None, 5.0).send("POST", "/v1/score", lambda attempt: b"x")
    finally:
        server.shutdown()
        server.server_close()
