"""The live dashboard in a real browser (Debian's chromium, driven by Playwright)."""

from __future__ import annotations

import shutil
import time
import urllib.request

import numpy as np
import pytest

from tests.conftest import REPO, free_port, need, noise, silence, tone, write_wav
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
            assert float(timeline.get_attribute("data-t0")) < 5.0, timeline.get_attribute("data-t0")
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

    base = f"sources: [{{id: a, device: default}}]\nmodels: {{clap: {{kind: clap, model: {tiny_clap}, labels: [a, b]}}}}\n"
    with pytest.raises(ConfigError, match="http.bind: binds a non-loopback address"):
        parse_config(base + "http: {bind: '0.0.0.0:8080'}\n", tmp_path)
    parse_config(base + "http: {bind: '0.0.0.0:8080', token: 'a-long-enough-secret'}\n", tmp_path)
    from starlette.testclient import TestClient

    from monitord.output.dashboard import Dashboard

    class FakeDaemon:  # the token gate needs no pipeline
        config = parse_config(base, tmp_path)
        models, clips = {}, None

    client = TestClient(Dashboard(FakeDaemon(), "127.0.0.1:1", "a-long-enough-secret").app())
    assert client.get("/api/state").status_code == 401
    assert client.get("/api/state?token=wrong-wrong-wrong-wrong").status_code == 401
    assert client.get("/api/state", headers={"Authorization": "Bearer a-long-enough-secret"}).status_code == 200


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
