"""Event log and ZeroMQ publishing over loopback."""

from __future__ import annotations

import json
import time

import zmq

from monitord.config import PublishConfig
from monitord.types import SCHEMA, Event, iso_utc
from monitord.output.eventlog import EventLog, last_seq_in
from monitord.output.publish import Publisher, PublishError
from tests.conftest import free_port, wait_until


def status(source="s", status="up"):
    return Event(kind="status", source=source, time=iso_utc(time.time()), host="h", status=status, detail="d")


def alert(source="kitchen", rule="glass"):
    return Event(kind="alert", source=source, time=iso_utc(0.0), host="h", rule=rule, label="glass breaking", phase="onset", score=0.9, scores={"glass breaking": 0.9, "speech": 0.1}, model="m", stream_start=1.0, stream_end=3.0)


def test_event_json_round_trip_and_topics():
    e = alert().with_sequence(7, "abc", 12.5)
    data = json.loads(e.to_json())
    assert list(data)[:4] == ["schema", "seq", "id", "kind"] and data["schema"] == SCHEMA
    assert Event.from_json(e.to_json()) == e
    assert e.topic == "alert.kitchen.glass" and status("kitchen").topic == "status.kitchen"
    assert iso_utc(0.5) == "1970-01-01T00:00:00.500Z"


def test_seq_continues_across_restarts_and_survives_a_torn_line(tmp_path):
    log = tmp_path / "events.jsonl"
    config = PublishConfig(endpoint=f"tcp://127.0.0.1:{free_port()}", event_log=str(log))
    p = Publisher(config, zmq.Context())
    p.start()
    for _ in range(3):
        p.publish(status())
    p.close()
    with log.open("ab") as f:
        f.write(b'{"schema":"monitord.event/1","seq":4,"kin')  # a crash in the middle of a line
    assert last_seq_in(log) == 3
    p = Publisher(config, zmq.Context())
    p.start()
    assert p.publish(status()).seq == 4
    p.close()
    seqs = []
    for line in log.read_bytes().splitlines():
        try:
            seqs.append(json.loads(line)["seq"])
        except ValueError:
            pass
    assert seqs == [1, 2, 3, 4]
    assert oct(log.stat().st_mode & 0o777) == "0o600"


def test_subscriber_receives_two_frame_messages_equal_to_the_log(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    p = Publisher(PublishConfig(endpoint=endpoint, event_log=str(tmp_path / "e.jsonl")), ctx)
    p.start()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.SUBSCRIBE, b"alert.")
    sub.connect(endpoint)
    deadline = time.monotonic() + 10
    received = []
    while time.monotonic() < deadline and not received:  # wait out the slow-joiner handshake
        p.publish(status())
        p.publish(alert())
        if sub.poll(100):
            received.append(sub.recv_multipart())
    p.close()
    assert received, "no message within 10 s"
    topic, payload = received[0]
    assert topic == b"alert.kitchen.glass"
    logged = {json.loads(line)["seq"]: line for line in (tmp_path / "e.jsonl").read_bytes().splitlines()}
    event = json.loads(payload)
    assert logged[event["seq"]] == payload
    sub.close()


def test_binding_a_busy_port_is_a_clear_error(tmp_path):
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    first = Publisher(PublishConfig(endpoint=endpoint, event_log=None), ctx)
    first.start()
    second = Publisher(PublishConfig(endpoint=endpoint, event_log=None), ctx)
    try:
        second.start()
        raise AssertionError("second bind succeeded")
    except PublishError as exc:
        assert "publish.endpoint: cannot bind" in str(exc)
    finally:
        first.close()


def test_log_rotation_keeps_seq_continuous_across_files_and_restarts(tmp_path):
    log = tmp_path / "events.jsonl"
    config = PublishConfig(endpoint=f"tcp://127.0.0.1:{free_port()}", event_log=str(log), event_log_max_mb=0.002, event_log_keep=3)
    for _ in range(2):  # a restart in the middle
        p = Publisher(config, zmq.Context())
        p.start()
        for _ in range(20):
            p.publish(alert())
        p.close()
    files = EventLog(log, keep=3).files()
    assert len(files) == 4 and files[-1] == log  # three rotated + the current one
    seqs = [json.loads(line)["seq"] for f in files for line in f.read_bytes().splitlines()]
    assert seqs == list(range(seqs[0], 41)) and seqs[0] > 1  # gapless; the oldest rotated away
    assert all(oct(f.stat().st_mode & 0o777) == "0o600" for f in files)


def test_replay_answers_since_and_rejects_garbage(tmp_path):
    endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    p = Publisher(PublishConfig(endpoint=endpoint, replay_endpoint=replay, event_log=str(tmp_path / "e.jsonl")), ctx)
    p.start()
    try:
        for _ in range(5):
            p.publish(alert())
        req = ctx.socket(zmq.REQ)
        req.connect(replay)
        req.send(b'{"since": 2}')
        assert req.poll(5000)
        header, *events = req.recv_multipart()
        assert json.loads(header) == {"count": 3, "last_seq": 5, "oldest_seq": 1}
        assert [json.loads(e)["seq"] for e in events] == [3, 4, 5]
        req.send(b"not json")
        assert req.poll(5000)
        assert "error" in json.loads(req.recv_multipart()[0])
        req.close()
    finally:
        p.close()


def curve_keys(tmp_path):
    import subprocess

    from tests.conftest import monitord_cmd

    for folder, name in (("server", "server"), ("clients", "alice"), ("strangers", "mallory")):
        out = subprocess.run(monitord_cmd("keys", str(tmp_path / folder), "--name", name), capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
    authorized = tmp_path / "authorized"
    authorized.mkdir()
    (authorized / "alice.key").write_bytes((tmp_path / "clients" / "alice.key").read_bytes())
    assert oct((tmp_path / "server" / "server.key_secret").stat().st_mode & 0o777) == "0o600"
    return authorized


def subscriber(ctx, endpoint, curve=None):
    from monitord.tools.tail import apply_client_curve

    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.LINGER, 0)
    if curve:
        apply_client_curve(sub, curve)
    sub.setsockopt(zmq.SUBSCRIBE, b"")
    sub.connect(endpoint)
    return sub


def test_curve_lets_authorized_subscribers_in_and_nobody_else(tmp_path):
    from monitord.cli import load_client_curve
    from monitord.config import CurveConfig

    authorized = curve_keys(tmp_path)
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    curve = CurveConfig(server_secret_key=str(tmp_path / "server" / "server.key_secret"), authorized_clients=str(authorized))
    p = Publisher(PublishConfig(endpoint=endpoint, event_log=None, curve=curve), ctx)
    p.start()
    server_key = str(tmp_path / "server" / "server.key")
    alice = subscriber(ctx, endpoint, load_client_curve(server_key, str(tmp_path / "clients" / "alice.key_secret")))
    mallory = subscriber(ctx, endpoint, load_client_curve(server_key, str(tmp_path / "strangers" / "mallory.key_secret")))
    plain = subscriber(ctx, endpoint)
    try:
        got = {"alice": 0, "mallory": 0, "plain": 0}
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            p.publish(alert())
            for name, sock in (("alice", alice), ("mallory", mallory), ("plain", plain)):
                while sock.poll(10):
                    sock.recv_multipart()
                    got[name] += 1
        assert got["alice"] > 0 and got["mallory"] == 0 and got["plain"] == 0, got
    finally:
        for sock in (alice, mallory, plain):
            sock.close()
        p.close()


def test_a_non_loopback_bind_needs_curve_or_an_explicit_opt_in(tmp_path):
    from monitord.config import ConfigError, parse_config

    base = "sources: [{id: a, device: default}]\nmodels: {clap: {kind: clap, labels: [a, b]}}\npublish: {endpoint: 'tcp://0.0.0.0:5556'%s}\n"
    try:
        parse_config(base % "", tmp_path)
        raise AssertionError("accepted")
    except ConfigError as exc:
        assert "publish.endpoint: binds a non-loopback address" in str(exc)
    parse_config(base % ", allow_insecure_remote: true", tmp_path)


def test_a_subscriber_that_never_reads_cannot_grow_the_daemons_memory(tmp_path):
    import psutil

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    p = Publisher(PublishConfig(endpoint=endpoint, event_log=str(tmp_path / "e.jsonl"), send_hwm=1000), ctx)
    p.start()
    stalled = ctx.socket(zmq.SUB)
    stalled.setsockopt(zmq.RCVHWM, 1000)
    stalled.setsockopt(zmq.SUBSCRIBE, b"")
    stalled.connect(endpoint)
    time.sleep(0.3)
    padded = alert()
    padded = Event(**{**padded.__dict__, "extra": {"pad": "x" * 2000}})  # ~2.3 kB per event
    me = psutil.Process()
    for _ in range(2000):
        p.publish(padded)
    before = me.memory_info().rss
    for _ in range(20000):  # 46 MB of events that nobody reads
        p.publish(padded)
    grown = (me.memory_info().rss - before) / 2**20
    p.close()
    stalled.close(0)
    assert len((tmp_path / "e.jsonl").read_bytes().splitlines()) == 22000  # all of it is in the log
    assert grown < 15, f"RSS grew {grown:.1f} MB"


def test_replay_stays_gapless_while_the_log_rotates_under_it(tmp_path, capsys):
    import re
    import threading

    from monitord.tools.tail import ReplayClient

    endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    config = PublishConfig(endpoint=endpoint, replay_endpoint=replay, event_log=str(tmp_path / "e.jsonl"),
                           event_log_max_mb=0.002, event_log_keep=20)  # a rotation every ~5 events, ~100 kept
    p = Publisher(config, ctx)
    p.start()
    stop = threading.Event()

    def publish() -> None:
        while not stop.is_set():
            p.publish(alert())
            time.sleep(0.0005)  # nothing kept rotates away between two pages of a replay unless it stalls ~100 ms

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    client = ReplayClient(ctx, replay)
    fetches, bad, told = 0, [], []
    try:
        # a replay of fewer than two events counts as bad below: not while the publisher (slow to start
        # on a loaded box) has made only one
        assert wait_until(lambda: p.seq >= 10, 60)
        deadline = time.monotonic() + 60
        while fetches < 60 and time.monotonic() < deadline:  # a count, not a rate: the machine may be busy
            since = max(0, p.seq - 200)  # further back than the log keeps: the replay starts at the oldest kept
            seqs = [event["seq"] for event in client.fetch(since)]
            rotated = re.search(r"events \d+-(\d+) are no longer in the log", capsys.readouterr().err)
            first = int(rotated.group(1)) + 1 if rotated else since + 1
            if rotated:
                told.append(first)
            fetches += 1
            if seqs != list(range(first, first + len(seqs))) or len(seqs) < 2:
                bad.append((since, first, seqs))
    finally:
        stop.set()
        publisher.join(5)
        p.close()
    print(f"\n[replay] {fetches} replays while {p.seq} events were published; {len(bad)} with a gap; "
          f"oldest_seq told: {told[:3]} ... {told[-3:]}")
    assert fetches >= 20 and told, (fetches, told)
    assert not bad, bad[:3]


def test_read_since_is_not_fooled_by_a_rotation_in_the_middle_of_a_read(tmp_path, monkeypatch):
    import os
    from pathlib import Path

    log = EventLog(tmp_path / "e.jsonl", max_bytes=2000, keep=3)
    log.open()
    seq = 0

    def append() -> None:
        nonlocal seq
        seq += 1
        log.append(alert().with_sequence(seq, "x", None).to_json().encode())

    for _ in range(30):
        append()
    real_open, opens = Path.open, []

    def open_and_rotate_once(path, mode="r", *args, **kwargs):
        opens.append(path.name)
        if len(opens) == 2:  # the reader has opened one file: the writer rotates now
            current = os.stat(log.path).st_ino
            while os.stat(log.path).st_ino == current:
                append()
        return real_open(path, mode, *args, **kwargs)

    monkeypatch.setattr(Path, "open", open_and_rotate_once)
    events, oldest = log.read_since(0, 1000)
    monkeypatch.undo()
    log.close()
    seqs = [json.loads(e)["seq"] for e in events]
    assert seqs == list(range(oldest, seq + 1)), (oldest, seqs)


def tail_while_publishing(tmp_path, capsys, topic: str, skip_every: int = 0, replay: bool = False,
                          monkeypatch=None) -> tuple[list[dict], str, int]:
    """``monitord tail`` (in-process) against a live publisher of alerts interleaved with status events;
    the events printed, stderr, and how many replay round trips tail made."""
    import threading

    from monitord.tools import tail as tail_module

    endpoint = f"tcp://127.0.0.1:{free_port()}"
    replay_endpoint = f"tcp://127.0.0.1:{free_port()}" if replay else None
    p = Publisher(PublishConfig(endpoint=endpoint, event_log=str(tmp_path / "e.jsonl"), replay_endpoint=replay_endpoint), zmq.Context())
    p.start()
    stop = threading.Event()
    fetches = []
    if monkeypatch is not None:
        real_fetch = tail_module.ReplayClient.fetch

        def counted_fetch(self, since):
            fetches.append(since)
            return real_fetch(self, since)

        monkeypatch.setattr(tail_module.ReplayClient, "fetch", counted_fetch)

    def publish() -> None:
        n = 0
        while not stop.is_set():
            p.publish(alert())
            p.publish(status())
            n += 1
            if skip_every and n % skip_every == 0:
                with p._lock:
                    p.seq += 3  # three events lost on the way
            time.sleep(0.005)

    publisher = threading.Thread(target=publish, daemon=True)
    publisher.start()
    try:
        code = tail_module.tail(endpoint, topic, as_json=True, count=20, timeout_s=10, replay_endpoint=replay_endpoint)
    finally:
        stop.set()
        publisher.join(5)
        p.close()
    out, err = capsys.readouterr()
    assert code == 0, err
    return [json.loads(line) for line in out.splitlines()], err, len(fetches)


def test_tail_with_a_topic_does_not_call_other_topics_missed(tmp_path, capsys):
    events, err, _ = tail_while_publishing(tmp_path, capsys, "alert.")
    assert len(events) == 20 and {e["kind"] for e in events} == {"alert"}
    assert "missed" not in err, err


def test_tail_with_a_topic_reports_a_real_gap_and_asks_the_replay_only_for_real_gaps(tmp_path, capsys, monkeypatch):
    """Before: under a topic, a lost event could not be told from another topic's (no warning), and with
    a replay endpoint every event after another topic's cost a replay round trip (20 here)."""
    events, err, _ = tail_while_publishing(tmp_path, capsys, "alert.", skip_every=3)
    assert {e["kind"] for e in events} == {"alert"}
    assert "missed (--replay fetches them)" in err, err
    events, err, fetches = tail_while_publishing(tmp_path / "r", capsys, "alert.", replay=True, monkeypatch=monkeypatch)
    assert len(events) == 20 and {e["kind"] for e in events} == {"alert"} and "missed" not in err
    assert fetches == 0, fetches
    seqs = [e["seq"] for e in events]
    assert seqs == sorted(seqs) and len(set(seqs)) == 20


def test_tail_without_a_topic_still_reports_a_real_gap(tmp_path, capsys):
    events, err, _ = tail_while_publishing(tmp_path, capsys, "", skip_every=3)
    seqs = [e["seq"] for e in events]
    assert any(b > a + 1 for a, b in zip(seqs, seqs[1:]))
    assert "missed (--replay fetches them)" in err, err


def test_a_replay_peer_cannot_make_the_daemon_hold_what_it_does_not_read(tmp_path):
    """A peer that sends requests and never reads gets the answers the socket can hold dropped,
    not kept (at ZeroMQ's default of 1000 one peer took the daemon from 55 to 558 MB); a request
    of many frames is dropped unanswered, not echoed back; replay goes on answering."""
    endpoint, replay = f"tcp://127.0.0.1:{free_port()}", f"tcp://127.0.0.1:{free_port()}"
    ctx = zmq.Context()
    p = Publisher(PublishConfig(endpoint=endpoint, replay_endpoint=replay, event_log=str(tmp_path / "e.jsonl")), ctx)
    p.start()
    try:
        for _ in range(1000):
            p.publish(alert())
        greedy = ctx.socket(zmq.DEALER)
        greedy.setsockopt(zmq.LINGER, 0)
        greedy.setsockopt(zmq.RCVHWM, 1)
        greedy.connect(replay)
        requests = 300
        for _ in range(requests):
            greedy.send_multipart([b"", b'{"since": 0}'])
        # once the server has served them all, what it could not hand on is gone, not queued
        for _ in range(1200):
            if p.replay.served == requests:
                break
            time.sleep(0.1)
        assert p.replay.served == requests
        answers = 0
        while greedy.poll(2000):
            greedy.recv_multipart()
            answers += 1
        assert 0 < answers < requests // 2, answers  # the rest were dropped at the high-water mark

        req = ctx.socket(zmq.DEALER)
        req.setsockopt(zmq.LINGER, 0)
        req.connect(replay)
        req.send_multipart([b""] + [b"x" * 100] * 1000 + [b'{"since": 0}'])  # 1002 frames
        req.send_multipart([b"", b'{"since": 999, "limit": 5}'])
        assert req.poll(10000)
        empty, header, *events = req.recv_multipart()  # the second request's answer, and nothing echoed
        assert empty == b"" and json.loads(header)["count"] == 1 and len(events) == 1
        req.close()
        greedy.close()

        # a REQ client behind a broker (its identity frame added to the request) is answered still
        import threading

        front_endpoint = f"tcp://127.0.0.1:{free_port()}"
        front, back = ctx.socket(zmq.ROUTER), ctx.socket(zmq.DEALER)
        front.bind(front_endpoint)
        back.connect(replay)
        threading.Thread(target=zmq.proxy, args=(front, back), daemon=True).start()
        behind = ctx.socket(zmq.REQ)
        behind.setsockopt(zmq.LINGER, 0)
        behind.connect(front_endpoint)
        behind.send(b'{"since": 998}')
        assert behind.poll(10000)
        assert json.loads(behind.recv_multipart()[0])["count"] == 2
        behind.close()
    finally:
        p.close()


def test_an_event_naming_a_file_with_undecodable_bytes_is_logged_and_sent(tmp_path):
    """os.listdir keeps a file name's undecodable bytes as lone surrogates, which UTF-8 cannot
    encode: such an event raised in the publisher, and the output stage, retrying it after each
    restart, would have died for good."""
    import os

    folder = tmp_path / "refs"
    folder.mkdir()
    (folder / os.fsdecode(b"glass-\xff.wav")).write_bytes(b"")
    name = os.listdir(folder)[0]
    event = Event(kind="status", source="daemon", time=iso_utc(0.0), host="h", status="reference_error",
                  detail=f"cannot read {folder / name}")
    endpoint = f"tcp://127.0.0.1:{free_port()}"
    p = Publisher(PublishConfig(endpoint=endpoint, event_log=str(tmp_path / "e.jsonl")), zmq.Context())
    p.start()
    try:
        p.publish(event)
    finally:
        p.close()
    logged = json.loads((tmp_path / "e.jsonl").read_bytes())
    assert logged["detail"] == f"cannot read {folder / name}"  # the same text back, escaped in the JSON

    # and the dashboard, which lists it among the recent events, still answers (it gave 500s)
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from monitord.config import parse_config
    from monitord.daemon import Availability
    from monitord.output.dashboard import Dashboard

    config = parse_config("sources: [{id: a, device: default}]\nmodels: {yam: {kind: yamnet}}\n", tmp_path)
    daemon = SimpleNamespace(config=config, models={}, clips=None, sources=[],
                             availability=Availability(config, {}, {}, {}, {}, frozenset(), frozenset()))
    dashboard = Dashboard(daemon, "127.0.0.1:1", None)
    dashboard.on_event(event)
    answer = TestClient(dashboard.app(), base_url="http://127.0.0.1:8080", raise_server_exceptions=False).get("/api/state")
    assert answer.status_code == 200 and answer.json()["events"][0]["detail"] == f"cannot read {folder / name}"
