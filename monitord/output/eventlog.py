"""The JSONL event log: append-only, owner-only, rotated by size, readable by seq.

``events.jsonl`` is the current file; rotation renames it to ``events.jsonl.1`` (older ones
shift to ``.2`` ... ``.keep``; the oldest is deleted). ``seq`` lives in the events, so it
continues across rotations and restarts.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

log = logging.getLogger(__name__)

TAIL_SCAN_BYTES = 1 << 16


def last_seq_in(path: Path) -> int:
    """The ``seq`` of the last complete event in one JSONL file (0 when none)."""
    try:
        size = path.stat().st_size
    except FileNotFoundError:
        return 0
    scan = TAIL_SCAN_BYTES
    with path.open("rb") as f:
        while True:
            f.seek(max(0, size - scan))
            for line in reversed(f.read().split(b"\n")):
                try:
                    return int(json.loads(line)["seq"])
                except (ValueError, KeyError, TypeError):
                    continue
            if scan >= size:
                return 0
            scan *= 4


class EventLog:
    def __init__(self, path: str | os.PathLike[str], max_bytes: int | None = None, keep: int = 5, fsync: bool = False):
        self.path = Path(path)
        self.max_bytes = max_bytes
        self.keep = keep
        self.fsync = fsync
        self._fd: int | None = None
        self._size = 0
        self._torn = False
        """The last append failed part-way: the next one starts on a fresh line."""

    def rotated(self, i: int) -> Path:
        return self.path.with_name(f"{self.path.name}.{i}")

    def files(self) -> list[Path]:
        """Oldest first."""
        older = [self.rotated(i) for i in range(self.keep, 0, -1) if self.rotated(i).exists()]
        return older + ([self.path] if self.path.exists() else [])

    def last_seq(self) -> int:
        for path in reversed(self.files()):
            seq = last_seq_in(path)
            if seq:
                return seq
        return 0

    def open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        self._size = os.fstat(self._fd).st_size
        self._torn = bool(self._size) and not _ends_with_newline(self.path)  # a line cut short by a crash stays alone

    def append(self, line: bytes) -> None:
        """One event line, written straight to the file (no user-space buffer). An OSError (disk
        full, I/O error) propagates; the caller retries the same line, which then starts on a fresh
        line, so a torn write never merges with the event after it."""
        assert self._fd is not None
        data = (b"\n" if self._torn else b"") + line + b"\n"
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]
            self._torn = bool(view)  # part of a line is out: whatever comes next starts on a fresh line
        self._size += len(data)
        if self.fsync:
            try:
                os.fsync(self._fd)
            except OSError as exc:  # the line is written; retrying it would log the event twice
                log.error("event log: fsync failed (%s); the event is written but may not survive a power loss", exc)
        if self.max_bytes is not None and self._size >= self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        self.close()
        oldest = self.rotated(self.keep)
        if oldest.exists():
            oldest.unlink()
        for i in range(self.keep - 1, 0, -1):
            if self.rotated(i).exists():
                self.rotated(i).rename(self.rotated(i + 1))
        self.path.rename(self.rotated(1))
        self.open()

    def read_since(self, seq: int, limit: int) -> tuple[list[bytes], int | None]:
        """Up to ``limit`` logged events with a seq above ``seq``, in order, and the oldest seq still kept.
        Files that end at or before ``seq`` are not read (their last line tells, from the tail)."""
        out: list[bytes] = []
        files = self.files()
        oldest = _first_seq(files[0]) if files else None
        for path in files:
            if last_seq_in(path) <= seq:
                continue
            try:
                with path.open("rb") as f:
                    for line in f:
                        if not line.endswith(b"\n"):
                            break  # being written right now
                        event_seq = _seq_of(line)
                        if event_seq is not None and event_seq > seq:
                            out.append(line.rstrip(b"\n"))
                            if len(out) >= limit:
                                return out, oldest
            except FileNotFoundError:  # rotated away while we read
                continue
        return out, oldest

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def _seq_of(line: bytes) -> int | None:
    try:
        return int(json.loads(line)["seq"])
    except (ValueError, KeyError, TypeError):
        return None


def _first_seq(path: Path) -> int | None:
    try:
        with path.open("rb") as f:
            for line in f:
                seq = _seq_of(line)
                if seq is not None:
                    return seq
    except FileNotFoundError:
        pass
    return None


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
