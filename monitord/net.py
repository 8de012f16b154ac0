"""Addresses: HOST:PORT parsing and the loopback check, for every socket the daemon binds."""

from __future__ import annotations

import ipaddress
import re

HOST_LABEL = re.compile(r"^(?!-)[a-z0-9-]{1,63}(?<!-)$")

REQUEST_HEAD_S = 10.0
"""Seconds an HTTP client of the dashboard or the metrics gets to send a whole request head once
connected; then it is cut off. One that sent a little at a time kept its connection, and a file
descriptor, for good: 1,100 of them used up the process's descriptors (slowloris)."""
MAX_HTTP_CONNECTIONS = 256
"""Connections one HTTP server (the dashboard, the metrics) keeps open at once; one more is closed
as it comes."""


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


def host_name(header: str) -> str | None:
    """The name a ``Host`` header names: lower-cased, without its port or one trailing dot (an
    IPv6 address without brackets); None where the value is no ``host[:port]`` at all (empty,
    userinfo, spaces, an unbracketed IPv6 address, a port that is not a number)."""
    if not header.isascii():
        return None
    if header.startswith("["):
        end = header.find("]")
        rest = header[end + 1:] if end > 0 else "x"
        if rest and not (rest[0] == ":" and rest[1:].isdigit()):
            return None
        try:
            return str(ipaddress.IPv6Address(header[1:end]))
        except ValueError:
            return None
    name, colon, port = header.partition(":")
    if colon and not port.isdigit():
        return None
    name = name.lower().removesuffix(".")
    if not name or len(name) > 253 or not all(HOST_LABEL.match(part) for part in name.split(".")):
        return None
    return name


def host_allowed(header: str, allowed: frozenset[str]) -> bool:
    """A loopback name or address, or one the user configured (``allowed``, normalised as host_name does)."""
    name = host_name(header)
    return name is not None and (name in allowed or is_loopback(name))
