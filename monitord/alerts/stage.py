"""The alerts stage: scored windows in, events out, on a thread of its own.

It steps the pure engine on each model's outcome, in queue order, and hands on alert events,
the live score events (when someone wants them: ``publish.scores`` or the dashboard) and every
scored window (the output stage feeds the dashboard's level meters and the metrics from them).
With ``publish.scores``, every frame of a frame-level model goes out once: in the score event of
the window that made it final, else (an unscored window, a stream's end) in a ``frames`` event.
"""

from __future__ import annotations

import logging
from collections import Counter, deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any

from monitord.alerts.engine import AlertEngine, Transition
from monitord.alerts.frames import Curve, FrameAlert, FrameTracker, Released
from monitord.teaching.suppress import Match, NotLike, suppressed_event
from monitord.stage import Channel, Closed, Stage
from monitord.types import Event, Publication, RulesChange, Scores, ScoredWindow, StreamEnd, Verdict, Window, iso_utc

log = logging.getLogger(__name__)

EVENT_TOP_LABELS = 10


def event_scores(probabilities: Mapping[str, float], *labels: str) -> dict[str, float]:
    """The scores an event carries: ``labels`` (the rule's; a score event's, those its model's rules
    watch) and the best EVENT_TOP_LABELS others (all of them for a CLAP label set; YAMNet has 521 classes)."""
    best = sorted(probabilities, key=probabilities.get, reverse=True)[:EVENT_TOP_LABELS]
    keep = [*best, *(label for label in dict.fromkeys(labels) if label not in best)]
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


def frames_payload(frames: Curve, labels: Sequence[str]) -> dict[str, Any]:
    """Frames as events carry them: one row of probabilities (in ``labels`` order) per frame."""
    return {"hop_s": round(frames.hop_s, 6), "labels": list(labels), "times": [round(t, 4) for t in frames.times.tolist()],
            "values": [[round(v, 5) for v in row] for row in frames.values.tolist()]}


def scores_event(scores: Scores, host: str, frames: Curve | None = None, watched: Sequence[str] = ()) -> Event:
    """A scored window's scores (the best, and the ``watched`` labels: the dashboard's timeline keeps
    each rule's label on its chart); for a frame-level model also the frames that became final with it
    (the merged curve trails the newest window by about 1.25 s with 2 s windows every 0.5 s)."""
    window = scores.window
    (label, score), = scores.top(1)
    extra = {}
    if frames is not None and len(frames):
        extra["frames"] = frames_payload(frames, list(scores.probabilities))
    return Event(
        kind="scores", source=window.source, time=iso_utc(window.wall_start), host=host, label=label,
        score=round(score, 6), scores=event_scores(scores.probabilities, label, *watched), model=scores.model_id,
        model_name=scores.model, stream_start=round(window.stream_start, 6), stream_end=round(window.stream_end, 6),
        facts=window.facts.to_dict(), extra=extra,
    )


def frames_event(window: Window, model: str, model_id: str, labels: Sequence[str], frames: Curve, host: str) -> Event:
    """Frames that became final with no score event to carry them: ``window`` (the source's window
    at hand) was not scored, or the stream ended. stream_start/stream_end: the first and last frame."""
    first, last = float(frames.times[0]), float(frames.times[-1])
    return Event(
        kind="frames", source=window.source, time=iso_utc(window.wall_start + (first - window.stream_start)), host=host,
        model=model_id, model_name=model, stream_start=round(first, 4), stream_end=round(last, 4),
        extra={"frames": frames_payload(frames, labels)},
    )


def frame_alert_event(window: Window, alert: FrameAlert, model_id: str, host: str) -> Event:
    """A frame rule's transition: stream_start is where the held run began (onset) or the onset it
    ends (offset), stream_end the frame at which it happened."""
    rule, t = alert.rule, alert.transition
    return Event(
        kind="alert", source=window.source, time=iso_utc(window.wall_start + (t.time - window.stream_start)), host=host,
        rule=rule.id, label=rule.label, phase=t.phase, score=round(t.score, 6), model=model_id, model_name=rule.model,
        stream_start=round(t.since, 6), stream_end=round(t.time, 6), facts=window.facts.to_dict(),
        extra={"frame_rule": True},
    )


class AlertsStage(Stage):
    """Reads ScoredWindow / StreamEnd / RulesChange items, writes Publications and ScoredWindows.

    The engine (every rule's state) lives on the object: a restarted stage goes on with it.
    When its channel is closed and empty (the daemon stopping), every alert still on ends.

    Each item is handled as a whole or not at all: what it makes is collected first and handed on
    after. A stage that dies while handling an item is restarted with the rules' states as they were
    before it and skips the item (likely the cause), so no event of it went out and no alert is left
    on that nobody saw begin; one that dies while handing on goes on handing on the rest. A rules
    change is never skipped: it is applied again.
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
        self.frames = FrameTracker(engine.rules)
        self._frame_models = self.frames.models | set(self._frame_publishers())
        self._in_hand: object | None = None
        self._made: list[tuple[object, bool]] = []
        """What handling the item in hand made so far: (item, may_drop)."""
        self._handing_on: deque[tuple[object, bool]] | None = None
        """What the item in hand made, being handed on (None while it is being handled)."""
        self._before: tuple = self._checkpoint()
        self.outcomes: Counter[tuple[str, str, str]] = Counter()
        """(source, model, verdict) -> windows seen."""
        self.not_like = NotLike()
        self._suppressing: set[tuple[str, str]] = set()
        """(rule, source) whose last window was a suppressed would-be onset (one status event per run)."""

    @property
    def idle(self) -> bool:
        return self._in_hand is None

    def run(self) -> None:
        if self._in_hand is not None and self._handing_on is None:
            self._restore(self._before)
            self._made = []
            item = self._in_hand
            if isinstance(item, RulesChange):
                # never skipped: the daemon has taken the new rules as applied. Dying on them again and
                # again ends the process (the supervisor's bound), which then starts with them.
                log.error("alerts: applying the new rules again; the stage died applying them")
                self._transaction(lambda: self._handle(item))
            else:  # the dead thread was handling it (likely the cause): as if it had never come
                log.error("alerts: skipping %r, which the stage died on; the rules' states are as before it", item)
                self._in_hand = None
        while not self.stopping.is_set():
            self.beat()
            if self._handing_on is not None:
                self._hand_on()
                continue
            try:
                self._in_hand = self.inbox.get(timeout=0.2)
            except Closed:
                self._in_hand = "stopped"
                self._transaction(lambda: self._end_all("stopped"))
                self._hand_on()
                return
            if self._in_hand is None:
                continue
            item = self._in_hand
            self._transaction(lambda: self._handle(item))

    def _transaction(self, handle: Callable[[], None]) -> None:
        self._before = self._checkpoint()
        self._made = []
        handle()
        self._handing_on, self._made = deque(self._made), []

    def _hand_on(self) -> None:
        queue = self._handing_on
        while queue:
            item, may_drop = queue[0]
            if may_drop:
                self.out.put_nowait(item)
            elif not self.out.put(item, self.stopping, self.beat):
                if not self.out.closed:
                    return  # stopping: a restart (the daemon draining) hands on the rest
                # closed (the daemon stopped waiting for this stage): nothing can take them, ever
                lost = [i for i, drop in queue if not drop and isinstance(i, Publication)]
                log.error("alerts: the output channel is closed; %d events not handed on: %s", len(lost),
                          "; ".join(p.event.to_json() for p in lost))
                break
            queue.popleft()
        self._handing_on, self._in_hand = None, None

    def _checkpoint(self) -> tuple:
        """Everything handling an item changes (the rules' states themselves are immutable values)."""
        return (self.engine, dict(self.engine.states), self.frames, self.frames.snapshot(), self._frame_models,
                dict(self._last_window))

    def _restore(self, checkpoint: tuple) -> None:
        self.engine, engine_states, self.frames, frames, self._frame_models, last_window = checkpoint
        self.engine.states = dict(engine_states)
        self.frames.restore(frames)
        self._last_window = dict(last_window)

    def _handle(self, item: object) -> None:
        if isinstance(item, ScoredWindow):
            self._on_window(item)
        elif isinstance(item, StreamEnd):
            self._end(item.source, "end of stream")
        elif isinstance(item, RulesChange):
            self.engine, ended = self.engine.with_rules(item.rules)
            self._publish_transitions(ended, None)
            self.frames, frame_ended = self.frames.with_rules(item.rules)
            self._publish_frame_alerts(frame_ended, None)
            self._frame_models = self.frames.models | set(self._frame_publishers())
            self._put(item)  # the sinks (MQTT discovery, notification rules) follow, after the offsets it caused

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
            suppressed = self._suppressed(window, outcome)
            transitions = self.engine.observe(window.source, outcome, window.stream_end, suppressed)
            self._publish_transitions(transitions, window, outcome.scores)
            curve = None
            if outcome.model in self._frame_models or (outcome.model in self.model_ids and self._publishes_frames()):
                scores = outcome.scores if outcome.verdict is Verdict.SCORED else None
                curve, alerts = self.frames.observe(window.source, outcome.model, window.stream_start, window.stream_end,
                                                    None if scores is None else scores.frames,
                                                    () if scores is None else tuple(scores.probabilities))
                self._publish_frame_alerts(alerts, window)
            if outcome.verdict is Verdict.SCORED:
                published = self._publishes_scores(outcome.model, window.source)
                if published or self.feed_windows:
                    watched = [r.label for r in self.engine.rules if r.model == outcome.model]
                    event = scores_event(outcome.scores, self.host, curve, watched)
                    if suppressed:
                        event = replace(event, extra={**event.extra,
                                                      "suppressed_by": {r: m.to_dict() for r, m in suppressed.items()}})
                    # a published frame is never dropped (it waits for room, as alerts do): each frame in one event
                    self._put(Publication(event, window.ready_at, logged=False, broadcast=published),
                              may_drop=not (published and curve is not None and len(curve)))
            elif curve is not None and len(curve) and self._publishes_scores(outcome.model, window.source):
                # released by a window the model did not score: no score event to carry them
                self._put(Publication(frames_event(window, outcome.model, self.model_ids.get(outcome.model, outcome.model),
                                                   self.frames.labels(outcome.model), curve, self.host),
                                      window.ready_at, logged=False))
        if self.feed_windows and fresh:
            self._put(scored, may_drop=True)

    def _suppressed(self, window: Window, outcome) -> dict[str, Match]:
        """The rules whose taught false alarms (``not_like``) this window is like; a window among them
        that would have counted toward an onset (with k-of-n: one of the k) is published as a
        ``suppressed`` status event (once per run of such windows), so "yes, this" can undo it."""
        matches = self.not_like.matches(self.engine.rules, outcome.scores, window.source) \
            if outcome.verdict is Verdict.SCORED else {}
        for rule in self.engine.rules:
            key = (rule.id, window.source)
            if rule.model != outcome.model:
                continue
            match = matches.get(rule.id)
            score = outcome.scores.probabilities.get(rule.label) if match is not None else None
            if score is None or not self.engine.would_count(rule.id, window.source, score, window.stream_end):
                self._suppressing.discard(key)
            elif key not in self._suppressing:
                self._suppressing.add(key)
                log.info("rule %s on %s: not raised, like taught false alarm %d", rule.id, window.source, match.id)
                self._put(Publication(suppressed_event(window, rule, score, match, self.model_ids.get(rule.model, rule.model),
                                                       self.host), window.ready_at))
                self.events += 1
        return matches

    def _publishes_scores(self, model: str, source: str) -> bool:
        wanted = self.scores_wanted
        return wanted is True or (bool(wanted) and (model in wanted or source in wanted))

    def _frame_publishers(self) -> list[str]:
        """Models whose frames go out with their score events (any model can have frames: only
        frame-level ones do)."""
        return list(self.model_ids) if self._publishes_frames() else []

    def _publishes_frames(self) -> bool:
        return bool(self.scores_wanted or self.feed_windows)

    def add_model(self, name: str, model_id: str) -> None:
        """A model loaded after the start: its events name ``model_id`` (and its frames go out as every
        model's do). Call it before the model scores anything; safe from another thread (rebound)."""
        self.model_ids = {**self.model_ids, name: model_id}

    def remove_model(self, name: str) -> None:
        """Undo ``add_model`` (a model that could not join the pipeline, so never scored)."""
        self.model_ids = {k: v for k, v in self.model_ids.items() if k != name}

    def _end(self, source: str, reason: str) -> None:
        window = self._last_window.get(source)
        self._publish_transitions(self.engine.end(source, reason), window)
        released, alerts = self.frames.end(source)
        self._publish_frame_alerts(alerts, window)
        self._publish_released(released, window)

    def _end_all(self, reason: str) -> None:
        for source in sorted({source for _, source in self.engine.active()} | {s for _, s in self.frames.active()}
                             | set(self.frames.pending())):
            self._end(source, reason)

    def _publish_released(self, released: list[Released], window: Window | None) -> None:
        """A stream's last frames (every stream's, the daemon stopping), in ``frames`` events."""
        for r in released:
            if window is None or not self._publishes_scores(r.model, r.source):
                continue  # no window of the source seen: it had no frames either
            event = frames_event(window, r.model, self.model_ids.get(r.model, r.model), r.labels, r.curve, self.host)
            self._put(Publication(event, None, logged=False))

    def _publish_frame_alerts(self, alerts: list[FrameAlert], window: Window | None) -> None:
        given = window
        for alert in alerts:
            window = given if given is not None else self._last_window.get(alert.source)
            if window is None:
                continue
            event = frame_alert_event(window, alert, self.model_ids.get(alert.rule.model, alert.rule.model), self.host)
            rate = window.sample_rate
            span = (round(alert.transition.since * rate), round(alert.transition.time * rate)) if alert.transition.phase == "onset" else None
            self._put(Publication(event, window.ready_at, clip_span=span))
            self.events += 1

    def _publish_transitions(self, transitions: list[Transition], window: Window | None, scores: Scores | None = None) -> None:
        given = window
        for transition in transitions:
            window = given if given is not None else self._last_window.get(transition.source)
            if window is None:
                continue  # an alert on a source with no window seen cannot be on
            event = alert_event(window, transition, self.model_ids.get(transition.rule.model, transition.rule.model),
                                self.host, scores if transition.reason is None else None)
            span = (window.start_index, window.start_index + window.valid) if transition.phase == "onset" else None
            self._put(Publication(event, window.ready_at if transition.reason is None else None, clip_span=span))
            self.events += 1

    def _put(self, item: object, may_drop: bool = False) -> None:
        """Collected, handed on once the item is handled: events wait for room (nothing logged is
        lost); live score streams may be dropped."""
        self._made.append((item, may_drop))
