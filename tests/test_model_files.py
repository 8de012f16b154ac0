"""Model files changed under a running process: loaded weights do not depend on them.

An administrator who copies new weights over a model folder truncates and rewrites the files a
running daemon loaded. Memory-mapped weights would then be read from a file that is shorter than
the mapping (SIGBUS: the process dies) or holds other bytes. Loaded weights live in memory of their
own; new ones are taken on SIGHUP, and a folder that cannot be loaded leaves the old ones scoring.

The load-and-truncate checks run in a child process of their own (``python -m tests.test_model_files
KIND PATH``): a SIGBUS there fails the test instead of ending the test run.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, free_port, need, require, tone, wait_until, write_wav
from tests.tiny_models import TRAIN_LABELS

WEIGHTS = {"clap": "model.safetensors", "emotion": "model.safetensors", "yamnet": None}


def private_copy(folder: Path, into: Path) -> Path:
    """A copy of a model folder without the engine cache (a conversion of other weights)."""
    shutil.copytree(folder, into, ignore=shutil.ignore_patterns(".monitord-engine"))
    return into


def mapped_files(pid: int | str = "self") -> set[str]:
    return {line.split(maxsplit=5)[5] for line in Path(f"/proc/{pid}/maps").read_text().splitlines()
            if len(line.split(maxsplit=5)) == 6}


@pytest.mark.parametrize("kind", ["clap", "emotion", "yamnet", "clap@openvino", "clap@onnxruntime"])
def test_a_loaded_models_weights_file_truncated_to_nothing_changes_nothing(kind, random_clap, tiny_emotion, tmp_path):
    """``kind@engine``: the file truncated is the engine's converted model in the cache."""
    if "@" in kind:
        engine = kind.split("@")[1]
        require(engine, f"pip install 'monitord[{engine}]'")
    if kind == "yamnet":
        from monitord.inference.models.yamnet import BUILTIN_FILE

        path = tmp_path / "yamnet.tflite"
        shutil.copy(BUILTIN_FILE, path)
    else:
        path = private_copy(random_clap if kind.startswith("clap") else tiny_emotion, tmp_path / kind)
    out = subprocess.run([sys.executable, "-m", "tests.test_model_files", kind, str(path)], cwd=REPO,
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"exit {out.returncode} (-7: SIGBUS); stderr:\n{out.stderr[-3000:]}"
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["truncated_to"] == 0
    assert result["after"] == result["before"]  # the same weights, bit for bit
    assert result["mapped_after"] == [], "the weights file is still mapped"


def _child(kind: str, path: str) -> None:
    """Load the model, score a window, truncate its weights file to 0 bytes, score again; print JSON."""
    from monitord.config import ClapModelConfig, EmotionModelConfig, YamnetModelConfig
    from monitord.inference.models import build_model
    from monitord.inference import wire

    kind, _, engine = kind.partition("@")
    if kind == "clap":
        config = ClapModelConfig(kind="clap", model=path, labels=TRAIN_LABELS, dtype="float32", engine=engine or "torch")
    elif kind == "emotion":
        config = EmotionModelConfig(kind="emotion", model=path, dtype="float32", engine="torch")
    else:
        config = YamnetModelConfig(kind="yamnet", model=path)
    model = build_model(kind, config)
    n = 2 * model.sample_rate
    samples = (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / model.sample_rate)).astype(np.float32)
    window = wire.make_window(wire.WindowMeta("rec", 0, model.sample_rate, n, 0.0, 0.0), samples, model.sample_rate)
    weights = Path(path) / WEIGHTS[kind] if WEIGHTS[kind] else Path(path)
    if engine:
        assert model.encoder.engine == engine, model.encoder.describe()
        weights = next((Path(path) / ".monitord-engine").glob("*/model.bin" if engine == "openvino" else "*/model.onnx"))
    before = dict(model.score([window])[0].probabilities)
    os.truncate(weights, 0)
    after = dict(model.score([window])[0].probabilities)
    print(json.dumps({"before": before, "after": after, "truncated_to": weights.stat().st_size,
                      "mapped_after": sorted(f for f in mapped_files() if f.startswith(str(weights)))}))


# the daemon

RATE = 44100


def _scores(run, after: int = 0) -> list[dict]:
    return [e["scores"] for e in run.sub.events[after:] if e["kind"] == "scores"]


def _statuses(run, status: str) -> list[dict]:
    return [e for e in run.sub.events if e["kind"] == "status" and e.get("status") == status]


def _close(a: dict, b: dict, atol: float = 1e-4) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= atol for k in a)


def _expected_scores(model: Path, audio: np.ndarray) -> dict:
    """What a model folder gives the file's (identical) windows, scored here."""
    from monitord.config import ClapModelConfig
    from monitord.inference.models.clap import ClapZeroShot
    from monitord.inference import wire

    clap = ClapZeroShot("clap", ClapModelConfig(kind="clap", model=str(model), labels=TRAIN_LABELS, dtype="float32",
                                                engine="torch"))
    n = 2 * RATE
    window = wire.make_window(wire.WindowMeta("rec", 0, RATE, n, 0.0, 0.0), audio[:n], RATE)
    return dict(clap.score([window])[0].probabilities)


def other_weights(folder: Path, into: Path) -> Path:
    """A copy of a CLAP folder with other weights (the same architecture and files): the audio
    projection negated, which ranks the labels the other way round, and a logit scale of e^8, which
    makes a random model's near-uniform probabilities far from uniform."""
    import torch
    from safetensors.torch import load_file, save_file

    private_copy(folder, into)
    tensors = load_file(into / "model.safetensors")
    tensors = {k: -v if k.startswith("audio_projection.") else v for k, v in tensors.items()}
    tensors["logit_scale_a"] = torch.full_like(tensors["logit_scale_a"], 8.0)
    save_file(tensors, into / "model.safetensors", metadata={"format": "pt"})
    return into


def test_weights_overwritten_under_a_running_daemon_change_nothing_until_sighup_which_loads_them(random_clap, tmp_path):
    import soundfile as sf

    from tests.test_e2e import subscribed_daemon

    need(Path("/proc/self/maps").exists(), "reads /proc/PID/maps")
    model = private_copy(random_clap, tmp_path / "clap")
    new_model = other_weights(random_clap, tmp_path / "clap-new")
    new_weights = (new_model / "model.safetensors").read_bytes()
    write_wav(tmp_path / "tone.wav", tone(1000, 90.0, RATE, -12), RATE)  # each 0.5 s hop is 500 periods: all windows alike
    audio, _ = sf.read(tmp_path / "tone.wav", dtype="float32")
    old_expected, new_expected = _expected_scores(model, audio), _expected_scores(new_model, audio)
    assert not _close(old_expected, new_expected, 0.05), "the two models must score the tone differently"
    port = free_port()
    config = tmp_path / "monitord.yaml"
    config.write_text(f"""
sources:
  - {{id: rec, file: tone.wav, realtime: true}}
gate: {{mode: energy, threshold_dbfs: -45}}
window: {{seconds: 2.0, hop_s: 0.5}}
models:
  clap: {{kind: clap, model: {model}, labels: [{", ".join(TRAIN_LABELS)}], dtype: float32, engine: torch, batch_max: 4, batch_wait_ms: 10}}
rules:
  - {{id: tone, model: clap, label: tone, threshold: 0.6, release: 0.4}}
publish: {{endpoint: "tcp://127.0.0.1:{port}", event_log: events.jsonl, scores: true}}
""")
    with subscribed_daemon(config, port) as run:
        alive = lambda: run.proc.poll() is None  # noqa: E731
        more = lambda n, since: lambda: not alive() or len(_scores(run)) >= since + n  # noqa: E731
        assert wait_until(more(2, 0), 120) and alive(), "no scores"
        pid = run.proc.pid
        assert not any(f.startswith(str(model)) for f in mapped_files(pid)), "the model's files are still mapped"

        os.truncate(model / "model.safetensors", 0)  # `cp` over the folder: first the file is emptied
        truncated_at = len(_scores(run))
        assert wait_until(more(3, truncated_at), 60) and alive(), f"exit {run.proc.poll()} after the weights were truncated"
        run.proc.send_signal(signal.SIGHUP)  # an empty weights file cannot be loaded: refused, the old weights score on
        assert wait_until(lambda: not alive() or _statuses(run, "reload_failed"), 60) and alive()
        failed = _statuses(run, "reload_failed")[0]["detail"]
        refused_at = len(_scores(run))
        assert wait_until(more(3, refused_at), 60) and alive()

        (model / "model.safetensors").write_bytes(new_weights)  # then written with the new weights
        written_at = len(_scores(run))
        assert wait_until(more(3, written_at), 60) and alive()
        before_hup = len(_scores(run))
        run.proc.send_signal(signal.SIGHUP)
        assert wait_until(lambda: not alive() or _statuses(run, "reloaded"), 120) and alive()
        reloaded_at = len(_scores(run))
        assert wait_until(more(8, reloaded_at), 60) and alive()
        scores = _scores(run)
        assert not any(f.startswith(str(model)) for f in mapped_files(pid)), "the new weights file is mapped"
    assert "models.clap" in failed and "old" in failed, failed
    assert all(_close(s, old_expected) for s in scores[:before_hup]), "the scores changed before SIGHUP"
    which = ["old" if _close(s, old_expected) else "new" if _close(s, new_expected) else "neither" for s in scores]
    first_new = which.index("new") if "new" in which else len(which)
    assert which == ["old"] * first_new + ["new"] * (len(which) - first_new), which  # old weights, then only the new
    assert which[-4:] == ["new"] * 4, "SIGHUP did not bring in the new weights"
    assert run.code == 0, run.err[-3000:]
    print(f"\nreload_failed: {failed[:300]}")
    print(f"{before_hup} windows scored with the old weights (the file truncated after {truncated_at}, rewritten "
          f"after {written_at}), then {len(scores) - reloaded_at} with the new ones after SIGHUP")


if __name__ == "__main__":
    _child(sys.argv[1], sys.argv[2])
