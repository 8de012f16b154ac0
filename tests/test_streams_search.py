"""The live-streams search of `monitord bench`: every N of the grid runs, an N counts only when it held
twice, and what else used the CPUs during a trial is measured (it explains a failure that does not
repeat). The trials here are injected outcomes: the search is a pure function of them."""

from __future__ import annotations

import subprocess
import sys
import time

from hypothesis import given, settings
from hypothesis import strategies as st

from monitord.tools.streams import GRID, P99_LIMIT_MS, Trial, measured, search


def outcome(n: int, held: bool) -> Trial:
    return Trial(n, windows=10 * n, dropped=0, latencies_ms=(100.0 if held else 2 * P99_LIMIT_MS,) * 10,
                 own_cores=1.0, other_cores=0.0)


def test_a_trial_holds_only_with_nothing_dropped_and_p99_under_a_second():
    assert outcome(5, True).held and not outcome(5, False).held
    late_tail = Trial(5, 100, 0, (10.0,) * 98 + (1500.0,) * 2, 1.0, 0.0)  # p99 over the line, p50 far under it
    assert late_tail.p50_ms < 100 and not late_tail.held
    one_drop = Trial(5, 100, 1, (10.0,) * 99, 1.0, 0.0)
    assert not one_drop.held
    assert not Trial(5, 100, 0, (), 1.0, 0.0).held  # nothing published: no evidence it held
    assert not Trial(5, 100, 0, (10.0,) * 99, 1.0, 0.0, unpublished=1).held  # one window never came out


def test_with_a_sharp_capacity_the_answer_is_the_largest_n_tried_below_it_and_every_grid_n_runs():
    capacity = 61
    runs: list[int] = []

    def trial(n: int) -> Trial:
        runs.append(n)
        return outcome(n, n <= capacity)

    best, trials = search(trial, estimate=50)
    grid = sorted({round(50 * f) for f in GRID})  # 25, 35, 42, 50, 57, 65
    assert runs[: len(grid)] == grid  # 65 failed: nothing after it was skipped, and it was not the stop
    assert best == max(n for n in grid if n <= capacity) == 57
    assert [t.note for t in trials].count("again, on its own") == 2  # 57 confirmed, 65 tried again


def test_the_search_goes_past_the_grid_while_its_top_holds_and_below_it_while_nothing_does():
    best, trials = search(lambda n: outcome(n, n <= 1000), estimate=10, extra=3)
    assert best > 13 and max(t.streams for t in trials) == best  # 13 held: went on up (17, 22, 29)
    best, trials = search(lambda n: outcome(n, n <= 3), estimate=40, extra=3)
    assert best == 2 and min(t.streams for t in trials) == 2  # 20..52 failed: halved to 10, 5, 2
    best, _ = search(lambda n: outcome(n, False), estimate=40, extra=3)
    assert best == 0


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.lists(st.booleans(), min_size=1, max_size=64))
def test_the_answer_held_every_time_it_ran_and_no_larger_n_did(estimate, coin):
    flips = iter(coin * 64)  # a noisy machine: any outcome, in any order

    best, trials = search(lambda n: outcome(n, next(flips)), estimate)
    held_runs = {}
    for t in trials:
        held_runs.setdefault(t.streams, []).append(t.held)
    if best:
        assert held_runs[best] and all(held_runs[best]) and len(held_runs[best]) >= 2
    assert not any(n > best and len(runs) >= 2 and all(runs) for n, runs in held_runs.items())
    grid = {round(max(1, estimate) * f) or 1 for f in GRID}
    assert grid <= set(held_runs)  # every grid N ran, whatever failed first


def test_what_others_use_of_the_cpus_during_a_trial_is_measured_apart_from_our_own():
    burn = "import time\nend = time.time() + 1.5\nwhile time.time() < end: pass"
    burners = [subprocess.Popen([sys.executable, "-c", burn]) for _ in range(2)]
    try:
        time.sleep(0.2)  # they are running
        quiet = measured(1, lambda: (time.sleep(1.0), (1, 0, [1.0], 0))[1])
    finally:
        for p in burners:
            p.wait(10)
    assert quiet.own_cores < 0.3 and quiet.other_cores >= 0.5, (quiet.own_cores, quiet.other_cores)

    walls = []

    def spin():  # 0.5 s of CPU however long that takes on a busy machine
        began, end = time.perf_counter(), time.process_time() + 0.5
        while time.process_time() < end:
            pass
        walls.append(time.perf_counter() - began)
        return 1, 0, [1.0], 0

    busy = measured(1, spin)
    assert abs(busy.own_cores - 0.5 / walls[0]) < 0.15, (busy.own_cores, walls)


def test_a_trials_model_time_per_window_is_what_the_models_spent_during_it_over_what_they_scored():
    spent = iter([(10.0, 100), (13.0, 160)])  # before, after: 3 s over 60 windows
    trial = measured(4, lambda: (4, 0, [5.0] * 4, 0), work=lambda: next(spent))
    assert abs(trial.model_ms - 50.0) < 1e-9 and "models 50.0 ms/window" in trial.line()
