"""Inference engines (monitord.inference.engines): each engine's probabilities against torch float32 on
trained tiny models (their outputs move with the input, so agreement means something), at every batch
size up to batch_max; the conversion cache (reused, refused when stale or corrupt); torch when an
engine is not installed; the setting on the Ray Serve tier; the benchmark's engine line."""

from __future__ import annotations

import json
import logging
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from monitord.config import ClapModelConfig, EmotionModelConfig
from tests.conftest import REPO, copied_model, noise, require, tone, trained_once
from tests.tiny_models import TRAIN_LABELS, build_clap, build_emotion, train_emotion

ENGINES = ("openvino", "onnxruntime")
TOLERANCE = 1e-4
"""Largest |p(engine) - p(torch)| for a float32 engine (stated in docs/models.md)."""
BATCH_MAX = 4
RATE = 48000


@pytest.fixture(scope="session")
def trained_emotion(tmp_path_factory) -> Path:
    trained = trained_once("tiny-emotion", lambda folder: train_emotion(build_emotion(folder)))
    return copied_model(trained, tmp_path_factory.mktemp("models") / "emotion-trained")


def windows(n: int = 7):
    """Tones and noise at different levels and pitches, 2 s at 48 kHz, as the stage cuts them."""
    from monitord.tools.bench import make_windows

    made = make_windows(n)
    clips = [tone(300 * (i + 1), 2.0, RATE, dbfs=-10 - 3 * i) if i % 2 else noise(2.0, RATE, dbfs=-12 - 2 * i, seed=i)
             for i in range(n)]
    from dataclasses import replace

    return [replace(w, samples=clip.astype(np.float32)) for w, clip in zip(made, clips)]


def build(kind: str, folder: Path, engine: str, dtype: str = "float32", **extra):
    if kind == "clap":
        from monitord.inference.models.clap import ClapZeroShot

        return ClapZeroShot("clap", ClapModelConfig(model=str(folder), labels=TRAIN_LABELS, dtype=dtype, engine=engine,
                                                    batch_max=BATCH_MAX), **extra)
    from monitord.inference.models.emotion import EmotionClassifier

    return EmotionClassifier("emo", EmotionModelConfig(kind="emotion", model=str(folder), dtype=dtype, engine=engine,
                                                       batch_max=BATCH_MAX), **extra)


def probabilities(model, ws) -> np.ndarray:
    return np.array([[s.probabilities[label] for label in model.labels] for s in model.score(ws)])


@pytest.mark.parametrize("engine", ENGINES)
@pytest.mark.parametrize("kind", ["clap", "emotion"])
def test_each_engine_matches_torch_float32_at_every_batch_size(kind, engine, tiny_clap, trained_emotion):
    require(engine, f"pip install -e '.[{engine}]'")
    folder = tiny_clap if kind == "clap" else trained_emotion
    ws = windows()
    reference = build(kind, folder, "torch")
    model = build(kind, folder, engine)
    assert reference.engine == "torch" and model.engine == engine  # not a silent fall-back
    expected = probabilities(reference, ws)
    spread = (expected.max(axis=0) - expected.min(axis=0)).max()
    assert spread > 0.2, f"the tiny model's outputs barely move ({spread:.3f}): agreement would mean nothing"
    for batch in range(1, BATCH_MAX + 1):  # one conversion, every batch size (dynamic shapes)
        got = np.concatenate([probabilities(model, ws[i:i + batch]) for i in range(0, len(ws), batch)])
        assert np.abs(got - expected).max() <= TOLERANCE, (batch, np.abs(got - expected).max())
    embeddings = [s.embedding for s in model.score(ws[:2])], [s.embedding for s in reference.score(ws[:2])]
    assert np.allclose(*embeddings, atol=1e-4)


BFLOAT16_TOLERANCE = 0.03
"""Largest |p(engine in bfloat16) - p(torch float32)|: bfloat16 rounding (stated in docs/models.md)."""


@pytest.mark.parametrize("kind", ["clap", "emotion"])
def test_openvino_in_bfloat16_stays_within_rounding_of_torch_float32(kind, tiny_clap, trained_emotion):
    """What ``dtype: auto`` picks on AMX CPUs where it times faster, forced here. On a CPU without
    bfloat16 (a fact of the machine, not a missing install: nothing is skipped) the same request runs
    float32, says why, and matches torch float32 to float32's tolerance."""
    ov = require("openvino", "pip install -e '.[openvino]'")
    has_bf16 = "BF16" in ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES")
    folder = tiny_clap if kind == "clap" else trained_emotion
    ws = windows()
    expected = probabilities(build(kind, folder, "torch"), ws)
    model = build(kind, folder, "openvino", dtype="bfloat16")
    difference = np.abs(probabilities(model, ws) - expected).max()
    if has_bf16:
        assert model.engine == "openvino" and model.encoder.precision == "bfloat16"
        assert difference <= BFLOAT16_TOLERANCE, difference
    else:
        assert model.engine == "openvino" and model.encoder.precision == "float32"
        assert "the CPU has no bfloat16" in model.encoder.reason, model.encoder.reason
        assert difference <= TOLERANCE, difference


@pytest.mark.parametrize("engine", ENGINES)
def test_emotion_windows_of_another_length_use_the_same_conversion(engine, trained_emotion):
    require(engine, f"pip install -e '.[{engine}]'")
    from dataclasses import replace

    reference, model = build("emotion", trained_emotion, "torch"), build("emotion", trained_emotion, engine)
    assert model.engine == engine
    for seconds in (1.0, 3.0):  # the conversion saw 2 s
        n = int(seconds * RATE)
        ws = [replace(w, samples=np.resize(w.samples, n), valid=n) for w in windows(3)]
        assert np.abs(probabilities(model, ws) - probabilities(reference, ws)).max() <= TOLERANCE, seconds


def _cache_folders(folder: Path, engine: str) -> list[Path]:
    return sorted((folder / ".monitord-engine").glob(f"{engine}-*"))


def test_the_cache_is_reused_and_refused_when_the_weights_change_or_it_is_corrupt(tiny_clap, tmp_path, caplog):
    require("openvino", "pip install -e '.[openvino]'")
    folder = tmp_path / "clap"
    shutil.copytree(tiny_clap, folder, ignore=shutil.ignore_patterns(".monitord-engine"))
    caplog.set_level(logging.INFO, logger="monitord")
    first = build("clap", folder, "openvino")
    assert first.encoder.converted and any("converting to openvino" in r.getMessage() for r in caplog.records)
    [cached] = _cache_folders(folder, "openvino")
    stamp = {p.name: p.stat().st_mtime_ns for p in cached.iterdir()}
    ws = windows(3)

    caplog.clear()
    second = build("clap", folder, "openvino")
    assert not second.encoder.converted and not any("converting" in r.getMessage() for r in caplog.records)
    assert _cache_folders(folder, "openvino") == [cached]
    assert {p.name: p.stat().st_mtime_ns for p in cached.iterdir()} == stamp
    assert np.abs(probabilities(second, ws) - probabilities(first, ws)).max() == 0.0

    build_clap(folder, seed=1)  # other weights, same place: the cached conversion is stale
    caplog.clear()
    third = build("clap", folder, "openvino")
    assert third.encoder.converted and any("stale" in r.getMessage() for r in caplog.records)
    [fresh] = _cache_folders(folder, "openvino")
    assert fresh != cached and not cached.exists()
    torch_now = build("clap", folder, "torch")
    assert np.abs(probabilities(third, ws) - probabilities(torch_now, ws)).max() <= TOLERANCE

    weights = fresh / "model.bin"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])  # a truncated copy
    caplog.clear()
    fourth = build("clap", folder, "openvino")
    assert fourth.encoder.converted
    assert any(r.levelno == logging.WARNING and "refusing" in r.getMessage() for r in caplog.records)
    assert np.abs(probabilities(fourth, ws) - probabilities(torch_now, ws)).max() <= TOLERANCE


def test_a_read_only_model_folder_caches_under_the_state_directory(tiny_clap, tmp_path, monkeypatch):
    require("onnxruntime", "pip install -e '.[onnxruntime]'")
    from monitord.inference import engine_cache

    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    monkeypatch.setattr(engine_cache.os, "access", lambda path, mode: False)  # as for a folder the daemon cannot write
    model = build("clap", tiny_clap, "onnxruntime")
    assert model.engine == "onnxruntime"
    assert model.encoder.folder.is_relative_to(tmp_path / "state" / "monitord" / "engine-cache")


FALLBACK = """
import json, logging, sys
sys.modules[{package!r}] = None  # as if the extra were not installed
logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s %(message)s")
from tests.test_engines import build, probabilities, windows
from pathlib import Path
model = build({kind!r}, Path({folder!r}), {engine!r})
print(json.dumps(dict(engine=model.engine, p=probabilities(model, windows(3)).tolist())))
"""


@pytest.mark.parametrize("kind,engine", [("clap", "openvino"), ("emotion", "onnxruntime")])
def test_a_missing_engine_is_one_warning_and_torch(kind, engine, tiny_clap, trained_emotion):
    folder = tiny_clap if kind == "clap" else trained_emotion
    script = FALLBACK.format(package=engine, kind=kind, folder=str(folder), engine=engine)
    out = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result["engine"] == "torch"
    warnings = [line for line in out.stderr.splitlines() if line.startswith("WARNING monitord")]
    assert len(warnings) == 1 and f"monitord[{engine}]" in warnings[0], out.stderr[-3000:]
    expected = probabilities(build(kind, folder, "torch"), windows(3))
    assert np.abs(np.array(result["p"]) - expected).max() <= 1e-6


def test_the_engine_setting_travels_to_the_serve_tier(tiny_clap):
    """Replicas build their models with build_model (monitord.serve.deployment.build_models), and the
    engine, like device and dtype, is not part of the fingerprint capture nodes must match."""
    require("onnxruntime", "pip install -e '.[onnxruntime]'")
    from monitord.inference.models import build_model
    from monitord.inference import wire

    served = ClapModelConfig(model=str(tiny_clap), labels=TRAIN_LABELS, dtype="float32", engine="onnxruntime")
    node = ClapModelConfig(model=str(tiny_clap), labels=TRAIN_LABELS, dtype="float32", engine="torch")
    assert wire.fingerprint(served) == wire.fingerprint(node)
    assert build_model("clap", served).engine == "onnxruntime"
    deployment = (REPO / "monitord" / "serve" / "deployment.py").read_text()
    assert "build_model(name, m)" in deployment


# the conversion cache under hostile conditions (review of #20): no engine needed, a fake conversion


def _fake_convert(folder: Path) -> None:
    (folder / "model.onnx").write_bytes(b"converted")


@pytest.mark.parametrize("damage", ["files-not-a-dict-of-dicts", "manifest-a-list", "size-missing", "a-file", "a-symlink"])
def test_a_damaged_cache_entry_is_converted_again_never_torch_for_good(tmp_path, damage):
    """A manifest that is valid JSON of the wrong shape raised TypeError/AttributeError/KeyError out of
    the check (load_encoder turned it into EngineError: torch, at every start, the cache never rebuilt);
    a file or a symlink where the folder goes could not be removed (rmtree refuses both, errors ignored),
    so the rename failed the same way. Each is now a refused entry, converted again."""
    from monitord.inference.engine_cache import FORMAT, MANIFEST, load_or_convert

    root, fp = tmp_path / "cache", "f" * 64
    root.mkdir()
    folder = root / f"onnxruntime-{fp[:20]}"
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("not the cache's")
    if damage == "a-file":
        folder.write_text("junk")
    elif damage == "a-symlink":
        folder.symlink_to(elsewhere, target_is_directory=True)
    else:
        folder.mkdir()
        (folder / "model.onnx").write_bytes(b"converted")
        manifest = {"files-not-a-dict-of-dicts": {"format": FORMAT, "fingerprint": fp, "files": {"model.onnx": 9}},
                    "manifest-a-list": [1, 2],
                    "size-missing": {"format": FORMAT, "fingerprint": fp, "files": {"model.onnx": {"sha256": "x"}}}}[damage]
        (folder / MANIFEST).write_text(json.dumps(manifest))
    cached = load_or_convert(root, "onnxruntime", fp, _fake_convert, "model t", {})
    assert cached.converted and cached.folder == folder
    assert folder.is_dir() and not folder.is_symlink() and (folder / "model.onnx").read_bytes() == b"converted"
    assert (elsewhere / "keep.txt").read_text() == "not the cache's"  # a symlink's target is not emptied
    assert not load_or_convert(root, "onnxruntime", fp, _fake_convert, "model t", {}).converted


def _convert_at_once(root: str, fp: str, barrier, out) -> None:
    from monitord.inference.engine_cache import load_or_convert

    def convert(folder: Path) -> None:
        barrier.wait(30)  # both are converting now
        (folder / "model.onnx").write_bytes(b"converted")

    cached = load_or_convert(Path(root), "onnxruntime", fp, convert, "model t", {})
    out.put((str(cached.folder), cached.converted))


def test_two_processes_converting_the_same_model_at_once_both_get_the_one_cache(tmp_path):
    """The daemon and `monitord teach` (or two replicas) starting together: both convert, one
    rename wins, the other uses the winner's folder; nothing temporary is left."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")
    barrier, out = ctx.Barrier(2), ctx.Queue()
    root, fp = tmp_path / "cache", "a" * 64
    root.mkdir()
    procs = [ctx.Process(target=_convert_at_once, args=(str(root), fp, barrier, out)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    results = [out.get(timeout=5) for _ in procs]
    assert {folder for folder, _ in results} == {str(root / f"onnxruntime-{fp[:20]}")}
    assert sorted(p.name for p in root.iterdir()) == [f"onnxruntime-{fp[:20]}"]


def test_a_cache_folder_another_user_made_sends_the_cache_to_the_state_directory(tmp_path, monkeypatch):
    """The model folder is writable but its .monitord-engine was made by another user (a `sudo
    monitord teach`): cache_root returned it, the conversion's temporary folder could not be made
    there, and the model ran on torch at every start instead of caching under the state directory."""
    from monitord.inference import engine_cache

    model = tmp_path / "model"
    (model / engine_cache.FOLDER).mkdir(parents=True)
    monkeypatch.delenv("STATE_DIRECTORY", raising=False)
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "state"))
    real_access = engine_cache.os.access
    monkeypatch.setattr(engine_cache.os, "access",
                        lambda path, mode: Path(path).name != engine_cache.FOLDER and real_access(path, mode))
    root = engine_cache.cache_root(str(model))
    assert root.is_relative_to(tmp_path / "state" / "monitord" / "engine-cache")
