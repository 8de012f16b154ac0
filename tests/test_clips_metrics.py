"""Alert clips with real pre-roll from the ring buffer, and a Prometheus scrape."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import soundfile as sf

from monitord.config import load_config
from monitord.daemon import Daemon, load_models
from tests.conftest import dominant_frequency, free_port, noise, rms_dbfs, silence, tone, write_wav
from tests.test_e2e import read_log

RATE = 48000


def run(tmp_path, tiny_clap, audio, extra: str, scrape: str | None = None):
    write_wav(tmp_path / "in.wav", audio, RATE)
    (tmp_path / "c.yaml").write_text(f"""
sources: [{{id: rec, file: in.wav}}]
gate: {{mode: energy, threshold_dbfs: -45}}
models: {{clap: {{kind: clap, model: {tiny_clap}, labels: [tone, noise, speech, music], dtype: float32}}}}
rules:
  - {{id: noise, model: clap, label: noise, threshold: 0.6, release: 0.4}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
{extra}""")
    config = load_config(tmp_path / "c.yaml")
    daemon = Daemon(config, load_models(config))
    daemon.start()
    daemon.wait(threading.Event(), until_done=True)
    text = urllib.request.urlopen(scrape, timeout=10).read().decode() if scrape else None
    daemon.stop()
    return read_log(tmp_path / "events.jsonl"), text


def test_a_clip_holds_the_real_pre_roll_and_is_owner_only(tiny_clap, tmp_path):
    audio = np.concatenate([silence(1.0, RATE), tone(700, 3.5, RATE, -20), noise(2.0, RATE, -20), silence(3.0, RATE)])
    events, _ = run(tmp_path, tiny_clap, audio, "clips: {enabled: true, dir: clips, pre_s: 1.0, post_s: 1.0, format: flac}\n"
                    "pipeline: {ring_seconds: 10}")
    onset = next(e for e in events if e["kind"] == "alert" and e["phase"] == "onset")
    written = next(e for e in events if e["kind"] == "status" and e["status"] == "clip")
    assert written["onset_seq"] == onset["seq"] and written["clip"] == onset["clip"]
    path = tmp_path / "clips" / onset["clip"].rsplit("/", 1)[1]
    assert path.exists() and oct(path.stat().st_mode & 0o777) == "0o600"
    assert oct((tmp_path / "clips").stat().st_mode & 0o777) == "0o700"
    clip, rate = sf.read(str(path), dtype="float32")
    begin = round((onset["stream_start"] - 1.0) * RATE)
    end = round((onset["stream_end"] + 1.0) * RATE)
    assert rate == RATE and len(clip) == end - begin
    np.testing.assert_allclose(clip, audio[begin:end], atol=1.5 / 32768)  # the very samples, 16-bit
    pre_roll = clip[: RATE]  # the second before the alerting window
    assert onset["stream_start"] - 1.0 >= 1.0 and onset["stream_start"] <= 4.5  # the pre-roll falls on the tone
    assert abs(dominant_frequency(pre_roll, RATE) - 700) < 2 and abs(rms_dbfs(pre_roll) + 20) < 1


def test_clip_retention_keeps_the_newest_within_the_size_cap(tmp_path):
    import os
    import time

    from monitord.output.clips import ClipWriter
    from monitord.config import ClipsConfig

    writer = ClipWriter(ClipsConfig(enabled=True, dir=str(tmp_path), max_total_mb=0.05, max_age_days=1.0))
    for i in range(6):
        p = tmp_path / f"c{i}.flac"
        p.write_bytes(b"x" * 15000)
        os.utime(p, (time.time() - 100 + i, time.time() - 100 + i))
    old = tmp_path / "ancient.flac"
    old.write_bytes(b"x")
    os.utime(old, (time.time() - 3 * 86400, time.time() - 3 * 86400))
    writer.enforce_retention()
    assert sorted(p.name for p in tmp_path.glob("*.flac")) == ["c3.flac", "c4.flac", "c5.flac"]


def test_metrics_are_scraped_over_http(tiny_clap, tmp_path):
    port = free_port()
    audio = np.concatenate([silence(2.0, RATE), noise(2.0, RATE, -20), silence(3.0, RATE)])
    events, text = run(tmp_path, tiny_clap, audio, f"metrics: {{bind: '127.0.0.1:{port}'}}", scrape=f"http://127.0.0.1:{port}/metrics")
    metrics = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            metrics[name] = float(value)
    cut, passed = metrics['monitord_windows_total{outcome="cut",source="rec"}'], metrics['monitord_windows_total{outcome="passed",source="rec"}']
    assert cut > passed > 0
    assert metrics['monitord_model_windows_total{model="clap",source="rec",verdict="scored"}'] == passed
    assert metrics['monitord_model_windows_total{model="clap",source="rec",verdict="quiet"}'] == cut - passed
    assert metrics['monitord_events_total{phase="onset",rule="noise",source="rec"}'] == 1
    assert metrics['monitord_stage_healthy{stage="inference"}'] == 1 and metrics['monitord_stage_healthy{stage="file-rec"}'] == 1
    assert metrics['monitord_stage_state{stage="file-rec",state="stopped"}'] == 1  # finished: the file has ended
    assert metrics['monitord_model_batch_seconds_count{model="clap"}'] >= 1
    assert metrics['monitord_source_up{source="rec"}'] == 0  # the file has ended
    assert metrics['monitord_last_event_timestamp_seconds{source="rec"}'] > 1e9
    assert -250 < metrics['monitord_input_level_dbfs{source="rec"}'] < 0
    assert "monitord_queue_depth" in metrics and 'monitord_windows_dropped{source="rec"}' not in metrics
