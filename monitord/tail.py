"""``monitord tail``: subscribe to a daemon's events and print them."""

from __future__ import annotations

import json
import sys

import zmq


def format_event(event: dict) -> str:
    """One line per event, for people."""
    head = f"#{event.get('seq')} {event.get('time')} {event.get('kind')} {event.get('source')}"
    if event.get("kind") == "alert":
        return (
            f"{head} {event.get('rule')} {event.get('phase')} {event.get('label')!r} score={event.get('score'):.3f} "
            f"stream={event.get('stream_start'):.2f}-{event.get('stream_end'):.2f}s latency={event.get('latency_ms')}ms"
        )
    return f"{head} {event.get('status')}: {event.get('detail')}"


def tail(endpoint: str, topic: str, as_json: bool = False, count: int | None = None, timeout_s: float | None = None) -> int:
    """Print events until interrupted, ``count`` events, or ``timeout_s`` of silence (exit 1)."""
    context = zmq.Context.instance()
    socket = context.socket(zmq.SUB)
    socket.setsockopt(zmq.LINGER, 0)
    socket.setsockopt_string(zmq.SUBSCRIBE, topic)
    try:
        socket.connect(endpoint)
    except zmq.ZMQError as exc:
        print(f"monitord: cannot connect to {endpoint}: {exc}", file=sys.stderr)
        return 2
    poller = zmq.Poller()
    poller.register(socket, zmq.POLLIN)
    seen = 0
    try:
        while count is None or seen < count:
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
                line = frames[1].decode() if as_json else format_event(event)
            except (ValueError, TypeError, UnicodeDecodeError) as exc:
                print(f"monitord: ignoring a malformed event on {frames[0]!r}: {exc}", file=sys.stderr)
                continue
            print(line, flush=True)
            seen += 1
    except KeyboardInterrupt:
        pass
    finally:
        socket.close()
    return 0
