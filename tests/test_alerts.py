"""The alert engine's decisions, on hand-made and random score sequences (no audio, no models)."""

from hypothesis import given, settings
from hypothesis import strategies as st

from monitord.alerts.engine import AlertEngine, RuleParams, RuleState, run, step
from monitord.config import RuleConfig
from monitord.types import Outcome, Scores, Verdict, Window, WindowFacts


def seq(scores, hop=0.5):
    return [(i * hop, s) for i, s in enumerate(scores)]


def test_threshold_onset_and_offset():
    p = RuleParams(threshold=0.6, release=0.6)
    assert run(p, seq([0.1, 0.7, 0.8, 0.5, 0.2])) == [(0.5, "onset"), (1.5, "offset")]


def test_hysteresis_holds_between_release_and_threshold():
    p = RuleParams(threshold=0.6, release=0.3)
    # 0.5 and 0.4 are below the threshold but above release: the alert stays on
    assert run(p, seq([0.7, 0.5, 0.4, 0.59, 0.2, 0.5])) == [(0.0, "onset"), (2.0, "offset")]


def test_k_of_n_needs_enough_recent_windows_and_releases_symmetrically():
    p = RuleParams(threshold=0.6, release=0.6, min_windows=2, of_windows=3)
    assert run(p, seq([0.9, 0.1, 0.1, 0.9, 0.1, 0.1])) == []  # never two of three
    # on at the second of two in three; off only once none of the last three reached release
    assert run(p, seq([0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.1, 0.1])) == [(1.0, "onset"), (3.5, "offset")]


def test_alternating_sound_and_silence_is_one_alert_not_a_flapping_series():
    p = RuleParams(threshold=0.5, release=0.3, min_windows=1, of_windows=2)
    one_second_steps = [0.9, None] * 10  # sound, then a gated-out (quiet) window, ten times
    assert run(p, seq(one_second_steps)) == [(0.0, "onset")]
    assert run(p, seq(one_second_steps + [None, None])) == [(0.0, "onset"), (10.0, "offset")]


def test_cooldown_suppresses_repeated_onsets():
    p = RuleParams(threshold=0.5, release=0.5, cooldown_s=2.0)
    events = run(p, seq([0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9]))
    # onsets at 0.0 and 2.0 (2.0 s later); the ones at 1.0 and 3.0 fall inside the cooldown
    assert [e for e in events if e[1] == "onset"] == [(0.0, "onset"), (2.0, "onset")]


def test_an_onset_exactly_one_cooldown_later_counts_though_window_times_are_floats():
    """Window ends are sample counts over the rate: at a 0.1 s hop, 1.4 - 1.1 is 0.2999...98 s."""
    rate, length, hop = 16000, 16000, 1600
    t = [(k * hop + length) / rate for k in range(6)]
    assert t[4] - t[1] < 0.3  # the floats themselves fall short
    p = RuleParams(threshold=0.5, release=0.5, cooldown_s=0.3)
    scores = [0.0, 0.9, 0.0, 0.0, 0.9, 0.0]
    assert run(p, list(zip(t, scores))) == [(t[1], "onset"), (t[2], "offset"), (t[4], "onset"), (t[5], "offset")]
    engine = AlertEngine([RuleConfig(id="r", model="m", label="x", threshold=0.5, cooldown_s=0.3)])
    engine.states[("r", "a")] = RuleState(False, (False,), (False,), t[1])
    assert engine.would_count("r", "a", 0.9, t[4])


def test_an_unscored_window_never_starts_an_alert_even_at_threshold_zero():
    p = RuleParams(threshold=0.0, release=0.0)
    assert run(p, seq([None, None, None])) == []
    assert run(p, seq([None, 0.0, None])) == [(0.5, "onset"), (1.0, "offset")]  # a scored 0.0 reaches 0.0


def test_step_is_pure():
    p = RuleParams(threshold=0.5, release=0.5)
    state = RuleState()
    new, phase = step(state, p, 0.9, 1.0)
    assert state == RuleState() and new.active and phase == "onset" and new.last_onset == 1.0


params = st.builds(
    lambda threshold, gap, n, k, cooldown: RuleParams(threshold, max(0.0, threshold - gap), min(k, n), n, cooldown),
    st.floats(0.0, 1.0), st.floats(0.0, 0.5), st.integers(1, 5), st.integers(1, 5), st.sampled_from([0.0, 0.0, 1.0, 3.0]),
)
scores = st.lists(st.one_of(st.none(), st.floats(0.0, 1.0)), max_size=80)


@settings(max_examples=400, deadline=None)
@given(params, scores)
def test_onsets_and_offsets_alternate_and_quiet_windows_never_start_one(p, sequence):
    transitions = run(p, seq(sequence))
    phases = [phase for _, phase in transitions]
    assert phases == ["onset", "offset"] * (len(phases) // 2) + ["onset"] * (len(phases) % 2)
    by_time = dict(seq(sequence))
    for t, phase in transitions:
        if phase == "onset":
            assert by_time[t] is not None and by_time[t] >= p.threshold


@settings(max_examples=200, deadline=None)
@given(params, scores)
def test_every_onset_gets_an_offset_at_the_latest_at_stop(p, sequence):
    rule = RuleConfig(id="r", model="m", label="x", threshold=p.threshold, release=p.release,
                      min_windows=p.min_windows, of_windows=p.of_windows, cooldown_s=p.cooldown_s)
    engine = AlertEngine((rule,))
    phases = []
    for t, score in seq(sequence):
        phases += [f.phase for f in engine.observe("s", outcome("m", score), t)]
    phases += [f.phase for f in engine.end(None, "stopped")]
    assert phases.count("onset") == phases.count("offset") and not engine.active()


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 6), st.integers(2, 40), st.floats(0.5, 1.0), st.floats(0.0, 0.29))
def test_a_run_of_alternating_scores_yields_one_onset(n, length, high, low):
    p = RuleParams(threshold=0.5, release=0.3, min_windows=max(1, n // 2), of_windows=n)
    alternating = [high if i % 2 == 0 else low for i in range(2 * (n + length))]  # long enough for k highs
    assert [phase for _, phase in run(p, seq(alternating))] == ["onset"]


def window(source="k", t=0.0):
    return Window(source, int(t * 16000), 16000, None, 32000, 0.0, 0.0, WindowFacts(-20, -10, -25, 0.0, 0, 0.0))


def outcome(model, score, label="x"):
    if score is None:
        return Outcome(model, Verdict.QUIET)
    return Outcome(model, Verdict.SCORED, Scores(window(), model, model, {label: score, "other": 1 - score}))


def rule(**kw):
    base = dict(id="r", model="clap", label="glass breaking", threshold=0.6, release=0.4)
    return RuleConfig(**{**base, **kw})


def test_engine_separates_sources_and_respects_rule_sources():
    engine = AlertEngine((rule(sources=("kitchen",)),))
    high = outcome("clap", 0.9, "glass breaking")
    assert engine.observe("garage", high, 1.0) == []
    fired = engine.observe("kitchen", high, 1.0)
    assert [(f.rule.id, f.phase) for f in fired] == [("r", "onset")]
    assert engine.observe("kitchen", outcome("other-model", 1.0), 1.5) == []


def test_quiet_window_ends_an_active_alert_and_sampled_out_or_failed_windows_do_nothing():
    engine = AlertEngine((rule(),))
    engine.observe("k", outcome("clap", 0.9, "glass breaking"), 1.0)
    for verdict in (Verdict.SAMPLED_OUT, Verdict.FAILED, Verdict.UNAVAILABLE):
        assert engine.observe("k", Outcome("clap", verdict), 1.5) == []
    assert engine.active() == [("r", "k")]
    fired = engine.observe("k", Outcome("clap", Verdict.CASCADE), 2.0)
    assert [(f.phase, f.score) for f in fired] == [("offset", 0.0)]


def test_a_rule_whose_label_is_missing_waits_instead_of_crashing():
    engine = AlertEngine((rule(label="glass breaking"),))
    assert engine.observe("k", outcome("clap", 0.9, "dog barking"), 1.0) == []


def test_changed_rules_end_their_alerts_and_unchanged_ones_keep_state():
    kept, changed = rule(id="kept"), rule(id="changed")
    engine = AlertEngine((kept, changed))
    engine.observe("k", outcome("clap", 0.9, "glass breaking"), 1.0)
    engine, ended = engine.with_rules((kept, rule(id="changed", threshold=0.7)))
    assert [(f.rule.id, f.phase, f.reason) for f in ended] == [("changed", "offset", "rule changed")]
    assert engine.active() == [("kept", "k")]


def test_a_retuned_rule_keeps_its_cooldown_so_a_reload_does_not_alert_again_on_the_same_sound():
    """A reload that changed only a rule's threshold ended its alert ("rule changed") and forgot
    its last onset: the next loud window of the same glass break alerted again, a second push
    notification for one sound, inside the rule's 30 s cooldown. The cooldown now holds over a
    retune; a rule of that id that now listens for another label starts afresh."""
    glass = rule(cooldown_s=30.0)
    engine = AlertEngine((glass,))
    assert [f.phase for f in engine.observe("k", outcome("clap", 0.9, "glass breaking"), 1.0)] == ["onset"]
    retuned, ended = engine.with_rules((rule(cooldown_s=30.0, threshold=0.7),))
    assert [(f.phase, f.reason) for f in ended] == [("offset", "rule changed")]
    assert retuned.observe("k", outcome("clap", 0.9, "glass breaking"), 2.0) == []
    assert retuned.observe("k", outcome("clap", 0.9, "glass breaking"), 30.5) == []
    assert [f.phase for f in retuned.observe("k", outcome("clap", 0.9, "glass breaking"), 31.0)] == ["onset"]

    relabelled, _ = engine.with_rules((rule(cooldown_s=30.0, label="dog barking"),))
    assert [f.phase for f in relabelled.observe("k", outcome("clap", 0.9, "dog barking"), 2.0)] == ["onset"]
