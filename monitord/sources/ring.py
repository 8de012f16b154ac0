"""Single-producer ring buffer of mono float32 samples, addressed by absolute sample index."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

import numpy as np


class Overrun(Exception):
    """The samples asked for were overwritten before they were read."""


class RingBuffer:
    """The producer (a capture callback) never blocks; readers address samples by absolute index.

    ``written`` counts every sample ever written, so sample ``i`` of the stream lives at
    ``i % capacity`` until ``written - i > capacity``. The producer updates the
    (index, wall time) anchor after each block, so readers can date any sample.
    """

    def __init__(self, capacity: int, sample_rate: int):
        if capacity <= 0:
            raise ValueError("capacity must be positive")
        self.capacity = capacity
        self.sample_rate = sample_rate
        self._data = np.zeros(capacity, dtype=np.float32)
        self._written = 0
        self._anchor: tuple[int, float] = (0, time.time())
        self._closed = False
        self._data_ready = threading.Event()
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
        """Append mono samples; wall_time_end is when the last of them was captured."""
        n = len(block)
        if n == 0:
            return
        if n > self.capacity:
            block = block[-self.capacity :]
            self._written += n - self.capacity
            n = self.capacity
        start = self._written % self.capacity
        first = min(n, self.capacity - start)
        self._data[start : start + first] = block[:first]
        if first < n:
            self._data[: n - first] = block[first:]
        self._written += n
        self._anchor = (self._written, time.time() if wall_time_end is None else wall_time_end)
        self._data_ready.set()

    def skip(self, n: int) -> None:
        """Advance the stream index by ``n`` samples without storing them (a gap longer than the ring)."""
        self._written += n
        self._anchor = (self._written, time.time())
        self._data_ready.set()

    def close(self) -> None:
        self._closed = True
        self._data_ready.set()

    def wall_time(self, index: int) -> float:
        """Wall-clock time (epoch seconds) of sample ``index``, from the latest anchor."""
        anchor_index, anchor_wall = self._anchor
        return anchor_wall - (anchor_index - index) / self.sample_rate

    def read(self, start: int, n: int) -> np.ndarray:
        """A copy of samples [start, start + n); raises Overrun if any were already overwritten."""
        end = start + n
        if end > self._written:
            raise ValueError(f"samples up to {end} requested, only {self._written} written")
        if self._written - start > self.capacity:
            raise Overrun(f"samples from {start} were overwritten (written={self._written})")
        begin = start % self.capacity
        first = min(n, self.capacity - begin)
        out = np.empty(n, dtype=np.float32)
        out[:first] = self._data[begin : begin + first]
        if first < n:
            out[first:] = self._data[: n - first]
        # The producer may have lapped us while we copied.
        if self._written - start > self.capacity:
            raise Overrun(f"samples from {start} were overwritten during the read")
        return out

    def wait_for(self, index: int, timeout: float) -> bool:
        """Wait until sample ``index`` is written (or the buffer is closed); True if available."""
        deadline = time.monotonic() + timeout
        while self._written < index and not self._closed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            self._data_ready.clear()
            if self._written >= index or self._closed:
                break
            self._data_ready.wait(min(remaining, 0.1))
        return self._written >= index

    # Back-pressure for producers that can wait (file sources): readers release what they consumed.

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
