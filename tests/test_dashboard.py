"""The live dashboard in a real browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import re
import shutil
import time
import urllib.request

import numpy as np
import pytest

from tests.conftest import REPO, free_port, need, noise, require, silence, tone, write_wav
from tests.test_e2e import start_daemon, stop_daemon, write_config

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = REPO / "artifacts"


def test_dashboard_shows_bars_events_and_try_it(tiny_clap, tmp_path):
    need(shutil.which("chromium") is not None, "chromium is not installed (Debian package chromium)")
    try:
        import playwright.sync_api as playwright
    except ImportError:
        playwright = None
    need(playwright is not None, "playwright is not installed (pip install playwright)")
    rate = 44100
    beep = np.concatenate([silence(2.5, rate), tone(1000, 1.0, rate, -12), silence(1.0, rate), noise(1.5, rate, -20)])
    write_wav(tmp_path / "clip.wav", np.concatenate([beep] * 6), rate)
    write_wav(tmp_path / "upload.wav", tone(700, 2.0, rate, -10), rate)
    port = free_port()
    config = write_config(tmp_path, tiny_clap, "{id: rec, file: clip.wav, realtime: true}", free_port())
    text = config.read_text().replace("models:\n", "models:\n"
                                      "  yam: {kind: yamnet, groups: {beep: ['Beep, bleep', 'Sine wave']}}\n"
                                      "  extra: {kind: clap, model: ./no-such-dir, labels: [a, b], optional: true}\n")
    text = text.replace("rules:\n", "rules:\n  - {id: extra-rule, model: extra, label: a, threshold: 0.5}\n")
    config.write_text(text + f"http: {{bind: '127.0.0.1:{port}'}}\n"
                      "clips: {enabled: true, dir: clips, pre_s: 0.5, post_s: 0.5}\n")
    proc = start_daemon(config)
    started = time.monotonic()
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                urllib.request.urlopen(url + "api/state", timeout=1)
                break
            except OSError:
                assert proc.poll() is None, proc.communicate()[1][-3000:]
                time.sleep(0.2)
        with playwright.sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, args=[
                "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                "--no-first-run", "--disable-sync"])
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(url)
            loaded = time.monotonic() - started  # about the stream time the page first saw (a real-time file)
            bars = page.locator('.source[data-source="rec"] .model[data-model="clap"] .bar')
            bars.first.wait_for(timeout=30000)
            first = page.locator('.source[data-source="rec"] .model[data-model="clap"] h4').inner_text()
            page.wait_for_function(
                "(before) => { const h = document.querySelector('.source[data-source=\"rec\"] .model[data-model=\"clap\"] h4');"
                " return h && h.textContent !== before; }", arg=first, timeout=30000)  # the bars moved on with the stream
            top_labels = set()
            for _ in range(40):  # over a few seconds the top label changes between tone and noise
                top_labels.add(bars.first.get_attribute("data-label"))
                if {"tone", "noise"} <= top_labels:
                    break
                page.wait_for_timeout(250)
            assert {"tone", "noise"} <= top_labels, top_labels
            page.locator("#events li.onset").first.wait_for(timeout=30000)
            page.locator("#events audio").first.wait_for(state="attached", timeout=30000)
            assert page.locator("#connection").inner_text() == "live"
            assert page.locator("canvas[data-timeline]").count() >= 1
            # which models work here, and which rules cannot fire
            card = page.locator('.source[data-source="rec"]')
            assert card.locator('.model-state[data-model="clap"]').get_attribute("data-state") == "active"
            assert card.locator('.model-state[data-model="yam"]').get_attribute("data-state") == "active"
            extra = card.locator('.model-state[data-model="extra"]')
            assert extra.get_attribute("data-state") == "inactive" and "no-such-dir" in extra.inner_text()
            assert card.locator('.rule-state[data-rule="extra-rule"]').get_attribute("data-active") == "false"
            assert card.locator('.rule-state[data-rule="tone"]').get_attribute("data-active") == "true"
            # the timeline spans the data it has: the first window sits at the left edge, not at "now - 5 min"
            timeline = page.locator('canvas[data-timeline="rec / clap"]')
            assert 0.0 <= float(timeline.get_attribute("data-t0")) < loaded + 5.0, (timeline.get_attribute("data-t0"), loaded)
            assert float(timeline.get_attribute("data-x0")) < 60
            assert timeline.get_attribute("data-x-label") == "stream time (s)" and timeline.get_attribute("data-y-label") == "score"
            assert timeline.get_attribute("data-ticks").endswith(" s"), timeline.get_attribute("data-ticks")
            # try it: CLAP's zero-shot for the typed labels, and YAMNet's classes and groups
            assert "clap (clap)" in page.locator("#try-models").inner_text() and "yam (yamnet)" in page.locator("#try-models").inner_text()
            page.set_input_files("#try-file", str(tmp_path / "upload.wav"))
            page.fill("#try-labels", "tone, noise")
            page.click("#try-submit")
            result = page.locator('#try-result .try-model[data-model="clap"] .bar')
            result.nth(1).wait_for(timeout=60000)
            scores = {result.nth(i).get_attribute("data-label"): float(result.nth(i).get_attribute("data-score")) for i in range(2)}
            assert set(scores) == {"tone", "noise"} and abs(sum(scores.values()) - 1) < 1e-3 and scores["tone"] > 0.5
            classes = page.locator('#try-result .try-model[data-model="yam"] .classes .bar')
            assert classes.count() == 10
            groups = page.locator('#try-result .try-model[data-model="yam"] .groups .bar')
            assert groups.first.get_attribute("data-label") == "beep" and float(groups.first.get_attribute("data-score")) > 0.1
            ARTIFACTS.mkdir(exist_ok=True)
            page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)
            browser.close()
    finally:
        code, _, err = stop_daemon(proc)
    assert code == 0, err[-2000:]
    assert (ARTIFACTS / "dashboard.png").stat().st_size > 10000


def test_a_non_loopback_dashboard_needs_a_token_and_checks_it(tiny_clap, tmp_path):
    from monitord.config import ConfigError, parse_config
    from monitord.daemon import Availability

    base = f"sources: [{{id: a, device: default}}]\nmodels: {{clap: {{kind: clap, model: {tiny_clap}, labels: [a, b]}}}}\n"
    with pytest.raises(ConfigError, match="http.bind: binds a non-loopback address"):
        parse_config(base + "http: {bind: '0.0.0.0:8080'}\n", tmp_path)
    parse_config(base + "http: {bind: '0.0.0.0:8080', token: 'a-long-enough-secret'}\n", tmp_path)
    from starlette.testclient import TestClient

    from monitord.output.dashboard import Dashboard

    class FakeDaemon:  # the token gate needs no pipeline
        config = parse_config(base, tmp_path)
        models, clips = {}, None
        availability = Availability(config, {}, {}, {}, {}, frozenset(), frozenset())

    client = TestClient(Dashboard(FakeDaemon(), "127.0.0.1:1", "a-long-enough-secret").app(), base_url="http://127.0.0.1:8080")
    assert client.get("/api/state").status_code == 401
    assert client.get("/api/state?token=wrong-wrong-wrong-wrong").status_code == 401
    assert client.get("/api/state", headers={"Authorization": "Bearer a-long-enough-secret"}).status_code == 200
    # the page (fetched with ?token=) loads its script and stylesheet as a browser does: without the token
    page = client.get("/?token=a-long-enough-secret")
    assert page.status_code == 200 and client.get("/").status_code == 401
    assets = re.findall(r'(?:src|href)="(static/[^"]+)"', page.text)
    assert sorted(assets) == ["static/app.css", "static/app.js", "static/favicon.svg"]
    assert all(client.get("/" + asset).status_code == 200 for asset in assets)
    assert client.get("/favicon.ico").status_code == 200  # asked for by browsers, without the token
    assert client.post("/static/app.js").status_code == 401  # only reading the shipped files is open


def test_the_page_has_an_icon(tmp_path):
    """No 404 for /favicon.ico on every page load: the page links its icon, and /favicon.ico is it too."""
    from starlette.testclient import TestClient

    from monitord.config import parse_config
    from monitord.daemon import Availability
    from monitord.output.dashboard import Dashboard

    class FakeDaemon:
        config = parse_config("sources: [{id: a, device: default}]\nmodels: {yam: {kind: yamnet}}\n", tmp_path)
        models, clips = {}, None
        availability = Availability(config, {}, {}, {}, {}, frozenset(), frozenset())

    client = TestClient(Dashboard(FakeDaemon(), "127.0.0.1:1", None).app(), base_url="http://127.0.0.1:8080")
    icon = re.search(r'<link rel="icon" href="([^"]+)" type="image/svg\+xml">', client.get("/").text)
    assert icon, "the page links no icon"
    for path in ("/" + icon.group(1), "/favicon.ico"):
        answer = client.get(path)
        assert answer.status_code == 200 and answer.headers["content-type"].startswith("image/svg+xml"), path
        assert answer.text.startswith("<svg") and "viewBox" in answer.text


def test_busy_dashboard_or_metrics_ports_are_clear_errors(tiny_clap, tmp_path):
    import socket
    import subprocess

    from tests.conftest import monitord_cmd

    write_wav(tmp_path / "clip.wav", tone(500, 1.0, 16000), 16000)
    busy = socket.socket()
    busy.bind(("127.0.0.1", 0))
    busy.listen(1)
    port = busy.getsockname()[1]
    try:
        for key in ("http", "metrics"):
            config = write_config(tmp_path, tiny_clap, "{id: rec, file: clip.wav}", free_port())
            config.write_text(config.read_text() + f"{key}: {{bind: '127.0.0.1:{port}'}}\n")
            out = subprocess.run(monitord_cmd("run", "-c", str(config), "--until-done"), cwd=REPO, capture_output=True, text=True, timeout=120)
            assert out.returncode == 2 and f"{key}.bind: cannot serve on 127.0.0.1:{port}" in out.stderr, out.stderr[-2000:]
            assert "Traceback" not in out.stderr
    finally:
        busy.close()


@pytest.fixture
def try_it(tiny_clap, tmp_path):
    """The dashboard's app on a daemon whose pipeline runs from the window queue on (no source)."""
    from starlette.testclient import TestClient

    from monitord.config import parse_config
    from monitord.daemon import Daemon
    from monitord.inference.build import load_models
    from monitord.output.dashboard import Dashboard

    config = parse_config(f"""
sources: [{{id: a, device: default}}]
models: {{clap: {{kind: clap, model: {tiny_clap}, labels: [tone, noise, speech, music]}}}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
""", tmp_path)
    daemon = Daemon(config, load_models(config))
    daemon.start(open_sources=False)
    write_wav(tmp_path / "upload.wav", tone(700, 2.0, 44100, -10), 44100)
    try:
        yield daemon, TestClient(Dashboard(daemon, "127.0.0.1:1", None, max_upload_mb=0.5).app(), base_url="http://127.0.0.1:8080"), \
            (tmp_path / "upload.wav").read_bytes()
    finally:
        daemon.stop()


def post(client, data: bytes, labels: str, **headers):
    return client.post("/api/try", files={"file": ("upload.wav", data, "audio/wav")}, data={"labels": labels}, headers=headers)


def test_try_it_scores_on_the_inference_thread_and_keeps_no_text_tower(try_it):
    import gc
    import threading

    from transformers import ClapModel

    daemon, client, upload = try_it
    model = daemon.models["clap"]
    threads = []
    real = model.probabilities_with

    def recording(windows, text):
        threads.append(threading.current_thread().name)
        return real(windows, text)

    model.probabilities_with = recording
    answer = post(client, upload, "tone, noise")
    assert answer.status_code == 200, answer.text
    scores = answer.json()["models"]["clap"]["probabilities"]
    assert set(scores) == {"tone", "noise"} and scores["tone"] > 0.5
    assert threads == ["inference"]  # the models are the inference stage's: nobody else runs them
    gc.collect()
    assert not [o for o in gc.get_objects() if type(o) is ClapModel], "a full CLAP model stayed resident"


def test_try_it_refuses_what_it_should(try_it):
    _, client, upload = try_it
    assert post(client, upload, ", ".join(f"label {i}" for i in range(33))).status_code == 400
    assert post(client, upload, "tone, noise", origin="http://evil.example").status_code == 403
    assert post(client, upload, "tone, noise", **{"sec-fetch-site": "cross-site"}).status_code == 403
    assert post(client, upload, "tone, noise", origin="http://127.0.0.1:8080").status_code == 200
    big = post(client, b"RIFF" + b"\0" * (2 * 2**20), "tone, noise")
    assert big.status_code == 413 and "max_upload_mb" in big.json()["error"]


def test_a_chunked_upload_is_cut_off_at_the_limit_not_read_whole(try_it):
    """A real server: an upload with no Content-Length is answered 413 once it passes the limit,
    while the client is still sending (the body is never read whole)."""
    import select
    import socket

    from monitord.output.dashboard import Dashboard

    daemon, _, _ = try_it
    port = free_port()
    dashboard = Dashboard(daemon, f"127.0.0.1:{port}", None, max_upload_mb=0.5)
    dashboard.start()
    sent, answer = 0, b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
            sock.sendall(b"POST /api/try HTTP/1.1\r\nHost: 127.0.0.1\r\nTransfer-Encoding: chunked\r\n"
                         b"Content-Type: multipart/form-data; boundary=x\r\n\r\n")
            chunk = b"%x\r\n%s\r\n" % (65536, b"\0" * 65536)
            for _ in range(400):  # 25 MiB if it were all read
                if select.select([sock], [], [], 0)[0]:
                    break
                try:
                    sock.sendall(chunk)
                except (BrokenPipeError, ConnectionResetError):
                    break
                sent += 1
            sock.settimeout(5)
            answer = sock.recv(4096)
    finally:
        dashboard.stop()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    assert sent < 100, f"{sent} chunks of 64 KiB were taken before the refusal"


def test_the_timeline_keeps_the_alerting_label_its_threshold_and_the_alert(tmp_path):
    """A real alarm clock early in a recording, other sounds after it: at the end, the timeline still
    draws the `alarm` rule's label with a dashed line at its threshold, and the alert's stretch is
    shaded, though other labels score higher by then (the shipped config: YAMNet, no hub for CLAP)."""
    import soundfile as sf
    import soxr

    from tests.conftest import AUDIO, shared_path
    from tests.test_first_start import Lines, default_config, no_sound_env

    need(shutil.which("chromium") is not None, "chromium is not installed (Debian package chromium)")
    playwright = require("playwright.sync_api", "pip install playwright")
    rate = 44100

    def clip(name: str) -> np.ndarray:
        data, clip_rate = sf.read(str(shared_path(AUDIO / name)), dtype="float32", always_2d=True)
        mono = data.mean(axis=1)
        return soxr.resample(mono, clip_rate, rate).astype(np.float32) if clip_rate != rate else mono

    lead = 6.0  # quiet (below the gate: nothing scored) while the page connects
    parts = [silence(lead, rate), clip("alarm_clock/esc50_alarm_clock_3-120526-B-37.wav"), silence(1.0, rate)]
    parts += [clip(f) for f in ("rain/rain.wav", "applause/applause.wav", "train/train.wav", "birds/birds1.wav",
                                "engine/car_engine.wav")]
    recording = np.concatenate(parts)
    seconds = len(recording) / rate
    write_wav(tmp_path / "room.wav", recording, rate)
    config, port = default_config(tmp_path)
    text, found = re.subn(r"(?ms)^sources:\n.*?^(?=gate:)", "sources:\n  - {id: room, file: room.wav, realtime: true}\n",
                          config.read_text())
    assert found == 1
    config.write_text(text)
    failed_requests: list[str] = []
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox", "--disable-gpu", "--no-first-run"])
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("response", lambda r: failed_requests.append(f"{r.status} {r.url}") if r.status >= 400 else None)
        proc = start_daemon(config, no_sound_env(tmp_path))
        try:
            printed = Lines(proc.stdout).wait_for(r"monitord: dashboard at (http://\S+)", 120, proc)
            assert printed, proc.poll()
            page.goto(printed.group(1))
            page.locator("#connection.on").wait_for(timeout=30000)
            key = "room / yam"
            page.wait_for_function(f"() => (window.__timeline[{key!r}]?.t1 ?? 0) >= {seconds - 1.0}", timeout=(seconds + 60) * 1000)
            timeline = page.evaluate(f"window.__timeline[{key!r}]")
            ARTIFACTS.mkdir(exist_ok=True)
            page.locator("#timelines").screenshot(path=str(ARTIFACTS / "timeline.png"))
            browser.close()
        finally:
            code, _, err = stop_daemon(proc)
    assert code == 0, err[-3000:]
    series = {s["label"]: s for s in timeline["series"]}
    assert "alarm" in series and series["alarm"]["watched"], list(series)
    alarm = series["alarm"]["points"]
    assert max(p for t, p in alarm if lead <= t <= lead + 8) >= 0.4, alarm  # the alarm clock, as it sounded
    assert alarm[0][0] <= lead + 2.5 and alarm[-1][0] >= seconds - 1.0  # drawn from the first scored window to the end
    latest = timeline["latest"]  # the newest window's scores: `alarm` is not among its six highest, yet it is drawn
    assert sorted(latest, key=latest.get, reverse=True).index("alarm") >= 6, latest
    assert {"rule": "alarm", "label": "alarm", "threshold": 0.4} in timeline["thresholds"], timeline["thresholds"]
    stretch = [s for s in timeline["shaded"] if s["rule"] == "alarm"]
    assert len(stretch) == 1 and not stretch[0]["open"], timeline["shaded"]
    assert lead <= stretch[0]["t0"] < stretch[0]["t1"] <= lead + 12, stretch
    assert len(timeline["series"]) <= 6 and len([s for s in timeline["series"] if not s["watched"]]) >= 2
    assert not failed_requests, failed_requests
