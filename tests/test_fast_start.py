"""A fast first start (issue #26): what a config does not use is not imported, and an optional model
whose weights are not there is known to be absent before torch and transformers are imported."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, silence, write_wav

CLASSIFY_CONFIG = """
sources: [{{id: f, file: clip.wav}}]
gate: {{mode: always}}
models:
  yam: {{kind: yamnet, groups: {{cat: [Cat, Meow]}}}}
{clap}
rules:
  - {{id: cat, model: yam, label: cat, threshold: 0.3}}
publish: {{endpoint: "tcp://127.0.0.1:5599", event_log: events.jsonl}}
"""

CLAP = """  clap:
    kind: clap
    model: {model}
    optional: {optional}
    labels: [cat meowing, speech, silence]
"""


def config_with(tmp_path: Path, clap: str = "") -> Path:
    write_wav(tmp_path / "clip.wav", silence(2.5, 16000), 16000)
    path = tmp_path / "c.yaml"
    path.write_text(CLASSIFY_CONFIG.format(clap=clap))
    return path


def run_cli(tmp_path: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, set[str], str, str]:
    """``monitord ARGS`` in a fresh interpreter (offline, an empty Hugging Face cache): its exit
    status, the modules it had imported when it returned, its stdout and stderr."""
    code = ("import json, sys\nfrom monitord.cli import main\nrc = main(sys.argv[1:])\n"
            "print('MODULES ' + json.dumps(sorted(sys.modules)), file=sys.stderr)\nsys.exit(rc)\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), **(env or {})}
    env.pop("HF_HUB_CACHE", None)
    env.pop("HUGGINGFACE_HUB_CACHE", None)
    out = subprocess.run([sys.executable, "-c", code, *args], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    line = next((ln for ln in out.stderr.splitlines() if ln.startswith("MODULES ")), None)
    assert line is not None, out.stderr[-3000:]
    return out.returncode, set(json.loads(line[len("MODULES "):])), out.stdout, out.stderr


HEAVY = {"torch", "transformers"}


@pytest.mark.parametrize("model", ["laion/clap-htsat-unfused", "./no-such-clap"])
def test_classify_with_an_absent_optional_clap_imports_neither_torch_nor_transformers(tmp_path, model):
    config = config_with(tmp_path, CLAP.format(model=model, optional="true"))
    code, modules, stdout, stderr = run_cli(tmp_path, "classify", "-c", str(config), str(tmp_path / "clip.wav"))
    assert code == 0, stderr[-3000:]
    assert not HEAVY & modules, sorted(HEAVY & modules)
    assert stdout.strip(), "no windows were classified"
    said = next(ln for ln in stderr.splitlines() if "optional model clap is not loaded" in ln)
    if model.startswith("."):
        assert "the directory" in said and "no-such-clap" in said and "--local-dir" in said
    else:  # what load_pretrained says after from_pretrained failed, word for word
        assert f"{model} is not in the Hugging Face cache and HF_HUB_OFFLINE is set. Fix: on a machine that reaches the hub, `" in said
        assert f"download {model}` (then copy HF_HOME's hub cache here)" in said


def test_a_required_absent_clap_fails_with_the_same_reason_and_no_torch(tmp_path):
    config = config_with(tmp_path, CLAP.format(model="laion/clap-htsat-unfused", optional="false"))
    code, modules, _, stderr = run_cli(tmp_path, "classify", "-c", str(config), str(tmp_path / "clip.wav"))
    assert code == 2 and "CLAP processor: cannot load 'laion/clap-htsat-unfused'" in stderr, stderr[-3000:]
    assert "Hugging Face cache (HF_HUB_OFFLINE is set)" in stderr
    assert not HEAVY & modules, sorted(HEAVY & modules)


def test_yamnet_only_and_check_config_import_neither(tmp_path):
    config = config_with(tmp_path)
    code, modules, stdout, stderr = run_cli(tmp_path, "classify", "-c", str(config), str(tmp_path / "clip.wav"))
    assert code == 0 and stdout.strip(), stderr[-3000:]
    assert not HEAVY & modules, sorted(HEAVY & modules)
    config = config_with(tmp_path, CLAP.format(model="laion/clap-htsat-unfused", optional="true"))
    code, modules, stdout, stderr = run_cli(tmp_path, "check-config", str(config))
    assert code == 0 and ": ok (" in stdout, stderr[-3000:]
    assert not HEAVY & modules, sorted(HEAVY & modules)


def test_a_snapshot_in_the_cache_is_left_to_transformers(tmp_path):
    """The pre-check refuses only what is surely absent: with a snapshot of the id in the cache (here an
    empty one, as a download that stopped half-way leaves), transformers is asked, and says why not."""
    snapshot = tmp_path / "hf-home" / "hub" / "models--laion--clap-htsat-unfused" / "snapshots" / "0123abcd"
    snapshot.mkdir(parents=True)
    config = config_with(tmp_path, CLAP.format(model="laion/clap-htsat-unfused", optional="true"))
    code, modules, _, stderr = run_cli(tmp_path, "classify", "-c", str(config), str(tmp_path / "clip.wav"))
    assert code == 0, stderr[-3000:]
    assert "transformers" in modules and "optional model clap is not loaded" in stderr
