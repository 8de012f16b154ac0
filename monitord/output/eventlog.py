"""The JSONL event log: append-only, owner-only, rotated by size, readable by seq.

``events.jsonl`` is the current file; rotation renames it to ``events.jsonl.1`` (older ones
shift to ``.2`` ... ``.keep``; the oldest is deleted). ``seq`` lives in the events, so it
continues across rotations and restarts.
"""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import BinaryIO

log = logging.getLogger(__name__)

TAIL_SCAN_BYTES = 1 << 16


def last_seq_in(path: Path) -> int:
    """The ``seq`` of the last complete event in one JSONL file (0 when none)."""
    try:
        with path.open("rb") as f:
            return _last_seq_of(f)
    except FileNotFoundError:
        return 0


def _last_seq_of(f: BinaryIO) -> int:
    """The ``seq`` of the last complete event in an open JSONL file (0 when none), read from its tail."""
    size = os.fstat(f.fileno()).st_size
    scan = TAIL_SCAN_BYTES
    while True:
        f.seek(max(0, size - scan))
        for line in reversed(f.read(min(scan, size)).split(b"\n")):
            try:
                return int(json.loads(line)["seq"])
            except (ValueError, KeyError, TypeError):
                continue
        if scan >= size:
            return 0
        scan *= 4


class LogKeptRotating(Exception):
    """No consistent view of the log files could be taken: it rotated during every attempt."""


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
        if self._fd is None:  # a rotation failed part-way: an OSError here is retried like any write
            self.open()
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
            try:
                self._rotate()
            except OSError as exc:  # the line is written: raising would have the caller log it twice
                log.error("event log: rotation failed (%s); tried again after the next event", exc)

    def _rotate(self) -> None:
        try:
            self.close()
            oldest = self.rotated(self.keep)
            if oldest.exists():
                oldest.unlink()
            for i in range(self.keep - 1, 0, -1):
                if self.rotated(i).exists():
                    self.rotated(i).rename(self.rotated(i + 1))
            self.path.rename(self.rotated(1))
        finally:
            if self._fd is None:
                self.open()

    def read_since(self, seq: int, limit: int) -> tuple[list[bytes], int | None]:
        """Up to ``limit`` logged events with a seq above ``seq``, in order, and the oldest seq still kept.

        Reads one consistent snapshot of the files (see ``_open_snapshot``), so a rotation while
        reading cannot make it skip a file. Files that end at or before ``seq`` are not read
        (their last line tells, from the tail)."""
        out: list[bytes] = []
        snapshot = self._open_snapshot()
        try:
            oldest = next((first for f in snapshot if (first := _first_seq_of(f)) is not None), None)
            for f in snapshot:
                if _last_seq_of(f) <= seq:
                    continue
                _seek_after(f, seq)
                for line in f:
                    if not line.endswith(b"\n"):
                        break  # being written right now
                    event_seq = _seq_of(line)
                    if event_seq is not None and event_seq > seq:
                        out.append(line.rstrip(b"\n"))
                        if len(out) >= limit:
                            return out, oldest
            return out, oldest
        finally:
            for f in snapshot:
                f.close()

    def find(self, seq: int) -> dict | None:
        """Logged event SEQ as its JSON object; None where the log does not hold it (rotated out, never
        logged) or holds it damaged."""
        lines, _ = self.read_since(seq - 1, 1)
        try:
            event = json.loads(lines[0]) if lines else None
        except ValueError:
            return None
        return event if isinstance(event, dict) and event.get("seq") == seq else None

    def _open_snapshot(self, attempts: int = 100) -> list[BinaryIO]:
        """Every log file, oldest first, opened at one moment between two rotations.

        An open file survives being renamed or deleted, so once every name has been opened and
        checked (same names, each still the file we hold), the reader is immune to later rotations.
        A rotation in between shows as a changed name list or inode: close all and try again.
        """
        for attempt in range(attempts):
            paths = self.files()
            opened: list[BinaryIO] = []
            try:
                for path in paths:
                    opened.append(path.open("rb"))
                if self.files() == paths and all(_same_file(path, f) for path, f in zip(paths, opened)):
                    return opened
            except FileNotFoundError:
                pass
            for f in opened:
                f.close()
            if attempt >= 3:
                time.sleep(0.001)  # let a rotation in progress finish its renames
        raise LogKeptRotating(f"{self.path} rotated during each of {attempts} attempts to read it")

    def close(self) -> None:
        if self._fd is not None:
            fd, self._fd = self._fd, None
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


SEEK_LINEAR_BYTES = 1 << 14
"""Below this many bytes the bisection gives way to reading lines."""


def _seek_after(f: BinaryIO, seq: int) -> None:
    """Put ``f`` at a line start at or before the first line whose seq is above ``seq``, bisecting on
    byte offsets (a file's lines are in seq order), so reading a backlog in pages costs each page,
    not the file up to it."""
    lo, hi = 0, f.seek(0, os.SEEK_END)
    while hi - lo > SEEK_LINEAR_BYTES:
        mid = (lo + hi) // 2
        f.seek(mid)
        f.readline()  # to the next line start
        start = f.tell()
        found = None
        while found is None:
            line = f.readline()
            if not line.endswith(b"\n"):
                break  # the end (or a line being written)
            found = _seq_of(line)
        if found is None or found > seq:
            hi = mid
        else:
            lo = start
    f.seek(lo)


def _seq_of(line: bytes) -> int | None:
    try:
        return int(json.loads(line)["seq"])
    except (ValueError, KeyError, TypeError):
        return None


def _first_seq_of(f: BinaryIO) -> int | None:
    f.seek(0)
    for line in f:
        seq = _seq_of(line)
        if seq is not None:
            return seq
    return None


def _same_file(path: Path, f: BinaryIO) -> bool:
    """Whether ``path`` still names the file ``f`` holds open."""
    try:
        named, held = path.stat(), os.fstat(f.fileno())
    except FileNotFoundError:
        return False
    return (named.st_dev, named.st_ino) == (held.st_dev, held.st_ino)


def _ends_with_newline(path: Path) -> bool:
    with path.open("rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"
