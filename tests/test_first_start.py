"""The way a newcomer meets monitord: `monitord run -c config/monitord.yaml` (what `make run` starts) on
a box with no model hub and no microphone, then with a microphone that appears later."""

from __future__ import annotations

import json
import os
import re
import subprocess
import threading
import time
import urllib.request
from pathlib import Path

import pytest

from monitord.tools.first_start import no_sound_env
from tests.conftest import AUDIO, REPO, free_port, monitord_cmd, need, shared_path, time_scale
from tests.test_e2e import read_log, start_daemon, stop_daemon
from tests.test_faults import status_is, wait_log

CAT = AUDIO / "cat" / "esc50_cat_3-95694-A-5.wav"
ALARM = AUDIO / "alarm_clock" / "esc50_alarm_clock_3-120526-B-37.wav"


def default_config(tmp_path: Path) -> tuple[Path, int]:
    """config/monitord.yaml as shipped, moved to free ports (its event log lands in the state
    directory: tmp_path, with the environment of ``no_sound_env`` or ``STATE_DIRECTORY`` set so)."""
    http_port = free_port()
    text = (REPO / "config" / "monitord.yaml").read_text()
    assert "bind: 127.0.0.1:8080" in text and "tcp://127.0.0.1:5556" in text
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{http_port}").replace("tcp://127.0.0.1:5556", f"tcp://127.0.0.1:{free_port()}")
    (tmp_path / "monitord.yaml").write_text(text)
    return tmp_path / "monitord.yaml", http_port


class Lines:
    """A process's stdout, read line by line in the background."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._thread = threading.Thread(target=lambda: self.lines.extend(iter(stream.readline, "")), daemon=True)
        self._thread.start()

    def wait_for(self, pattern: str, timeout: float, proc) -> re.Match | None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and proc.poll() is None:
            for line in list(self.lines):
                if match := re.search(pattern, line):
                    return match
            time.sleep(0.1)
        return None


def get_json(url: str) -> dict:
    return json.loads(urllib.request.urlopen(url, timeout=10).read())


def post_file(url: str, path: Path, labels: str = "") -> dict:
    boundary = "monitord-test-boundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"labels\"\r\n\r\n{labels}\r\n"
            f"--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"{path.name}\"\r\n"
            "Content-Type: audio/wav\r\n\r\n").encode() + path.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    request = urllib.request.Request(url, data=body, headers={"Content-Type": f"multipart/form-data; boundary={boundary}"})
    return json.loads(urllib.request.urlopen(request, timeout=120).read())


@pytest.mark.sound
def test_the_no_device_environment_hides_a_device_that_is_there(tmp_path, sound_server):
    """What makes the first-start test's "no microphone" true on any machine: with a capture device
    present (the sound server's), the ALSA configuration of no_sound_env alone leaves PortAudio none."""
    def devices(extra: dict[str, str]) -> str:
        out = subprocess.run(monitord_cmd("devices"), cwd=REPO, env={**os.environ, **sound_server, **extra},
                             capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        return out.stdout

    assert "no input devices" not in devices({})
    assert "no input devices" in devices({"ALSA_CONFIG_PATH": no_sound_env(tmp_path)["ALSA_CONFIG_PATH"]})


def test_first_start_with_no_hub_and_no_microphone(tmp_path):
    env = no_sound_env(tmp_path)
    devices = subprocess.run(monitord_cmd("devices"), cwd=REPO, env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
    assert devices.returncode == 0, devices.stderr
    assert "no input devices" in devices.stdout and "waits for one" in devices.stdout, devices.stdout
    config, http_port = default_config(tmp_path)
    began = time.monotonic()
    proc = start_daemon(config, env)
    out = Lines(proc.stdout)
    url = f"http://127.0.0.1:{http_port}/"
    try:
        printed = out.wait_for(r"monitord: dashboard at (http://\S+)", 120, proc)
        assert printed and printed.group(1) == url, (out.lines, proc.poll())
        up_after = time.monotonic() - began
        waiting = wait_log(tmp_path / "events.jsonl", status_is("down"), 30, proc)
        assert waiting and waiting["source"] == "living-room" and "waiting for a microphone" in waiting["detail"]
        time.sleep(2.0)
        assert proc.poll() is None  # it stays up
        state = get_json(url + "api/state")
        assert state["source_states"]["living-room"]["state"] == "down"
        assert "waiting for a microphone" in state["source_states"]["living-room"]["detail"]
        assert state["models"]["yam"]["state"] == "active" and state["models"]["clap"]["state"] == "inactive"
        assert "hf download laion/clap-htsat-unfused" in state["models"]["clap"]["detail"]
        assert {r["id"]: r["active"] for r in state["rules"]} == {
            "glass-break": True, "alarm": True, "dog-bark": True,
            "glass-break-confirmed": False, "alarm-confirmed": False, "dog-bark-confirmed": False}
        statuses = {(e["source"], e["status"]): e for e in state["events"] if e["kind"] == "status"}
        missing = statuses[("daemon", "model_unavailable")]
        assert missing["model"] == "clap" and "laion/clap-htsat-unfused" in missing["detail"]
        assert "HF_HUB_OFFLINE" in missing["missing"] and missing["fix"].startswith("on a machine that reaches the hub, `")
        assert "hf download laion/clap-htsat-unfused`" in missing["fix"]
        assert "waiting for a microphone" in statuses[("living-room", "down")]["detail"]
        assert state["try_it"] == {"yam": "yamnet"}
        result = post_file(url + "api/try", shared_path(CAT))
        top = result["models"]["yam"]["top"]
        assert "Cat" in top, top
        assert "clap" not in result["models"]
        browser_check(url)
    finally:
        code, _, err = stop_daemon(proc)
    assert code == 0, err[-3000:]
    assert "Traceback" not in err
    print(f"\n[first start] dashboard up {up_after:.1f} s after `monitord run` (no hub, no microphone); "
          f"YAMNet top classes for the cat: {list(top)[:3]}")


def browser_check(url: str) -> None:
    """What the page shows: the source waiting for a microphone, CLAP inactive with its fix."""
    import shutil

    need(shutil.which("chromium") is not None, "chromium is not installed (Debian package chromium)")
    try:
        import playwright.sync_api as playwright
    except ImportError:
        playwright = None
    need(playwright is not None, "playwright is not installed (pip install playwright)")
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=shutil.which("chromium"), args=["--no-sandbox", "--disable-gpu"])
        page = browser.new_page()
        page.goto(url)
        card = page.locator('.source[data-source="living-room"]')
        card.locator('.source-state[data-state="down"]').wait_for(timeout=30000)
        assert "waiting for a microphone" in card.locator(".source-state").inner_text()
        clap = card.locator('.model-state[data-model="clap"]')
        assert clap.get_attribute("data-state") == "inactive" and "hf download" in clap.inner_text()
        assert card.locator('.rule-state[data-rule="glass-break-confirmed"]').get_attribute("data-active") == "false"
        assert page.locator('#events li.status[data-status="model_unavailable"]').count() == 1
        assert page.locator("#try-labels").is_hidden()  # no CLAP: YAMNet needs no labels
        browser.close()


@pytest.mark.sound
def test_capture_starts_when_a_microphone_appears_and_yamnet_alerts(tmp_path, sound_server):
    """The default config, started while the sound server is down: it waits, picks the device up when
    the server comes back, and a real alarm-clock recording played into it raises the alarm rule."""
    script = ["bash", str(REPO / "tests" / "sound-server.sh")]
    env = {**sound_server, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path / "hf-home"), "STATE_DIRECTORY": str(tmp_path)}
    subprocess.run([*script, "stop"], env={**os.environ, **env}, check=True, timeout=30)
    config, _ = default_config(tmp_path)
    log = tmp_path / "events.jsonl"
    proc = start_daemon(config, env)
    try:
        waiting = wait_log(log, status_is("down"), 120, proc)
        assert waiting and "waiting for a microphone" in waiting["detail"], proc.poll()
        started = subprocess.run([*script, "start"], env={**os.environ, **env}, capture_output=True, text=True, timeout=60)
        assert started.returncode == 0, started.stderr
        up = wait_log(log, status_is("up", waiting["seq"]), 60, proc)
        assert up and up["source"] == "living-room", "capture did not start when the device appeared"
        time.sleep(1.0)
        from tests.conftest import play

        assert play(shared_path(ALARM), sound_server).wait(timeout=30) == 0
        onset = wait_log(log, lambda e: e["kind"] == "alert" and e["rule"] == "alarm" and e["phase"] == "onset", 30, proc)
    finally:
        code, _, err = stop_daemon(proc)
        subprocess.run([*script, "start"], env={**os.environ, **env}, capture_output=True, timeout=60)  # as the fixture left it
        import sounddevice as sd

        sd._terminate()  # this process's PortAudio saw the old server too
        sd._initialize()
    assert onset, f"no alarm alert\n{err[-3000:]}\n{[e for e in read_log(log) if e['kind'] == 'alert']}"
    assert onset["model"] == "yamnet:builtin" and onset["source"] == "living-room" and onset["score"] >= 0.4
    assert code == 0, err[-3000:]


def test_the_benchmarks_first_start_times_the_shipped_config_to_its_url(tmp_path):
    """``first_start_s=`` on the benchmark's last line: the shipped config, no hub, no microphone, to the URL."""
    from monitord.tools.first_start import first_start

    assert 0 < first_start(tmp_path / "shipped", timeout_s=120 * time_scale()) < 120 * time_scale()
    broken = tmp_path / "broken.yaml"
    broken.write_text((REPO / "config" / "monitord.yaml").read_text().replace("kind: yamnet", "kind: yamnet\n    model: /nonexistent/yamnet.tflite"))
    with pytest.raises(RuntimeError, match=r"printed no dashboard URL(.|\n)*/nonexistent/yamnet.tflite"):
        first_start(tmp_path / "broken", broken, timeout_s=120 * time_scale())
