"""A real Mosquitto broker for tests: a free loopback port, a generated config and password file,
persistence (so a subscriber's session and its queued messages survive a broker restart)."""

from __future__ import annotations

import json
import shutil
import socket
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from tests.conftest import free_port, need, time_scale

USER, PASSWORD = "monitord", "a-test-password"


def mosquitto() -> str:
    path = shutil.which("mosquitto") or ("/usr/sbin/mosquitto" if Path("/usr/sbin/mosquitto").exists() else None)
    need(path is not None and shutil.which("mosquitto_passwd") is not None,
         "Mosquitto is not installed (Debian package mosquitto; `make test` installs it)")
    return path


class Broker:
    def __init__(self, folder: Path):
        self.folder = folder
        self.folder.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.binary = mosquitto()
        passwd = folder / "passwd"
        subprocess.run(["mosquitto_passwd", "-b", "-c", str(passwd), USER, PASSWORD], check=True, capture_output=True, timeout=30)
        passwd.chmod(0o600)
        (folder / "data").mkdir(exist_ok=True)
        self.config = folder / "mosquitto.conf"
        self.config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous false\n"
            f"password_file {passwd}\n"
            "persistence true\n"
            f"persistence_location {folder / 'data'}/\n"
            "user root\n"  # as root it would switch to the 'mosquitto' user, which cannot read this folder
            f"log_dest file {folder / 'mosquitto.log'}\n"
            "log_type error\nlog_type warning\nlog_type notice\n")
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Broker":
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
                return self
            except OSError:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"mosquitto exited: {self.proc.stderr.read().decode()[-2000:]}")
                time.sleep(0.05)
        raise RuntimeError("mosquitto did not start listening within 15 s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self.proc = None

    def password_file(self, password: str = PASSWORD) -> Path:
        path = self.folder / f"client-{len(password)}.pass"
        path.write_text(password + "\n")
        path.chmod(0o600)
        return path


@dataclass
class Message:
    topic: str
    payload: bytes
    retain: bool
    at: float

    def json(self) -> dict:
        return json.loads(self.payload)


class Subscriber:
    """A QoS 1 subscriber with a persistent session: messages published while it is away (the broker
    restarting) are kept for it by the broker and delivered when it is back."""

    def __init__(self, broker: Broker, topics: list[str], client_id: str = "monitord-test-subscriber"):
        import paho.mqtt.client as mqtt

        self.messages: list[Message] = []
        self._lock = threading.Lock()
        self.client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=False)
        self.client.username_pw_set(USER, PASSWORD)
        self.client.reconnect_delay_set(0.2, 1)
        self.topics = topics
        self.connected = threading.Event()
        self.client.on_connect = self._on_connect
        self.client.on_message = self._on_message
        self.client.on_disconnect = lambda *args: self.connected.clear()
        self.client.connect("127.0.0.1", broker.port, keepalive=10)
        self.client.loop_start()
        assert self.connected.wait(10 * time_scale()), "the test subscriber could not connect"

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        for topic in self.topics:
            client.subscribe(topic, qos=1)
        self.connected.set()

    def _on_message(self, client, userdata, message) -> None:
        with self._lock:
            self.messages.append(Message(message.topic, message.payload, bool(message.retain), time.monotonic()))

    def on(self, topic: str) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if m.topic == topic]

    def matching(self, predicate) -> list[Message]:
        with self._lock:
            return [m for m in self.messages if predicate(m)]

    def wait_for(self, predicate, timeout: float, count: int = 1) -> list[Message]:
        """The messages matching ``predicate`` once ``count`` are in, or what came in ``timeout``
        (scaled by ``time_scale()``: it says "it did not come", not how fast)."""
        deadline = time.monotonic() + timeout * time_scale()
        while time.monotonic() < deadline:
            found = self.matching(predicate)
            if len(found) >= count:
                return found
            time.sleep(0.05)
        return self.matching(predicate)

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()
