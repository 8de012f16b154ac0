"""Turning per-window scores into onset/offset decisions.

``step`` is a pure function: a rule's state, one score and its stream time in, the new
state and what happened out. No audio, models or clocks involved, so every behaviour
(threshold, hysteresis, k-of-n, cooldown) is testable on hand-made sequences.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Literal

from monitord.config import RuleConfig

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
    recent: tuple[bool, ...] = ()
    """Whether each of the last ``of_windows`` scores reached the threshold, oldest first."""
    last_onset: float | None = None
    """Stream time of the last onset, for the cooldown."""


def step(state: RuleState, params: RuleParams, score: float, t: float) -> tuple[RuleState, Phase | None]:
    """Advance one window (stream time ``t``, its end) and return the new state and any transition.

    - onset: not active, at least ``min_windows`` of the last ``of_windows`` scores reached
      ``threshold``, and ``cooldown_s`` has passed since the previous onset;
    - offset: active and the score fell below ``release`` (hysteresis: between release and
      threshold the alert stays on).
    """
    recent = (state.recent + (score >= params.threshold,))[-params.of_windows :]
    if state.active:
        if score < params.release:
            return RuleState(False, recent, state.last_onset), "offset"
        return RuleState(True, recent, state.last_onset), None
    cooled = state.last_onset is None or t - state.last_onset >= params.cooldown_s
    if sum(recent) >= params.min_windows and score >= params.threshold and cooled:
        return RuleState(True, recent, t), "onset"
    return RuleState(False, recent, state.last_onset), None


def run(params: RuleParams, scored: Iterable[tuple[float, float]]) -> list[tuple[float, Phase]]:
    """All transitions over a sequence of (time, score); handy for tests and offline use."""
    state = RuleState()
    out: list[tuple[float, Phase]] = []
    for t, score in scored:
        state, phase = step(state, params, score, t)
        if phase:
            out.append((t, phase))
    return out


@dataclass
class AlertEngine:
    """Holds one RuleState per (rule, source) and applies ``step`` to incoming scores."""

    rules: tuple[RuleConfig, ...]
    states: dict[tuple[str, str], RuleState] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self._params = {rule.id: RuleParams.from_config(rule) for rule in self.rules}

    def observe(self, model: str, source: str, probabilities: dict[str, float], t: float) -> list[tuple[RuleConfig, Phase, float]]:
        """Feed one window's probabilities; returns (rule, phase, score) for each transition."""
        rules = [r for r in self.rules if r.model == model and _watches(r, source)]
        return self._advance(rules, source, lambda rule: probabilities[rule.label], t)

    def observe_quiet(self, source: str, t: float, model: str | None = None) -> list[tuple[RuleConfig, Phase, float]]:
        """A window no model heard anything in (the gate rejected it, or a cascade kept it from
        ``model``): the rules on the source (of that model) see a score of 0."""
        rules = [r for r in self.rules if _watches(r, source) and (model is None or r.model == model)]
        return self._advance(rules, source, lambda rule: 0.0, t)

    def _advance(self, rules: list[RuleConfig], source: str, score_of, t: float) -> list[tuple[RuleConfig, Phase, float]]:
        fired = []
        for rule in rules:
            key = (rule.id, source)
            score = score_of(rule)
            state, phase = step(self.states.get(key, RuleState()), self._params[rule.id], score, t)
            self.states[key] = state
            if phase:
                fired.append((rule, phase, score))
        return fired


def _watches(rule: RuleConfig, source: str) -> bool:
    return rule.sources is None or source in rule.sources
