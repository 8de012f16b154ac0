"""Events out: appended to the JSONL event log first, then sent on a ZeroMQ PUB socket.

The log is the record: ``seq`` continues from its last line after a restart, so a
subscriber that sees a gap in ``seq`` knows exactly what to fetch from it.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
import uuid
from pathlib import Path

import zmq

from monitord.config import PublishConfig
from monitord.events import Event

log = logging.getLogger(__name__)

TAIL_SCAN_BYTES = 1 << 16


class PublishError(Exception):
    """The event log or the socket cannot be opened."""


def last_seq(path: Path) -> int:
    """The ``seq`` of the last complete event in a JSONL log (0 when none)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    scan = TAIL_SCAN_BYTES
    with path.open("rb") as f:
        while True:
            f.seek(max(0, size - scan))
            lines = f.read().split(b"\n")
            for line in reversed(lines):
                try:
                    return int(json.loads(line)["seq"])
                except (ValueError, KeyError, TypeError):
                    continue
            if scan >= size:
                return 0
            scan *= 4


class Publisher:
    """Thread-safe: sources, worker and daemon all publish through one lock."""

    def __init__(self, config: PublishConfig, context: zmq.Context | None = None):
        self.config = config
        self._context = context or zmq.Context.instance()
        self._lock = threading.Lock()
        self._socket: zmq.Socket | None = None
        self._log_file = None
        self.seq = 0
        self.published = 0

    def start(self) -> None:
        if self.config.event_log is not None:
            path = Path(self.config.event_log)
            try:
                path.parent.mkdir(parents=True, exist_ok=True)
                self.seq = last_seq(path)
                fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                self._log_file = os.fdopen(fd, "ab")
                if path.stat().st_size and not _ends_with_newline(path):
                    self._log_file.write(b"\n")  # a line cut short by a crash stays alone on its line
            except OSError as exc:
                raise PublishError(f"publish.event_log: cannot open {path}: {exc.strerror or exc}") from None
        socket = self._context.socket(zmq.PUB)
        socket.setsockopt(zmq.SNDHWM, self.config.send_hwm)
        socket.setsockopt(zmq.LINGER, 1000)
        try:
            socket.bind(self.config.endpoint)
        except zmq.ZMQError as exc:
            socket.close(0)
            raise PublishError(f"publish.endpoint: cannot bind {self.config.endpoint}: {exc}") from None
        self._socket = socket
        log.info("publishing on %s (event log %s, next seq %d)", self.config.endpoint, self.config.event_log, self.seq + 1)

    def publish(self, event: Event, ready_at: float | None = None) -> Event:
        """Give the event its seq and id, log it, send it; returns the published event."""
        with self._lock:
            seq = self.seq + 1
            latency_ms = None if ready_at is None else round((time.time() - ready_at) * 1000.0, 1)
            event = event.with_sequence(seq, uuid.uuid4().hex, latency_ms)
            payload = event.to_json().encode()
            if self._log_file is not None:
                self._log_file.write(payload + b"\n")
                self._log_file.flush()
                if self.config.fsync:
                    os.fsync(self._log_file.fileno())
            self.seq = seq
            if self._socket is not None:
                try:
                    self._socket.send_multipart([event.topic.encode(), payload], flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass  # PUB never blocks at the HWM; the event is in the log
            self.published += 1
            return event

    def publish_unlogged(self, event: Event, ready_at: float | None = None) -> Event:
        """Send without a seq and without logging (live score streams: loss is acceptable there)."""
        with self._lock:
            latency_ms = None if ready_at is None else round((time.time() - ready_at) * 1000.0, 1)
            event = event.with_sequence(0, uuid.uuid4().hex, latency_ms)
            if self._socket is not None:
                try:
                    self._socket.send_multipart([event.topic.encode(), event.to_json().encode()], flags=zmq.NOBLOCK)
                except zmq.Again:
                    pass
            return event

    def close(self) -> None:
        with self._lock:
            if self._socket is not None:
                self._socket.close()
                self._socket = None
            if self._log_file is not None:
                self._log_file.flush()
                os.fsync(self._log_file.fileno())
                self._log_file.close()
                self._log_file = None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
