"""Events out, on the output stage's thread: appended to the event log first, then sent on a ZeroMQ PUB socket.

The log is the record: ``seq`` continues from its last line after a restart, so a subscriber
that sees a gap in ``seq`` asks the replay socket for what it missed (the ZeroMQ guide's
reliable pub-sub: publish + snapshot): ``{"since": N}`` on a REQ/DEALER socket returns the
logged events after N, in order, ``limit`` at a time.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid

import zmq

from monitord.config import PublishConfig
from monitord.output.eventlog import EventLog, LogKeptRotating
from monitord.types import Event

log = logging.getLogger(__name__)

REPLAY_LIMIT = 1000
REPLAY_MAX_REQUEST = 4096
REPLAY_MAX_FRAMES = 16
"""A request: a peer's identity (one more per broker on the way), REQ's empty delimiter, the query.
A message of more frames (each under REPLAY_MAX_REQUEST, a limit ZeroMQ applies per frame) is
dropped unanswered, not echoed: 100,000 frames were held and sent back."""
REPLAY_SEND_HWM = 2
"""Answers kept for a peer that does not read them; later ones are dropped (ROUTER's behaviour at its
high-water mark). At ZeroMQ's default of 1000, a peer that sent requests and never read made the
daemon hold up to 1000 answers of 1000 events each (55 -> 558 MB from one peer)."""


class PublishError(Exception):
    """The event log or a socket cannot be opened."""


class Publisher:
    """The event log and the PUB socket. Used by one thread (the output stage); a seq is taken
    only once its event is in the log, so a failed write can be retried with the same seq."""

    def __init__(self, config: PublishConfig, context: zmq.Context | None = None):
        self.config = config
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._socket: zmq.Socket | None = None
        self.event_log: EventLog | None = None
        if config.event_log is not None:
            max_bytes = None if config.event_log_max_mb is None else int(config.event_log_max_mb * 2**20)
            self.event_log = EventLog(config.event_log, max_bytes, config.event_log_keep, config.fsync)
        self.replay: ReplayServer | None = None
        self._authenticator = None
        self.seq = 0
        self.published = 0

    def start(self) -> None:
        if self.event_log is not None:
            try:
                self.seq = self.event_log.last_seq()
                self.event_log.open()
            except OSError as exc:
                raise PublishError(f"publish.event_log: cannot open {self.event_log.path}: {exc.strerror or exc}") from None
        if self.config.curve is not None:
            self._start_authenticator()
        self._socket = self._bind(zmq.PUB, self.config.endpoint, "publish.endpoint")
        self._socket.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        if self.config.replay_endpoint is not None:
            if self.event_log is None:
                raise PublishError("publish.replay_endpoint: needs publish.event_log (replay reads the log)")
            # a request is a few bytes: a peer sending more is cut off
            router = self._bind(zmq.ROUTER, self.config.replay_endpoint, "publish.replay_endpoint", REPLAY_MAX_REQUEST,
                                send_hwm=REPLAY_SEND_HWM)
            self.replay = ReplayServer(router, self.event_log)
            self.replay.start()
        log.info("publishing on %s (event log %s, next seq %d)", self.config.endpoint, self.config.event_log, self.seq + 1)

    def _start_authenticator(self) -> None:
        """Only clients whose public certificates are in ``authorized_clients`` get through."""
        from zmq.auth.thread import ThreadAuthenticator

        curve = self.config.curve
        try:
            self._server_public, self._server_secret = zmq.auth.load_certificate(curve.server_secret_key)
        except (OSError, ValueError) as exc:
            raise PublishError(f"publish.curve.server_secret_key: cannot load {curve.server_secret_key}: {exc}") from None
        if self._server_secret is None:
            raise PublishError(f"publish.curve.server_secret_key: {curve.server_secret_key} holds no secret key")
        self._authenticator = ThreadAuthenticator(self._context)
        self._authenticator.start()
        self._authenticator.configure_curve(domain="*", location=curve.authorized_clients)

    def _bind(self, kind: int, endpoint: str, key: str, max_message: int | None = None,
              send_hwm: int | None = None) -> zmq.Socket:
        socket = self._context.socket(kind)
        socket.setsockopt(zmq.LINGER, 1000)
        if max_message is not None:  # before bind: it applies to the connections accepted after it
            socket.setsockopt(zmq.MAXMSGSIZE, max_message)
        if send_hwm is not None:
            socket.setsockopt(zmq.SNDHWM, send_hwm)
        if self.config.curve is not None:
            socket.curve_secretkey = self._server_secret
            socket.curve_publickey = self._server_public
            socket.curve_server = True
        try:
            socket.bind(endpoint)
        except zmq.ZMQError as exc:
            socket.close(0)
            raise PublishError(f"{key}: cannot bind {endpoint}: {exc}") from None
        return socket

    def publish(self, event: Event, ready_at: float | None = None) -> Event:
        """Give the event its seq and id, log it, send it; returns the published event."""
        with self._lock:
            seq = self.seq + 1
            latency_ms = None if ready_at is None else round((time.time() - ready_at) * 1000.0, 1)
            event = event.with_sequence(seq, uuid.uuid4().hex, latency_ms)
            payload = event.to_json().encode()
            if self.event_log is not None:
                self.event_log.append(payload)
            self.seq = seq
            self._send(event.topic, payload)
            self.published += 1
        return event

    def publish_unlogged(self, event: Event, ready_at: float | None = None) -> Event:
        """Send without a seq and without logging (live score streams: loss is acceptable there)."""
        with self._lock:
            latency_ms = None if ready_at is None else round((time.time() - ready_at) * 1000.0, 1)
            event = event.with_sequence(0, uuid.uuid4().hex, latency_ms)
            self._send(event.topic, event.to_json().encode())
        return event

    def _send(self, topic: str, payload: bytes) -> None:
        if self._socket is None:
            return
        try:
            self._socket.send_multipart([topic.encode(), payload], flags=zmq.NOBLOCK)
        except zmq.Again:
            pass  # PUB drops at the high-water mark rather than block; the event is in the log

    def close(self) -> None:
        if self.replay is not None:
            self.replay.stop()
            self.replay = None
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
            if self.event_log is not None:
                self.event_log.close()
        if self._authenticator is not None:
            self._authenticator.stop()
            self._authenticator = None


class ReplayServer:
    """Answers ``{"since": N[, "limit": L]}`` with a header frame and the logged events after N.

    Header: ``{"count": k, "last_seq": s, "oldest_seq": o}`` (``oldest_seq`` above N+1 means the
    events in between were rotated away); a malformed request gets ``{"error": ...}``.
    """


    @property
    def alive(self) -> bool:
        """Its thread runs (started and not dead): the supervisor's health reads it."""
        return self._thread is not None and self._thread.is_alive()
    def __init__(self, socket: zmq.Socket, event_log: EventLog):
        self.socket = socket
        self.event_log = event_log
        self.served = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="replay", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                if not self.socket.poll(100):
                    continue
                frames = self._receive()
                if frames is None:
                    continue
                envelope, request = frames[:-1], frames[-1]
                try:
                    answer = self.answer(request)
                except Exception as exc:  # one bad request must not end replay for everyone
                    log.exception("replay: cannot answer %r", request[:200])
                    answer = [json.dumps({"error": f"cannot answer: {type(exc).__name__}"}).encode()]
                self.socket.send_multipart(envelope + answer)
        finally:
            self.socket.close(0)

    def _receive(self) -> list[bytes] | None:
        """One request's frames, read one at a time; None for a message of more than REPLAY_MAX_FRAMES
        (the rest are read and let go: a peer's 100,000 frames are neither kept nor echoed back)."""
        frames, too_many = [self.socket.recv()], False
        while self.socket.getsockopt(zmq.RCVMORE):
            frame = self.socket.recv()
            if len(frames) < REPLAY_MAX_FRAMES:
                frames.append(frame)
            else:
                too_many = True
        if too_many:
            log.warning("replay: a request of more than %d frames dropped unanswered", REPLAY_MAX_FRAMES)
            return None
        return frames

    def answer(self, request: bytes) -> list[bytes]:
        try:
            query = json.loads(request)
            since = int(query["since"])
            limit = max(1, min(int(query.get("limit", REPLAY_LIMIT)), REPLAY_LIMIT))
        except (ValueError, KeyError, TypeError, OverflowError, RecursionError) as exc:
            return [json.dumps({"error": f'expected {{"since": N}}: {exc}'}).encode()]
        try:
            events, oldest = self.event_log.read_since(since, limit)
        except LogKeptRotating as exc:
            log.warning("replay: %s", exc)
            return [json.dumps({"error": f"{exc}: ask again"}).encode()]
        last = json.loads(events[-1])["seq"] if events else since
        self.served += 1
        return [json.dumps({"count": len(events), "last_seq": last, "oldest_seq": oldest}).encode(), *events]
