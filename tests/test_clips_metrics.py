"""Alert clips with real pre-roll from the ring buffer, and a Prometheus scrape."""

from __future__ import annotations

import threading
import urllib.request

import numpy as np
import soundfile as sf

from monitord.config import load_config
from monitord.daemon import Daemon
from monitord.inference.build import load_models
from tests.conftest import dominant_frequency, free_port, noise, rms_dbfs, silence, tone, write_wav
from tests.test_e2e import read_log

RATE = 48000


def noise_config(tmp_path, tiny_clap, audio, extra: str):
    """A file source of ``audio``, the tiny CLAP and a 'noise' rule, plus ``extra`` YAML; the loaded config."""
    write_wav(tmp_path / "in.wav", audio, RATE)
    (tmp_path / "c.yaml").write_text(f"""
sources: [{{id: rec, file: in.wav}}]
gate: {{mode: energy, threshold_dbfs: -45}}
models: {{clap: {{kind: clap, model: {tiny_clap}, labels: [tone, noise, speech, music], dtype: float32}}}}
rules:
  - {{id: noise, model: clap, label: noise, threshold: 0.6, release: 0.4}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
{extra}""")
    return load_config(tmp_path / "c.yaml")


def run(tmp_path, tiny_clap, audio, extra: str, scrape: str | None = None):
    config = noise_config(tmp_path, tiny_clap, audio, extra)
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


def test_a_clip_that_cannot_be_written_is_a_status_and_the_output_stage_lives_on(tiny_clap, tmp_path):
    """Disk full, permissions, a folder gone: a clip_error status, and every later event still goes out."""
    import shutil

    from monitord.types import StageState

    audio = np.concatenate([silence(1.0, RATE), noise(2.0, RATE, -20), silence(3.0, RATE), noise(2.0, RATE, -20), silence(3.0, RATE)])
    config = noise_config(tmp_path, tiny_clap, audio, "clips: {enabled: true, dir: clips, pre_s: 0.5, post_s: 0.5}\n")
    daemon = Daemon(config, load_models(config))
    daemon.start()
    shutil.rmtree(tmp_path / "clips")
    (tmp_path / "clips").write_text("not a folder any more")  # every clip write now fails with ENOTDIR
    daemon.wait(threading.Event(), until_done=True)
    assert daemon.output.state is StageState.RUNNING and daemon.output.restarts == 0
    daemon.stop()
    events = read_log(tmp_path / "events.jsonl")
    onsets = [e for e in events if e["kind"] == "alert" and e["phase"] == "onset"]
    errors = [e for e in events if e.get("status") == "clip_error"]
    assert len(onsets) == 2 and len(errors) == 2 and {e["onset_seq"] for e in errors} == {e["seq"] for e in onsets}
    assert all("not written" in e["detail"] for e in errors)
    assert [e["phase"] for e in events if e["kind"] == "alert"] == ["onset", "offset", "onset", "offset"]


def test_the_ring_holds_the_pre_roll_through_the_queues_worst_lag():
    from monitord.config import ClipsConfig, Config, PipelineConfig, SourceConfig, WindowConfig
    from monitord.daemon import ring_seconds

    base = dict(sources=(SourceConfig(id="a", device="default"),), models={"c": {"kind": "clap", "labels": ["a", "b"]}},
                window=WindowConfig(seconds=2.0, hop_s=0.5), pipeline=PipelineConfig(queue_max_windows=64, ring_seconds=10))
    assert ring_seconds(Config(**base)) == 10  # no clips: the configured ring
    with_clips = Config(**base, clips=ClipsConfig(enabled=True, pre_s=2.0, post_s=2.0))
    # 64 queued windows of one source at 0.5 s hop are 32 s behind: the pre-roll must still be there then
    assert ring_seconds(with_clips) >= 2.0 + 64 * 0.5 + 2.0 + 2.0


def test_a_clip_whose_pre_roll_the_ring_no_longer_holds_is_cut_and_says_so(tmp_path):
    from monitord.config import ClipsConfig
    from monitord.output.clips import ClipWriter
    from monitord.sources.ring import RingBuffer

    writer = ClipWriter(ClipsConfig(enabled=True, dir=str(tmp_path / "clips"), pre_s=3.0, post_s=0.5))
    writer.open()
    ring = RingBuffer(4 * RATE, RATE)
    ring.write(tone(440, 3.0, RATE, -20))
    writer.request("rec", ring, 2 * RATE, 3 * RATE, writer.path_for("rec", "r", "2026-11-29T10:00:00.000Z"), 7)
    ring.write(tone(440, 2.0, RATE, -20))  # the ring (4 s) now starts at 1.0 s: the pre-roll wanted from 0 is gone
    result, = writer.poll()
    assert result.path is not None and "pre-roll cut by" in result.detail
    clip, rate = sf.read(str(result.path))
    assert rate == RATE and len(clip) == round((3.5 - 1.25) * RATE)  # from what the ring holds (less a margin) to the post-roll
