"""systemd's notification protocol (Type=notify): READY, STATUS, STOPPING and watchdog pings.

The pings come from the supervisor's loop only while every stage is healthy (its thread runs and
beat within its bound, or it finished its work), never from a timer thread that would go on
pinging while a stage is dead or stuck.
"""

from __future__ import annotations

import logging
import os
import socket
import time

log = logging.getLogger(__name__)


def notify(message: str) -> bool:
    """Send ``message`` to $NOTIFY_SOCKET; False when not run by systemd."""
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.connect(address)
            sock.sendall(message.encode())
        return True
    except OSError as exc:
        log.warning("cannot notify systemd at %s: %s", address, exc)
        return False


class Watchdog:
    """Pings at half of WatchdogSec, and only when told every stage is healthy."""

    def __init__(self) -> None:
        usec = os.environ.get("WATCHDOG_USEC")
        pid = os.environ.get("WATCHDOG_PID")
        enabled = usec is not None and usec.isdigit() and (pid is None or pid == str(os.getpid()))
        self.timeout_s = int(usec) / 1e6 if enabled else None
        self._last_ping = 0.0
        self.pings = 0

    @property
    def enabled(self) -> bool:
        return self.timeout_s is not None

    def tick(self, healthy: bool) -> None:
        if self.timeout_s is None or not healthy:
            return
        now = time.monotonic()
        if now - self._last_ping >= self.timeout_s / 2:
            if notify("WATCHDOG=1"):
                self.pings += 1
            self._last_ping = now
