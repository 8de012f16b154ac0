"""Frame curves without models: merging overlapping windows, frame rules (hold, smoothing,
hysteresis, gaps), and that chunking never changes a decision."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from monitord.alerts.frames import (Curve, FrameRuleParams, FrameRuleState, FrameScores, MergeState, TIE_S, contiguous, frames_for,
                             merge_end, merge_skip, merge_step, merge_windows, rule_close, rule_run, rule_step,
                             runs_at_or_above)

HOP = 0.02
OFFSET = 0.0125


def window_frames(start: float, length: float = 2.0, seed: int = 0, valid: float | None = None) -> tuple[float, float, FrameScores]:
    """A window's frames as an encoder places them; values tag the window (column 0) and frame (column 1)."""
    end = start + (length if valid is None else valid)
    n = min(99, int(np.ceil(((end - start) - OFFSET) / HOP)))  # 99 frames in 2 s, as wav2vec2 makes
    values = np.zeros((n, 3), dtype=np.float32)
    values[:, 0] = seed
    values[:, 1] = np.arange(n)
    return start, end, FrameScores(start + OFFSET, HOP, values)


def most_central(windows: list[tuple[float, float, FrameScores]], t: float) -> int:
    """The oracle: among windows covering t, the one whose centre is nearest; ties to the earliest."""
    covering = [(abs(t - (a + b) / 2), i) for i, (a, b, _) in enumerate(windows) if a <= t < b]
    best = min(d for d, _ in covering)
    return min(i for d, i in covering if d <= best + TIE_S)


def check_merge(windows: list[tuple[float, float, FrameScores]], curve: Curve) -> None:
    expected = []
    for i, (a, b, frames) in enumerate(windows):
        for j, t in enumerate(frames.times):
            if most_central(windows, t) == i:
                expected.append((i, j, t))
    assert [(int(v[0]), int(v[1])) for v in curve.values] == [(i, j) for i, j, _ in expected]
    assert np.array_equal(curve.times, np.array([t for *_, t in expected]))


def test_regular_windows_merge_into_one_curve_at_the_frame_hop():
    windows = [window_frames(0.5 * k, seed=k) for k in range(8)]  # 0-5.5 s
    curve = merge_windows(windows)
    check_merge(windows, curve)
    steps = np.diff(curve.times)
    assert np.allclose(steps, HOP)  # no frame twice, none missing
    assert curve.times[0] == pytest.approx(OFFSET) and curve.times[-1] < 5.5
    assert len(curve) == 274  # 0.0125 ... 5.4725 s: every frame position of the 5.5 s once
    owners = curve.values[:, 0]
    # each inner window owns the 0.5 s around its centre: 25 frames
    assert [int((owners == k).sum()) for k in range(1, 7)] == [25] * 6


def test_gated_windows_leave_gaps_and_an_end_aligned_window_joins_without_overlap():
    windows = [window_frames(0.0, seed=0), window_frames(0.5, seed=1),  # 0-2.5 s
               window_frames(4.0, seed=2), window_frames(4.5, seed=3),  # 4-6.5 s after a pause
               window_frames(4.83, seed=4)]  # the file's last window, aligned to its end, off the grid
    curve = merge_windows(windows)
    check_merge(windows, curve)
    segments = curve.segments()
    assert len(segments) == 2
    assert curve.times[segments[0]][-1] < 2.5 and curve.times[segments[1]][0] >= 4.0
    steps = np.diff(curve.times)
    assert np.all(steps > 0) and np.all(steps[steps < 1] < 2 * HOP)  # where grids meet off step: under 2 hops


def test_a_file_shorter_than_a_window_keeps_only_frames_centred_in_its_sound():
    start, end, frames = window_frames(0.0, valid=0.7)
    curve = merge_windows([(start, end, frames)])
    assert len(curve) == len(frames) == 35 and curve.times[-1] < 0.7


@settings(max_examples=150, deadline=None)
@given(st.lists(st.integers(0, 30), min_size=1, max_size=12, unique=True), st.integers(0, 39))
def test_merging_matches_the_most_central_window_for_any_set_of_scored_windows(hops, shift):
    """Windows every 0.5 s, some gated out (missing), the last possibly shifted off the grid."""
    starts = sorted(0.5 * h for h in hops)
    starts[-1] += shift * 0.0125 if len(starts) > 1 else 0.0
    windows = [window_frames(s, seed=i) for i, s in enumerate(sorted(starts))]
    check_merge(windows, merge_windows(windows))


def test_merging_online_hands_out_each_frame_once_in_order():
    """Windows every 0.5 s, the model scoring some: frames come out final as soon as no later window
    can compete for them, and all together they are the offline curve."""
    scored = {0, 1, 2, 8, 9}
    state, times, released_at = MergeState(), [], {}
    for k in range(12):
        start, end, frames = window_frames(0.5 * k, seed=k)
        state, part = merge_step(state, start, end, frames) if k in scored else merge_skip(state, start)
        times += part.times.tolist()
        released_at[k] = len(times)
    assert released_at[2] == released_at[5] < released_at[6]  # window 2 (1-3 s) is final once a window starts at 3 s
    assert released_at[9] == released_at[11]  # window 9 (4.5-6.5 s) is still pending
    times += merge_end(state)[1].times.tolist()
    offline = merge_windows([window_frames(0.5 * k, seed=k) for k in sorted(scored)])
    assert times == offline.times.tolist()


def test_runs_and_gaps():
    times = np.array([0.0, 0.02, 0.04, 0.06, 1.0, 1.02, 1.04])
    values = np.array([0.9, 0.9, 0.1, 0.8, 0.8, 0.8, 0.1])
    assert [(s.start, s.stop) for s in contiguous(times, HOP)] == [(0, 4), (4, 7)]
    assert runs_at_or_above(times, values, 0.7, HOP) == [(0, 2), (3, 4), (4, 6)]  # a gap splits a run


# --- frame rules -------------------------------------------------------------------------------


def test_frames_for_a_hold_round_up_to_whole_frames():
    assert frames_for(3.0, 0.02) == 150 and frames_for(0.0, 0.02) == 1 and frames_for(0.03, 0.02) == 2


def test_a_hold_fires_exactly_when_the_curve_has_stayed_above_threshold_that_long():
    """angry >= 0.7 for 3 s: frame 40 is the first above; 3 s later (frame 40 + 149) it fires, not before."""
    params = FrameRuleParams.from_seconds(0.7, HOP, release=0.5, hold_s=3.0)
    values = np.full(600, 0.2)
    values[40:120] = 0.9  # 1.6 s above: too short
    values[120] = 0.65  # a dip below the threshold restarts the hold
    values[121:400] = 0.9
    values[400:420] = 0.6  # between release and threshold: stays on
    values[420:] = 0.3
    times = 10.0 + HOP * np.arange(len(values))
    transitions = rule_run(params, times, values)
    assert [(t.phase, t.index) for t in transitions] == [("onset", 121 + 149), ("offset", 420)]
    onset = transitions[0]
    assert onset.time == times[270] and onset.since == times[121] and onset.score == 0.9
    assert transitions[1].since == onset.time
    # one frame short of the hold: nothing
    short = values.copy()
    short[121 + 149 :] = 0.2
    assert rule_run(params, times, short) == []


def test_smoothing_is_a_trailing_mean_and_gaps_end_alerts_and_restart_the_hold():
    params = FrameRuleParams.from_seconds(0.5, HOP, smooth_s=0.1, hold_s=0.0)  # 5 frames
    values = np.array([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0, 0.0, 0.0])
    times = HOP * np.arange(len(values))
    got = rule_run(params, times, values)
    # means: 1, .5, .67, .5, .6, .6, .6, .4 -> onset at frame 0, offset at frame 7
    assert [(t.phase, t.index) for t in got] == [("onset", 0), ("offset", 7)]
    # a gap ends an alert one hop after the last frame, and the hold restarts after it
    params = FrameRuleParams.from_seconds(0.7, HOP, hold_s=0.1)  # 5 frames
    times = np.concatenate([HOP * np.arange(10), 5.0 + HOP * np.arange(10)])
    values = np.full(20, 0.9)
    got = rule_run(params, times, values)
    assert [(t.phase, t.index) for t in got] == [("onset", 4), ("offset", 10), ("onset", 14), ("offset", 20)]
    assert got[1].time == pytest.approx(times[9] + HOP) and got[2].since == 5.0


def test_cooldown_between_onsets():
    params = FrameRuleParams.from_seconds(0.7, HOP, cooldown_s=1.0)
    values = np.array([0.9, 0.1] * 30 + [0.9] * 5)
    times = HOP * np.arange(len(values))
    onsets = [t.index for t in rule_run(params, times, values) if t.phase == "onset"]
    assert onsets == [0, 50]  # 1 s after the first


def test_an_onset_exactly_one_cooldown_later_counts_though_frame_times_are_floats():
    params = FrameRuleParams.from_seconds(0.7, HOP, cooldown_s=0.1)
    times = HOP * np.arange(8)
    assert times[6] - times[1] < 0.1  # 0.0999...
    values = np.array([0.1, 0.9, 0.1, 0.1, 0.1, 0.1, 0.9, 0.1])
    assert [t.index for t in rule_run(params, times, values) if t.phase == "onset"] == [1, 6]


def _chunks(n: int, cuts: list[int]) -> list[slice]:
    edges = [0, *sorted({c for c in cuts if 0 < c < n}), n]
    return [slice(a, b) for a, b in zip(edges[:-1], edges[1:])]


@settings(max_examples=200, deadline=None)
@given(
    values=st.lists(st.floats(0.0, 1.0, allow_nan=False), min_size=1, max_size=250),
    cuts=st.lists(st.integers(0, 250), max_size=30),
    smooth=st.integers(1, 12),
    hold=st.integers(1, 20),
    threshold=st.floats(0.3, 0.9),
    gap_at=st.integers(0, 250),
)
def test_chunking_never_changes_the_transitions(values, cuts, smooth, hold, threshold, gap_at):
    params = FrameRuleParams(threshold, threshold - 0.2, HOP, smooth, hold, cooldown_s=0.1)
    values = np.array(values)
    times = HOP * np.arange(len(values)) + np.where(np.arange(len(values)) >= gap_at, 3.0, 0.0)  # one pause
    whole = rule_run(params, times, values)
    state, pieces = FrameRuleState(), []
    for part in _chunks(len(values), cuts):
        state, got = rule_step(state, params, times[part], values[part])
        pieces += got
    pieces += rule_close(state, params)[1]
    assert pieces == whole


def test_the_streaming_tracker_fires_a_hold_rule_where_the_merged_curve_held_and_ends_it_at_a_gap():
    """Windows every 0.5 s whose frames say 0.9 from 3.0 s on: a 1 s hold fires at the frame that
    completes a second at 0.9 (the curve as merged), and the first unscored stretch ends it."""
    from monitord.alerts.frames import FrameTracker, merge_windows
    from monitord.config import RuleConfig

    rule = RuleConfig(id="angry", model="emo", label="b", threshold=0.7, hold_s=1.0)
    tracker = FrameTracker([rule])
    spans = [(0.5 * i, 0.5 * i + 2.0) for i in range(12)]
    scored = []
    alerts = []
    for start, end in spans:
        times = start + OFFSET + HOP * np.arange(round(2.0 / HOP))
        values = np.where(times[:, None] >= 3.0, [0.1, 0.9], [0.9, 0.1]).astype(np.float32)
        frames = FrameScores(start + OFFSET, HOP, values)
        scored.append((start, end, frames))
        _, fired = tracker.observe("s", "emo", start, end, frames, ("a", "b"))
        alerts += fired
    for start in (6.0, 6.5, 7.0, 7.5, 8.0):  # gated out: the stretch ends
        _, fired = tracker.observe("s", "emo", start, start + 2.0, None)
        alerts += fired
    curve = merge_windows(scored)
    first = curve.times[np.argmax(curve.values[:, 1] >= 0.7)]
    expected_onset = curve.times[np.searchsorted(curve.times, first) + frames_for(1.0, HOP) - 1]
    assert [(a.rule.id, a.transition.phase) for a in alerts] == [("angry", "onset"), ("angry", "offset")]
    assert alerts[0].transition.time == pytest.approx(expected_onset) and alerts[0].transition.since == pytest.approx(first)
    assert alerts[1].transition.time == pytest.approx(curve.times[-1] + HOP)  # the frames ended there


def test_a_retuned_frame_rule_keeps_its_cooldown_over_a_reload():
    """As for window rules (test_alerts): a frame rule whose threshold a reload changed ends its
    alert and keeps its last onset, so the same sound does not alert again inside the cooldown."""
    from monitord.alerts.frames import FrameTracker
    from monitord.config import RuleConfig

    def window(tracker, start, values=(0.1, 0.9)):
        times = start + OFFSET + HOP * np.arange(round(2.0 / HOP))
        frames = FrameScores(start + OFFSET, HOP, np.tile(np.float32(values), (len(times), 1)))
        return [(a.transition.phase, a.transition.time) for a in tracker.observe("s", "emo", start, start + 2.0, frames, ("a", "b"))[1]]

    angry = dict(id="angry", model="emo", label="b", hold_s=0.2, cooldown_s=20.0)
    tracker = FrameTracker([RuleConfig(threshold=0.7, **angry)])
    fired = [p for start in (0.0, 0.5, 1.0) for p in window(tracker, start)]
    assert [p for p, _ in fired] == ["onset"]
    onset = fired[0][1]
    retuned, ended = tracker.with_rules([RuleConfig(threshold=0.8, **angry)])
    assert [a.transition.phase for a in ended] == ["offset"]
    later = [p for start in (1.5, 2.0, 2.5, 3.0) for p in window(retuned, start)]
    assert later == [], "the retuned rule alerted again inside its cooldown"
    relabelled, _ = tracker.with_rules([RuleConfig(threshold=0.8, **{**angry, "label": "a"})])
    again = [p for start in (1.5, 2.0) for p, t in window(relabelled, start, (0.9, 0.1)) if t < onset + 20.0]
    assert again == ["onset"], "a rule now listening for another label starts afresh"
