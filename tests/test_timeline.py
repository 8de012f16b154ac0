"""classify --timeline on a spoken recording: files written, CSV and JSON agree, a real PNG."""

from __future__ import annotations

import csv
import json
import shutil
import subprocess

import numpy as np
import soundfile as sf

from tests.conftest import REPO, monitord_cmd, need, silence, tone, write_wav


def test_timeline_files_agree_and_cover_the_recording(tiny_clap, tiny_emotion, tmp_path):
    need(shutil.which("espeak-ng") is not None, "espeak-ng is not installed")
    subprocess.run(["espeak-ng", "-w", str(tmp_path / "speech.wav"), "What a round. I cannot believe we lost that fight, again."],
                   check=True, timeout=30)
    speech, rate = sf.read(str(tmp_path / "speech.wav"), dtype="float32")
    audio = np.concatenate([tone(800, 1.5, rate, -15), silence(1.0, rate), speech, silence(0.7, rate)])
    write_wav(tmp_path / "cast.wav", audio, rate)
    duration = len(audio) / rate
    config = tmp_path / "c.yaml"
    config.write_text(f"""
sources: [{{id: a, device: default}}]
gate: {{mode: always}}
models:
  clap: {{kind: clap, model: {tiny_clap}, labels: [tone, noise, speech, music]}}
  emo: {{kind: emotion, model: {tiny_emotion}}}
""")
    out = subprocess.run(monitord_cmd("classify", str(tmp_path / "cast.wav"), "-c", str(config), "--timeline", str(tmp_path / "tl"),
                                      "--embeddings", "--quiet"), cwd=REPO, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    folder = tmp_path / "tl" / "cast"
    result = json.loads((folder / "result.json").read_text())
    assert result["models"] == ["clap", "emo"] and result["file"].endswith("cast.wav")
    starts = [w["stream_start"] for w in result["windows"]]
    assert starts[:-1] == [round(0.5 * i, 6) for i in range(len(starts) - 1)]  # once per hop...
    assert abs(result["windows"][-1]["stream_end"] - duration) < 1e-3  # ...and the end of the file is covered
    for model in ("clap", "emo"):
        with (folder / f"{model}.csv").open() as f:
            rows = list(csv.DictReader(f))
        assert len(rows) == len(result["windows"])
        for row, window in zip(rows, result["windows"]):
            assert float(row["stream_start"]) == window["stream_start"]
            for label, p in window["scores"][model].items():
                assert abs(float(row[label]) - p) < 1e-6
        summary = result["summary"][model]
        assert summary["windows"] == len(rows) and summary["dominant"]["label"] in rows[0]
        assert summary["segments"] and summary["segments"][0]["start"] == 0.0
        png = folder / f"{model}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        import matplotlib.image

        assert matplotlib.image.imread(str(png)).shape[:2] == (450, 1200)
        embeddings = np.load(folder / f"{model}.embeddings.npy")
        assert embeddings.shape[0] == len(rows) and np.isfinite(embeddings).all()
    assert {w["stream_start"] for w in result["windows"]} == {float(r["stream_start"]) for r in csv.DictReader((folder / "clap.windows.csv").open())}
