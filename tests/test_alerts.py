"""The alert engine's decisions, on hand-made score sequences (no audio, no models)."""

from monitord.alerts import AlertEngine, RuleParams, RuleState, run, step
from monitord.config import RuleConfig


def seq(scores, hop=0.5):
    return [(i * hop, s) for i, s in enumerate(scores)]


def test_threshold_onset_and_offset():
    p = RuleParams(threshold=0.6, release=0.6)
    assert run(p, seq([0.1, 0.7, 0.8, 0.5, 0.2])) == [(0.5, "onset"), (1.5, "offset")]


def test_hysteresis_holds_between_release_and_threshold():
    p = RuleParams(threshold=0.6, release=0.3)
    # 0.5 and 0.4 are below the threshold but above release: the alert stays on
    assert run(p, seq([0.7, 0.5, 0.4, 0.59, 0.2, 0.5])) == [(0.0, "onset"), (2.0, "offset")]


def test_k_of_n_needs_enough_recent_windows():
    p = RuleParams(threshold=0.6, release=0.6, min_windows=2, of_windows=3)
    assert run(p, seq([0.9, 0.1, 0.1, 0.9, 0.1, 0.1])) == []  # never two of three
    assert run(p, seq([0.9, 0.1, 0.9, 0.1])) == [(1.0, "onset"), (1.5, "offset")]


def test_cooldown_suppresses_repeated_onsets():
    p = RuleParams(threshold=0.5, release=0.5, cooldown_s=2.0)
    events = run(p, seq([0.9, 0.1, 0.9, 0.1, 0.9, 0.1, 0.9]))
    # onsets at 0.0 and 2.0 (2.0 s later); the ones at 1.0 and 3.0 fall inside the cooldown
    assert [e for e in events if e[1] == "onset"] == [(0.0, "onset"), (2.0, "onset")]


def test_step_is_pure():
    p = RuleParams(threshold=0.5, release=0.5)
    state = RuleState()
    new, phase = step(state, p, 0.9, 1.0)
    assert state == RuleState() and new.active and phase == "onset" and new.last_onset == 1.0


def rule(**kw):
    base = dict(id="r", model="clap", label="glass breaking", threshold=0.6, release=0.4)
    return RuleConfig(**{**base, **kw})


def test_engine_separates_sources_and_respects_rule_sources():
    engine = AlertEngine((rule(sources=("kitchen",)),))
    high = {"glass breaking": 0.9, "speech": 0.1}
    assert engine.observe("clap", "garage", high, 1.0) == []
    fired = engine.observe("clap", "kitchen", high, 1.0)
    assert [(r.id, phase) for r, phase, _ in fired] == [("r", "onset")]
    assert engine.observe("other-model", "kitchen", {"x": 1.0}, 1.5) == []


def test_quiet_window_ends_an_active_alert():
    engine = AlertEngine((rule(),))
    engine.observe("clap", "k", {"glass breaking": 0.9, "speech": 0.1}, 1.0)
    fired = engine.observe_quiet("k", 1.5)
    assert [(phase, score) for _, phase, score in fired] == [("offset", 0.0)]
