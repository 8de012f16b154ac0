"""Turning per-window scores into onset/offset decisions.

``step`` is a pure function: a rule's state, one window's score (or None for a window no model
heard anything in) and its stream time in, the new state and what happened out. No audio, models
or clocks involved, so every behaviour is testable on hand-made sequences:

- onset: at least ``min_windows`` of the last ``of_windows`` scored windows reached ``threshold``,
  the current one among them, and ``cooldown_s`` of stream time passed since the previous onset;
- offset (symmetric release): no window of the last ``of_windows`` reached ``release``. With
  ``of_windows`` 1 that is "the score fell below release"; with more, a sound with short gaps is
  one alert, not a series of them;
- a window no model scored (gated out as quiet, skipped by a cascade) counts as below both
  levels: it can end an alert, never start one. Windows with no evidence either way (skipped by
  periodic sampling, a model failure) are not stepped at all.
"""

from __future__ import annotations

import logging
from collections.abc import Collection, Iterable
from dataclasses import dataclass, field
from typing import Literal

from monitord.config import RuleConfig
from monitord.types import Outcome, Verdict

log = logging.getLogger(__name__)

Phase = Literal["onset", "offset"]


@dataclass(frozen=True)
class RuleParams:
    threshold: float
    release: float
    min_windows: int = 1
    of_windows: int = 1
    cooldown_s: float = 0.0

    @classmethod
    def from_config(cls, rule: RuleConfig) -> "RuleParams":
        return cls(rule.threshold, rule.release_level, rule.min_windows, rule.of_windows, rule.cooldown_s)


@dataclass(frozen=True)
class RuleState:
    active: bool = False
    above: tuple[bool, ...] = ()
    """Whether each of the last ``of_windows`` windows reached the threshold, oldest first."""
    holding: tuple[bool, ...] = ()
    """Whether each of the last ``of_windows`` windows reached the release level, oldest first."""
    last_onset: float | None = None
    """Stream time of the last onset, for the cooldown."""


SAME_TIME_S = 1e-6
"""Stream times are sample counts over a rate, in floats (at a 0.1 s hop, 1.4 - 1.1 is 0.2999...98):
times this close are one instant, less than a sample apart at any rate monitord reads."""


def cooled(last_onset: float | None, t: float, cooldown_s: float) -> bool:
    """Whether ``cooldown_s`` of stream time has passed at ``t`` since the last onset (None: none yet)."""
    return last_onset is None or t - last_onset >= cooldown_s - SAME_TIME_S


def step(state: RuleState, params: RuleParams, score: float | None, t: float) -> tuple[RuleState, Phase | None]:
    """Advance one window (stream time ``t``, its end); ``score`` None: a window no model scored."""
    n = params.of_windows
    above = (state.above + (score is not None and score >= params.threshold,))[-n:]
    holding = (state.holding + (score is not None and score >= params.release,))[-n:]
    if state.active:
        if not any(holding):
            return RuleState(False, above, holding, state.last_onset), "offset"
        return RuleState(True, above, holding, state.last_onset), None
    if above[-1] and sum(above) >= params.min_windows and cooled(state.last_onset, t, params.cooldown_s):
        return RuleState(True, above, holding, t), "onset"
    return RuleState(False, above, holding, state.last_onset), None


def run(params: RuleParams, scored: Iterable[tuple[float, float | None]]) -> list[tuple[float, Phase]]:
    """All transitions over a sequence of (time, score or None); handy for tests and offline use."""
    state = RuleState()
    out: list[tuple[float, Phase]] = []
    for t, score in scored:
        state, phase = step(state, params, score, t)
        if phase:
            out.append((t, phase))
    return out


@dataclass(frozen=True)
class Transition:
    rule: RuleConfig
    phase: Phase
    score: float
    reason: str | None = None
    """Why an offset happened other than by the score: "end of stream", "stopped"."""
    source: str | None = None
    """The source whose alert ended (set by ``end``: its offsets come with no window)."""


@dataclass
class AlertEngine:
    """Holds one RuleState per (rule, source) and steps it on each model's outcome for a window."""

    rules: tuple[RuleConfig, ...]
    states: dict[tuple[str, str], RuleState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._params = {rule.id: RuleParams.from_config(rule) for rule in self.rules}
        self._missing_warned: set[tuple[str, str]] = set()

    def observe(self, source: str, outcome: Outcome, t: float, suppressed: Collection[str] = ()) -> list[Transition]:
        """One model's outcome for one window of ``source`` ending at stream time ``t``; rules in
        ``suppressed`` (the window is like one of their taught false alarms) take it as a window
        below both levels: it can end their alert, never start one."""
        if outcome.verdict is Verdict.SCORED:
            probabilities = outcome.scores.probabilities if outcome.scores is not None else {}
        elif not outcome.verdict.ends_alerts:
            return []  # no evidence either way
        else:
            probabilities = None
        fired = []
        for rule in self.rules:
            if rule.model != outcome.model or not _watches(rule, source) or rule.is_frame_rule:
                continue  # frame rules (smooth_s, hold_s) are stepped on frames: see alerts.frames
            score = None
            if probabilities is not None:
                score = probabilities.get(rule.label)
                if score is None:  # labels changed under the rule: no evidence, rather than a crash
                    self._warn_missing(rule, outcome.model)
                    continue
            if rule.id in suppressed:
                score = None
            key = (rule.id, source)
            state, phase = step(self.states.get(key, RuleState()), self._params[rule.id], score, t)
            self.states[key] = state
            if phase:
                fired.append(Transition(rule, phase, 0.0 if score is None else score))
        return fired

    def end(self, source: str | None, reason: str, rule_ids: set[str] | None = None) -> list[Transition]:
        """Offsets for every alert still active on ``source`` (all sources when None; only
        ``rule_ids`` when given): the stream ended, the daemon is stopping, a rule changed.
        Every onset gets its offset."""
        fired = []
        for (rule_id, rule_source), state in list(self.states.items()):
            if state.active and (source is None or rule_source == source) and (rule_ids is None or rule_id in rule_ids):
                self.states[(rule_id, rule_source)] = RuleState(False, (), (), state.last_onset)
                rule = next(r for r in self.rules if r.id == rule_id)
                fired.append(Transition(rule, "offset", 0.0, reason, rule_source))
        return fired

    def would_count(self, rule_id: str, source: str, score: float, t: float) -> bool:
        """Whether this score, at ``t``, would count toward the rule's onset: the rule is not active,
        out of its cooldown, and the score reaches its threshold (with k-of-n, one of the k windows).
        Read only."""
        state, params = self.states.get((rule_id, source), RuleState()), self._params[rule_id]
        return not state.active and cooled(state.last_onset, t, params.cooldown_s) and score >= params.threshold

    def active(self) -> list[tuple[str, str]]:
        """(rule, source) pairs with an alert on."""
        return sorted(key for key, state in self.states.items() if state.active)

    def with_rules(self, rules: tuple[RuleConfig, ...]) -> tuple["AlertEngine", list[Transition]]:
        """An engine for new rules, and offsets for the alerts of rules that changed or went away;
        unchanged rules keep their state (a reload does not reset them). A retuned rule (same id,
        model and label) keeps the time of its last onset: the cooldown still holds, so a reload
        does not alert again on the sound it just alerted on."""
        unchanged = {r.id for r in self.rules if r in rules}
        retuned = {r.id for r in rules if r.id not in unchanged and retunes(self.rules, r)}
        ended = self.end(None, "rule changed", {r.id for r in self.rules} - unchanged)
        engine = AlertEngine(rules)
        engine.states.update({key: state for key, state in self.states.items() if key[0] in unchanged})
        engine.states.update({key: RuleState(last_onset=state.last_onset) for key, state in self.states.items()
                              if key[0] in retuned and state.last_onset is not None})
        return engine, ended

    def _warn_missing(self, rule: RuleConfig, model: str) -> None:
        if (rule.id, model) not in self._missing_warned:
            self._missing_warned.add((rule.id, model))
            log.warning("rule %s: model %s gave no score for %r; the rule waits", rule.id, model, rule.label)


def retunes(old_rules: Iterable[RuleConfig], rule: RuleConfig) -> bool:
    """Whether ``rule`` replaces an old rule of its id that listened for the same thing (model and
    label) the same way (window or frame rule): only its decision changed (threshold, release,
    k-of-n, cooldown; a frame rule's smoothing or hold)."""
    return any(old.id == rule.id and old.model == rule.model and old.label == rule.label
               and old.is_frame_rule == rule.is_frame_rule for old in old_rules)


def _watches(rule: RuleConfig, source: str) -> bool:
    return rule.sources is None or source in rule.sources
