"""`monitord bench --quick` runs on the full-size architecture and reports (it asserts no timing)."""

from __future__ import annotations

import re
import subprocess

import pytest

from tests.conftest import AUDIO, REPO, monitord_cmd, shared_path

LAST_LINE = re.compile(
    r"^engine=(?P<engine>torch|openvino|onnxruntime) speedup_vs_pipeline=(?P<speedup>[\d.]+) "
    r"speedup_same_precision=(?P<same>[\d.]+) efficiency_vs_encoder=(?P<eff>[\d.]+) vs_torch_encoder=(?P<vs>[\d.]+) "
    r"max_prob_diff=(?P<diff>[\d.e+-]+|inf) realtime_streams_hop1=(?P<streams>\d+) cascade_streams_hop1=(?P<cascade>\d+)$"
)


@pytest.mark.timeout(900)
def test_quick_benchmark_reports_the_side_by_side_figures():
    shared_path(AUDIO)  # the live cascade mixes the real recordings
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
                "live cascade YAMNet -> CLAP at hop 1 s", "fsynced log on a 50 ms disk", "RSS", "capture callback"):
        assert row in text, row
    # the cascade ran on the real recordings: YAMNet passed on about the share its threshold was calibrated to
    share = re.search(r"windows past the energy gate / reaching CLAP\s+(\d+)% / (\d+)% of those YAMNet scored "
                      r"\(calibrated to 25%", text)
    assert share and int(share[1]) > 80 and 10 <= int(share[2]) <= 45, share
    clap_only, cascade = text.split("live cascade YAMNet -> CLAP at hop 1 s")
    for section, answer in ((clap_only, match["streams"]), (cascade, match["cascade"])):
        trials = re.findall(r"(\d+) streams: (ok|no) \(p50 \d+ / p99 (\d+) ms, (\d+) of (\d+) dropped", section)
        assert len(trials) >= 4, section  # three grid points and a confirmation at least
        for n, verdict, p99, dropped, windows in trials:
            if verdict == "ok":
                assert int(dropped) == 0 and int(p99) <= 1000, (n, p99, dropped)
            else:
                assert int(dropped) > 0 or int(p99) >= 1000, (n, p99, dropped)
        if int(answer):  # the answer held in its every run, at least twice
            runs = [v for n, v, *_ in trials if n == answer]
            assert len(runs) >= 2 and set(runs) == {"ok"}, (answer, trials)
    print(out.stdout)
