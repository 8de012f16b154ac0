"""The output stage: the one thread that owns the side effects.

Events arrive as Publications (alerts from the alerts stage; status events from anywhere): a
logged event gets its seq and lands in the event log first, then goes out on the ZeroMQ PUB
socket, to the sinks (MQTT, notifications), the dashboard and the metrics; an onset alert gets its
clip requested. Scored windows feed the dashboard. Nothing upstream ever waits on a disk or a
socket: this stage does, and a write that fails (disk full, I/O error) is retried with the same
event and the same seq, with the stage degraded meanwhile, so nothing is lost and no seq skipped.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Protocol

from monitord.output.clips import ClipWriter
from monitord.output.publish import Publisher
from monitord.sources.ring import RingBuffer
from monitord.stage import Channel, Closed, Stage
from monitord.config import RuleConfig
from monitord.types import Event, Publication, RulesChange, ScoredWindow, iso_utc

log = logging.getLogger(__name__)

RETRY_MAX_S = 5.0


class Sink(Protocol):
    """Somewhere else events go, after the log (MQTT, notifications). ``deliver`` is called on the
    output thread and must not block: a sink with a network hands the event to its own thread.

    A sink with ``wants_windows = True`` also gets every scored window through ``on_window(scored)``
    (same thread, same rule: no blocking), e.g. for input levels."""

    name: str

    def start(self) -> None: ...

    def deliver(self, event: Event) -> None: ...

    def stop(self, timeout: float) -> None: ...

    def on_rules(self, rules: tuple[RuleConfig, ...]) -> None:
        """A reload changed the rules (output thread; must not block). Optional: a sink without it
        is left out."""


class Feed(Protocol):
    """The dashboard's side of the output stage."""

    def on_window(self, scored: ScoredWindow) -> None: ...

    def on_event(self, event: Event) -> None: ...


@dataclass
class OutputStats:
    published: int = 0
    unlogged: int = 0
    write_failures: int = 0
    clips: int = 0
    clip_failures: int = 0


class OutputStage(Stage):
    def __init__(self, inbox: Channel, publisher: Publisher, host: str, rings: Mapping[str, RingBuffer],
                 clips: ClipWriter | None = None, sinks: Sequence[Sink] = (), feed: Feed | None = None,
                 on_published: Callable[[Event], None] = lambda event: None, stall_s: float = 10.0):
        super().__init__("output", stall_s)
        self.inbox = inbox
        self.publisher = publisher
        self.host = host
        self.rings = dict(rings)
        self.clips = clips
        self.sinks = list(sinks)
        self.window_sinks = [sink for sink in self.sinks if getattr(sink, "wants_windows", False)]
        self.feed = feed
        self.on_published = on_published
        self.stats = OutputStats()
        self._in_hand: Publication | None = None
        """The event being written: retried first by a restarted stage, so it is not lost."""
        self._clip_statuses: deque[Publication] = deque()
        """Statuses of clips written (taken from the clip writer) and not yet published: a restarted
        stage publishes them first."""

    @property
    def idle(self) -> bool:
        return self._in_hand is None and not self._clip_statuses and (self.clips is None or not self.clips.pending)

    def run(self) -> None:
        while True:
            self.beat()
            if self._in_hand is not None:
                self._publish(self._in_hand)
                self._in_hand = None
            self._write_clips()
            try:
                item = self.inbox.get(timeout=0.1)
            except Closed:
                self._write_clips(flush=True)
                return
            if self.stopping.is_set() and item is None:
                return
            if isinstance(item, Publication):
                self._in_hand = item
                self._publish(item)
                self._in_hand = None
            elif isinstance(item, RulesChange):
                for sink in self.sinks:
                    on_rules = getattr(sink, "on_rules", None)  # optional: a sink may not care about rules
                    if on_rules is None:
                        continue
                    try:
                        on_rules(item.rules)
                    except Exception:  # a sink's failure is its own
                        log.exception("sink %s failed to take the new rules", sink.name)
            elif isinstance(item, ScoredWindow):
                if self.feed is not None:
                    self.feed.on_window(item)
                for sink in self.window_sinks:
                    try:
                        sink.on_window(item)
                    except Exception:  # a sink's failure is its own
                        log.exception("sink %s failed on a window", sink.name)

    def status(self, source: str, status: str, detail: str, **extra: object) -> Event:
        return Event(kind="status", source=source, time=iso_utc(time.time()), host=self.host, status=status,
                     detail=detail, extra=dict(extra))

    def _publish(self, publication: Publication) -> None:
        event = publication.event
        if publication.logged and event.kind == "alert" and event.phase == "onset" and self.clips is not None \
                and publication.clip_span is not None and event.source in self.rings and event.clip is None:
            event = replace(event, clip=str(self.clips.path_for(event.source, event.rule or "", event.time)))
        if publication.logged:
            published = self._log_and_send(event, publication.ready_at)
            if self._in_hand is publication:
                self._in_hand = None  # in the log now: a restarted stage must not log it again
        elif publication.broadcast:
            published = self.publisher.publish_unlogged(event, publication.ready_at)
            self.stats.unlogged += 1
        else:
            published = event
        if published.clip is not None and publication.clip_span is not None and self.clips is not None:
            start, end = publication.clip_span
            self.clips.request(event.source, self.rings[event.source], start, end, Path(published.clip), published.seq)
        if publication.logged or publication.broadcast:
            for sink in self.sinks:
                try:
                    sink.deliver(published)
                except Exception:  # a sink's failure is its own; the log already has the event
                    log.exception("sink %s failed on event %d", sink.name, published.seq)
        if self.feed is not None and published.kind != "frames":  # the dashboard lists events and draws no frames
            self.feed.on_event(published)
        if publication.logged:
            self.on_published(published)

    def _log_and_send(self, event: Event, ready_at: float | None) -> Event:
        """Log (then send) the event, retrying a failed write with backoff until it lands."""
        delay = 0.1
        while True:
            try:
                published = self.publisher.publish(event, ready_at)
            except OSError as exc:
                self.stats.write_failures += 1
                if self.stats.write_failures == 1 or delay >= RETRY_MAX_S:
                    log.error("event log: cannot write event %d: %s; retrying", self.publisher.seq + 1, exc)
                self.set_degraded(f"event log write failing: {exc.strerror or exc}")
                if self.pause(delay):
                    log.error("event log: stopping with event %d unwritten: %s", self.publisher.seq + 1, event.to_json())
                    raise
                delay = min(delay * 2, RETRY_MAX_S)
                continue
            if self.state.value == "degraded" and self.detail.startswith("event log"):
                self.set_running()
            self.stats.published += 1
            return published

    def _write_clips(self, flush: bool = False) -> None:
        if self.clips is not None and self.clips.pending:
            for result in self.clips.poll(flush):
                request = result.request
                if result.path is not None:
                    self.stats.clips += 1
                    status = self.status(request.source, "clip", result.detail, clip=str(result.path), onset_seq=request.onset_seq)
                else:
                    self.stats.clip_failures += 1
                    status = self.status(request.source, "clip_error", result.detail, onset_seq=request.onset_seq)
                self._clip_statuses.append(Publication(status))
        while self._clip_statuses:
            self._in_hand = self._clip_statuses.popleft()
            self._publish(self._in_hand)
            self._in_hand = None

