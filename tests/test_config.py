"""Config validation: every problem named by its key path, exit 2, never a traceback."""

from __future__ import annotations

import subprocess
import textwrap
from pathlib import Path

import pytest

from monitord.config import ConfigError, load_config
from tests.conftest import REPO, monitord_cmd, silence, write_wav

VALID = """
sources:
  - id: kitchen
    device: default
    sample_rate: 48000
  - id: recording
    file: sample.wav
    realtime: false
gate:
  mode: energy
  threshold_dbfs: -50
window:
  seconds: 2.0
  hop_s: 0.5
models:
  clap:
    kind: clap
    model: laion/clap-htsat-unfused
    device: auto
    labels: [glass breaking, dog barking, speech, music, silence]
    prompt: "This is a sound of {label}."
rules:
  - id: glass-break
    model: clap
    label: glass breaking
    sources: [kitchen]
    threshold: 0.6
    release: 0.4
    min_windows: 1
    of_windows: 1
    cooldown_s: 30
publish:
  endpoint: tcp://127.0.0.1:5556
  event_log: events.jsonl
"""


def write(tmp_path: Path, text: str) -> Path:
    write_wav(tmp_path / "sample.wav", silence(0.5, 16000), 16000)  # parse_config checks it is there; check-config reads it
    path = tmp_path / "monitord.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def problems(tmp_path: Path, text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return [str(p) for p in info.value.problems]


def test_the_documented_example_is_valid_and_paths_resolve(tmp_path):
    config = load_config(write(tmp_path, VALID))
    assert config.sources[1].file == str(tmp_path / "sample.wav")
    assert config.publish.event_log == str(tmp_path / "events.jsonl")
    assert config.models["clap"].model == "laion/clap-htsat-unfused"  # an HF id stays an id
    assert config.rules[0].release_level == 0.4


@pytest.mark.parametrize(
    "old, new, expected",
    [
        ("  threshold_dbfs: -50", "  treshold_dbfs: -50", "gate.treshold_dbfs: unknown key (did you mean 'threshold_dbfs'?)"),
        ("  hop_s: 0.5", "  hop_s: fast", "window.hop_s: "),
        ("    threshold: 0.6", "    threshold: 1.5", "rules.0.threshold: "),
        ("    release: 0.4", "    release: 0.8", "rules.0.release: release (0.8) must not exceed threshold (0.6)"),
        ("    model: clap\n    label", "    model: clapp\n    label", "rules.0.model: no model named 'clapp'"),
        ("    label: glass breaking", "    label: glass braking", "rules.0.label: 'glass braking' is not a label of model 'clap'; did you mean 'glass breaking'?"),
        ("    file: sample.wav", "    file: missing.wav", "sources.1.file: file not found"),
        ("  hop_s: 0.5", "  hop_s: 3.0", "window.hop_s: hop (3.0 s) is longer than the window (2.0 s)"),
        ("    min_windows: 1", "    min_windows: 3", "rules.0.min_windows: min_windows (3) exceeds of_windows (1)"),
        ("    sources: [kitchen]", "    sources: [garage]", "rules.0.sources.0: no source named 'garage'"),
        ("  endpoint: tcp://127.0.0.1:5556", "  endpoint: tcp://0.0.0.0:5556", "publish.endpoint: binds a non-loopback address"),
        ("    device: auto", "    device: gpu", "models.clap.device: 'gpu' is not a device"),
        ('    prompt: "This is a sound of {label}."', '    prompt: "A sound."', 'models.clap.prompt: prompt must contain "{label}"'),
        ("  - id: kitchen", "  - id: kitchen sink", "sources.0.id: 'kitchen sink' is not a valid id"),
    ],
)
def test_each_problem_names_its_key(tmp_path, old, new, expected):
    assert old in VALID
    found = problems(tmp_path, VALID.replace(old, new, 1))
    assert any(expected in p for p in found), found


def test_problems_carry_yaml_line_numbers(tmp_path):
    found = problems(tmp_path, VALID.replace("    threshold: 0.6", "    threshold: 1.5"))
    line = VALID.splitlines().index("    threshold: 1.5".replace("1.5", "0.6")) + 1
    assert any(p.startswith("rules.0.threshold:") and p.endswith(f"(line {line})") for p in found), found


def test_several_problems_are_reported_together(tmp_path):
    text = VALID.replace("  hop_s: 0.5", "  hop_s: 3.0").replace("    release: 0.4", "    release: 0.9")
    found = problems(tmp_path, text)
    assert any(p.startswith("window.hop_s") for p in found) and any(p.startswith("rules.0.release") for p in found)


def test_a_source_needs_exactly_one_of_device_or_file(tmp_path):
    found = problems(tmp_path, VALID.replace("    device: default\n", ""))
    assert any(p.startswith("sources.0: give exactly one of 'device', 'file' or 'url'") for p in found), found


def test_invalid_yaml_is_reported_with_its_line(tmp_path):
    found = problems(tmp_path, "sources: [\n  - id: x\n")
    assert found and found[0].startswith("config: invalid YAML") and "(line" in found[0]


def test_check_config_cli_exit_codes(tmp_path):
    good = write(tmp_path, VALID)
    ok = subprocess.run(monitord_cmd("check-config", str(good)), capture_output=True, text=True, cwd=REPO, timeout=60)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(VALID.replace("    threshold: 0.6", "    threshold: 7"))
    for args in (("check-config", str(bad)), ("run", "-c", str(bad))):
        out = subprocess.run(monitord_cmd(*args), capture_output=True, text=True, cwd=REPO, timeout=60)
        assert out.returncode == 2
        assert "rules.0.threshold: " in out.stderr and "Traceback" not in out.stderr


def test_missing_config_file_is_a_clear_error(tmp_path):
    out = subprocess.run(monitord_cmd("check-config", str(tmp_path / "nope.yaml")), capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "config: file not found" in out.stderr and "Traceback" not in out.stderr


def test_shipped_configs_are_valid():
    shipped = sorted((REPO / "config").glob("[!.]*.yaml"))
    assert shipped
    for path in shipped:
        load_config(path)
