"""The real daemon process: file and null-sink sources, events received over ZeroMQ on loopback."""

from __future__ import annotations

import json
import signal
import subprocess
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import zmq

from monitord.types import SCHEMA
from tests.conftest import REPO, free_port, monitord_cmd, noise, play, silence, tone, write_wav, time_scale
from tests.tiny_models import TRAIN_LABELS

RATE = 44100
EVENT_KEYS = {"schema", "seq", "id", "kind", "source", "rule", "label", "phase", "score", "scores", "model",
              "stream_start", "stream_end", "time", "latency_ms", "host", "clip"}
TONE_AT, TONE_S, NOISE_AT, NOISE_S = 4.0, 1.5, 7.5, 1.5


def write_config(tmp_path: Path, model: Path, source: str, port: int) -> Path:
    path = tmp_path / "monitord.yaml"
    path.write_text(f"""
sources:
  - {source}
gate: {{mode: energy, threshold_dbfs: -45}}
window: {{seconds: 2.0, hop_s: 0.5}}
models:
  clap: {{kind: clap, model: {model}, labels: [{", ".join(TRAIN_LABELS)}], batch_max: 4, batch_wait_ms: 10}}
rules:
  - {{id: tone, model: clap, label: tone, threshold: 0.6, release: 0.4}}
  - {{id: noise, model: clap, label: noise, threshold: 0.6, release: 0.4, min_windows: 2, of_windows: 3}}
publish:
  endpoint: tcp://127.0.0.1:{port}
  event_log: events.jsonl
""")
    return path


class Subscriber:
    """Collects every message on the endpoint in a background thread."""

    def __init__(self, endpoint: str):
        self.messages: list[tuple[bytes, bytes]] = []
        self._ctx = zmq.Context()
        self._socket = self._ctx.socket(zmq.SUB)
        self._socket.setsockopt(zmq.SUBSCRIBE, b"")
        self._socket.connect(endpoint)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._socket.poll(50):
                frames = self._socket.recv_multipart()
                self.messages.append((frames[0], frames[1]))

    @property
    def events(self) -> list[dict]:
        return [json.loads(payload) for _, payload in self.messages]

    def wait_for(self, predicate, timeout: float) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if any(predicate(e) for e in self.events):
                return True
            time.sleep(0.05)
        return False

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._socket.close(0)
        self._ctx.term()


def start_daemon(config: Path, env: dict | None = None) -> subprocess.Popen:
    import os

    return subprocess.Popen(monitord_cmd("run", "-c", str(config)), cwd=REPO, env={**os.environ, **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop_daemon(proc: subprocess.Popen) -> tuple[int, float, str]:
    began = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        _, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
    return proc.returncode, time.monotonic() - began, err


class Run:
    """A daemon process with a subscriber on its endpoint; code, took and err are set once it stopped."""

    def __init__(self, proc: subprocess.Popen, sub: Subscriber):
        self.proc, self.sub = proc, sub
        self.code: int | None = None
        self.took = 0.0
        self.err = ""


@contextmanager
def subscribed_daemon(config: Path, port: int, env: dict | None = None):
    """Subscribe first (so nothing published after the bind is missed), start `monitord run`,
    and on leaving stop it with SIGTERM and close the subscriber."""
    run = Run(None, Subscriber(f"tcp://127.0.0.1:{port}"))
    run.proc = start_daemon(config, env)
    try:
        yield run
    finally:
        run.code, run.took, run.err = stop_daemon(run.proc)
        run.sub.close()


def read_log(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def is_alert(rule: str, phase: str):
    return lambda e: e["kind"] == "alert" and e["rule"] == rule and e["phase"] == phase


def test_file_source_end_to_end(tiny_clap, tmp_path):
    audio = np.concatenate([
        silence(TONE_AT, RATE), tone(1000, TONE_S, RATE, -12), silence(NOISE_AT - TONE_AT - TONE_S, RATE),
        noise(NOISE_S, RATE, -20), silence(3.0, RATE),
    ])
    write_wav(tmp_path / "clip.wav", audio, RATE)
    port = free_port()
    config = write_config(tmp_path, tiny_clap, "{id: rec, file: clip.wav, realtime: true}", port)
    with subscribed_daemon(config, port) as run:
        finished = run.sub.wait_for(is_alert("noise", "offset"), timeout=60)
    sub, code, took, err = run.sub, run.code, run.took, run.err
    assert finished, err[-3000:]
    assert code == 0 and took < 5.0 * time_scale(), (code, took, err[-2000:])
    assert "Traceback" not in err

    logged = read_log(tmp_path / "events.jsonl")
    assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1))
    received = sub.events
    seqs = [e["seq"] for e in received]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs))), seqs  # gapless
    by_seq = {e["seq"]: e for e in logged}
    for topic, payload in sub.messages:
        event = json.loads(payload)
        assert by_seq[event["seq"]] == event
        expected_topic = f"alert.rec.{event['rule']}" if event["kind"] == "alert" else "status.rec"
        assert topic.decode() == expected_topic

    alerts = [e for e in logged if e["kind"] == "alert"]
    for e in alerts:
        assert set(e) >= EVENT_KEYS and e["schema"] == SCHEMA and e["source"] == "rec"
        assert e["model"] == str(tiny_clap) and e["time"].endswith("Z")
    transitions = [(e["rule"], e["phase"]) for e in alerts]
    assert transitions == [("tone", "onset"), ("tone", "offset"), ("noise", "onset"), ("noise", "offset")], transitions
    tone_on, tone_off, noise_on, noise_off = alerts
    # the first window that holds the tone's start raises the alert
    assert tone_on["stream_start"] < TONE_AT < tone_on["stream_end"] <= TONE_AT + 0.5 + 1e-6
    assert tone_on["score"] > 0.6 and max(tone_on["scores"], key=tone_on["scores"].get) == "tone"
    assert tone_off["stream_start"] >= TONE_AT + TONE_S - 2.0 and tone_off["stream_start"] > tone_on["stream_start"]
    # noise needs two of three windows: the second window that holds it
    assert noise_on["stream_start"] < NOISE_AT < noise_on["stream_end"] <= NOISE_AT + 1.0 + 1e-6
    assert noise_off["stream_start"] >= NOISE_AT + NOISE_S - 2.0
    assert all(e["latency_ms"] is not None and e["latency_ms"] >= 0 for e in alerts)


def test_file_source_until_done_and_seq_across_restart(tiny_clap, tmp_path):
    audio = np.concatenate([silence(1.0, RATE), tone(800, 1.0, RATE, -10), silence(1.0, RATE)])
    write_wav(tmp_path / "clip.wav", audio, RATE)
    config = write_config(tmp_path, tiny_clap, "{id: rec, file: clip.wav}", free_port())
    for _ in range(2):
        out = subprocess.run(monitord_cmd("run", "-c", str(config), "--until-done"), cwd=REPO, capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr[-2000:]
    logged = read_log(tmp_path / "events.jsonl")
    assert [e["seq"] for e in logged] == list(range(1, len(logged) + 1))
    onsets = [e for e in logged if e["kind"] == "alert" and e["phase"] == "onset"]
    assert [e["rule"] for e in onsets] == ["tone", "tone"]  # one per run, same stream time
    assert onsets[0]["stream_start"] == onsets[1]["stream_start"]


@pytest.mark.sound
def test_null_sink_device_end_to_end(tiny_clap, tmp_path, sound_server):
    write_wav(tmp_path / "tone.wav", np.concatenate([tone(1000, 1.5, 48000, -12), silence(0.5, 48000)]), 48000)
    port = free_port()
    config = write_config(tmp_path, tiny_clap, "{id: mic, device: default, sample_rate: 48000}", port)
    log = tmp_path / "events.jsonl"
    with subscribed_daemon(config, port, sound_server) as run:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and not (log.exists() and '"status":"up"' in log.read_text()):
            assert run.proc.poll() is None, run.proc.communicate()[1][-3000:]
            time.sleep(0.1)
        time.sleep(1.0)
        played_from = max(e["stream_end"] or 0 for e in read_log(log)) if log.exists() else 0
        assert play(tmp_path / "tone.wav", sound_server).wait(timeout=15) == 0
        got = run.sub.wait_for(is_alert("tone", "onset"), timeout=20)
    sub, code, took, err = run.sub, run.code, run.took, run.err
    assert got, err[-3000:]
    assert code == 0 and took < 5.0 * time_scale() and "Traceback" not in err
    onset = next(e for e in sub.events if is_alert("tone", "onset")(e))
    assert onset["source"] == "mic" and onset["stream_end"] > played_from
    assert 20 * np.log10(10 ** (onset["facts"]["rms_dbfs"] / 20)) > -45


def test_sighup_reloads_rules_without_stopping_capture(tiny_clap, tmp_path):
    beep = np.concatenate([silence(1.0, RATE), tone(1000, 1.0, RATE, -12), silence(2.0, RATE)])
    audio = np.concatenate([beep] * 5)  # a beep every 4 s, 20 s in all
    write_wav(tmp_path / "clip.wav", audio, RATE)
    port = free_port()
    config = write_config(tmp_path, tiny_clap, "{id: rec, file: clip.wav, realtime: true}", port)
    original = config.read_text()
    with subscribed_daemon(config, port) as run:
        assert run.sub.wait_for(is_alert("tone", "onset"), timeout=60)
        config.write_text(original.replace("label: tone, threshold: 0.6", "label: tonne, threshold: 0.6"))
        run.proc.send_signal(signal.SIGHUP)  # invalid: refused, the old rules keep running
        # the refusal before the next change: two signals close together are one reload, of the second file
        assert run.sub.wait_for(lambda e: e.get("status") == "reload_failed", timeout=30), run.sub.events[-5:]
        config.write_text(original.replace("{id: tone,", "{id: beep,"))
        run.proc.send_signal(signal.SIGHUP)
        got_new_rule = run.sub.wait_for(is_alert("beep", "onset"), timeout=30)
    code, err = run.code, run.err
    assert got_new_rule and code == 0, err[-3000:]
    assert "rules.0.label: 'tonne' is not a label" in err and "reload refused" in err
    alerts = [e for e in read_log(tmp_path / "events.jsonl") if e["kind"] == "alert" and e["phase"] == "onset"]
    first_beep = next(e for e in alerts if e["rule"] == "beep")
    last_tone = [e for e in alerts if e["rule"] == "tone"][-1]
    # the stream clock went on: the new rule's first onset is later in the same stream, on a beep
    # (beeps sound from 4k+1 to 4k+2 s)
    assert first_beep["stream_start"] > last_tone["stream_start"]
    assert any(first_beep["stream_start"] < 4 * k + 2 and first_beep["stream_end"] > 4 * k + 1 for k in range(5))


def test_tail_since_fetches_the_backlog_then_follows_live_without_gap_or_duplicate(tiny_clap, tmp_path):
    import os

    beep = np.concatenate([silence(2.5, RATE), tone(1000, 1.0, RATE, -12)])
    write_wav(tmp_path / "clip.wav", np.concatenate([beep] * 9), RATE)  # an onset and an offset every 3.5 s
    config = write_config(tmp_path, tiny_clap, "{id: rec, file: clip.wav, realtime: true}", free_port())
    config.write_text(config.read_text().replace("  event_log: events.jsonl", f"  event_log: events.jsonl\n  replay_endpoint: tcp://127.0.0.1:{free_port()}"))
    log = tmp_path / "events.jsonl"
    proc = start_daemon(config)
    tail = lambda *a: subprocess.run(monitord_cmd("tail", "-c", str(config), "--json", *a), cwd=REPO,  # noqa: E731
                                     capture_output=True, text=True, timeout=90, env=os.environ)
    try:
        first = tail("--count", "2", "--topic", "alert.")  # a subscriber that then goes away
        assert first.returncode == 0, first.stderr
        seen = [json.loads(line) for line in first.stdout.splitlines()]
        last = seen[-1]["seq"]
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and len(read_log(log)) < last + 3:
            time.sleep(0.2)
        backlog = len(read_log(log)) - last
        assert backlog >= 3
        again = tail("--since", str(last), "--count", str(backlog + 2))  # the backlog, then two live events
    finally:
        stop_daemon(proc)
    assert again.returncode == 0, again.stderr
    got = [json.loads(line) for line in again.stdout.splitlines()]
    assert [e["seq"] for e in got] == list(range(last + 1, last + 1 + backlog + 2))
    logged = {e["seq"]: e for e in read_log(log)}
    assert all(logged[e["seq"]] == e for e in got)


def test_the_readme_demo_starts_alerts_only_on_scored_windows_and_ends_each_one(random_clap, tmp_path):
    """threshold 0.0: every scored window reaches it, but a silent (gated-out) window must not
    start an alert, and every onset gets its offset."""
    import threading

    from monitord.config import load_config
    from monitord.daemon import Daemon
    from monitord.inference.build import load_models

    write_wav(tmp_path / "beep.wav", np.concatenate([silence(2.0, 48000), tone(1000, 2.0, 48000, -13), silence(2.0, 48000)]), 48000)
    (tmp_path / "demo.yaml").write_text(f"""
sources: [{{id: demo, file: beep.wav}}]
models:
  clap: {{kind: clap, model: {random_clap}, labels: [tone, noise, speech, music]}}
rules:
  - {{id: any-sound, model: clap, label: tone, threshold: 0.0, release: 0.0}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: demo-events.jsonl}}
""")
    config = load_config(tmp_path / "demo.yaml")
    daemon = Daemon(config, load_models(config))
    daemon.start()
    daemon.wait(threading.Event(), until_done=True)
    daemon.stop()
    alerts = [e for e in read_log(tmp_path / "demo-events.jsonl") if e["kind"] == "alert"]
    assert [e["phase"] for e in alerts] == ["onset", "offset"], alerts
    onset = alerts[0]
    assert onset["scores"] is not None and onset["score"] > 0.0 and onset["facts"]["rms_dbfs"] > -60
    assert onset["stream_end"] > 2.0 and onset["stream_start"] < 4.0  # a window that holds the beep
