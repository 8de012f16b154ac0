"""Frame-level scores (about 20 ms each): one window's frames, one curve from overlapping windows,
and frame rules (smoothing, hold, hysteresis) as pure functions. numpy only: no models, no clocks.

A frame-level model scores each window once and also returns the probabilities of every frame
inside it (``FrameScores``). Windows overlap (2 s every 0.5 s), so most instants lie in several
windows; ``merge_step``/``merge_windows`` keep each instant once, from the window in which it is
most central (its centre nearest the window's centre), which is also where the encoder saw the
most context on both sides. Windows a gate rejected bring no frames: the curve has gaps there.

Rules on a curve (``FrameRuleParams``, ``rule_step``) take frames in chunks as they arrive and
report onsets and offsets with their stream times; the result does not depend on where the
chunk boundaries fall.

Streaming, per source and frame-level model: keep a ``MergeState``; for each window in order,
``merge_step`` if the model scored it (``Scores.frames``), else ``merge_skip``; the returned
``Curve`` holds the frames now final (they trail the newest window by about 1.25 s with 2 s
windows every 0.5 s). Feed each rule's label column (``Scores.probabilities`` order) to
``rule_step``; when ``merge_skip`` or ``merge_end`` released a stretch's last frames, call
``rule_close`` so an alert ends where the frames end rather than at the next stretch. Every curve
the three return is frames no other call returns: handing each one on once hands on every frame
once (``FrameTracker`` returns all of them, ``end`` included).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np

from monitord.alerts.engine import cooled, retunes
from monitord.types import FrameScores

GAP_FRAMES = 2.5
"""Two frames further apart than this many hops have a gap between them (an unscored stretch).
Where two windows' frame grids meet off step (a window aligned to a file's end, a source rate
that is not a multiple of the model's), consecutive frames may be up to 2 hops apart."""


@dataclass(frozen=True, eq=False)
class Curve:
    """Merged frames: one row per kept frame, in time order, with gaps where nothing was scored."""

    hop_s: float
    times: np.ndarray = field(default_factory=lambda: np.zeros(0))
    """(n,) float64 stream times of the frames' centres."""
    values: np.ndarray = field(default_factory=lambda: np.zeros((0, 0), dtype=np.float32))
    """(n, n_labels) float32."""

    def __len__(self) -> int:
        return len(self.times)

    def segments(self) -> list[slice]:
        """Row ranges of contiguous stretches (no gap inside)."""
        return contiguous(self.times, self.hop_s)


def contiguous(times: np.ndarray, hop_s: float) -> list[slice]:
    """Row ranges of ``times`` with no step above ``GAP_FRAMES`` hops."""
    if len(times) == 0:
        return []
    breaks = np.flatnonzero(np.diff(times) > GAP_FRAMES * hop_s) + 1
    edges = [0, *breaks.tolist(), len(times)]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


def concat(curves: Sequence[Curve], hop_s: float, n_labels: int) -> Curve:
    """Curves one after the other (as ``merge_step`` hands them out) as one."""
    kept = [c for c in curves if len(c)]
    if not kept:
        return Curve(hop_s, np.zeros(0), np.zeros((0, n_labels), dtype=np.float32))
    return Curve(hop_s, np.concatenate([c.times for c in kept]), np.concatenate([c.values for c in kept]))


# --- merging overlapping windows --------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class MergeState:
    """The latest window, whose later frames wait for the next window to know who owns them."""

    pending: tuple[float, float, FrameScores] | None = None
    """(stream start, stream end, frames) of the latest window."""
    previous: tuple[float, float] | None = None
    """The span of the window before it, where the two overlap: it competes for the early frames."""


TIE_S = 1e-9
"""Distances to two window centres closer than this are a tie (frame times are sums of floats)."""


def _centre(span: tuple[float, float]) -> float:
    return (span[0] + span[1]) / 2


def merge_step(state: MergeState, start_s: float, end_s: float, frames: FrameScores) -> tuple[MergeState, Curve]:
    """Add the next scored window (in start order) and return the frames now final.

    ``start_s``/``end_s`` are the window's stream span (its real sound: a file's padding excluded).
    A frame belongs to the window, among those covering it, whose centre is nearest; a tie goes to
    the earlier window. Windows of equal length arriving in start order (as the windower cuts
    them) need only their neighbours for that, so each window's frames are final once the next
    scored window has arrived; ``merge_end`` hands out the last ones.
    """
    out = _release(state, following=(start_s, end_s))
    previous = None
    if state.pending is not None and start_s < state.pending[1]:
        previous = state.pending[:2]
    return MergeState((start_s, end_s, frames), previous), out


def merge_skip(state: MergeState, start_s: float) -> tuple[MergeState, Curve]:
    """A window the model did not score (gated out) starting at ``start_s``: once windows start at or
    after the pending window's end, nothing can compete for its frames, so they are all final (and
    the stretch has ended: a frame rule may be closed)."""
    if state.pending is not None and start_s >= state.pending[1]:
        return merge_end(state)
    return state, Curve(state.pending[2].hop_s if state.pending is not None else 0.0)


def merge_end(state: MergeState) -> tuple[MergeState, Curve]:
    """The rest of the pending window (end of stream, or a pause long enough to let it go)."""
    return MergeState(), _release(state, following=None)


def _covers(span: tuple[float, float], times: np.ndarray) -> np.ndarray:
    return (times >= span[0]) & (times < span[1])


def _release(state: MergeState, following: tuple[float, float] | None) -> Curve:
    if state.pending is None:
        return Curve(0.0)
    start_s, end_s, frames = state.pending
    times = frames.times
    own = np.abs(times - _centre((start_s, end_s)))
    keep = np.ones(len(times), dtype=bool)
    if state.previous is not None:  # the earlier window takes nearer frames and ties
        keep &= ~(_covers(state.previous, times) & (np.abs(times - _centre(state.previous)) <= own + TIE_S))
    if following is not None and following[0] < end_s:  # the later one only strictly nearer frames
        keep &= ~(_covers(following, times) & (np.abs(times - _centre(following)) < own - TIE_S))
    return Curve(frames.hop_s, times[keep], frames.values[keep])


def merge_windows(windows: Iterable[tuple[float, float, FrameScores]]) -> Curve:
    """One curve from the frames of scored windows (stream start, stream end, frames), any order."""
    ordered = sorted(windows, key=lambda w: (w[0], w[1]))
    if not ordered:
        return Curve(0.0)
    state, parts = MergeState(), []
    for start_s, end_s, frames in ordered:
        state, part = merge_step(state, start_s, end_s, frames)
        parts.append(part)
    parts.append(merge_end(state)[1])
    first = ordered[0][2]
    return concat(parts, first.hop_s, first.values.shape[1])


# --- curve statistics ---------------------------------------------------------------------------


def runs_at_or_above(times: np.ndarray, values: np.ndarray, threshold: float, hop_s: float) -> list[tuple[int, int]]:
    """[start, stop) row ranges where ``values`` (1-D) stays at or above ``threshold``, broken at gaps."""
    out = []
    for seg in contiguous(times, hop_s):
        above = values[seg] >= threshold
        if not above.any():
            continue
        edges = np.diff(np.concatenate([[0], above.astype(np.int8), [0]]))
        starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        out += [(seg.start + a, seg.start + b) for a, b in zip(starts, stops)]
    return out


# --- frame rules ----------------------------------------------------------------------------------

Phase = Literal["onset", "offset"]


def frames_for(seconds: float, hop_s: float) -> int:
    """Frames needed to span ``seconds`` (at least 1): a run of n frames spans n hops."""
    return max(1, math.ceil(seconds / hop_s - 1e-9))


@dataclass(frozen=True)
class FrameRuleParams:
    threshold: float
    release: float
    hop_s: float
    smooth_frames: int = 1
    """Trailing moving average over this many frames (1: none)."""
    hold_frames: int = 1
    """Consecutive (smoothed) frames at or above the threshold before the onset."""
    cooldown_s: float = 0.0

    @classmethod
    def from_seconds(cls, threshold: float, hop_s: float, release: float | None = None, smooth_s: float = 0.0,
                     hold_s: float = 0.0, cooldown_s: float = 0.0) -> "FrameRuleParams":
        """``smooth_s`` rounds to the nearest frame count; ``hold_s`` up (the score holds at least that long)."""
        smooth = max(1, round(smooth_s / hop_s)) if smooth_s else 1
        return cls(threshold, threshold if release is None else release, hop_s, smooth, frames_for(hold_s, hop_s), cooldown_s)

    @classmethod
    def from_config(cls, rule: object, hop_s: float) -> "FrameRuleParams":
        """From a ``RuleConfig`` with ``smooth_s``/``hold_s`` and the model's frame hop."""
        return cls.from_seconds(rule.threshold, hop_s, rule.release_level, rule.smooth_s or 0.0, rule.hold_s or 0.0,
                                rule.cooldown_s)


@dataclass(frozen=True)
class FrameRuleState:
    active: bool = False
    run: int = 0
    """Consecutive (smoothed) frames at or above the threshold, up to the latest."""
    run_since: float = 0.0
    """Stream time of the first frame of that run."""
    recent: tuple[float, ...] = ()
    """The latest raw values of this contiguous stretch, up to ``smooth_frames``, oldest first."""
    last_time: float | None = None
    """Stream time of the latest frame (a later frame more than GAP_FRAMES hops on means a gap)."""
    frames: int = 0
    """Frames stepped so far (the next frame's index)."""
    onset_at: float | None = None
    """Stream time of the active alert's onset, or of the last one (for the cooldown)."""
    score: float = 0.0
    """The latest (smoothed) score."""


@dataclass(frozen=True)
class FrameTransition:
    phase: Phase
    time: float
    """Stream time of the frame at which it happened (an offset at a gap: one hop after the last frame)."""
    index: int
    """That frame's index among all frames the rule was stepped with."""
    score: float
    """The (smoothed) score there (an offset at a gap: the last frame's)."""
    since: float
    """onset: when the held run began; offset: the onset it ends."""


def rule_step(state: FrameRuleState, params: FrameRuleParams, times: Sequence[float] | np.ndarray,
              values: Sequence[float] | np.ndarray) -> tuple[FrameRuleState, list[FrameTransition]]:
    """Advance over new frames of one label (times ascending, any chunk size).

    - onset: not active, the (smoothed) score has been at or above ``threshold`` for
      ``hold_frames`` consecutive frames, and ``cooldown_s`` has passed since the last onset;
      reported at the frame completing the hold;
    - offset: active and the (smoothed) score fell below ``release``; or a gap in the frames
      (an unscored stretch), which also restarts smoothing and the hold.
    The smoothed value of a frame is the exactly rounded mean (``math.fsum``) of the latest
    ``smooth_frames`` raw values of its stretch, so chunking cannot change any decision.
    """
    active, run, run_since = state.active, state.run, state.run_since
    recent, last, index, onset_at, score = list(state.recent), state.last_time, state.frames, state.onset_at, state.score
    out: list[FrameTransition] = []
    k = params.smooth_frames
    for t, raw in zip(np.asarray(times, dtype=np.float64).tolist(), np.asarray(values, dtype=np.float64).tolist()):
        if last is not None and t - last > GAP_FRAMES * params.hop_s:
            if active:
                out.append(FrameTransition("offset", last + params.hop_s, index, score, onset_at))
            active, run, recent = False, 0, []
        recent.append(raw)
        if len(recent) > k:
            del recent[0]
        score = math.fsum(recent) / len(recent) if k > 1 else raw
        if score >= params.threshold:
            if run == 0:
                run_since = t
            run += 1
        else:
            run = 0
        if active:
            if score < params.release:
                out.append(FrameTransition("offset", t, index, score, onset_at))
                active = False
        elif run >= params.hold_frames and cooled(onset_at, t, params.cooldown_s):
            out.append(FrameTransition("onset", t, index, score, run_since))
            active, onset_at = True, t
        last = t
        index += 1
    return FrameRuleState(active, run, run_since, tuple(recent), last, index, onset_at, score), out


def rule_close(state: FrameRuleState, params: FrameRuleParams) -> tuple[FrameRuleState, list[FrameTransition]]:
    """No more frames for now (end of stream, or a window the model did not score): an active
    alert ends just after the last frame, and smoothing and the hold restart."""
    out = []
    if state.active and state.last_time is not None:
        out.append(FrameTransition("offset", state.last_time + params.hop_s, state.frames, state.score, state.onset_at))
    return FrameRuleState(False, 0, 0.0, (), None, state.frames, state.onset_at, state.score), out


def rule_run(params: FrameRuleParams, times: np.ndarray, values: np.ndarray) -> list[FrameTransition]:
    """Every transition over a whole curve of one label, the stream closed at its end."""
    state, out = rule_step(FrameRuleState(), params, times, values)
    return out + rule_close(state, params)[1]


# --- streaming: frames of successive windows, rules stepped as frames become final --------------


@dataclass(frozen=True)
class FrameAlert:
    rule: object
    """The RuleConfig (a frame rule: ``smooth_s`` or ``hold_s``)."""
    transition: FrameTransition
    source: str | None = None
    """Set where the alert ended with no window at hand (a rule changed by a reload)."""


@dataclass(frozen=True, eq=False)
class Released:
    """Frames of one source and model that became final with no window of theirs at hand (the
    end of a stream, or the daemon stopping)."""

    source: str
    model: str
    labels: tuple[str, ...]
    """The model's labels, in the order of ``curve.values``' columns."""
    curve: Curve


class FrameTracker:
    """Per source and frame-level model, the windows' frames merged into one curve as they come,
    and the frame rules stepped on the frames that became final. No threads, no I/O: the alerts
    stage feeds it each model's outcome for each window, in order, and hands on every curve it
    returns (each frame is in exactly one of them)."""

    def __init__(self, rules: Sequence[object]):
        self.rules = [r for r in rules if getattr(r, "is_frame_rule", False)]
        self.models = {r.model for r in self.rules}
        self._merge: dict[tuple[str, str], MergeState] = {}
        self._states: dict[tuple[str, str], FrameRuleState] = {}
        self._params: dict[str, FrameRuleParams] = {}
        self._labels: dict[str, tuple[str, ...]] = {}

    def observe(self, source: str, model: str, start_s: float, end_s: float,
                frames: FrameScores | None, labels: Sequence[str] = ()) -> tuple[Curve, list[FrameAlert]]:
        """One window of ``source`` (its span), with the model's frames if it scored them: the frames
        now final, and what the frame rules made of them."""
        key = (source, model)
        state = self._merge.get(key, MergeState())
        if frames is not None:
            self._labels[model] = tuple(labels)
            state, curve = merge_step(state, start_s, end_s, frames)
            closed = False
        else:
            had = state.pending is not None
            state, curve = merge_skip(state, start_s)
            closed = had and state.pending is None
        self._merge[key] = state
        return curve, self._step(source, model, curve, closed)

    def end(self, source: str | None) -> tuple[list[Released], list[FrameAlert]]:
        """The end of ``source``'s stream (every source's when None): the last frames (one entry
        per model that had some pending), and what the rules made of them, every rule closed."""
        released, out = [], []
        for (src, model), state in list(self._merge.items()):
            if source is None or src == source:
                self._merge[(src, model)], curve = merge_end(state)
                if len(curve):
                    released.append(Released(src, model, self._labels.get(model, ()), curve))
                out += self._step(src, model, curve, closed=True)
        return released, out

    def labels(self, model: str) -> tuple[str, ...]:
        """The labels of the model's latest frames (the columns of its curves)."""
        return self._labels.get(model, ())

    def pending(self) -> list[str]:
        """Sources with frames not yet final (waiting for a later window or the stream's end)."""
        return sorted({src for (src, _), state in self._merge.items() if state.pending is not None})

    def active(self) -> list[tuple[str, str]]:
        return sorted(key for key, state in self._states.items() if state.active)

    def snapshot(self) -> tuple:
        """Everything ``observe`` and ``end`` change, for ``restore`` (the states are immutable values)."""
        return dict(self._merge), dict(self._states), dict(self._params), dict(self._labels)

    def restore(self, snapshot: tuple) -> None:
        merge, states, params, labels = snapshot
        self._merge, self._states, self._params, self._labels = dict(merge), dict(states), dict(params), dict(labels)

    def with_rules(self, rules: Sequence[object]) -> tuple["FrameTracker", list[FrameAlert]]:
        """A tracker for new rules keeping the merged frames and unchanged rules' states; changed or
        removed rules' alerts end here. A retuned rule keeps the time of its last onset (the cooldown
        still holds: see ``AlertEngine.with_rules``)."""
        tracker = FrameTracker(rules)
        kept = {r.id for r in self.rules if r in tracker.rules}
        retuned = {r.id for r in tracker.rules if r.id not in kept and retunes(self.rules, r)}
        ended = []
        for (rule_id, source), state in self._states.items():
            if rule_id in kept:
                tracker._states[(rule_id, source)] = state
                continue
            if state.active:
                rule = next(r for r in self.rules if r.id == rule_id)
                _, transitions = rule_close(state, self._params[rule_id])
                ended += [FrameAlert(rule, t, source) for t in transitions]
            if rule_id in retuned and state.onset_at is not None:
                tracker._states[(rule_id, source)] = FrameRuleState(onset_at=state.onset_at)
        tracker._merge, tracker._labels = dict(self._merge), dict(self._labels)
        tracker._params = {k: v for k, v in self._params.items() if k in kept}
        return tracker, ended

    def _step(self, source: str, model: str, curve: Curve, closed: bool) -> list[FrameAlert]:
        out = []
        for rule in self.rules:
            if rule.model != model or (rule.sources is not None and source not in rule.sources):
                continue
            key = (rule.id, source)
            state = self._states.get(key, FrameRuleState())
            if len(curve) and rule.label in self._labels.get(model, ()):
                params = self._params.setdefault(rule.id, FrameRuleParams.from_config(rule, curve.hop_s))
                state, transitions = rule_step(state, params, curve.times, curve.values[:, self._labels[model].index(rule.label)])
                out += [FrameAlert(rule, t) for t in transitions]
            if closed and rule.id in self._params:
                state, transitions = rule_close(state, self._params[rule.id])
                out += [FrameAlert(rule, t) for t in transitions]
            self._states[key] = state
        return out
