"""Events to an MQTT broker (paho-mqtt 2.x), with Home Assistant discovery: a sink of the output stage.

Topics (``P`` = ``publish.mqtt.topic_prefix``):

- ``P/<source>/<rule>``: every alert event, as JSON (``Event.to_json()``, the ZeroMQ schema);
- ``P/<source>/status``: every status event of a source (``P/daemon/status`` for the daemon's own);
- ``P/<source>/<rule>/state``: ``ON`` from an onset to its offset, then ``OFF``; retained;
- ``P/<source>/level``: the source's input level in dBFS, every ``level_interval_s``;
- ``P/availability``: ``online``, or ``offline`` (also the connection's last will); retained;
- with ``discovery``, ``<discovery_prefix>/binary_sensor|sensor/monitord_<host>/<object>/config``: Home
  Assistant's discovery configs (retained), one device per monitord host.

Nothing is lost while the broker is away: the output stage logs every event before it reaches
``deliver`` (which only queues it and returns), and this sink's own thread sends events in seq order,
reading the event log itself (``EventLog.read_since``) for whatever it no longer holds in memory. An
event counts as delivered once the broker acknowledged it (QoS 1 PUBACK); the last acknowledged seq is
kept in a small state file beside the event log, so after a reconnect or a restart sending resumes
right after it: every event reaches the broker once per seq (an event whose acknowledgement was lost
with the connection is sent again; its seq tells a subscriber it has it already).

A broker that is unreachable, refuses the login or drops the connection is a ``mqtt_down`` status
event and a retry with exponential backoff; ``mqtt_up`` once connected. The rest of the daemon never
waits for any of it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from monitord.config import Config, MqttConfig, RuleConfig
from monitord.output.eventlog import EventLog
from monitord.types import Event, ScoredWindow

log = logging.getLogger(__name__)

StatusCallback = Callable[..., None]
"""``status(source, status, detail, **extra)`` (the daemon's)."""

QUEUE_MAX = 1000
"""Events held in memory for the sink's thread; older ones are read back from the log."""
MAX_IN_FLIGHT = 100
"""Events sent and not yet acknowledged (paho queues what its own in-flight window cannot take)."""
LOG_BATCH = 200
CONNECT_TIMEOUT_S = 10.0
STATE_SAVE_EVERY_S = 0.5
DEFAULT_DEVICE_CLASS = "sound"
SOURCE_TOPICS = ("level", "status")
FEEDBACK_PENDING_MAX = 8
"""Feedback commands waiting for the one feedback thread (each may wait for the inference thread): more are refused."""
"""Topics of a source that are not rules (rule ids may not take these names)."""


def node_id(host: str) -> str:
    """The discovery node id (and device id) of a monitord host: ``monitord_<host>`` in topic-safe characters."""
    return "monitord_" + re.sub(r"[^A-Za-z0-9_-]", "_", host)


@dataclass(frozen=True)
class Message:
    topic: str
    payload: str
    retain: bool = False


class Topics:
    """Every topic and discovery payload, from the config alone (pure: tested without a broker)."""

    def __init__(self, config: MqttConfig, host: str, pairs: Iterable[tuple[str, str]], sources: Iterable[str],
                 version: str = ""):
        self.config = config
        self.prefix = config.topic_prefix
        self.host = host
        self.node = node_id(host)
        self.pairs = list(pairs)
        """(source, rule) pairs: one alert state and one binary_sensor each."""
        self.sources = list(sources)
        self.version = version
        self.availability = f"{self.prefix}/availability"

    def event(self, event: Event) -> str:
        if event.kind == "alert":
            return f"{self.prefix}/{event.source}/{event.rule}"
        return f"{self.prefix}/{event.source}/status"

    def state(self, source: str, rule: str) -> str:
        return f"{self.prefix}/{source}/{rule}/state"

    def level(self, source: str) -> str:
        return f"{self.prefix}/{source}/level"

    @property
    def feedback(self) -> str:
        """The command topics feedback arrives on (``<prefix>/<source>/<rule>/feedback``), as a subscription."""
        return f"{self.prefix}/+/+/feedback"

    def feedback_pair(self, topic: str) -> tuple[str, str] | None:
        """(source, rule) of a feedback command topic of ours; None for any other topic."""
        head = f"{self.prefix}/"
        if not topic.startswith(head) or not topic.endswith("/feedback"):
            return None
        parts = topic[len(head):-len("/feedback")].split("/")
        return (parts[0], parts[1]) if len(parts) == 2 and (parts[0], parts[1]) in self.pairs else None

    def device(self) -> dict[str, Any]:
        return {"ids": [self.node], "name": f"monitord {self.host}", "mf": "monitord", "mdl": "audio monitor",
                "sw": self.version}

    def discovery(self) -> list[Message]:
        """Home Assistant discovery configs (abbreviated keys, ``~`` as the topic base), all retained."""
        out = []
        common = {"avty_t": self.availability, "pl_avail": "online", "pl_not_avail": "offline", "dev": self.device(),
                  "o": {"name": "monitord", "sw": self.version}}
        root = self.config.discovery_prefix
        for source, rule in self.pairs:
            object_id = f"{source}_{rule}"
            payload = {
                "~": f"{self.prefix}/{source}/{rule}",
                "name": f"{source} {rule}",
                "uniq_id": f"{self.node}_{object_id}",
                "obj_id": f"monitord_{object_id}",
                "stat_t": "~/state", "pl_on": "ON", "pl_off": "OFF",
                "json_attr_t": "~",
                "dev_cla": self.config.device_classes.get(rule, DEFAULT_DEVICE_CLASS),
                "qos": self.config.qos,
                **common,
            }
            out.append(Message(f"{root}/binary_sensor/{self.node}/{object_id}/config", json.dumps(payload), retain=True))
        for source in self.sources:
            payload = {
                "~": f"{self.prefix}/{source}",
                "name": f"{source} input level",
                "uniq_id": f"{self.node}_{source}_level",
                "obj_id": f"monitord_{source}_level",
                "stat_t": "~/level",
                "unit_of_meas": "dBFS",
                "stat_cla": "measurement",
                "sug_dsp_prc": 1,
                "exp_aft": int(3 * self.config.level_interval_s) + 5,
                "ic": "mdi:microphone",
                "ent_cat": "diagnostic",
                **common,
            }
            out.append(Message(f"{root}/sensor/{self.node}/{source}_level/config", json.dumps(payload), retain=True))
        return out


def source_rule_pairs(config: Config) -> list[tuple[str, str]]:
    """(source, rule) for every rule and every source it watches."""
    return pairs_for(config.rules, [s.id for s in config.sources])


def pairs_for(rules: Iterable[RuleConfig], sources: Sequence[str]) -> list[tuple[str, str]]:
    return [(source, rule.id) for rule in rules for source in (rule.sources or sources)]


class AckState:
    """The last acknowledged seq, and the retained topics this host has on the broker (discovery
    configs, alert states) so that those of rules or sources that are gone can be removed, even
    across restarts; in a small JSON file beside the event log (written atomically)."""

    def __init__(self, path: Path | None):
        self.path = path
        self.seq = 0
        self.retained: list[str] = []

    def load(self) -> int | None:
        if self.path is None:
            return None
        try:
            data = json.loads(self.path.read_text())
            seq = int(data["acked_seq"])
            retained = data.get("retained", [])
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("mqtt: cannot read %s (%s); resuming from the end of the event log", self.path, exc)
            return None
        if not isinstance(retained, list) or not all(isinstance(t, str) and t and not set(t) & set("+#\0")
                                                     for t in retained):
            # the seq still holds: only topics of removed rules may stay on the broker
            log.warning("mqtt: %s: 'retained' is not a list of topics; ignored", self.path)
            retained = []
        self.seq, self.retained = seq, retained
        return seq

    def save(self, seq: int, retained: Sequence[str] | None = None) -> None:
        self.seq = seq
        if retained is not None:
            self.retained = list(retained)
        if self.path is None:
            return
        tmp = self.path.with_name(self.path.name + ".tmp")
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps({"acked_seq": seq, "retained": self.retained}) + "\n")
            os.replace(tmp, self.path)
        except OSError as exc:
            log.warning("mqtt: cannot write %s: %s", self.path, exc)


def state_path_for(event_log: str | None) -> Path | None:
    return None if event_log is None else Path(event_log + ".mqtt-state.json")


class MqttSink:
    """The output stage's MQTT sink. ``deliver`` and ``on_window`` (output thread) only hand over;
    the sink's thread connects, sends in seq order, tracks acknowledgements and reconnects."""

    name = "mqtt"
    wants_windows = True

    @property
    def alive(self) -> bool:
        """Its thread runs (started and not dead): the supervisor's health reads it."""
        return self._thread is not None and self._thread.is_alive()

    def __init__(self, config: MqttConfig, topics: Topics, event_log: EventLog | None, status: StatusCallback,
                 state_path: Path | None = None, client_factory: Callable[[], Any] | None = None,
                 feedback: Callable[..., dict] | None = None):
        self.config = config
        self.feedback = feedback
        """``feedback(seq, verdict, via, expect=(source, rule))`` (the daemon's): commands on the feedback topics."""
        self._feedback_pool: Any = None
        self._feedback_pending = 0
        """Feedback requests submitted and not yet answered (at most FEEDBACK_PENDING_MAX: a flood is refused)."""
        self._feedback_lock = threading.Lock()
        self.topics = topics
        self.event_log = event_log
        self.status = status
        self.ack_state = AckState(state_path)
        self.client_factory = client_factory or self._new_client
        self.queue: deque[Event] = deque(maxlen=QUEUE_MAX)
        self.latest_seq = 0
        """The highest seq handed over (or in the log at start)."""
        self.sent_seq = 0
        self.acked_seq = 0
        self.states: dict[tuple[str, str], str] = {pair: "OFF" for pair in topics.pairs}
        self.levels: dict[str, float] = {}
        self.delivered = 0
        """Events acknowledged by the broker (or written, with QoS 0) since start."""
        self.connected = threading.Event()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: Any = None
        self._lost: str | None = None
        self._refused: str | None = None
        self._acks: deque[int] = deque()
        self._pending: dict[int, set[int]] = {}
        """seq -> mids not yet acknowledged."""
        self._mids: dict[int, int] = {}
        """mid -> seq."""
        self._backlog: deque[Event] = deque()
        """Events read from the log, not yet sent."""
        self._saved_seq = 0
        self._saved_at = 0.0
        self._levels_at = 0.0
        self._down_reported = ""
        self._stop_deadline = 0.0
        self._run_first_seq = 0
        """The last seq logged before this run: alerts up to it are an earlier run's."""
        self._gap_reported = 0
        self._new_pairs: list[tuple[str, str]] | None = None
        """Set by a reload (output thread), taken by the sink's thread."""
        self._pairs_lock = threading.Lock()
        self._retained: list[str] = []
        """The retained topics this host has now (discovery configs, alert states)."""
        self._clearing: dict[int, str] = {}
        """mid -> a topic no longer ours being emptied: it stays in the state file until the broker has it."""

    # the output stage's side (must not block)

    def start(self) -> None:
        last = self.event_log.last_seq() if self.event_log is not None else 0
        saved = self.ack_state.load()
        if saved is None or saved > last:
            saved = last  # first start (or a log that was reset): begin with what comes next...
            self.ack_state.save(saved)  # ...and remember it, so what this run logs is sent even if it never connects
        self.acked_seq = self.sent_seq = self._saved_seq = saved
        self.latest_seq = self._run_first_seq = last
        if self.event_log is None:
            log.warning("mqtt: no publish.event_log: events sent while the broker is away cannot be read back")
        self._thread = threading.Thread(target=self._run, name="mqtt", daemon=True)
        self._thread.start()

    def deliver(self, event: Event) -> None:
        if event.seq <= 0 or event.kind not in ("alert", "status"):
            return  # score streams are neither logged nor sent here
        self.queue.append(event)
        self.latest_seq = max(self.latest_seq, event.seq)
        self._wake.set()

    def on_window(self, scored: ScoredWindow) -> None:
        window = scored.window
        self.levels[window.source] = window.facts.rms_dbfs

    def on_rules(self, rules: tuple[RuleConfig, ...]) -> None:
        """A reload: the sink's thread publishes discovery for new rules and removes the entities of
        rules that are gone (an empty retained config is Home Assistant's "delete")."""
        with self._pairs_lock:
            self._new_pairs = pairs_for(rules, self.topics.sources)
        self._wake.set()

    def stop(self, timeout: float) -> None:
        """Send what is pending for at most ``timeout`` seconds, say offline, disconnect, save the state."""
        self._stop_deadline = time.monotonic() + timeout
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout + CONNECT_TIMEOUT_S)
            if self._thread.is_alive():
                log.warning("mqtt: the sink's thread did not stop in time")

    # the sink's thread

    def _run(self) -> None:
        delay = 1.0
        while not self._stop.is_set():
            try:
                delay = self._turn(delay)
            except Exception as exc:  # noqa: BLE001 - the sink's thread must not die: nothing would notice
                log.exception("mqtt: unexpected error")
                self._went_down(f"unexpected error in the MQTT sink: {exc!r}", error=True)
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(delay * 2, self.config.backoff_max_s)
        self._finish()

    def _turn(self, delay: float) -> float:
        """One turn of the sink's loop; the next connection backoff."""
        if self._client is None:
            if self._connect():
                delay = 1.0
            else:
                self._wake.wait(delay)
                self._wake.clear()
                delay = min(delay * 2, self.config.backoff_max_s)
            return delay
        if self._lost is None and not self._client.is_connected():  # gone before on_disconnect could say so
            self._lost = f"connection to {self.config.host}:{self.config.port} lost"
        if self._lost is not None:
            self._went_down(self._lost)
            return delay
        self._take_acks()
        self._take_new_rules()
        self._pump()
        self._send_levels()
        self._save_state()
        self._wake.wait(0.2)
        self._wake.clear()
        return delay

    def _new_client(self) -> Any:
        import paho.mqtt.client as mqtt

        config = self.config
        client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=config.client_id or f"monitord-{self.topics.host}",
                             clean_session=True, reconnect_on_failure=False)
        if config.username is not None:
            client.username_pw_set(config.username, self._read_password())
        if config.tls is not None:
            client.tls_set(ca_certs=config.tls.ca, certfile=config.tls.cert, keyfile=config.tls.key)
            client.tls_insecure_set(config.tls.insecure)
        client.will_set(self.topics.availability, "offline", qos=1, retain=True)
        client.max_inflight_messages_set(MAX_IN_FLIGHT)
        return client

    def _read_password(self) -> str | None:
        """The password file's first line (read at each connection, so a changed file takes effect)."""
        if self.config.password_file is None:
            return None
        lines = Path(self.config.password_file).read_text(encoding="utf-8").splitlines()
        return lines[0] if lines else ""

    def _connect(self) -> bool:
        where = f"{self.config.host}:{self.config.port}"
        connack: dict[str, Any] = {}
        answered = threading.Event()

        def on_connect(client, userdata, flags, reason_code, properties) -> None:
            connack["reason"] = reason_code
            answered.set()

        def on_disconnect(client, userdata, flags, reason_code, properties) -> None:
            if self._client is client and self._lost is None:
                self._lost = f"connection to {where} lost ({reason_code})"
                self._wake.set()

        def on_publish(client, userdata, mid, reason_code, properties) -> None:
            self._acks.append(mid)  # the sink's thread does the bookkeeping
            self._wake.set()

        try:
            client = self.client_factory()
        except (OSError, ValueError) as exc:  # a password file not in UTF-8 is a ValueError
            self._went_down(f"cannot set up the MQTT client for {where}: {exc}")
            return False
        client.on_connect, client.on_disconnect, client.on_publish = on_connect, on_disconnect, on_publish
        if self.feedback is not None:
            client.on_message = self._on_message
        try:
            client.connect(self.config.host, self.config.port, keepalive=self.config.keepalive_s)
        except (OSError, ValueError) as exc:
            self._went_down(f"cannot connect to the MQTT broker {where}: {getattr(exc, 'strerror', None) or exc}")
            return False
        client.loop_start()
        if not answered.wait(CONNECT_TIMEOUT_S) or connack["reason"].is_failure:
            reason = connack.get("reason")
            client.loop_stop()
            client.disconnect()
            if reason is None:
                self._went_down(f"the MQTT broker {where} did not answer within {CONNECT_TIMEOUT_S:g} s")
            elif reason.value in (0x86, 0x87):  # bad user name or password / not authorized (3.1.1 codes 4, 5)
                user = self.config.username
                self._went_down(f"the MQTT broker {where} refused the login" + (f" of user {user!r}" if user else "") +
                                f": {reason} (check publish.mqtt.username and password_file)", error=True)
            else:
                self._went_down(f"the MQTT broker {where} refused the connection: {reason}")
            return False
        self._client, self._lost = client, None
        self.sent_seq = self.acked_seq
        self._pending.clear()
        self._mids.clear()
        self._acks.clear()
        self._backlog.clear()
        self._publish(self.topics.availability, "online", retain=True)
        if self.feedback is not None:
            client.subscribe(self.topics.feedback, qos=1)
        self._take_new_rules(publish=False)  # a reload while the broker was away: no old entity comes back
        self._publish_retained()
        self.connected.set()
        self._down_reported = ""
        log.info("mqtt: connected to %s; sending from seq %d", where, self.acked_seq + 1)
        self.status("daemon", "mqtt_up", f"connected to the MQTT broker {where}", sink="mqtt", broker=where)
        return True

    def _take_new_rules(self, publish: bool = True) -> None:
        """Apply a reload's (source, rule) pairs: new ones start OFF, gone ones are removed."""
        with self._pairs_lock:
            pairs, self._new_pairs = self._new_pairs, None
        if pairs is None:
            return
        gone = set(self.topics.pairs) - set(pairs)
        self.topics.pairs = pairs
        self.states = {pair: self.states.get(pair, "OFF") for pair in pairs}
        log.info("mqtt: rules reloaded: %d alert entities, %d removed", len(pairs), len(gone))
        if publish:
            self._publish_retained()

    def _publish_retained(self) -> None:
        """Discovery configs and alert states, retained; every retained topic this host published
        before and no longer has is emptied (an empty retained config is Home Assistant's "delete")."""
        messages = self.topics.discovery() if self.config.discovery else []
        messages += [Message(self.topics.state(source, rule), value, retain=True) for (source, rule), value in self.states.items()]
        self._retained = [m.topic for m in messages]
        self._clearing = {}
        for topic in sorted(set(self.ack_state.retained) - set(self._retained)):
            self._clearing[self._publish(topic, b"", retain=True, qos=1)] = topic
        for message in messages:
            self._publish(message.topic, message.payload, retain=True)
        self._save_retained()

    def _save_retained(self) -> None:
        """The retained topics in the state file: ours, and those being emptied until that is acknowledged
        (an emptying lost with the connection is done again at the next one, also after a restart)."""
        keep = self._retained + sorted(set(self._clearing.values()) - set(self._retained))
        if keep != self.ack_state.retained:
            self.ack_state.save(self.ack_state.seq, keep)

    def _went_down(self, reason: str, error: bool = False) -> None:
        """Drop the connection (if any) and say why, once per distinct reason."""
        client, self._client, self._lost = self._client, None, None
        self.connected.clear()
        if client is not None:
            client.loop_stop()
            try:
                client.disconnect()
            except Exception:  # noqa: BLE001 - a dead connection may refuse even that
                pass
        self.sent_seq = self.acked_seq  # what was not acknowledged goes again, from the log
        self._pending.clear()
        self._mids.clear()
        self._clearing.clear()  # the next client numbers its messages anew
        self._backlog.clear()
        if reason != self._down_reported:
            self._down_reported = reason
            (log.error if error else log.warning)("mqtt: %s; retrying with backoff", reason)
            self.status("daemon", "mqtt_down", f"{reason}; events stay in the log and are sent once it is back",
                        sink="mqtt", broker=f"{self.config.host}:{self.config.port}")

    def _publish(self, topic: str, payload: str | bytes, retain: bool = False, qos: int | None = None) -> int:
        info = self._client.publish(topic, payload, qos=self.config.qos if qos is None else qos, retain=retain)
        return info.mid

    def _pump(self) -> None:
        """Send events after ``sent_seq``, in order, while the in-flight window has room."""
        while len(self._pending) < MAX_IN_FLIGHT and self._lost is None:
            item = self._next()
            if item is None:
                return
            seq, event = item
            if seq > self.sent_seq + 1:
                self._gap(self.sent_seq + 1, seq - 1)
            # a reload handed over while sending: its rules before this event, which may be of a new rule
            # (on_rules comes before every event logged after the reload, on the output thread)
            self._take_new_rules()
            mids = set()
            # an earlier run's alerts (replayed from the log) leave the state alone: this run's engine
            # starts with no open alert, so an onset whose offset a crash prevented must not stay ON
            if seq > self._run_first_seq and event.kind == "alert" and event.phase in ("onset", "offset") \
                    and (event.source, event.rule) in self.states:
                value = "ON" if event.phase == "onset" else "OFF"
                self.states[(event.source, event.rule)] = value
                mids.add(self._publish(self.topics.state(event.source, event.rule), value, retain=True))
            mids.add(self._publish(self.topics.event(event), event.to_json()))
            self.sent_seq = seq
            if self.config.qos == 0:
                self._acked(seq)
                continue
            self._pending[seq] = mids
            for mid in mids:
                self._mids[mid] = seq

    def _next(self) -> tuple[int, Event] | None:
        want = self.sent_seq + 1
        while self.queue and self.queue[0].seq < want:
            self.queue.popleft()
        if self.queue and self.queue[0].seq == want:
            event = self.queue.popleft()
            return event.seq, event
        if self.sent_seq >= self.latest_seq or self.event_log is None:
            if self.queue:  # no log to fill the gap from: go on with what there is
                event = self.queue.popleft()
                return event.seq, event
            return None
        if not self._backlog or self._backlog[0].seq < want:
            self._backlog.clear()
            lines, _ = self.event_log.read_since(self.sent_seq, LOG_BATCH)
            for line in lines:
                try:
                    self._backlog.append(Event.from_json(line))
                except ValueError:  # not an event line: nothing to send
                    continue
            if not self._backlog:
                return None
        if self.queue and self.queue[0].seq < self._backlog[0].seq:  # rotated out of the log, still in memory
            event = self.queue.popleft()
            return event.seq, event
        event = self._backlog.popleft()
        return event.seq, event

    def _gap(self, first: int, last: int) -> None:
        """Events that can no longer be sent (rotated out of the event log, or never in one): said once."""
        if last <= self._gap_reported:
            return
        self._gap_reported = last
        detail = (f"events {first}-{last} were not sent to the MQTT broker and no longer can be (no longer in the "
                  "event log: it rotated while the broker was away)")
        log.error("mqtt: %s", detail)
        self.status("daemon", "mqtt_gap", detail, sink="mqtt", first_seq=first, last_seq=last)

    def _on_message(self, client, userdata, message) -> None:
        """A feedback command (paho's network thread): checked here, applied on a thread of its own
        (embedding waits for the inference thread); the answer goes to ``<topic>/result``. Nothing
        raised here may leave: paho (suppress_exceptions off) would end its network thread with it."""
        try:
            self._on_feedback_message(client, message)
        except Exception:  # noqa: BLE001 - see above
            log.exception("mqtt: a feedback message could not be handled")

    def _on_feedback_message(self, client, message) -> None:
        from monitord.teaching.feedback import MAX_REQUEST_BYTES, FeedbackError, parse_request

        pair = self.topics.feedback_pair(message.topic)
        if pair is None:
            log.warning("mqtt: ignored a message on %r: not the feedback topic of a source and rule of this host", message.topic)
            return
        if message.retain:
            log.warning("mqtt: ignored a retained feedback message on %s (feedback is a command: send it unretained)", message.topic)
            return
        try:
            seq, verdict = parse_request(bytes(message.payload[: MAX_REQUEST_BYTES + 1]))
        except FeedbackError as exc:
            log.warning("mqtt: ignored feedback on %s: %s", message.topic, exc)
            self._answer(client, message.topic, {"error": str(exc)})
            return
        if self._feedback_pending >= FEEDBACK_PENDING_MAX:  # a flood: the queue stays bounded
            log.warning("mqtt: ignored feedback on %s (seq %d): %d requests already waiting", message.topic, seq,
                        self._feedback_pending)
            self._answer(client, message.topic, {"seq": seq, "verdict": verdict,
                                                 "error": f"busy: {self._feedback_pending} feedback requests waiting; try again"})
            return
        if self._feedback_pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._feedback_pool = ThreadPoolExecutor(1, thread_name_prefix="mqtt-feedback")
        with self._feedback_lock:
            self._feedback_pending += 1
        try:
            self._feedback_pool.submit(self._apply_feedback, client, message.topic, seq, verdict, pair)
        except RuntimeError:  # the sink is stopping: its pool is shut down
            with self._feedback_lock:
                self._feedback_pending -= 1

    def _apply_feedback(self, client, topic: str, seq: int, verdict: str, pair: tuple[str, str]) -> None:
        try:
            self._apply_feedback_now(client, topic, seq, verdict, pair)
        finally:
            with self._feedback_lock:
                self._feedback_pending -= 1

    def _apply_feedback_now(self, client, topic: str, seq: int, verdict: str, pair: tuple[str, str]) -> None:
        from monitord.teaching.feedback import FeedbackError

        try:
            answer = self.feedback(seq, verdict, "mqtt", expect=pair)
        except FeedbackError as exc:
            log.warning("mqtt: feedback on %s (seq %d) not applied: %s", topic, seq, exc)
            answer = {"seq": seq, "verdict": verdict, "error": str(exc)}
        except Exception as exc:  # noqa: BLE001 - the pool's thread must live on
            log.exception("mqtt: feedback on %s (seq %d) failed", topic, seq)
            answer = {"seq": seq, "verdict": verdict, "error": f"failed: {exc!r}"}
        self._answer(client, topic, answer)

    def _answer(self, client, topic: str, answer: dict) -> None:
        try:
            client.publish(f"{topic}/result", json.dumps(answer, separators=(",", ":")), qos=0)
        except (RuntimeError, ValueError, OSError) as exc:
            log.warning("mqtt: feedback answer on %s/result not sent: %s", topic, exc)

    def _take_acks(self) -> None:
        cleared = False
        while self._acks:
            mid = self._acks.popleft()
            if self._clearing.pop(mid, None) is not None:
                cleared = True
                continue
            seq = self._mids.pop(mid, None)
            if seq is None or seq not in self._pending:
                continue
            self._pending[seq].discard(mid)
            if not self._pending[seq]:
                del self._pending[seq]
                self.delivered += 1
        self.acked_seq = (min(self._pending) - 1) if self._pending else self.sent_seq
        if cleared:
            self._save_retained()

    def _acked(self, seq: int) -> None:
        self.delivered += 1
        self.acked_seq = seq

    def _send_levels(self) -> None:
        now = time.monotonic()
        if now - self._levels_at < self.config.level_interval_s or not self.levels:
            return
        self._levels_at = now
        for source, level in list(self.levels.items()):
            self._publish(self.topics.level(source), f"{max(level, -120.0):.1f}", qos=0)

    def _save_state(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.acked_seq != self._saved_seq and (force or now - self._saved_at >= STATE_SAVE_EVERY_S):
            self.ack_state.save(self.acked_seq)
            self._saved_seq, self._saved_at = self.acked_seq, now

    def _finish(self) -> None:
        """On stop: a last bounded effort to send and have acknowledged what is pending, then offline."""
        deadline = self._stop_deadline
        while self._client is not None and self._lost is None and time.monotonic() < deadline:
            self._take_acks()
            self._pump()
            if not self._pending and self.sent_seq >= self.latest_seq:
                break
            self._wake.wait(0.05)
            self._wake.clear()
        self._take_acks()
        if self._client is not None:
            client, self._client = self._client, None
            try:
                client.publish(self.topics.availability, "offline", qos=1, retain=True).wait_for_publish(2.0)
            except (RuntimeError, ValueError, OSError):
                pass
            client.disconnect()
            client.loop_stop()
        self.connected.clear()
        if self._feedback_pool is not None:
            self._feedback_pool.shutdown(wait=False, cancel_futures=True)
        self._save_state(force=True)
        if self.acked_seq < self.latest_seq:
            log.info("mqtt: stopping with events %d-%d not yet acknowledged; they are sent at the next start",
                     self.acked_seq + 1, self.latest_seq)


def build_mqtt_sink(config: Config, host: str, event_log: EventLog | None, status: StatusCallback,
                    feedback: Callable[..., dict] | None = None) -> MqttSink:
    from importlib.metadata import PackageNotFoundError, version

    try:
        monitord_version = version("monitord")
    except PackageNotFoundError:
        monitord_version = ""
    mqtt = config.publish.mqtt
    assert mqtt is not None
    topics = Topics(mqtt, host, source_rule_pairs(config), [s.id for s in config.sources], monitord_version)
    return MqttSink(mqtt, topics, event_log, status, state_path_for(config.publish.event_log), feedback=feedback)
