"""`monitord bench --quick` runs on the full-size architecture and reports (it asserts no timing)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import REPO, monitord_cmd

LAST_LINE = re.compile(
    r"^engine=(?P<engine>torch|openvino|onnxruntime) speedup_vs_pipeline=(?P<speedup>[\d.]+) "
    r"speedup_same_precision=(?P<same>[\d.]+) efficiency_vs_encoder=(?P<eff>[\d.]+) vs_torch_encoder=(?P<vs>[\d.]+) "
    r"max_prob_diff=(?P<diff>[\d.e+-]+|inf) realtime_streams_hop1=(?P<streams>\d+)$"
)


@pytest.mark.timeout(900)
def test_quick_benchmark_reports_the_side_by_side_figures():
    # one engine beside torch here: every installed engine side by side is tests/test_engines.py's (on a tiny model)
    out = subprocess.run(monitord_cmd("bench", "--quick", "--engines", "openvino"), cwd=REPO, capture_output=True, text=True,
                         timeout=880)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    # correctness, not speed: in float32 the pipeline's probabilities, to a small part of how much they
    # move between windows (a swapped logit scale or a reversed window would be of the order of 1)
    assert float(match["diff"]) <= 1e-2
    assert float(match["speedup"]) > 0 and float(match["same"]) > 0 and float(match["eff"]) > 0
    text = out.stdout
    for row in ("1 pipeline (", "2 bare audio encoder", "3 monitord window -> event", "live streams at hop 1 s",
                "fsynced log on a 50 ms disk", "RSS", "capture callback"):
        assert row in text, row
    print(out.stdout)
