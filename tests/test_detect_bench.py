"""bench/detect.py, the detection benchmark, in its quick form on the real corpus (../shared/detect):
it runs through the daemon's own windowing, YAMNet and alert engine, and what it reports holds
together. Its figures are not asserted (they are measurements, printed and kept in the README)."""

from __future__ import annotations

import importlib.util
import json
import math
import re
import sys
from types import SimpleNamespace

from tests.conftest import REPO, SHARED, shared_path


def load_bench():
    spec = importlib.util.spec_from_file_location("bench_detect", REPO / "bench" / "detect.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    return module


def test_the_detection_benchmark_runs_on_real_glass_and_its_figures_hold_together(tmp_path, capsys):
    shared_path(SHARED / "detect" / "glass")
    bench = load_bench()
    args = SimpleNamespace(detect=SHARED / "detect", config=REPO / "config" / "monitord.yaml", out=tmp_path, quick=True, seed=0)
    report = bench.run(args)
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    fields = dict(re.findall(r"(\w+)=([\d.]+|nan)", last))
    assert set(fields) == {"fa_per_h", "recall", "not_this_same_source_removed", "not_this_recall_lost", "margin"}, last
    assert json.loads((tmp_path / "detect.json").read_text())["margin"] == report["margin"] == float(fields["margin"])
    assert (tmp_path / "detect.png").stat().st_size > 10_000
    assert 0 <= report["base"]["recall_all"] <= 1 and report["base"]["fa_per_h"]["glass-break"] >= 0
    rows = {(r["margin"], r["n"], r["guard"]): r for r in report["results"]}
    for (margin, n, guarded), row in rows.items():
        assert all(0 <= v <= 1 for v in row["recall_lost"].values())
        if not guarded:
            continue
        # the guard only ever takes suppressions away: never more recall lost, never fewer false alarms left
        bare = rows[(margin, n, False)]
        assert all(row["recall_lost"][lv] <= bare["recall_lost"][lv] + 1e-9 for lv in row["recall_lost"]), (row, bare)
        assert row["fa_per_h_other_after"] >= bare["fa_per_h_other_after"] - 1e-9
        assert row["fa_per_h_other_after"] <= row["fa_per_h_other_before"] + 1e-9
    # a larger margin suppresses at least as much, unguarded (the same negatives, a superset of windows)
    margins = sorted({m for m, _, _ in rows})
    for small, large in zip(margins, margins[1:]):
        for n in {n for _, n, _ in rows}:
            assert rows[(large, n, False)]["fa_per_h_other_after"] <= rows[(small, n, False)]["fa_per_h_other_after"] + 1e-9
    chosen = rows[(report["margin"], 10, True)]
    assert chosen["recall_lost_max"] <= bench.RECALL_BUDGET or report["margin"] == min(margins)
    # and the guard is at work: at the widest margin it keeps windows that unguarded teaching suppresses
    # (the windows nearer to a real break than to what was taught; tests/test_not_this.py shows a break kept)
    widest = max(margins)
    assert rows[(widest, 10, True)]["fa_per_h_other_after"] > rows[(widest, 10, False)]["fa_per_h_other_after"], \
        (rows[(widest, 10, False)], rows[(widest, 10, True)])
    assert not math.isnan(float(fields["recall"]))
