"""The CPU edge tier on real sound: YAMNet (real pretrained weights), the silero speech gate, cascades."""

from __future__ import annotations

import sys
import time

import numpy as np
import pytest
import soundfile as sf

from monitord.config import GateConfig, YamnetModelConfig, parse_config
from monitord.inference.models import ModelUnavailable
from monitord.inference.models.yamnet import YamnetClassifier
from monitord.types import Verdict
from monitord.windowing.gate import inspect
from tests.conftest import config_problems, AUDIO, YAMNET, file_windows as _file_windows, free_port, shared_path, silence, tone, write_wav

RAVDESS = sorted(AUDIO.glob("speech_*/*.wav"))
GROUPS = {"cat": ("Cat", "Meow", "Caterwaul", "Purr"), "crowd": ("Crowd", "Cheering", "Applause")}


@pytest.fixture(scope="module")
def yamnet() -> YamnetClassifier:
    return YamnetClassifier("yam", YamnetModelConfig(kind="yamnet", model=str(shared_path(YAMNET)), groups=GROUPS))


def file_windows(path, gate: GateConfig, rates=(16000,)):
    """Every window of a file, through the daemon's own file source, ring buffer and windowing stage."""
    rate, windows, _ = _file_windows(path, gate, rates)
    return rate, windows


def top5(yamnet, path) -> list[set[str]]:
    rate, windows = file_windows(path, GateConfig(mode="always"))
    assert rate == sf.info(str(path)).samplerate
    return [{label for label, _ in s.top(5)} for s in yamnet.score(windows)]


def test_yamnet_tags_real_recordings(yamnet):
    assert any("Cat" in top for top in top5(yamnet, shared_path(AUDIO / "cat" / "esc50_cat_3-95694-A-5.wav")))
    assert any(top & {"Crowd", "Cheering"} for top in top5(yamnet, shared_path(AUDIO / "cheering" / "crowd_cheering.wav")))
    assert RAVDESS, "no RAVDESS clips"
    for clip in RAVDESS:
        assert any("Speech" in top for top in top5(yamnet, clip)), clip.name


def test_silero_gate_passes_speech_and_not_engines_rain_or_trains():
    gate = GateConfig(mode="speech", vad="silero", threshold_dbfs=-60)
    for clip in [shared_path(p) for p in RAVDESS]:
        _, windows = file_windows(clip, gate)
        assert any(w.passed for w in windows), clip.name
    for name in ("engine/car_engine.wav", "rain/rain.wav", "train/train.wav"):
        _, windows = file_windows(shared_path(AUDIO / name), gate)
        assert not any(w.passed for w in windows), name
        assert max(w.facts.rms_dbfs for w in windows) > -60  # loud enough: the VAD is what said no


def test_silero_tells_a_tone_from_speech_where_webrtc_cannot():
    window = tone(440, 2.0, 16000, dbfs=-12)
    assert inspect(window, 16000, GateConfig(mode="speech", vad="webrtc"))[2] is Verdict.PASSED  # webrtcvad: "speech"
    assert inspect(window, 16000, GateConfig(mode="speech", vad="silero"))[2] is Verdict.QUIET


def test_group_and_class_names_are_validated(tmp_path):
    text = """
sources: [{id: a, device: default}]
models:
  yam: {kind: yamnet, model: yamnet.tflite, groups: {glass: [Glass, Shatterr]}}
rules:
  - {id: g, model: yam, label: Glas, threshold: 0.3}
"""
    found = config_problems(text, tmp_path)
    assert any(p.startswith("models.yam.groups.glass.1: 'Shatterr' is not a class of model 'yam'; did you mean 'Shatter'?") for p in found), found
    assert any(p.startswith("rules.0.label: 'Glas' is not a label of model 'yam'; did you mean 'Glass'?") for p in found), found


def test_a_missing_model_file_says_where_to_get_it(tmp_path):
    with pytest.raises(ModelUnavailable, match="official YAMNet distribution") as info:
        YamnetClassifier("yam", YamnetModelConfig(kind="yamnet", model=str(tmp_path / "yamnet.tflite")))
    assert "leave `model:` out" in str(info.value) and info.value.fix and info.value.missing


def test_yamnet_ships_inside_the_package_and_is_the_default(tmp_path):
    import hashlib

    from monitord.inference.build import load_models
    from monitord.inference.models.yamnet import BUILTIN_FILE, BUILTIN_ID

    digest = hashlib.sha256(BUILTIN_FILE.read_bytes()).hexdigest()
    assert digest == "687f226c147a2caab4706fbbab5e9cecb14b9a368264bf61108078b1fddf68f5"
    notice = (BUILTIN_FILE.parent / "NOTICE.md").read_text()
    assert "yamnet.tflite" in notice and "Apache License 2.0" in notice and digest in notice
    for line in ("", "model: builtin, "):
        config = parse_config(f"sources: [{{id: a, device: default}}]\nmodels: {{yam: {{kind: yamnet, {line}groups: {{cat: [Cat]}}}}}}\n",
                              tmp_path)
        assert config.models["yam"].model == "builtin"
        model = load_models(config)["yam"]
        assert model.model_id == BUILTIN_ID and model.labels[-1] == "cat"
    # the real model on a real recording, from the shipped file
    rate, windows = file_windows(shared_path(AUDIO / "cat" / "esc50_cat_3-95694-A-5.wav"), GateConfig(mode="always"))
    assert any("Cat" in {label for label, _ in s.top(5)} for s in model.score(windows))


def test_the_edge_preset_runs_with_nothing_to_download():
    """The preset needs no file outside the package: its models load from the config alone."""
    from monitord.config import load_config
    from monitord.inference.build import load_models
    from tests.conftest import REPO

    config = load_config(REPO / "config" / "home-security-edge.yaml")
    models = load_models(config)
    assert {m.model_id for m in models.values()} == {"yamnet:builtin"}


def test_the_package_data_includes_the_model():
    import tomllib

    from tests.conftest import REPO

    data = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-data"]
    assert "*.tflite" in data["monitord.inference.models"]
    assert "ai-edge-litert" in " ".join(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"])


def mix(seconds_of_silence: float, clip, rate_hint: int = 44100):
    data, rate = sf.read(str(clip), dtype="float32", always_2d=True)
    return np.concatenate([silence(seconds_of_silence, rate), data.mean(axis=1)]), rate


def test_group_rule_fires_over_zeromq_at_the_right_stream_time(tmp_path):
    from tests.test_e2e import is_alert, read_log, subscribed_daemon

    clip = shared_path(AUDIO / "cat" / "esc50_cat_3-95694-A-5.wav")
    audio, rate = mix(5.0, clip)
    audio = np.concatenate([audio, silence(3.0, rate)])
    write_wav(tmp_path / "cat.wav", audio, rate)
    port = free_port()
    config = tmp_path / "edge.yaml"
    config.write_text(f"""
sources: [{{id: porch, file: cat.wav, realtime: true}}]
gate: {{mode: energy, threshold_dbfs: -50}}
models:
  yam: {{kind: yamnet, model: {shared_path(YAMNET)}, groups: {{cat: [Cat, Meow, Caterwaul, Purr]}}}}
rules:
  - {{id: cat, model: yam, label: cat, threshold: 0.3, release: 0.2}}
publish: {{endpoint: "tcp://127.0.0.1:{port}", event_log: events.jsonl}}
""")
    with subscribed_daemon(config, port) as run:
        got = run.sub.wait_for(is_alert("cat", "onset"), timeout=60)
    sub, code, err = run.sub, run.code, run.err
    assert got and code == 0, err[-3000:]
    onset = next(e for e in sub.events if is_alert("cat", "onset")(e))
    clip_start = 5.0 + first_sound(clip)
    assert onset["stream_start"] < clip_start + 1.0 and onset["stream_end"] > clip_start, (onset, clip_start)
    assert onset["label"] == "cat" and onset["score"] >= 0.3 and "cat" in onset["scores"]
    assert onset == next(e for e in read_log(tmp_path / "events.jsonl") if e["seq"] == onset["seq"])


def first_sound(clip) -> float:
    """Seconds into the clip where it first rises above -40 dBFS in a 20 ms frame."""
    data, rate = sf.read(str(clip), dtype="float32", always_2d=True)
    x = data.mean(axis=1)
    frame = rate // 50
    levels = [20 * np.log10(np.sqrt(np.mean(x[i : i + frame] ** 2)) + 1e-12) for i in range(0, len(x) - frame, frame)]
    return next(i for i, level in enumerate(levels) if level > -40) * frame / rate


def real_mix(seconds: float = 60.0, rate: int = 44100) -> np.ndarray:
    """Real clips back to back with 1 s of silence between them, resampled to one rate."""
    from monitord.audio import resample

    parts, total = [], 0.0
    clips = sorted(AUDIO.glob("*/*.wav"))
    for clip in clips * 3:
        data, clip_rate = sf.read(str(clip), dtype="float32", always_2d=True)
        parts += [resample(data.mean(axis=1), clip_rate, rate), silence(1.0, rate)]
        total += len(parts[-2]) / rate + 1.0
        if total >= seconds:
            break
    return np.concatenate(parts)[: int(seconds * rate)]


def test_full_pipeline_on_a_minute_of_real_sound_with_a_cascade(tmp_path, tiny_clap, capsys):
    from monitord.tools.classify import classify_file
    from monitord.inference.build import load_models

    shared_path(AUDIO)
    write_wav(tmp_path / "mix.wav", real_mix(60.0), 44100)
    config = parse_config(f"""
sources: [{{id: mix, file: mix.wav}}]
gate: {{mode: energy, threshold_dbfs: -45}}
models:
  yam: {{kind: yamnet, model: {shared_path(YAMNET)}, groups: {{crowd: [Crowd, Cheering, Applause], animal: [Animal]}}}}
  clap:
    kind: clap
    model: {tiny_clap}
    labels: [tone, noise, speech, music]
    gated_by: {{model: yam, labels: [crowd, animal], threshold: 0.2}}
""", tmp_path)
    models = load_models(config)
    began = time.perf_counter()
    rows = list(classify_file(tmp_path / "mix.wav", config, models))
    elapsed = time.perf_counter() - began
    passed = [r for r in rows if r.passed]
    assert len(rows) == 117 and passed  # 60 s at 0.5 s hop: 2 s windows at 0, 0.5, ..., 58
    assert all("yam" in r.scores for r in passed)
    reached_clap = [r for r in passed if "clap" in r.scores]
    assert 0 < len(reached_clap) < len(passed)  # the cascade let some windows through, not all
    for r in reached_clap:
        assert max(r.scores["yam"]["crowd"], r.scores["yam"]["animal"]) >= 0.2
    with capsys.disabled():
        print(f"\n[edge] 60 s real mix: {len(rows)} windows, {len(passed)} passed the gate, "
              f"{len(reached_clap)} reached CLAP ({len(reached_clap) / len(passed):.0%}); "
              f"{elapsed / len(rows) * 1000:.1f} ms per window all in", file=sys.stderr)
