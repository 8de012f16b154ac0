"""Take docs/dashboard.png: the dashboard of a real daemon on a recording, in headless Chromium.

    python docs/screenshot.py [--audio ../shared/audio] [--out docs/dashboard.png]

The daemon runs `config/monitord.yaml`'s YAMNet rules on a file source (played in real time: a
quiet start, an alarm clock from the development recordings, a cat, rain), on free loopback
ports and with its state in a temporary folder; the page is captured once the alarm's onset is in
its event list. Needs Playwright and Chromium (`make test` installs both).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def mix(audio: Path, out: Path) -> Path:
    """3 s of quiet, an alarm clock, a cat, then rain: one 48 kHz mono file."""
    parts = [audio / "alarm_clock/esc50_alarm_clock_3-120526-B-37.wav", audio / "cat/esc50_cat_3-95694-A-5.wav",
             next((audio / "rain").glob("*.wav"))]
    subprocess.run(["sox", *map(str, parts), "-r", "48000", "-c", "1", str(out), "pad", "3", "2"], check=True)
    return out


def config(folder: Path, wav: Path, http: int) -> Path:
    """config/monitord.yaml with the recording for the microphone, CLAP left out, free ports."""
    text = (REPO / "config" / "monitord.yaml").read_text()
    text = re.sub(r"    device: default.*\n    sample_rate: 48000.*\n    retry: true.*\n",
                  f"    file: {wav}\n    realtime: true\n", text)
    text = re.sub(r"  clap:.*?\n(?=rules:)", "", text, flags=re.S)              # CLAP and its rules: not here
    text = re.sub(r"  - id: [a-z-]+-confirmed.*?(?=\n  - id|\nhttp:)", "", text, flags=re.S)
    text = text.replace("127.0.0.1:8080", f"127.0.0.1:{http}").replace("tcp://127.0.0.1:5556", f"tcp://127.0.0.1:{free_port()}")
    text = text.replace("id: living-room", "id: kitchen")
    text += "clips: {enabled: true}\n"
    path = folder / "dashboard.yaml"
    path.write_text(text)
    return path


def reachable(url: str) -> bool:
    try:
        urllib.request.urlopen(url, timeout=5).close()
        return True
    except OSError:
        return False


def onset(log: Path) -> bool:
    events = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    return any(e["kind"] == "alert" and e["phase"] == "onset" for e in events)


def wait(condition, daemon: subprocess.Popen, failure: str, timeout_s: float = 90) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline or daemon.poll() is not None:
            raise SystemExit(failure)
        time.sleep(0.25)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--audio", type=Path, default=REPO.parent / "shared" / "audio")
    parser.add_argument("--out", type=Path, default=REPO / "docs" / "dashboard.png")
    parser.add_argument("--chromium", default=shutil.which("chromium") or "/usr/bin/chromium")
    parser.add_argument("--after-s", type=float, default=8.0, help="seconds after the onset to take the picture")
    args = parser.parse_args()
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        http = free_port()
        path = config(folder, mix(args.audio, folder / "recording.wav"), http)
        env = {**os.environ, "XDG_STATE_HOME": str(folder / "state"), "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
        daemon = subprocess.Popen([sys.executable, "-m", "monitord", "run", "-c", str(path)], cwd=REPO, env=env)
        try:
            url = f"http://127.0.0.1:{http}/"
            log = folder / "state" / "monitord" / "events.jsonl"
            with sync_playwright() as p:
                browser = p.chromium.launch(executable_path=args.chromium, args=CHROMIUM_ARGS)
                page = browser.new_page(viewport={"width": 1200, "height": 1170})
                wait(lambda: reachable(url), daemon, "the dashboard did not answer")
                page.goto(url)  # from the start, so that the timeline holds the whole recording
                wait(lambda: onset(log), daemon, "no alert from the daemon")
                page.wait_for_timeout(args.after_s * 1000)  # the recording goes on: the timeline fills
                page.screenshot(path=str(args.out))
                browser.close()
        finally:
            daemon.send_signal(signal.SIGINT)
            daemon.wait(30)
    print(f"{args.out}: {args.out.stat().st_size // 1024} KB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
