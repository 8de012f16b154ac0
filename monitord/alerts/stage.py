"""The alerts stage: scored windows in, events out, on a thread of its own.

It steps the pure engine on each model's outcome, in queue order, and hands on alert events,
the live score events (when someone wants them: ``publish.scores`` or the dashboard) and every
scored window (the output stage feeds the dashboard's level meters and the metrics from them).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass

from monitord.alerts.engine import AlertEngine, Transition
from monitord.config import RuleConfig
from monitord.stage import Channel, Closed, Stage
from monitord.types import Event, Publication, Scores, ScoredWindow, StreamEnd, Verdict, Window, iso_utc

log = logging.getLogger(__name__)

EVENT_TOP_LABELS = 10


@dataclass(frozen=True)
class RulesChange:
    """New rules, taking effect right after the windows scored with the old labels (the
    inference stage puts this into the alerts channel between two batches, after a label swap)."""

    rules: tuple[RuleConfig, ...]


def event_scores(probabilities: Mapping[str, float], label: str) -> dict[str, float]:
    """The scores an event carries: the rule's label and the best EVENT_TOP_LABELS others
    (all of them for a CLAP label set; YAMNet has 521 classes)."""
    best = sorted(probabilities, key=probabilities.get, reverse=True)[:EVENT_TOP_LABELS]
    keep = best if label in best else [*best, label]
    return {name: round(probabilities[name], 6) for name in keep if name in probabilities}


def alert_event(window: Window, transition: Transition, model_id: str, host: str, scores: Scores | None) -> Event:
    rule = transition.rule
    return Event(
        kind="alert", source=window.source, time=iso_utc(window.wall_start), host=host, rule=rule.id, label=rule.label,
        phase=transition.phase, score=round(transition.score, 6),
        scores=None if scores is None else event_scores(scores.probabilities, rule.label),
        model=model_id, model_name=rule.model, stream_start=round(window.stream_start, 6),
        stream_end=round(window.stream_end, 6), facts=window.facts.to_dict(),
        extra={} if transition.reason is None else {"reason": transition.reason},
    )


def scores_event(scores: Scores, host: str) -> Event:
    window = scores.window
    (label, score), = scores.top(1)
    return Event(
        kind="scores", source=window.source, time=iso_utc(window.wall_start), host=host, label=label,
        score=round(score, 6), scores=event_scores(scores.probabilities, label), model=scores.model_id,
        model_name=scores.model, stream_start=round(window.stream_start, 6), stream_end=round(window.stream_end, 6),
        facts=window.facts.to_dict(),
    )


class AlertsStage(Stage):
    """Reads ScoredWindow / StreamEnd / RulesChange items, writes Publications and ScoredWindows.

    The engine (every rule's state) lives on the object: a restarted stage goes on with it.
    When its channel is closed and empty (the daemon stopping), every alert still on ends.
    """

    def __init__(self, engine: AlertEngine, inbox: Channel, out: Channel, host: str, model_ids: Mapping[str, str],
                 scores_wanted: bool | tuple[str, ...] = False, feed_windows: bool = False, stall_s: float = 10.0):
        super().__init__("alerts", stall_s)
        self.engine = engine
        self.inbox = inbox
        self.out = out
        self.host = host
        self.model_ids = dict(model_ids)
        self.scores_wanted = scores_wanted
        self.feed_windows = feed_windows
        """Hand every scored window (and every score event) on, for the dashboard."""
        self._last_window: dict[str, Window] = {}
        self.events = 0
        self._in_hand: object | None = None
        self.outcomes: Counter[tuple[str, str, str]] = Counter()
        """(source, model, verdict) -> windows seen."""

    @property
    def idle(self) -> bool:
        return self._in_hand is None

    def run(self) -> None:
        if self._in_hand is not None:  # what the dead thread was handling when it died: likely the cause
            log.error("alerts: skipping %r, which the stage died on", self._in_hand)
            self._in_hand = None
        while not self.stopping.is_set():
            self.beat()
            if self._in_hand is None:
                try:
                    self._in_hand = self.inbox.get(timeout=0.2)
                except Closed:
                    self._end_all("stopped")
                    return
            item = self._in_hand
            if item is None:
                continue
            self._handle(item)
            self._in_hand = None

    def _handle(self, item: object) -> None:
        if isinstance(item, ScoredWindow):
            self._on_window(item)
        elif isinstance(item, StreamEnd):
            self._end(item.source, "end of stream")
        elif isinstance(item, RulesChange):
            self.engine, ended = self.engine.with_rules(item.rules)
            self._publish_transitions(ended, None)

    def _on_window(self, scored: ScoredWindow) -> None:
        window = scored.window
        last = self._last_window.get(window.source)
        # a window's remote outcomes come in a ScoredWindow of their own, after its local ones (and
        # maybe after later windows'): the last window seen and the dashboard's feed only move forward
        fresh = last is None or window.start_index > last.start_index
        if fresh:
            self._last_window[window.source] = window
        for outcome in scored.outcomes:
            self.outcomes[(window.source, outcome.model, outcome.verdict.value)] += 1
            transitions = self.engine.observe(window.source, outcome, window.stream_end)
            self._publish_transitions(transitions, window, outcome.scores)
            if outcome.verdict is Verdict.SCORED:
                published = self._publishes_scores(outcome.model, window.source)
                if published or self.feed_windows:
                    self._put(Publication(scores_event(outcome.scores, self.host), window.ready_at, logged=False,
                                          broadcast=published), may_drop=True)
        if self.feed_windows and fresh:
            self._put(scored, may_drop=True)

    def _publishes_scores(self, model: str, source: str) -> bool:
        wanted = self.scores_wanted
        return wanted is True or (bool(wanted) and (model in wanted or source in wanted))

    def _end(self, source: str, reason: str) -> None:
        self._publish_transitions(self.engine.end(source, reason), self._last_window.get(source))

    def _end_all(self, reason: str) -> None:
        for source in sorted({source for _, source in self.engine.active()}):
            self._end(source, reason)

    def _publish_transitions(self, transitions: list[Transition], window: Window | None, scores: Scores | None = None) -> None:
        for transition in transitions:
            if window is None:
                continue  # an alert on a source with no window seen cannot be on
            event = alert_event(window, transition, self.model_ids.get(transition.rule.model, transition.rule.model),
                                self.host, scores if transition.reason is None else None)
            span = (window.start_index, window.start_index + window.valid) if transition.phase == "onset" else None
            self._put(Publication(event, window.ready_at if transition.reason is None else None, clip_span=span))
            self.events += 1

    def _put(self, item: object, may_drop: bool = False) -> None:
        """Events wait for room (nothing logged is lost); live score streams may be dropped."""
        if may_drop:
            self.out.put_nowait(item)
        else:
            self.out.put(item, self.stopping, self.beat)
