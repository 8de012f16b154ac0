"""``monitord tail``: subscribe to a daemon's events and print them.

With ``--since N`` it first fetches the logged events after N from the replay socket, then
follows the live stream with no gap and no duplicate: the subscription is opened first, a
live event already fetched is skipped, and a gap in ``seq`` is filled from the replay socket
(without one, it is reported on stderr).

``seq`` counts every logged event (alerts and statuses), whatever its topic. So under a topic
filter (other than a score stream's, which has no ``seq``) tail still subscribes to everything and
filters here: a gap in ``seq`` is then a real loss, and other topics' events cost neither a false
warning nor a replay round trip. (One subscription, not one per logged topic: ZeroMQ applies
subscriptions one by one, and a moment with only some of them active would look like a gap.)
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterator

import zmq

from monitord.types import Event


class ReplayError(Exception):
    pass


def format_event(event: dict) -> str:
    """One line per event, for people."""
    head = f"#{event.get('seq')} {event.get('time')} {event.get('kind')} {event.get('source')}"
    if event.get("kind") == "alert":
        return (
            f"{head} {event.get('rule')} {event.get('phase')} {event.get('label')!r} score={event.get('score'):.3f} "
            f"stream={event.get('stream_start'):.2f}-{event.get('stream_end'):.2f}s latency={event.get('latency_ms')}ms"
        )
    if event.get("kind") == "scores":
        return f"{head} {event.get('model_name')} {event.get('label')!r} {event.get('score'):.3f}"
    if event.get("kind") == "frames":
        times = (event.get("frames") or {}).get("times") or []
        return (f"{head} {event.get('model_name')} {len(times)} frames "
                f"stream={event.get('stream_start'):.2f}-{event.get('stream_end'):.2f}s")
    return f"{head} {event.get('status')}: {event.get('detail')}"


class ReplayClient:
    def __init__(self, context: zmq.Context, endpoint: str, timeout_s: float = 5.0, curve: dict | None = None):
        self.context, self.endpoint, self.timeout_ms, self.curve = context, endpoint, int(timeout_s * 1000), curve

    def fetch(self, since: int) -> Iterator:
        """Every logged event after ``since``, as dicts, in order; warns on stderr about rotated-away events."""
        warned = False
        while True:
            socket = self.context.socket(zmq.REQ)
            socket.setsockopt(zmq.LINGER, 0)
            if self.curve:
                apply_client_curve(socket, self.curve)
            socket.connect(self.endpoint)
            try:
                socket.send(json.dumps({"since": since}).encode())
                if not socket.poll(self.timeout_ms):
                    raise ReplayError(f"no answer from the replay endpoint {self.endpoint} within {self.timeout_ms / 1000:g} s")
                header, *events = socket.recv_multipart()
            finally:
                socket.close()
            info = json.loads(header)
            if "error" in info:
                raise ReplayError(info["error"])
            oldest = info.get("oldest_seq")
            if not warned and oldest is not None and oldest > since + 1:
                print(f"monitord: events {since + 1}-{oldest - 1} are no longer in the log (rotated away)", file=sys.stderr)
                warned = True
            for raw in events:
                yield json.loads(raw)
            if not events:
                return
            since = info["last_seq"]


def apply_client_curve(socket: zmq.Socket, curve: dict) -> None:
    socket.curve_secretkey = curve["secret"]
    socket.curve_publickey = curve["public"]
    socket.curve_serverkey = curve["server"]


def subscription(topic: str) -> str:
    """What to subscribe to for ``topic``: everything, so ``seq`` has no holes, unless the topic is a
    score stream's (no ``seq``; possibly many a second)."""
    return topic if topic.startswith("scores.") else ""


def tail(
    endpoint: str,
    topic: str,
    as_json: bool = False,
    count: int | None = None,
    timeout_s: float | None = None,
    since: int | None = None,
    replay_endpoint: str | None = None,
    curve: dict | None = None,
) -> int:
    """Print events until interrupted, ``count`` events, or ``timeout_s`` of silence (exit 1)."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    if curve:
        apply_client_curve(socket, curve)
    socket.setsockopt_string(zmq.SUBSCRIBE, subscription(topic))
    try:
        socket.connect(endpoint)
    except zmq.ZMQError as exc:
        print(f"monitord: cannot connect to {endpoint}: {exc}", file=sys.stderr)
        return 2
    replay = ReplayClient(context, replay_endpoint, curve=curve) if replay_endpoint else None
    printed = 0
    last = since

    def show(event: dict) -> bool:
        nonlocal printed
        print(json.dumps(event, separators=(",", ":")) if as_json else format_event(event), flush=True)
        printed += 1
        return count is not None and printed >= count

    def matches(event: dict) -> bool:
        try:
            return Event.from_dict(event).topic.startswith(topic)
        except (TypeError, ValueError):
            return False

    def catch_up() -> bool:
        """Print logged events after ``last``; True when ``count`` is reached."""
        nonlocal last
        for event in replay.fetch(last):
            last = event["seq"]
            if matches(event) and show(event):
                return True
        return False

    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    try:
        if since is not None:
            if replay is None:
                print("monitord: --since needs a replay endpoint (--replay, or publish.replay_endpoint in -c CONFIG)", file=sys.stderr)
                return 2
            if catch_up():
                return 0
        while count is None or printed < count:
            ready = dict(poller.poll(None if timeout_s is None else int(timeout_s * 1000)))
            if socket not in ready:
                print(f"monitord: no event within {timeout_s} s", file=sys.stderr)
                return 1
            frames = socket.recv_multipart()
            if len(frames) != 2:
                print(f"monitord: ignoring a message of {len(frames)} frames", file=sys.stderr)
                continue
            try:
                event = json.loads(frames[1])
                seq = int(event.get("seq") or 0)
            except (ValueError, TypeError, AttributeError) as exc:
                print(f"monitord: ignoring a malformed event on {frames[0]!r}: {exc}", file=sys.stderr)
                continue
            if seq and last is not None and seq <= last:
                continue  # already fetched from the log
            if seq and last is not None and seq > last + 1:
                if replay is not None:
                    if catch_up():  # a gap: fill it from the log (the fetch includes this event)
                        return 0
                    continue
                print(f"monitord: events {last + 1}-{seq - 1} missed (--replay fetches them)", file=sys.stderr)
            if seq:
                last = seq
            if not frames[0].decode("utf-8", "replace").startswith(topic):
                continue  # another topic: taken only to see every seq
            if show(event):
                break
    except ReplayError as exc:
        print(f"monitord: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    finally:
        socket.close()
    return 0
