"""Single-producer ring buffer of mono float32 samples, addressed by absolute sample index.

The producer's path (``write``, ``skip``, ``close``: the capture callback) takes no lock and
signals nobody; readers check afterwards whether what they copied could have been overwritten
(a seqlock-style claim, see ``RingBuffer``) and poll for new samples. Back-pressure for
producers that may wait (file sources) is separate and does use a lock, on their own thread.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np

POLL_S = 0.005
"""How often ``wait_for`` looks for new samples: up to this much latency is added between a
block's arrival and a waiting reader noticing it (against a 0.5 s hop), for ~200 cheap wake-ups
a second per waiting reader."""


class Overrun(Exception):
    """The samples asked for were overwritten before they were read."""


class RingBuffer:
    """One producer (a capture callback) that never blocks; any number of readers, by absolute index.

    ``written`` counts every sample ever written, so sample ``i`` of the stream lives at
    ``i % capacity``. Before copying a block of ``n`` samples the producer publishes its claim,
    ``written + n`` (the end of what it is about to store, so slots of samples below
    ``claim - capacity`` may be changing); it advances ``written`` only after the copy. A reader
    copies first and then checks the claim: if it reaches past ``start + capacity``, some copied
    sample may be torn and ``read`` raises ``Overrun`` instead of returning it. The producer also
    updates the (index, wall time) anchor after each block, so readers can date any sample.

    Plain attribute loads and stores of ints are atomic in CPython and the producer's stores happen
    in program order, which is all the scheme needs.
    """

    def __init__(self, capacity: int, sample_rate: int):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.sample_rate = sample_rate
        self._data = np.zeros(capacity, dtype=np.float32)
        self._written = 0
        self._claim = 0
        self._anchor: tuple[int, float] = (0, time.time())
        self._closed = False
        self._space_ready = threading.Condition()
        self._released = 0

    @property
    def written(self) -> int:
        return self._written

    @property
    def closed(self) -> bool:
        """True once the producer has said no more samples will come (end of file)."""
        return self._closed

    def write(self, block: np.ndarray, wall_time_end: float | None = None) -> None:
        """Append mono samples; wall_time_end is when the last of them was captured. Takes no lock."""
        n = len(block)
        if n == 0:
            return
        end = self._written + n
        self._claim = end  # before the copy: readers of the slots being overwritten will know
        if n > self.capacity:
            block = block[-self.capacity :]
        stored = len(block)
        start = (end - stored) % self.capacity
        first = min(stored, self.capacity - start)
        self._data[start : start + first] = block[:first]
        if first < stored:
            self._data[: stored - first] = block[first:]
        self._written = end
        self._anchor = (end, time.time() if wall_time_end is None else wall_time_end)

    def skip(self, n: int) -> None:
        """Advance the stream index by ``n`` samples without storing them (a gap longer than the ring).
        The skipped indices read back as whatever the ring holds in their slots."""
        end = self._written + n
        self._claim = end
        self._written = end
        self._anchor = (end, time.time())

    def close(self) -> None:
        self._closed = True

    def wall_time(self, index: int) -> float:
        """Wall-clock time (epoch seconds) of sample ``index``, from the latest anchor."""
        anchor_index, anchor_wall = self._anchor
        return anchor_wall - (anchor_index - index) / self.sample_rate

    def read(self, start: int, n: int) -> np.ndarray:
        """A copy of samples [start, start + n); raises Overrun if any may have been overwritten."""
        end = start + n
        written = self._written
        if end > written:
            raise ValueError(f"samples up to {end} requested, only {written} written")
        if self._claim - start > self.capacity:
            raise Overrun(f"samples from {start} were overwritten (written={written})")
        begin = start % self.capacity
        first = min(n, self.capacity - begin)
        out = np.empty(n, dtype=np.float32)
        out[:first] = self._data[begin : begin + first]
        if first < n:
            out[first:] = self._data[: n - first]
        if self._claim - start > self.capacity:
            raise Overrun(f"samples from {start} were overwritten during the read")
        return out

    def wait_for(self, index: int, timeout: float) -> bool:
        """Wait until sample ``index`` is written (or the buffer is closed); True if available.

        Polls every ``POLL_S``: the producer signals nobody, so that it never takes a lock."""
        deadline = time.monotonic() + timeout
        while self._written < index and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            time.sleep(min(remaining, POLL_S))
        return self._written >= index

    # Back-pressure for producers that can wait (file sources): readers release what they consumed.
    # The lock is taken by the reader and by such a producer's own thread, never by a capture callback.

    def release(self, index: int) -> None:
        """The reader no longer needs samples before ``index``."""
        with self._space_ready:
            self._released = max(self._released, index)
            self._space_ready.notify_all()

    def wait_for_space(self, n: int, stop: threading.Event, beat: Callable[[], None] | None = None) -> bool:
        """Block until ``n`` more samples can be written without overwriting unread ones
        (calling ``beat`` while it waits); False if ``stop`` was set first."""
        with self._space_ready:
            while self._written + n - self._released > self.capacity:
                if stop.is_set():
                    return False
                self._space_ready.wait(0.1)
                if beat is not None:
                    beat()
        return True
