"""Speech emotion: a tiny offline classifier through the daemon's loading code, label mapping,
several models per window with their own gates."""

from __future__ import annotations

import shutil
import subprocess

import numpy as np

from monitord.config import EMOTIONS, EmotionModelConfig, parse_config
from monitord.inference.models.emotion import EmotionClassifier, map_label
from tests.conftest import config_problems, need, noise, silence, tone, write_wav


def test_checkpoint_labels_map_onto_the_nine_emotions():
    assert map_label("ang", {}) == "angry" and map_label("HAP", {}) == "happy" and map_label("calm", {}) == "neutral"
    assert map_label("生气/angry", {}) == "angry"  # emotion2vec-style names
    assert map_label("whisper", {}) == "other"
    assert map_label("whisper", {"whisper": "fearful"}) == "fearful"


def test_emotion_model_loads_from_disk_and_its_nine_scores_sum_to_one(tiny_emotion):
    from monitord.config import GateConfig, WindowConfig
    from monitord.windowing.tiling import ModelInput, WindowCutter

    model = EmotionClassifier("emo", EmotionModelConfig(kind="emotion", model=str(tiny_emotion), label_map={"whisper": "fearful"}))
    assert model.sample_rate == 16000 and model.mapping["calm"] == "neutral" and model.mapping["whisper"] == "fearful"
    cutter = WindowCutter("s", 44100, WindowConfig(), GateConfig(mode="always"), {"emo": ModelInput(16000)})
    windows = [cutter.cut(tone(300, 2.0, 44100), 0, 0, 0), cutter.cut(noise(2.0, 44100, -20), 0, 0, 0)]
    scored = model.score(windows)
    for s in scored:
        assert list(s.probabilities) == list(EMOTIONS)
        assert abs(sum(s.probabilities.values()) - 1) < 1e-5
        assert s.probabilities["unknown"] == 0.0  # no checkpoint label maps there
        assert s.embedding.shape == (32,)
    alone = model.score(windows[:1])[0]
    assert all(abs(alone.probabilities[e] - scored[0].probabilities[e]) < 1e-5 for e in EMOTIONS)


def test_wavlm_checkpoints_load_too(tmp_path):
    from tests.tiny_models import build_emotion

    folder = build_emotion(tmp_path / "wavlm", kind="wavlm")
    model = EmotionClassifier("emo", EmotionModelConfig(kind="emotion", model=str(folder)))
    assert model.architecture == "WavLMForSequenceClassification"  # model.model is None where another engine runs it


def test_label_map_targets_and_rule_labels_are_validated(tmp_path):
    text = """
sources: [{id: a, device: default}]
models:
  emo: {kind: emotion, model: some/checkpoint, label_map: {ang: angery}}
rules:
  - {id: r, model: emo, label: joyful, threshold: 0.5}
"""
    found = config_problems(text, tmp_path)
    assert any(p.startswith("models.emo.label_map.ang: 'angery' is not one of the emotions") for p in found), found
    assert any(p.startswith("rules.0.label: 'joyful' is not a label of model 'emo'") for p in found), found


def test_two_models_with_their_own_gates_see_different_windows(tiny_clap, tiny_emotion, tmp_path):
    """CLAP (energy gate) hears the tone burst and the speech; emotion (silero speech gate) only the speech."""
    from monitord.tools.classify import classify_file
    from monitord.inference.build import load_models
    from monitord.audio import resample

    need(shutil.which("espeak-ng") is not None, "espeak-ng is not installed")
    subprocess.run(["espeak-ng", "-w", str(tmp_path / "s.wav"), "Well played, that was an incredible comeback in the final round."],
                   check=True, timeout=30)
    import soundfile as sf

    speech, rate = sf.read(str(tmp_path / "s.wav"), dtype="float32")
    speech = resample(speech, rate, 16000)
    audio = np.concatenate([silence(2.0, 16000), tone(1000, 2.0, 16000, -12), silence(3.0, 16000), speech, silence(2.0, 16000)])
    write_wav(tmp_path / "mix.wav", audio, 16000)
    speech_at = (7.0, 7.0 + len(speech) / 16000)
    config = parse_config(f"""
sources: [{{id: a, device: default}}]
gate: {{mode: energy, threshold_dbfs: -45}}
models:
  clap: {{kind: clap, model: {tiny_clap}, labels: [tone, noise, speech, music]}}
  emo: {{kind: emotion, model: {tiny_emotion}, gate: {{mode: speech, vad: silero, threshold_dbfs: -50}}}}
""", tmp_path)
    rows = list(classify_file(tmp_path / "mix.wav", config, load_models(config)))
    clap_rows = [r for r in rows if "clap" in r.scores]
    emo_rows = [r for r in rows if "emo" in r.scores]
    tone_windows = [r for r in rows if r.window.stream_start < 4.0 and r.window.stream_end > 2.0]
    assert all("clap" in r.scores for r in tone_windows)  # CLAP saw the tone burst
    assert not any("emo" in r.scores for r in tone_windows)  # the speech gate kept it from the emotion model
    assert emo_rows and len(emo_rows) < len(clap_rows)
    for r in emo_rows:  # the emotion model only saw windows holding speech
        assert r.window.stream_start < speech_at[1] and r.window.stream_end > speech_at[0]
        assert r.window.facts.speech_ratio >= 0.3
