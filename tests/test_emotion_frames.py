"""Frame-level emotion: frame logits from the window's own forward pass, the refusal of heads that
are not linear after the encoder, frames CSV / summary / plots from `monitord classify --timeline`
on real speech, and frame-rule config checks."""

from __future__ import annotations

import csv
import json
import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
import soundfile as sf

from monitord.config import EMOTIONS, EmotionModelConfig, GateConfig, WindowConfig
from monitord.inference.models.frame_head import FrameHeadError, FrameTap
from monitord.inference.models.base import ModelUnavailable
from monitord.inference.models.emotion import EmotionClassifier
from monitord.windowing.tiling import ModelInput, WindowCutter
from tests.conftest import AUDIO, REPO, config_problems, monitord_cmd, noise, shared_path, silence, tone, write_wav

PNG = b"\x89PNG\r\n\x1a\n"
ANGRY = AUDIO / "speech_angry" / "03-01-05-02-01-01-10.wav"
SAD = AUDIO / "speech_sad" / "03-01-04-02-01-01-10.wav"


def frame_model(folder: Path, **kwargs) -> EmotionClassifier:
    return EmotionClassifier("emo", EmotionModelConfig(kind="emotion", model=str(folder), granularity="frame", dtype="float32"),
                             **kwargs)


def check_invariant(model: EmotionClassifier, windows: list) -> None:
    """softmax(mean of frame logits) is the window's probabilities, over the checkpoint's labels and
    over the nine emotions; each window's frames are the softmax of its frame logits, mapped."""
    import torch

    tap = FrameTap(model.model)  # a second tap, beside the model's own: the raw frame logits
    try:
        scored = model.score(windows)
        frame_logits = tap.logits()
    finally:
        tap.remove()
    audio = np.stack([w.at_rate(16000) for w in windows])
    inputs = model.extractor(list(audio), sampling_rate=16000, return_tensors="pt", return_attention_mask=False)
    with torch.inference_mode():
        window_logits = model.model(inputs["input_values"]).logits.float()
    assert frame_logits.dtype == torch.float32 and frame_logits.shape == (len(windows), 99, len(model.checkpoint_labels))
    from_frames = frame_logits.mean(dim=1).softmax(dim=-1)
    assert float((from_frames - window_logits.softmax(dim=-1)).abs().max()) < 1e-5
    index = [EMOTIONS.index(model.mapping[label]) for label in model.checkpoint_labels]
    onto = np.zeros((len(model.checkpoint_labels), len(EMOTIONS)), dtype=np.float64)
    onto[np.arange(len(index)), index] = 1.0
    for s, window, frames_p, p in zip(scored, windows, frame_logits.softmax(dim=-1).numpy(), from_frames.numpy()):
        window_p = np.array([s.probabilities[e] for e in EMOTIONS])
        assert np.abs(p @ onto - window_p).max() < 1e-5
        assert s.frames.values.dtype == np.float32 and s.frames.values.shape == (99, 9)
        assert np.abs(frames_p @ onto - s.frames.values).max() < 1e-5
        assert s.frames.hop_s == 0.02 and s.frames.start_s == pytest.approx(window.stream_start + 325 / 2 / 16000)


def test_frame_logits_average_to_the_window_logits(tiny_emotion):
    model = frame_model(tiny_emotion)
    cutter = WindowCutter("s", 44100, WindowConfig(), GateConfig(mode="always"), {"emo": ModelInput(16000)})
    sweep = np.concatenate([tone(200 * (k + 1), 0.25, 44100, -20) for k in range(8)])
    windows = [cutter.cut(tone(300, 2.0, 44100), 0, 0, 0), cutter.cut(noise(2.0, 44100, -20), 22050, 0, 0),
               cutter.cut(sweep, 44100, 0, 0)]
    check_invariant(model, windows)


def test_frame_logits_average_to_the_window_logits_on_real_speech(tiny_emotion):
    samples, rate = sf.read(str(shared_path(ANGRY)), dtype="float32")
    cutter = WindowCutter("s", rate, WindowConfig(), GateConfig(mode="always"), {"emo": ModelInput(16000)})
    length = 2 * rate
    windows = [cutter.cut(samples[s : s + length], s, 0, 0) for s in (0, rate // 2, rate, len(samples) - length)]
    check_invariant(frame_model(tiny_emotion), windows)


def _attention_pooled_class():
    import torch
    from transformers import Wav2Vec2ForSequenceClassification
    from transformers.modeling_outputs import SequenceClassifierOutput

    class AttentionPooledEmotion(Wav2Vec2ForSequenceClassification):
        """Softmax attention over frames instead of the mean: frame logits do not average to the window's."""

        def __init__(self, config):
            super().__init__(config)
            self.attention = torch.nn.Linear(config.classifier_proj_size, 1)

        def forward(self, input_values, attention_mask=None, labels=None, **kwargs):
            out = self.wav2vec2(input_values, **kwargs)
            h = self.projector(out.last_hidden_state)
            weights = self.attention(h).softmax(dim=1)
            return SequenceClassifierOutput(logits=self.classifier((weights * h).sum(dim=1)), hidden_states=out.hidden_states)

    return AttentionPooledEmotion


def _altered(folder: Path, how: str):
    import torch
    from transformers import AutoModelForAudioClassification
    from transformers.modeling_outputs import SequenceClassifierOutput

    if how == "attention pooling":
        return _attention_pooled_class().from_pretrained(str(folder)).eval()
    model = AutoModelForAudioClassification.from_pretrained(str(folder)).eval()
    if how == "tanh after pooling":
        model.classifier = torch.nn.Sequential(torch.nn.Tanh(), model.classifier)
    elif how == "extra module":
        model.add_module("pool_attention", torch.nn.Linear(model.config.classifier_proj_size, 1))
    elif how == "max pooling in forward":
        def forward(input_values, **kwargs):  # same modules, other pooling: only the probe can tell
            out = model.wav2vec2(input_values, output_hidden_states=kwargs.get("output_hidden_states"))
            pooled = model.projector(out.last_hidden_state).max(dim=1).values
            return SequenceClassifierOutput(logits=model.classifier(pooled), hidden_states=out.hidden_states)

        model.forward = forward
    return model


@pytest.mark.parametrize("how, message", [
    ("tanh after pooling", r"its classifier is Sequential\(Tanh, Linear\), not a single Linear layer"),
    ("attention pooling", r"its head class .*AttentionPooledEmotion is not one known to be"),
    ("extra module", r"modules beside the encoder, projector and classifier: pool_attention"),
    ("max pooling in forward", r"the mean of its frame logits differs from its window logits by"),
])
def test_a_head_that_is_not_linear_after_the_encoder_is_refused_for_frames(tiny_emotion, how, message):
    altered = _altered(tiny_emotion, how)
    with pytest.raises(FrameHeadError, match=r"^model 'emo': granularity: frame needs a head that is linear") as info:
        frame_model(tiny_emotion, model=altered)
    assert re.search(message, str(info.value)), str(info.value)
    assert isinstance(info.value, ModelUnavailable)  # the CLI and daemon report it and exit 2
    assert not altered.projector._forward_hooks  # no tap left behind
    if how == "tanh after pooling":  # the same model still scores windows
        window = EmotionClassifier("emo", EmotionModelConfig(kind="emotion", model=str(tiny_emotion), dtype="float32"),
                                   model=altered)
        assert window.frame_geometry is None


def test_frame_rules_need_a_frame_level_model(tmp_path):
    text = """
sources: [{id: a, device: default}]
models:
  clap: {kind: clap, model: some/clap, labels: [speech, music]}
  emo: {kind: emotion, model: some/checkpoint}
  frames: {kind: emotion, model: some/checkpoint, granularity: frame}
rules:
  - {id: a, model: emo, label: angry, threshold: 0.7, hold_s: 3}
  - {id: b, model: clap, label: speech, threshold: 0.7, smooth_s: 0.5}
  - {id: c, model: frames, label: angry, threshold: 0.7, hold_s: 3, min_windows: 2, of_windows: 3}
  - {id: ok, model: frames, label: angry, threshold: 0.7, release: 0.5, smooth_s: 0.2, hold_s: 3}
"""
    found = config_problems(text, tmp_path)
    assert any(p.startswith("rules.0.hold_s: needs a frame-level model: model 'emo' scores whole windows "
                            "(set models.emo.granularity: frame)") for p in found), found
    assert any(p.startswith("rules.1.smooth_s: needs a frame-level model: model 'clap' is a clap model") for p in found), found
    assert any(p.startswith("rules.2.min_windows: a frame rule holds with hold_s") for p in found), found
    assert not any(p.startswith("rules.3") for p in found), found
    negative = text.replace("hold_s: 3}", "hold_s: -1}", 1)
    assert config_problems(negative, tmp_path)[0].startswith("rules.0.hold_s: Input should be greater than or equal to 0")
    assert config_problems("sources: [{id: a, device: default}]\nmodels: {e: {kind: emotion, model: x, granularity: frames}}",
                           tmp_path)[0].startswith("models.e.granularity:")


# --- monitord classify --timeline on real speech ------------------------------------------------


@pytest.fixture(scope="module")
def classified(tiny_emotion, tmp_path_factory):
    """Three recordings through `monitord classify --timeline --json` with a frame-level and a
    window-level emotion model behind a speech gate: an angry clip, a sad one, and the angry clip
    twice with 5 s of silence between (the gate rejects the silence: a gap)."""
    angry, sad = shared_path(ANGRY), shared_path(SAD)
    tmp = tmp_path_factory.mktemp("classified")
    speech, rate = sf.read(str(angry), dtype="float32")
    write_wav(tmp / "twice.wav", np.concatenate([speech, silence(5.0, rate), speech]), rate)
    config = tmp / "c.yaml"
    config.write_text(f"""
sources: [{{id: a, device: default}}]
models:
  emo: {{kind: emotion, model: {tiny_emotion}, granularity: frame, dtype: float32, gate: {{mode: speech, vad: silero}}}}
  emo_w: {{kind: emotion, model: {tiny_emotion}, dtype: float32, gate: {{mode: speech, vad: silero}}}}
""")
    files = [angry, sad, tmp / "twice.wav"]
    out = subprocess.run(monitord_cmd("classify", *map(str, files), "-c", str(config), "--timeline", str(tmp / "tl"), "--json",
                                      "--peak-threshold", "0.2", "--peak-min-s", "0.3"),
                         cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    return files, tmp / "tl", json.loads(out.stdout)


def _rows(path: Path) -> list[dict[str, str]]:
    with path.open() as f:
        return list(csv.DictReader(f))


def _scored_spans(folder: Path, model: str) -> list[tuple[float, float]]:
    """Stretches covered by the model's scored windows (overlapping windows joined)."""
    spans: list[list[float]] = []
    for row in _rows(folder / f"{model}.csv"):
        if row["scored"] == "1":
            a, b = float(row["stream_start"]), float(row["stream_end"])
            if spans and a <= spans[-1][1]:
                spans[-1][1] = max(spans[-1][1], b)
            else:
                spans.append([a, b])
    return [tuple(s) for s in spans]


def test_a_frames_csv_covers_the_scored_speech_at_20_ms(classified):
    files, out, _ = classified
    for path in files:
        folder = out / path.stem
        rows = _rows(folder / "emo.frames.csv")
        assert list(rows[0]) == ["time", *EMOTIONS]
        times = np.array([float(r["time"]) for r in rows])
        values = np.array([[float(r[e]) for e in EMOTIONS] for r in rows])
        assert np.abs(values.sum(axis=1) - 1).max() < 1e-5  # nine columns, a distribution per frame
        spans = _scored_spans(folder, "emo")
        assert spans, "the speech gate passed no window"
        for a, b in spans:  # every stretch the model scored is covered once, at 20 ms
            inside = times[(times >= a) & (times < b)]
            assert abs(len(inside) - (b - a) / 0.02) <= 2, (path.name, a, b, len(inside))
            steps = np.diff(inside)
            off = np.abs(steps - 0.02) > 1e-4  # only where the file's last window, aligned to its end, meets the grid
            assert off.sum() <= 1 and np.all((steps > 0) & (steps < 0.04)), steps[off]
        assert all(any(a <= t < b for a, b in spans) for t in times)  # no frame where nothing was scored
        assert not (folder / "emo_w.frames.csv").exists()  # a window-level model has no frames
        result = json.loads((folder / "result.json").read_text())
        assert list(result["frames"]) == ["emo"] and result["frames"]["emo"]["labels"] == list(EMOTIONS)
        assert np.allclose(result["frames"]["emo"]["times"], times) and np.allclose(result["frames"]["emo"]["values"], values, atol=1e-6)
        png = (folder / "emo.heatmap.png").read_bytes()
        assert png[:8] == PNG
        import matplotlib.image

        assert matplotlib.image.imread(str(folder / "emo.heatmap.png")).shape[:2] == (320, 1200)
    twice = _scored_spans(out / "twice", "emo")
    assert len(twice) == 2 and twice[1][0] - twice[0][1] > 1.0  # the silence between is a gap in the curve


def test_the_summary_compares_the_recordings(classified):
    files, out, printed = classified
    rows = _rows(out / "summary.csv")
    assert [(r["file"], r["model"], r["granularity"]) for r in rows] == [
        (p.name, m, g) for p in files for m, g in (("emo", "frame"), ("emo_w", "window"))]
    assert [(r["file"], r["model"]) for r in rows] == [(r["file"], r["model"]) for r in printed["summary"]]  # --json: the same
    for row, nested in zip(rows, printed["summary"]):
        folder = out / Path(row["file"]).stem
        windows = _rows(folder / f"{row['model']}.csv")
        assert int(row["windows"]) == len(windows)
        assert float(row["speech_share"]) == pytest.approx(sum(w["scored"] == "1" for w in windows) / len(windows), abs=1e-4)
        assert float(row["duration_s"]) == pytest.approx(sf.info(str(next(p for p in files if p.name == row["file"]))).duration, abs=1e-3)
        if row["granularity"] == "frame":
            curve = _rows(folder / "emo.frames.csv")
            times = np.array([float(r["time"]) for r in curve])
            values = np.array([[float(r[e]) for e in EMOTIONS] for r in curve])
            hop = 0.02
        else:
            scored = [w for w in windows if w["scored"] == "1"]
            times = np.array([(float(w["stream_start"]) + float(w["stream_end"])) / 2 for w in scored])
            values = np.array([[float(w[e]) for e in EMOTIONS] for w in scored])
            hop = 0.5
        assert int(row["points"]) == len(values)
        top = values.argmax(axis=1)
        for j, e in enumerate(EMOTIONS):
            assert float(row[f"mean_{e}"]) == pytest.approx(values[:, j].mean(), abs=2e-6)
            assert float(row[f"dominant_share_{e}"]) == pytest.approx((top == j).mean(), abs=1e-4)
            assert float(row[f"volatility_{e}"]) == pytest.approx(values[:, j].std(), abs=2e-6)
            assert int(row[f"peaks_{e}"]) == _peaks(times, values[:, j], hop, 0.2, 0.3)
            assert nested["emotions"][e]["mean"] == pytest.approx(float(row[f"mean_{e}"]))
        assert float(row["neutral_share"]) == float(row["dominant_share_neutral"])
        mean = values.mean(axis=0) / values.mean(axis=0).sum()
        assert float(row["entropy_bits"]) == pytest.approx(-(mean[mean > 0] * np.log2(mean[mean > 0])).sum(), abs=1e-3)
        moments = [(float(row[f"moment{k}_time"]), row[f"moment{k}_emotion"], float(row[f"moment{k}_score"]))
                   for k in (1, 2, 3) if row[f"moment{k}_time"]]  # fewer where the curve is too short for three 1 s apart
        assert moments and len(moments) == len(nested["key_moments"])
        if row["granularity"] == "frame":
            assert len(moments) == 3
        assert [m[2] for m in moments] == sorted((m[2] for m in moments), reverse=True)
        assert all(e not in ("neutral", "other", "unknown") for _, e, _ in moments)
        assert all(abs(a[0] - b[0]) >= 1.0 for i, a in enumerate(moments) for b in moments[i + 1 :])
        best = max(values[:, EMOTIONS.index(e)].max() for e in EMOTIONS if e not in ("neutral", "other", "unknown"))
        assert moments[0][2] == pytest.approx(best, abs=1e-6)
    assert sum(int(r["peaks_neutral"]) for r in rows if r["file"] == "twice.wav" and r["model"] == "emo") >= 2  # one per stretch
    png = out / "summary.png"
    assert png.read_bytes()[:8] == PNG
    import matplotlib.image

    assert matplotlib.image.imread(str(png)).shape[:2] == (int(round(100 * (1.0 + 2.2 * len(rows)))), 1200)


def _peaks(times: np.ndarray, values: np.ndarray, hop: float, threshold: float, min_s: float) -> int:
    """Stretches at or above the threshold lasting min_s (a point counts one hop), split at gaps."""
    count, run, last = 0, 0, None
    for t, v in zip(times, values):
        if last is not None and t - last > 2.5 * hop:
            count += run * hop >= min_s - 1e-9
            run = 0
        if v >= threshold:
            run += 1
        else:
            count += run * hop >= min_s - 1e-9
            run = 0
        last = t
    return count + (run * hop >= min_s - 1e-9)


def test_a_stream_publishes_new_frames_with_its_scores_and_a_hold_rule_fires_on_them(tiny_emotion, tmp_path):
    """The daemon: score events carry the frames that became final (20 ms apart, nine columns
    summing to 1), and a frame rule with hold_s onsets once frames held that long, offsets at the end."""
    import threading

    from monitord.config import load_config
    from monitord.daemon import Daemon
    from monitord.inference.build import load_models
    from tests.conftest import free_port, noise, write_wav
    from tests.test_e2e import read_log

    write_wav(tmp_path / "in.wav", noise(6.0, 16000, -20), 16000)
    (tmp_path / "c.yaml").write_text(f"""
sources: [{{id: cast, file: in.wav}}]
gate: {{mode: always}}
models: {{emo: {{kind: emotion, model: {tiny_emotion}, granularity: frame, dtype: float32}}}}
rules: [{{id: held, model: emo, label: other, threshold: 0.0, hold_s: 0.5}}]
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl, scores: true}}
""")
    config = load_config(tmp_path / "c.yaml")
    daemon = Daemon(config, load_models(config))
    received = []

    class Sink:
        name = "test"

        def start(self):
            pass

        def deliver(self, event):
            received.append(event)

        def stop(self, timeout):
            pass

    daemon.sinks.append(Sink())
    daemon.start()
    daemon.wait(threading.Event(), until_done=True)
    daemon.stop()
    frames = [e.extra["frames"] for e in received if e.kind == "scores" and "frames" in e.extra]
    times = [t for f in frames for t in f["times"]]
    assert frames and times == sorted(times) and len(set(times)) == len(times)  # each frame once, in order
    steps = np.diff(times)
    assert np.median(steps) == pytest.approx(0.02, abs=1e-3)
    assert all(abs(sum(row) - 1.0) < 1e-3 for f in frames for row in f["values"])
    alerts = [e for e in read_log(tmp_path / "events.jsonl") if e["kind"] == "alert"]
    assert [e["phase"] for e in alerts] == ["onset", "offset"], alerts
    onset = alerts[0]
    assert onset["frame_rule"] and onset["stream_end"] - onset["stream_start"] == pytest.approx(0.5 - 0.02, abs=0.011)
