"""The CLAP worker: real transformers classes loaded from disk, compared with the pipeline."""

from __future__ import annotations

import subprocess
import time

import numpy as np
import pytest

from monitord.config import ClapModelConfig, GateConfig, WindowConfig
from monitord.inference.build import load_models
from monitord.inference.models import ModelUnavailable
from monitord.inference.models.clap import ClapZeroShot
from monitord.windowing.tiling import ModelInput, WindowCutter
from tests.conftest import REPO, monitord_cmd, noise, tone
from tests.tiny_models import TRAIN_LABELS

LABELS = ("glass breaking", "dog barking", "speech", "music", "silence")


def windows(rate=44100):
    cutter = WindowCutter("s", rate, WindowConfig(), GateConfig(mode="always"), {"clap": ModelInput(48000)})
    clips = [
        tone(1000, 2.0, rate, -12),
        noise(2.0, rate, -20),
        tone(300, 2.0, rate, -30) + noise(2.0, rate, -40, seed=4),
        np.concatenate([np.zeros(rate, np.float32), tone(2500, 1.0, rate, -6)]),
        tone(60, 2.0, rate, -3),
    ]
    return [cutter.cut(c, i * rate, 0.0, 0.0) for i, c in enumerate(clips)]


def with_logit_scales(folder, out, audio: float, text: float):
    """A copy of a checkpoint whose logit scales are exp(log(audio)) and exp(log(text))."""
    import math
    import shutil

    import torch
    from transformers import ClapModel

    shutil.copytree(folder, out)
    model = ClapModel.from_pretrained(str(folder))
    with torch.no_grad():
        model.logit_scale_a.fill_(math.log(audio))
        model.logit_scale_t.fill_(math.log(text))
    model.save_pretrained(out)
    return out


def test_probabilities_equal_the_transformers_pipeline(tiny_clap, tmp_path):
    """On a trained model whose probabilities move with the sound, with the audio and text logit scales
    far apart (the pipeline uses the audio one): a wrong scale, feature or prompt cannot pass."""
    from transformers import pipeline

    checkpoint = with_logit_scales(tiny_clap, tmp_path / "clap", audio=2.0, text=20.0)  # soft probabilities
    model = ClapZeroShot("clap", ClapModelConfig(model=str(checkpoint), labels=TRAIN_LABELS, dtype="float32"))
    ws = windows()
    ours = model.score(ws)
    pipe = pipeline("zero-shot-audio-classification", model=str(checkpoint))
    worst = 0.0
    for window, scores in zip(ws, ours):
        theirs = {r["label"]: r["score"] for r in pipe(window.at_rate(48000), candidate_labels=list(TRAIN_LABELS), hypothesis_template="This is a sound of {}.")}
        assert set(theirs) == set(scores.probabilities)
        worst = max(worst, max(abs(theirs[k] - scores.probabilities[k]) for k in TRAIN_LABELS))
        assert abs(sum(scores.probabilities.values()) - 1.0) < 1e-5
    probabilities = np.array([[s.probabilities[k] for k in TRAIN_LABELS] for s in ours])
    spread = probabilities.max(axis=0) - probabilities.min(axis=0)
    print(f"\n[clap] spread between windows { {k: round(float(v), 3) for k, v in zip(TRAIN_LABELS, spread)} }; worst difference {worst:.1e}")
    assert spread.max() >= 0.3
    assert worst <= 1e-4


def test_a_windows_scores_do_not_depend_on_its_batch(random_clap):
    model = ClapZeroShot("clap", ClapModelConfig(model=str(random_clap), labels=LABELS, dtype="float32"))
    ws = windows()
    together = model.score(ws)
    for window, batched in zip(ws, together):
        alone = model.score([window])[0]
        for label in LABELS:
            assert abs(alone.probabilities[label] - batched.probabilities[label]) < 1e-5


@pytest.mark.parametrize("truncation", ["rand_trunc", "fusion"])
@pytest.mark.parametrize("seconds", [2.0, 2.03, 1.0, 3.7, 10.0, 0.01])
def test_torch_features_equal_the_feature_extractor(truncation, seconds):
    import torch
    from transformers import ClapFeatureExtractor

    from monitord.inference.models.clap_features import ClapFeatures

    extractor = ClapFeatureExtractor(truncation=truncation, padding="repeatpad", frequency_min=50, frequency_max=14000)
    n = int(seconds * 48000)
    batch = np.stack([noise(seconds, 48000, -20, seed=1)[:n], tone(440, seconds, 48000, -6)[:n], np.zeros(n, np.float32)])
    batch[2, n // 2] = 0.9  # a click in silence: extreme dynamic range
    ours, longer = ClapFeatures(extractor, "cpu")(batch)
    theirs = [extractor([b], sampling_rate=48000, return_tensors="pt") for b in batch]
    assert ours.shape == torch.cat([t["input_features"] for t in theirs]).shape
    # Both compute in float64 and round to float32: at most one float32 step apart, 7.6e-6 dB for
    # values in [-128, 128) (features are clamped at -100 dB and stay far below +128 dB).
    assert float((ours - torch.cat([t["input_features"] for t in theirs])).abs().max()) < 1e-5
    assert torch.equal(longer, torch.cat([t["is_longer"] for t in theirs]))


def test_only_the_audio_tower_stays_resident(random_clap):
    model = ClapZeroShot("clap", ClapModelConfig(model=str(random_clap), labels=LABELS, dtype="float32"))
    assert not hasattr(model, "model") and model.text_embeddings.shape == (len(LABELS), 16)
    before = model.score(windows()[:1])[0].probabilities
    model.set_labels(("tone", "noise", "speech"), "A recording of {label}.")
    after = model.score(windows()[:1])[0].probabilities
    assert set(before) == set(LABELS) and list(after) == ["tone", "noise", "speech"]


def test_the_trained_tiny_model_tells_tone_from_noise(tiny_clap):
    model = ClapZeroShot("clap", ClapModelConfig(model=str(tiny_clap), labels=TRAIN_LABELS))
    ws = windows()
    top = [s.top(1)[0][0] for s in model.score(ws[:2])]
    assert top == ["tone", "noise"]


def test_load_models_reads_a_local_directory(tiny_clap, tmp_path):
    from monitord.config import parse_config

    text = f"""
sources: [{{id: a, device: default}}]
models:
  clap: {{kind: clap, model: {tiny_clap}, labels: [tone, noise]}}
"""
    models = load_models(parse_config(text, tmp_path))
    assert models["clap"].sample_rate == 48000 and models["clap"].labels == ("tone", "noise")
    assert models["clap"].text_embeddings.shape == (2, 16)


def test_a_missing_directory_is_named(tmp_path):
    with pytest.raises(ModelUnavailable, match="does not exist"):
        ClapZeroShot("clap", ClapModelConfig(model=str(tmp_path / "nothing-here"), labels=LABELS))


def test_an_incomplete_directory_is_explained(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(ModelUnavailable, match="does not hold a complete"):
        ClapZeroShot("clap", ClapModelConfig(model=str(tmp_path), labels=LABELS))


def test_an_uncached_hub_id_offline_fails_fast_with_advice(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    began = time.monotonic()
    with pytest.raises(ModelUnavailable) as info:
        ClapZeroShot("clap", ClapModelConfig(model="laion/clap-model-that-is-not-cached", labels=LABELS))
    assert time.monotonic() - began < 30
    message = str(info.value)
    assert "laion/clap-model-that-is-not-cached" in message and "hf download laion/clap-model-that-is-not-cached" in message


def test_run_with_unavailable_weights_exits_2_without_traceback(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text(
        "sources: [{id: a, device: default}]\n"
        "models:\n  clap: {kind: clap, model: ./no-such-model, labels: [a, b]}\n"
    )
    out = subprocess.run(monitord_cmd("run", "-c", str(config)), capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 2
    assert "no-such-model" in out.stderr and "Traceback" not in out.stderr


def test_falling_back_to_the_cpu_keeps_scoring_in_float32(random_clap, tiny_emotion):
    """The move CLAP and the emotion model share (TorchPlacement): modules and the tensors beside them."""
    import torch

    from monitord.config import EmotionModelConfig
    from monitord.inference.models.emotion import EmotionClassifier

    clap = ClapZeroShot("clap", ClapModelConfig(model=str(random_clap), labels=LABELS, dtype="bfloat16"))
    emotion = EmotionClassifier("emo", EmotionModelConfig(kind="emotion", model=str(tiny_emotion), dtype="bfloat16"))
    ws = windows()
    for model in (clap, emotion):
        # bfloat16 as asked, except on a CPU without it, where the model says so (and starts in float32)
        assert model.dtype == torch.bfloat16 or (model.dtype == torch.float32 and "no bfloat16" in model.dtype_reason), \
            (model.dtype, model.dtype_reason)
        model.fall_back_to_cpu()
        assert model.device == "cpu" and model.dtype == torch.float32 and model.dtype_reason == "fallback from GPU"
        assert all(p.dtype == torch.float32 for module in model.torch_modules() for p in module.parameters())
        assert len(model.score(ws[:2])) == 2
