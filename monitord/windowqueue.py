"""The bounded hand-off between windowers and the model worker."""

from __future__ import annotations

import threading
import time
from collections import Counter, deque

from monitord.windows import Window


class WindowQueue:
    """Bounded FIFO. Live sources drop the oldest window when full (counted per source);
    sources that can wait (files) block instead, so nothing of a file is skipped."""

    def __init__(self, max_windows: int):
        self.max_windows = max_windows
        self._items: deque[Window] = deque()
        self._cond = threading.Condition()
        self.dropped: Counter[str] = Counter()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    def put(self, window: Window, wait: bool, stop: threading.Event | None = None) -> Window | None:
        """Enqueue; returns the window dropped to make room, if any."""
        dropped = None
        with self._cond:
            if wait:
                while len(self._items) >= self.max_windows and not self._closed:
                    if stop is not None and stop.is_set():
                        return None
                    self._cond.wait(0.1)
            elif len(self._items) >= self.max_windows:
                dropped = self._items.popleft()
                self.dropped[dropped.source] += 1
            self._items.append(window)
            self._cond.notify_all()
        return dropped

    def get_batch(self, max_items: int, wait_s: float, timeout: float) -> list[Window]:
        """Up to max_items windows: waits up to ``timeout`` for the first, then ``wait_s`` for more."""
        with self._cond:
            if not self._items:
                self._cond.wait_for(lambda: bool(self._items) or self._closed, timeout)
            if not self._items:
                return []
            deadline = time.monotonic() + wait_s
            while len(self._items) < max_items and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch = [self._items.popleft() for _ in range(min(max_items, len(self._items)))]
            self._cond.notify_all()
            return batch

    def close(self) -> None:
        """No more puts will wait; get_batch returns what is left, then empty lists."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
