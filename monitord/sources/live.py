"""What live sources (devices, stream URLs) share, written once: noticing a lost stream (its own
signs, or no audio for ``watchdog_s``), a ``down`` status, reopening with exponential backoff, an
``up`` status, and the time lost written into the stream as silence, so stream time stays
wall-clock time and events after the gap carry their true stream times."""

from __future__ import annotations

import logging
import time

import numpy as np

from monitord.config import SourceConfig
from monitord.sources.common import CaptureStats, SourceError, StatusCallback
from monitord.sources.ring import RingBuffer
from monitord.stage import Stage

log = logging.getLogger(__name__)

POLL_S = 0.1


class Backoff:
    """Delays for reconnecting: ``first``, doubling, at most ``max_s``."""

    def __init__(self, first: float = 0.5, max_s: float = 30.0):
        self.first, self.max_s = first, max_s
        self.delay = first

    def next(self) -> float:
        delay = self.delay
        self.delay = min(self.delay * 2, self.max_s)
        return delay

    def reset(self) -> None:
        self.delay = self.first


def fill_gap(source_id: str, ring: RingBuffer, lost_at: float, latency_s: float = 0.0) -> None:
    """Silence for the time a live source was away: from the last sample heard (``lost_at``) to
    the first the reopened source will deliver."""
    resumes_at = time.time() + latency_s  # the time the reopened source's first sample stands for
    missing = int((resumes_at - lost_at) * ring.sample_rate)
    if missing <= 0:
        return
    if missing > ring.capacity:
        ring.skip(missing - ring.capacity)
    ring.write(np.zeros(min(missing, ring.capacity), dtype=np.float32), wall_time_end=resumes_at)
    log.info("source %s: %.2f s gap recorded in the stream", source_id, missing / ring.sample_rate)


class LiveSource(Stage):
    """The supervision loop; subclasses say how to connect, disconnect and what "lost" looks like.

    ``connect()`` opens and starts delivering into ``self.ring`` (raising SourceError when it
    cannot), calling ``fill_pending_gap()`` on the producing side before the first samples;
    ``lost_reason()`` says why a connected stream is lost, or None; ``disconnect()`` closes it. The state, reconnect count and ring survive a restart of the stage's thread.
    """

    def __init__(self, config: SourceConfig, ring: RingBuffer, on_status: StatusCallback, kind: str):
        super().__init__(f"{kind}-{config.id}", stall_s=max(10.0, 4 * config.watchdog_s))
        self.config = config
        self.id = config.id
        self.ring = ring
        self.sample_rate = ring.sample_rate
        self.on_status = on_status
        self.stats = CaptureStats()
        self.reconnects = 0
        self.connected = False
        self.waits_for_worker = False
        self._lost_at: float | None = None
        """When the last sample was heard before an outage (None: never up yet, or up now)."""
        self._down = False
        self._attempts = 0
        self._gap_from: float | None = None
        self.waiting_at_start = False
        """Nothing to open at start (a device that is not there yet, ``retry: true``): say so first."""
        self._backoff = Backoff(0.5, config.backoff_max_s)
        self._last_blocks = -1
        self._last_block_at = time.monotonic()

    # what subclasses provide

    def connect(self) -> None:
        raise NotImplementedError

    def disconnect(self) -> None:
        raise NotImplementedError

    def lost_reason(self) -> str | None:
        return None

    def gap_latency_s(self) -> float:
        return 0.0

    # the loop

    def run(self) -> None:
        if self.waiting_at_start:
            self.waiting_at_start = False
            self._went_down(self.waiting_detail())
        while not self.stopping.is_set():
            self.beat()
            if self.connected:
                reason = self._lost()
                if reason is None:
                    self.stopping.wait(POLL_S)
                    continue
                self.disconnect()
                self.connected = False
                self._lost_at = self.ring.wall_time(self.ring.written)  # when the last sample was heard
                self._backoff.reset()
                self._attempts = 1  # give it the first backoff before trying again
                if not self.config.reconnect:
                    log.error("source %s: %s; not reconnecting (reconnect: false)", self.id, reason)
                    self._went_down(f"{reason}; not reconnecting")
                    break
                log.warning("source %s: %s; reconnecting", self.id, reason)
                self._went_down(reason)
                continue
            if self._attempts and self.pause(self._backoff.next()):
                break
            self._attempts += 1
            self._gap_from = self._lost_at  # a reconnect, not the first start: the outage becomes silence
            try:
                self.connect()
            except SourceError as exc:
                if not self._down:
                    self._went_down(f"{self.waiting_detail()}: {exc}")
                log.info("source %s: not there (%s); next try in %.1f s", self.id, exc, self._backoff.delay)
                self.detail = f"{self.waiting_detail()}: {exc}"
                continue
            self._came_up()
        if self.connected:
            self.disconnect()
            self.connected = False
        self.ring.close()

    def waiting_detail(self) -> str:
        return f"waiting for {self.id}"

    def _lost(self) -> str | None:
        if self.stats.blocks != self._last_blocks:
            self._last_blocks, self._last_block_at = self.stats.blocks, time.monotonic()
        reason = self.lost_reason()
        if reason is None and time.monotonic() - self._last_block_at > self.config.watchdog_s:
            reason = f"no audio for {self.config.watchdog_s:g} s"
        return reason

    def fill_pending_gap(self) -> None:
        """Write the outage as silence: called by whoever produces the connection's first samples,
        before them, on the producing thread (the ring has a single producer)."""
        lost_at, self._gap_from = self._gap_from, None
        if lost_at is not None:
            fill_gap(self.id, self.ring, lost_at, self.gap_latency_s())

    def _came_up(self) -> None:
        if self._lost_at is not None:
            self.reconnects += 1
        self.connected = True
        self._down = False
        self._attempts = 0
        self._lost_at = None
        self._last_blocks, self._last_block_at = self.stats.blocks, time.monotonic()
        self._backoff.reset()
        self.set_running()
        self.on_status(self.id, "up", self.up_detail())

    def up_detail(self) -> str:
        return f"capturing at {self.sample_rate} Hz"

    def _went_down(self, detail: str) -> None:
        self._down = True
        self.set_degraded(detail)
        self.on_status(self.id, "down", detail)

    def stop(self) -> None:
        """The thread disconnects and closes the ring on its way out; a dead thread's work is done here."""
        super().stop()
        if not self.alive:
            if self.connected:
                self.disconnect()
                self.connected = False
            self.ring.close()
