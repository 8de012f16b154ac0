"""Addresses: HOST:PORT parsing and the loopback check, for every socket the daemon binds."""

from __future__ import annotations

import ipaddress


def split_host_port(bind: str) -> tuple[str, int]:
    """'HOST:PORT' (an IPv6 host in brackets) -> (host, port); ValueError naming what is wrong."""
    host, _, port = bind.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{bind!r}: expected HOST:PORT")
    return host.strip("[]"), int(port)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def url_for_bind(bind: str, scheme: str = "http") -> str:
    """Where a browser finds a server bound to HOST:PORT (a wildcard address: this host's name)."""
    import socket

    host, port = split_host_port(bind)
    if host in ("0.0.0.0", "::", ""):
        host = socket.gethostname()
    return f"{scheme}://{'[' + host + ']' if ':' in host else host}:{port}/"
