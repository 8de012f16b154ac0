"""The bounded hand-off between the windowing stages and inference.

Live sources never wait: when the queue is full, a live source drops its own oldest queued
window (or, with none queued, the window it brings), counted against that source. Sources that
can wait (files) block instead, so nothing of a file is skipped and no file window is ever
dropped for a live source. A ``StreamEnd`` marker is never dropped.

While too many windows wait for remote scoring (the cluster down or slow) the inference stage
holds the sources that can wait (``hold_waiting``): their puts wait even with room in the queue,
so live sources' windows still flow to the local models. ``wake`` ends a wait for windows early
(a remote answer came back).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, deque
from collections.abc import Callable

from monitord.types import StreamEnd, Window

Item = Window | StreamEnd


class WindowQueue:
    def __init__(self, max_windows: int):
        self.max_windows = max_windows
        self._items: deque[Item] = deque()
        self._cond = threading.Condition()
        self.dropped: Counter[str] = Counter()
        """Windows dropped per source (live sources under overload, and any put after close)."""
        self._closed = False
        self._woken = False
        self._holding = False
        self.live: dict[str, bool] = {}
        """Per source seen: whether it is live (drops its own oldest windows) or waits (a file)."""

    def __len__(self) -> int:
        return len(self._items)

    def put(self, item: Item, live: bool, stop: threading.Event | None = None,
            beat: Callable[[], None] | None = None) -> Window | None:
        """Enqueue; returns the window dropped to make room (a live source's own), if any.

        A file's put waits while the queue is full or waiting sources are held (checking ``stop``,
        calling ``beat``); after ``close`` nothing is added and the item counts as dropped."""
        with self._cond:
            self.live[item.source] = live
            if isinstance(item, Window) and not live:
                while (len(self._items) >= self.max_windows or self._holding) and not self._closed:
                    if stop is not None and stop.is_set():
                        return None
                    self._cond.wait(0.1)
                    if beat is not None:
                        beat()
            if self._closed:
                if isinstance(item, Window):
                    self.dropped[item.source] += 1
                    return item
                return None
            dropped = None
            if isinstance(item, Window) and len(self._items) >= self.max_windows:
                dropped = self._oldest_of(item.source)
                if dropped is None:
                    self.dropped[item.source] += 1
                    return item
                self._items.remove(dropped)
                self.dropped[item.source] += 1
            self._items.append(item)
            self._cond.notify_all()
            return dropped

    def _oldest_of(self, source: str) -> Window | None:
        return next((w for w in self._items if isinstance(w, Window) and w.source == source), None)

    def get_batch(self, max_windows: int, wait_s: float, timeout: float, taken: list[Item] | None = None) -> list[Item]:
        """Up to ``max_windows`` windows (markers ride along in order): waits up to ``timeout``
        for the first item (or a ``wake``), then up to ``wait_s`` for the batch to fill. With
        ``taken``, the batch is also added to that list before the queue's lock is let go (so no
        observer ever sees a window in neither place)."""
        with self._cond:
            if not self._items and not self._woken:
                self._cond.wait_for(lambda: bool(self._items) or self._closed or self._woken, timeout)
            self._woken = False
            if not self._items:
                return []
            deadline = time.monotonic() + wait_s
            while self._windows() < max_windows and not self._closed:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._cond.wait(remaining)
            batch: list[Item] = []
            windows = 0
            while self._items and windows < max_windows:
                item = self._items.popleft()
                batch.append(item)
                windows += isinstance(item, Window)
            while self._items and isinstance(self._items[0], StreamEnd):
                batch.append(self._items.popleft())
            if taken is not None:
                taken.extend(batch)
            self._cond.notify_all()
            return batch

    def _windows(self) -> int:
        return sum(isinstance(i, Window) for i in self._items)

    def put_back(self, items: list[Item]) -> None:
        """Return a batch to the front, in order (inference died before finishing it)."""
        with self._cond:
            self._items.extendleft(reversed(items))
            self._cond.notify_all()

    def hold_waiting(self, hold: bool) -> None:
        """Hold (or let go) the sources that wait (files): their next windows wait in ``put``. What
        they queued already stays and is taken as usual."""
        with self._cond:
            if hold != self._holding:
                self._holding = hold
                self._cond.notify_all()

    @property
    def holding(self) -> bool:
        return self._holding

    def wake(self) -> None:
        """End a ``get_batch`` that waits for a first item now (another thread has news for its caller)."""
        with self._cond:
            self._woken = True
            self._cond.notify_all()

    def close(self) -> None:
        """No more puts; get_batch returns what is left, then empty lists."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()

    @property
    def closed(self) -> bool:
        return self._closed
