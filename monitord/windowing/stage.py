"""The windowing stage of one source: reads its ring buffer, cuts and gates windows, queues them."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from monitord.windowing.queue import WindowQueue
from monitord.sources.ring import Overrun, RingBuffer
from monitord.stage import Stage
from monitord.types import StreamEnd, Window
from monitord.windowing.tiling import Tiler, WindowCutter

log = logging.getLogger(__name__)

RING_WAIT_S = 0.2


@dataclass
class WindowingStats:
    cut: int = 0
    passed: int = 0
    overruns: int = 0
    """Times the reader fell behind the ring and skipped ahead."""
    skipped_samples: int = 0
    level_dbfs: float = -240.0
    """RMS level of the latest window."""


class WindowingStage(Stage):
    """Every window, passed or not, goes into the window queue in stream order (gated-out windows
    travel unscored so alerts end in order); at the end of the stream a ``StreamEnd`` follows.

    When inference is behind, a live source drops its own oldest queued window (``on_drop`` hears
    of it) and a file waits; this stage only waits on the ring and on the queue. Its position
    (the tiler) and gate state live on the object, so a restarted stage resumes at the next window.
    """

    def __init__(self, ring: RingBuffer, cutter: WindowCutter, queue: WindowQueue, live: bool,
                 on_drop: Callable[[Window], None] = lambda window: None, stall_s: float = 10.0):
        super().__init__(f"windowing-{cutter.source}", stall_s)
        self.ring = ring
        self.cutter = cutter
        self.queue = queue
        self.live = live
        self.on_drop = on_drop
        self.tiler = Tiler(cutter.length, cutter.hop)
        self.stats = WindowingStats()
        self._pending: list[int] = []
        """Starts taken from the tiler but not yet handed on (kept across a restart)."""
        self._ended = False

    def run(self) -> None:
        length = self.cutter.length
        while not self.stopping.is_set():
            self.beat()
            if not self._pending:
                ended = self.ring.closed  # read before `written`: once closed, written is final
                self._pending = self.tiler.take(self.ring.written, ended)
                if not self._pending:
                    if self.tiler.finished:
                        break
                    self.ring.wait_for(self.tiler.next_start + length, timeout=RING_WAIT_S)
                    continue
            start = self._pending[0]
            end = min(start + length, self.ring.written)
            try:
                raw = self.ring.read(start, end - start)
            except Overrun:
                self._fell_behind(start)
                continue
            window = self.cutter.cut(raw, start, self.ring.wall_time(start), time.time())
            self.stats.cut += 1
            self.stats.passed += window.passed
            self.stats.level_dbfs = window.facts.rms_dbfs
            self._put(window)
            self._pending.pop(0)
            self.ring.release(min(self.tiler.next_start, self._pending[0] if self._pending else self.tiler.next_start))
        if self.tiler.finished and not self._ended:
            self._ended = True
            self._put(StreamEnd(self.cutter.source, self.tiler.covered / self.cutter.sample_rate))

    def _put(self, item: Window | StreamEnd) -> None:
        dropped = self.queue.put(item, live=self.live, stop=self.stopping, beat=self.beat)
        if dropped is not None:
            self.on_drop(dropped)

    def _fell_behind(self, start: int) -> None:
        """The producer lapped us (we were stalled): resume at the freshest whole window."""
        newest = max(0, self.ring.written - self.cutter.length)
        self.tiler.skip_to(newest)
        self._pending = []
        self.stats.overruns += 1
        self.stats.skipped_samples += self.tiler.next_start - start
        log.warning("source %s: reader fell behind the ring, %.2f s of windows skipped", self.cutter.source,
                    (self.tiler.next_start - start) / self.cutter.sample_rate)
