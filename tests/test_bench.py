"""`monitord bench --quick` runs and reports (it asserts no timing); without --model it measures the
full-size architecture."""

from __future__ import annotations

import re
import subprocess

import pytest

from monitord.inference.engines import ENGINES as ALL_ENGINES
from tests.conftest import AUDIO, REPO, monitord_cmd, require, shared_path

ENGINES = [e for e in ALL_ENGINES if e != "torch"]

LAST_LINE = re.compile(
    r"^engine=(?P<engine>torch|openvino|onnxruntime) speedup_vs_pipeline=(?P<speedup>[\d.]+) "
    r"speedup_same_precision=(?P<same>[\d.]+) efficiency_vs_encoder=(?P<eff>[\d.]+) vs_torch_encoder=(?P<vs>[\d.]+) "
    r"max_prob_diff=(?P<diff>[\d.e+-]+|inf) realtime_streams_hop1=(?P<streams>\d+) cascade_streams_hop1=(?P<cascade>\d+|n/a) "
    r"first_start_s=(?P<start>[\d.]+)$"
)


@pytest.mark.timeout(600)
def test_quick_benchmark_reports_the_side_by_side_figures(tiny_clap):
    """The quick mode on the trained tiny model (its outputs move with the input): every installed
    engine beside torch, the live streams and the live cascade on the real recordings."""
    shared_path(AUDIO)  # the live cascade mixes the real recordings
    for engine in ENGINES:
        require(engine, f"pip install -e '.[{engine}]'")
    args = ("bench", "--quick", "--model", str(tiny_clap), "--rounds", "1", "--windows", "16", "--pipeline-windows", "4",
            "--live-seconds", "3")
    out = subprocess.run(monitord_cmd(*args), cwd=REPO, capture_output=True, text=True, timeout=580)
    assert out.returncode == 0, out.stderr[-3000:]
    lines = out.stdout.strip().splitlines()
    match = LAST_LINE.match(lines[-1])
    assert match, lines[-1]
    for engine in ("torch", *ENGINES):
        assert any(line.startswith(f"-- {engine}") for line in lines), (engine, out.stdout)
    # correctness, not speed: in float32 every engine's probabilities are the pipeline's, to a small part of
    # how much they move between windows (a swapped logit scale or a reversed window would be of the order of 1)
    assert float(match["diff"]) <= 1e-2
    assert all(float(match[k]) > 0 for k in ("speedup", "same", "eff", "vs", "start"))
    text = out.stdout
    for row in ("1 pipeline (", "2 bare audio encoder", "3 monitord window -> event", "live streams at hop 1 s",
                "live cascade YAMNet -> CLAP at hop 1 s", "fsynced log on a 50 ms disk", "RSS", "capture callback",
                "shipped config: start -> dashboard URL"):
        assert row in text, row
    # the cascade ran on the real recordings: YAMNet passed on about the share its threshold was calibrated to
    share = re.search(r"energy gate passed / YAMNet sent on to CLAP\s+(\d+)% of the mix's windows / (\d+)% of the windows "
                      r"YAMNet scored in the trials \(threshold [\d.]+ on its event group, calibrated to 25%\)", text)
    assert share and int(share[1]) > 80 and 10 <= int(share[2]) <= 45, share
    assert match["cascade"] != "n/a"
    clap_only, cascade = text.split("live cascade YAMNet -> CLAP at hop 1 s")
    for section, answer in ((clap_only, match["streams"]), (cascade, match["cascade"])):
        trials = re.findall(r"(\d+) streams: (ok|no) \(p50 (?:\d+|inf) / p99 (\d+|inf) ms, (\d+) of (\d+) dropped"
                            r"(?:, (\d+) unpublished)?", section)
        assert len(trials) >= 2, section  # a grid point and its confirmation at least
        for n, verdict, p99, dropped, windows, unpublished in trials:
            if verdict == "ok":
                assert int(dropped) == 0 and not unpublished and p99 != "inf" and int(p99) <= 1000, (n, p99, dropped)
            else:
                assert int(dropped) > 0 or unpublished or p99 == "inf" or int(p99) >= 1000, (n, p99, dropped)
        if section is cascade:  # the tiers overlap: YAMNet scored during some of CLAP's time, read from the stage's spans
            busy = [int(x) for x in re.findall(r"YAMNet busy during (\d+)% of CLAP's time", section)]
            assert len(busy) == len(trials) and max(busy) > 0, busy
        if int(answer):  # the answer held in its every run, at least twice
            runs = [v for n, v, *_ in trials if n == answer]
            assert len(runs) >= 2 and set(runs) == {"ok"}, (answer, trials)
    print(out.stdout)


def test_without_a_model_the_benchmark_measures_the_full_size_clap_htsat_unfused_architecture():
    from monitord.tools.bench import build_model

    model, processor = build_model(None, "cpu")
    config = model.config
    assert not config.audio_config.enable_fusion and config.projection_dim == 512
    assert list(config.audio_config.depths) == [2, 2, 6, 2] and config.audio_config.patch_embeds_hidden_size == 96
    assert config.text_config.hidden_size == 768 and config.text_config.num_hidden_layers == 12
    assert sum(p.numel() for p in model.parameters()) > 150e6
    assert processor.feature_extractor.sampling_rate == 48000
