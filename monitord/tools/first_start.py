"""How long ``monitord run`` with the shipped config takes to print its dashboard URL on a machine
with no model hub and no microphone: what a new user's ``make run`` waits for (``first_start_s=``
on the benchmark's last line).

The config is the shipped one with its ports moved to free loopback ones; the environment
(``no_sound_env``) has no capture device (no sound server, an ALSA configuration with no card), the
hub offline with an empty cache (CLAP is absent, as on a first run behind a firewall) and a fresh
state directory. Timed from the process's start to the URL line on its stdout, then stopped with a
SIGTERM.
"""

from __future__ import annotations

import os
import queue
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import yaml

SHIPPED_CONFIG = Path(__file__).resolve().parents[2] / "config" / "monitord.yaml"
URL_LINE = "monitord: dashboard at "


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


NO_ALSA_DEVICES = """\
# ALSA knows only the PCMs its configuration defines: this one defines a default on a card that does
# not exist and nothing else (no hw:N, no plugins), so PortAudio finds no device, hardware included.
pcm.!default { type hw card 999 }
ctl.!default { type hw card 999 }
"""


def no_sound_env(workdir: Path) -> dict[str, str]:
    """No capture device (no sound server reachable, an ALSA configuration with no device), no hub,
    an empty model cache, ``workdir`` the state directory."""
    runtime = workdir / "xdg"
    runtime.mkdir(mode=0o700)
    alsa = workdir / "no-devices.asoundrc"
    alsa.write_text(NO_ALSA_DEVICES)
    return {"XDG_RUNTIME_DIR": str(runtime), "PULSE_SERVER": f"unix:{runtime}/no-server", "ALSA_CONFIG_PATH": str(alsa),
            "HF_HUB_OFFLINE": "1", "HF_HOME": str(workdir / "hf-home"), "STATE_DIRECTORY": str(workdir)}


def offline_config(config: Path, workdir: Path) -> Path:
    """``config`` with its dashboard and publisher on free loopback ports, written in ``workdir``."""
    data = yaml.safe_load(config.read_text())
    data["http"] = {**data.get("http", {}), "bind": f"127.0.0.1:{free_port()}"}
    data["publish"] = {**data.get("publish", {}), "endpoint": f"tcp://127.0.0.1:{free_port()}"}
    path = workdir / "first-start.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return path


def first_start(workdir: Path, config: Path = SHIPPED_CONFIG, timeout_s: float = 300.0) -> float:
    """Seconds from ``monitord run`` starting to its dashboard URL printed (see the module's docstring).
    Raises RuntimeError, with the end of its output, where it exits or says nothing in ``timeout_s``."""
    workdir.mkdir(parents=True, exist_ok=True)
    path = offline_config(config, workdir)
    env = {**os.environ, **no_sound_env(workdir), "PYTHONUNBUFFERED": "1"}
    began = time.monotonic()
    process = subprocess.Popen([sys.executable, "-m", "monitord", "run", "-c", str(path)], env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1)
    lines: queue.Queue[str | None] = queue.Queue()

    def read() -> None:  # a thread: a blocking readline never holds up the deadline
        for line in process.stdout:
            lines.put(line)
        lines.put(None)

    reader = threading.Thread(target=read, name="first-start-output", daemon=True)
    reader.start()
    seen: list[str] = []
    try:
        while (left := began + timeout_s - time.monotonic()) > 0:
            try:
                line = lines.get(timeout=left)
            except queue.Empty:
                break
            if line is None:
                break  # it exited
            seen.append(line)
            if line.startswith(URL_LINE):
                return time.monotonic() - began
        raise RuntimeError(f"monitord run -c {path} printed no dashboard URL in {timeout_s:g} s; its output ended:\n"
                           + "".join(seen[-20:]))
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(60)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        reader.join(10)  # it read the shutdown's output too (a full pipe would have held the exit up)
        process.stdout.close()
