"""The systemd side: notify protocol from the real daemon, watchdog health, the unit file."""

from __future__ import annotations

import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from tests.conftest import REPO, free_port, need, silence, tone, write_wav
from tests.test_e2e import start_daemon, stop_daemon, write_config
from tests.test_faults import ScriptedModel


def test_daemon_notifies_ready_pings_the_watchdog_and_says_stopping(tiny_clap, tmp_path):
    write_wav(tmp_path / "clip.wav", np.concatenate([silence(1.0, 44100), tone(800, 1.0, 44100)] * 10), 44100)
    config = write_config(tmp_path, tiny_clap, "{id: rec, file: clip.wav, realtime: true}", free_port())
    address = str(tmp_path / "notify.sock")
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    listener.bind(address)
    listener.settimeout(0.2)
    proc = start_daemon(config, {"NOTIFY_SOCKET": address, "WATCHDOG_USEC": "1000000"})
    messages: list[str] = []
    try:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and sum(m == "WATCHDOG=1" for m in messages) < 3:
            try:
                messages.append(listener.recv(4096).decode())
            except socket.timeout:
                assert proc.poll() is None, proc.communicate()[1][-2000:]
    finally:
        code, _, err = stop_daemon(proc)
    try:
        while True:
            messages.append(listener.recv(4096).decode())
    except socket.timeout:
        pass
    listener.close()
    assert code == 0, err[-2000:]
    assert messages[0].startswith("READY=1\nSTATUS=listening to 1 sources"), messages
    assert sum(m == "WATCHDOG=1" for m in messages) >= 3
    assert messages[-1] == "STOPPING=1"


def test_a_stuck_inference_stage_is_unhealthy_so_the_watchdog_stops_pinging(tmp_path):
    from monitord.config import load_config
    from monitord.daemon import Daemon

    write_wav(tmp_path / "in.wav", tone(500, 3.0, 16000, -12), 16000)
    (tmp_path / "c.yaml").write_text(f"""
sources: [{{id: rec, file: in.wav}}]
models: {{clap: {{kind: clap, model: unused, labels: [tone, noise]}}}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
pipeline: {{inference_stall_s: 0.5}}
""")
    daemon = Daemon(load_config(tmp_path / "c.yaml"), {"clap": ScriptedModel(delay_s=2.0)})  # one window: 2 s
    assert not daemon.healthy(), "stages that are not running cannot be healthy"
    daemon.start()
    try:
        deadline = time.monotonic() + 10
        seen_unhealthy = False
        while time.monotonic() < deadline and not seen_unhealthy:
            health = daemon.health()
            seen_unhealthy = not health["inference"].ok
            time.sleep(0.05)
        assert seen_unhealthy, "an inference stage inside a 2 s model call still looked healthy"
        assert "no progress" in health["inference"].reason and not daemon.healthy()
    finally:
        daemon.stop(drain_timeout_s=0.0)


def test_the_unit_file_verifies(tmp_path):
    need(shutil.which("systemd-analyze") is not None, "systemd-analyze is not installed (Debian package systemd)")
    monitord = Path(sys.executable).with_name("monitord")
    unit = tmp_path / "monitord.service"
    unit.write_text((REPO / "systemd" / "monitord.service").read_text().replace("/opt/monitord/venv/bin/monitord", str(monitord)))
    out = subprocess.run(["systemd-analyze", "verify", str(unit)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    text = unit.read_text()
    for line in ("Type=notify", "WatchdogSec=", "ExecStartPre=" + str(monitord) + " check-config", "NoNewPrivileges=yes",
                 "ProtectSystem=strict", "CapabilityBoundingSet=\n", "DynamicUser=yes", "SupplementaryGroups=audio"):
        assert line in text, line
    security = subprocess.run(["systemd-analyze", "security", "--offline=true", str(unit)], capture_output=True, text=True, timeout=60)
    if security.returncode == 0:
        print(security.stdout.strip().splitlines()[-1])
