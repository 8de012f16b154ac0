"""URL sources: ffmpeg decoding a stream served over HTTP on loopback; the server dies and returns."""

from __future__ import annotations

import functools
import http.server
import shutil
import threading
import time

import numpy as np

from monitord.config import EMOTIONS
from tests.conftest import free_port, need, silence, tone, write_wav
from tests.test_faults import status_is, wait_log
from tests.test_e2e import is_alert, start_daemon, stop_daemon, write_config


class Server:
    """A static HTTP server on 127.0.0.1 that can be killed and started again on the same port."""

    def __init__(self, folder, port: int):
        self.folder, self.port = folder, port
        self.httpd = None

    def start(self) -> "Server":
        handler = functools.partial(QuietHandler, directory=str(self.folder))
        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", self.port), handler)
        self.httpd.daemon_threads = True
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return self

    def kill(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args) -> None:
        pass

    def copyfile(self, source, outputfile) -> None:  # trickle the file, like a live stream
        try:
            while chunk := source.read(16384):
                outputfile.write(chunk)
                time.sleep(0.02)
        except (BrokenPipeError, ConnectionResetError):
            pass


def test_a_stream_url_is_decoded_and_reconnected_when_the_server_returns(tiny_clap, tmp_path):
    need(shutil.which("ffmpeg") is not None, "ffmpeg is not installed")
    rate = 44100
    beep = np.concatenate([silence(2.5, rate), tone(1000, 1.0, rate, -12)])
    write_wav(tmp_path / "live.wav", np.concatenate([beep] * 4), rate)
    port = free_port()
    server = Server(tmp_path, port).start()
    config = write_config(tmp_path, tiny_clap, f"{{id: cast, url: 'http://127.0.0.1:{port}/live.wav', realtime: true, backoff_max_s: 1.0}}", free_port())
    log = tmp_path / "events.jsonl"
    proc = start_daemon(config)
    try:
        up = wait_log(log, status_is("up"), 60, proc)
        first = wait_log(log, is_alert("tone", "onset"), 30, proc)
        assert up and first, "no audio from the stream"
        server.kill()
        down = wait_log(log, status_is("down", first["seq"]), 40, proc)
        assert down, "the lost stream was not noticed"
        time.sleep(2.0)  # a few failed reconnects
        server.start()
        again = wait_log(log, status_is("up", down["seq"]), 30, proc)
        later = wait_log(log, lambda e: is_alert("tone", "onset")(e) and again is not None and e["seq"] > again["seq"], 30, proc)
    finally:
        code, _, err = stop_daemon(proc)
        server.kill()
    assert again and later, err[-3000:]
    assert code == 0
    assert later["stream_start"] > first["stream_start"]


def test_the_esports_preset_runs_against_a_local_stream(tiny_clap, tiny_emotion, tmp_path):
    """config/esports.yaml as shipped, with local models and a local stream: CLAP tags every sounding
    window, the emotion model only the spoken ones, both on the live scores topics."""
    import json
    import subprocess

    import soundfile as sf
    import yaml

    from tests.conftest import REPO
    from tests.test_e2e import subscribed_daemon
    from monitord.audio import resample

    need(shutil.which("ffmpeg") is not None and shutil.which("espeak-ng") is not None, "ffmpeg and espeak-ng are needed")
    subprocess.run(["espeak-ng", "-w", str(tmp_path / "cast.wav"), "And they take the final fight! What a comeback from the underdogs."],
                   check=True, timeout=30)
    speech, rate = sf.read(str(tmp_path / "cast.wav"), dtype="float32")
    speech = resample(speech, rate, 48000)
    crowd = tone(600, 2.0, 48000, -15)  # a non-speech sound the speech gate must keep from the emotion model
    write_wav(tmp_path / "match.wav", np.concatenate([silence(1.0, 48000), crowd, silence(2.5, 48000), speech, silence(3.0, 48000)]), 48000)
    port = free_port()
    server = Server(tmp_path, port).start()
    preset = yaml.safe_load((REPO / "config" / "esports.yaml").read_text())
    preset["sources"][0].update(url=f"http://127.0.0.1:{port}/match.wav", realtime=True)
    preset["models"]["clap"]["model"] = str(tiny_clap)
    preset["models"]["emotion"]["model"] = str(tiny_emotion)
    endpoint, replay = free_port(), free_port()
    preset["publish"].update(endpoint=f"tcp://127.0.0.1:{endpoint}", replay_endpoint=f"tcp://127.0.0.1:{replay}")
    config = tmp_path / "esports.yaml"
    config.write_text(yaml.safe_dump(preset))
    try:
        with subscribed_daemon(config, endpoint) as run:
            got = run.sub.wait_for(lambda e: e.get("kind") == "scores" and e.get("model_name") == "emotion", timeout=90)
            time.sleep(2.0)
    finally:
        server.kill()
    sub, code, err = run.sub, run.code, run.err
    assert got and code == 0, err[-3000:]
    topics = {topic.decode() for topic, _ in sub.messages}
    assert {"scores.stream.clap", "scores.stream.emotion"} <= topics
    scores = [json.loads(p) for t, p in sub.messages if t.startswith(b"scores.")]
    crowd_at = (1.0, 3.0)
    emotion = [e for e in scores if e["model_name"] == "emotion"]
    clap = [e for e in scores if e["model_name"] == "clap"]
    assert any(e["stream_start"] < crowd_at[1] and e["stream_end"] > crowd_at[0] for e in clap)  # CLAP heard the crowd
    for e in emotion:  # the emotion model heard only speech
        assert e["stream_end"] > 5.5 and set(e["scores"]) <= set(EMOTIONS)
        assert e["facts"]["speech_ratio"] >= 0.4


class StallingHandler(http.server.BaseHTTPRequestHandler):
    """The first connection sends eight seconds of audio, then holds the connection open and sends
    nothing (a stalled server); later ones stream normally."""

    connections: list[float] = []
    audio: bytes = b""

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        first = not StallingHandler.connections
        StallingHandler.connections.append(time.monotonic())
        self.send_response(200)
        self.send_header("Content-Type", "audio/wav")
        self.end_headers()
        data = StallingHandler.audio
        try:
            if first:
                self.wfile.write(data[: 44 + 8 * 2 * 16000])  # the header and 8 s of 16 kHz PCM (past what ffmpeg probes)
                self.wfile.flush()
                time.sleep(30)  # stalled: the connection stays open, nothing comes
                return
            for i in range(0, len(data), 8000):
                self.wfile.write(data[i : i + 8000])
                time.sleep(0.2)
        except (BrokenPipeError, ConnectionResetError):
            pass


def test_a_stalled_stream_is_declared_down_by_the_watchdog_and_reconnected(tmp_path):
    import io

    import soundfile as sf

    from monitord.config import load_config
    from monitord.daemon import Daemon
    from tests.test_faults import ScriptedModel

    need(shutil.which("ffmpeg") is not None, "ffmpeg is not installed")
    buffer = io.BytesIO()
    sf.write(buffer, tone(500, 20.0, 16000, -12), 16000, format="WAV", subtype="PCM_16")
    StallingHandler.audio, StallingHandler.connections = buffer.getvalue(), []
    port = free_port()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", port), StallingHandler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "c.yaml").write_text(f"""
sources: [{{id: cast, url: 'http://127.0.0.1:{port}/live.wav', sample_rate: 16000, watchdog_s: 1.0, backoff_max_s: 1.0}}]
models: {{clap: {{kind: clap, model: unused, labels: [tone, noise]}}}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
""")
    daemon = Daemon(load_config(tmp_path / "c.yaml"), {"clap": ScriptedModel()})
    daemon.start()
    log = tmp_path / "events.jsonl"
    try:
        down = wait_log(log, status_is("down"), 30)
        up_again = wait_log(log, lambda e: e["kind"] == "status" and e["status"] == "up" and down is not None
                            and e["seq"] > down["seq"], 30)
    finally:
        daemon.stop()
        server.shutdown()
        server.server_close()
    assert down is not None and "no audio for 1 s" in down["detail"], down
    assert up_again is not None, "not reconnected after the stall"
    assert len(StallingHandler.connections) >= 2
