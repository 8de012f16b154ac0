"""Hostile clients of the inference application: refused on their headers, bodies never read whole.

The replica's own request handler (``MonitordInference.__call__``) runs behind uvicorn in a process
of its own (``python -m tests.test_serve_hostile PORT LIMIT_MB``), without Ray, so that its memory
can be read from /proc; one check runs it on a real Ray Serve application.
"""

from __future__ import annotations

import asyncio
import http.client
import importlib.util
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import REPO, free_port, need, wait_until

TOKEN = "a-long-enough-shared-secret"
WRONG = "another-long-enough-secret"
LABELS = ("tone", "noise", "speech", "music")
RATE = 16000
BIG = 60_000_000
"""The hostile body: 60 MB, under the default serve.max_request_mb (64 MiB)."""
MB = 1024 * 1024


@dataclass
class Server:
    port: int
    pid: int
    prefix: str = "/monitord"

    def peak_rss(self) -> int:
        """The process's peak resident set (VmHWM), bytes."""
        return proc_kb(self.pid, "VmHWM") * 1024


def proc_kb(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


@contextmanager
def replica_server(limit_mb: float = 64.0) -> Iterator[Server]:
    """The replica's handler behind uvicorn in a child process (token TOKEN, serve.max_request_mb ``limit_mb``)."""
    need(importlib.util.find_spec("ray") is not None and importlib.util.find_spec("uvicorn") is not None,
         "ray[serve] is not installed (pip install 'monitord[cluster]')")
    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "tests.test_serve_hostile", str(port), str(limit_mb)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        up = wait_until(lambda: proc.poll() is not None or _accepts(port), 60)
        assert up and proc.poll() is None, f"the server did not start: {proc.stderr.read() if proc.poll() is not None else ''}"
        yield Server(port, proc.pid)
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return True
    except OSError:
        return False


def post_headers(port: int, path: str, token: str | None, length: int | None) -> socket.socket:
    """A POST's request line and headers, and none of its body (``length`` None: chunked)."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=20)
    lines = [f"POST {path} HTTP/1.1", "Host: 127.0.0.1", "Content-Type: application/x-monitord",
             "Transfer-Encoding: chunked" if length is None else f"Content-Length: {length}"]
    if token is not None:
        lines.append(f"Authorization: Bearer {token}")
    sock.sendall(("\r\n".join(lines) + "\r\n\r\n").encode("ascii"))
    return sock


def reply_of(sock: socket.socket) -> tuple[int, bytes]:
    response = http.client.HTTPResponse(sock)
    response.begin()
    return response.status, response.read()


def send_in_background(sock: socket.socket, chunks: Iterator[bytes]) -> threading.Thread:
    """Send the body on a thread of its own (a server that answers early may stop reading it)."""

    def run() -> None:
        try:
            for chunk in chunks:
                sock.sendall(chunk)
        except OSError:
            pass

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def plain_chunks(total: int, size: int = MB) -> Iterator[bytes]:
    block = b"\0" * size
    sent = 0
    while sent < total:
        n = min(size, total - sent)
        yield block[:n]
        sent += n


def chunked(chunks: Iterator[bytes]) -> Iterator[bytes]:
    """HTTP/1.1 chunked transfer coding."""
    for chunk in chunks:
        yield b"%x\r\n" % len(chunk) + chunk + b"\r\n"
    yield b"0\r\n\r\n"


def score_body(model: str = "clap", seconds: float = 2.0) -> bytes:
    from monitord.config import ClapModelConfig
    from monitord.inference import wire

    n = int(seconds * RATE)
    meta = wire.WindowMeta("rec", 0, RATE, n, 1.7e9, 1.7e9)
    fingerprint = wire.fingerprint(ClapModelConfig(model="/m/clap", labels=LABELS))
    samples = np.sin(np.arange(n) / 10.0).astype(np.float32)
    return wire.encode_request(wire.ScoreRequest("node:clap:1", model, fingerprint, RATE, (meta,), (samples,)))


# refused on the headers


def test_a_wrong_token_is_refused_on_the_headers_before_any_of_the_body_is_read():
    with replica_server() as server:
        for token in (WRONG, None):
            sock = post_headers(server.port, "/monitord/v1/score", token, BIG)  # and never a byte of the body
            with sock:
                status, body = reply_of(sock)
            assert status == 401 and b"token" in body


@pytest.mark.parametrize("length, status", [("\u00b2", 400), ("\u00b9\u00b3", 400), ("+5", 400), ("-1", 400), ("1_0", 400),
                                            ("9" * 5000, 413), ("0" * 30 + "5", None)])
def test_a_content_length_int_cannot_read_is_refused_not_raised(length, status):
    """handle_asgi is the replica's whole handler: a length str.isdigit() takes but int() does not
    ('²'; 4300+ digits) raised out of it instead of answering."""
    from monitord.config import ClapModelConfig
    from monitord.serve.service import InferenceService

    service = InferenceService({"clap": _StubModel()}, {"clap": ClapModelConfig(model="/m/clap", labels=LABELS)},
                               TOKEN, 1000, 30.0, replica="test")
    scope = {"type": "http", "method": "POST", "path": "/v1/nowhere", "root_path": "",
             "headers": [(b"authorization", f"Bearer {TOKEN}".encode()), (b"content-length", length.encode("latin-1"))]}

    async def receive():
        return {"type": "http.request", "body": b"x" * 5, "more_body": False}

    reply = asyncio.run(service.handle_asgi(scope, receive))
    assert reply.status == (status or 404), reply


@pytest.mark.parametrize("host, status", [("127.0.0.1:8000", 404), ("localhost:8000", 404), ("[::1]:8000", 404), (None, 404),
                                          ("attacker.example:8000", 421), ("127.0.0.1.nip.io:8000", 421), ("localhost.attacker.example", 421)])
def test_a_tokenless_server_answers_loopback_clients_only_by_loopback_host_names(host, status):
    """A tokenless replica answered any loopback client: a DNS-rebinding page (its own name re-pointed
    at 127.0.0.1, so the browser connects from loopback) could use it and read its models and stats."""
    from monitord.config import ClapModelConfig
    from monitord.serve.service import InferenceService

    service = InferenceService({"clap": _StubModel()}, {"clap": ClapModelConfig(model="/m/clap", labels=LABELS)},
                               None, 1000, 30.0, replica="test")
    headers = [] if host is None else [(b"host", host.encode())]
    scope = {"type": "http", "method": "GET", "path": "/v1/nowhere", "root_path": "", "headers": headers,
             "client": ("127.0.0.1", 50000)}

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    assert asyncio.run(service.handle_asgi(scope, receive)).status == status


def test_a_right_token_with_an_oversized_declared_length_is_413_before_the_body():
    with replica_server(limit_mb=4) as server, post_headers(server.port, "/monitord/v1/score", TOKEN, 5 * MB) as sock:
        status, body = reply_of(sock)
    assert status == 413 and b"max_request_mb" in body


def test_a_60_mb_body_with_a_wrong_token_costs_the_server_under_5_mb():
    with replica_server() as server:
        with post_headers(server.port, "/monitord/v1/score", WRONG, 4096) as sock:  # warm: every code path taken once
            sock.sendall(b"\0" * 4096)
            assert reply_of(sock)[0] == 401
        before = server.peak_rss()
        sock = post_headers(server.port, "/monitord/v1/score", WRONG, BIG)
        with sock:
            sender = send_in_background(sock, plain_chunks(BIG))
            status, _ = reply_of(sock)
            sender.join(60)
        grown = server.peak_rss() - before
        print(f"\npeak RSS of the server: {before / MB:.1f} MiB before a 60 MB body with a wrong token, "
              f"+{grown / MB:.2f} MiB after")
        assert status == 401 and not sender.is_alive()
        assert grown < 5 * MB, f"peak RSS grew by {grown / MB:.1f} MiB"


def test_a_chunked_body_is_read_up_to_the_limit_and_never_past_it():
    with replica_server(limit_mb=1) as server:
        with post_headers(server.port, "/monitord/v1/score", TOKEN, None) as sock:  # a scoring request, chunked
            send_in_background(sock, chunked(iter([score_body()]))).join(30)
            status, body = reply_of(sock)
        assert status == 200, body
        before = server.peak_rss()
        with post_headers(server.port, "/monitord/v1/score", TOKEN, None) as sock:
            sender = send_in_background(sock, chunked(plain_chunks(BIG, 64 * 1024)))
            status, body = reply_of(sock)
            sender.join(60)
        grown = server.peak_rss() - before
        print(f"\npeak RSS of the server: +{grown / MB:.2f} MiB for a 60 MB chunked body over a 1 MiB limit")
    assert status == 413 and b"max_request_mb" in body
    assert grown < 5 * MB, f"peak RSS grew by {grown / MB:.1f} MiB"


def test_a_right_token_gets_scores_through_the_same_handler():
    from monitord.inference import wire

    body = score_body()
    with replica_server() as server:
        conn = http.client.HTTPConnection("127.0.0.1", server.port, timeout=20)
        conn.request("POST", "/monitord/v1/score", body, {"Authorization": f"Bearer {TOKEN}",
                                                           "Content-Type": wire.CONTENT_TYPE})
        response = conn.getresponse()
        answer = response.read()
        conn.close()
    assert response.status == 200, answer
    decoded = wire.decode_response(answer)
    assert decoded.labels == LABELS and decoded.windows == (("rec", 0),)


def test_the_token_comparison_never_compares_inputs_of_different_lengths(monkeypatch):
    """What hmac.compare_digest cannot hide is the length of what it compares: both sides are digests."""
    import hmac

    from monitord.serve import service as service_module

    seen: list[tuple[int, int]] = []
    real = hmac.compare_digest

    def recording(a, b):
        seen.append((len(a), len(b)))
        return real(a, b)

    monkeypatch.setattr(service_module.hmac, "compare_digest", recording)
    service = service_module.InferenceService({}, {}, TOKEN, MB, 30.0)
    for given in ("short-one", TOKEN + "-and-more", TOKEN):
        status = asyncio.run(service.handle("GET", "/v1/stats", {"authorization": f"Bearer {given}"}, b"", "10.0.0.1")).status
        assert status == (200 if given == TOKEN else 401)
    assert len(seen) == 3 and all(a == b for a, b in seen), seen


# the replica on a real Ray Serve application


@pytest.fixture(scope="module")
def token_cluster(tmp_path_factory, tiny_emotion):
    """`monitord serve` with a token and one replica (a tiny emotion model), started once."""
    need(importlib.util.find_spec("ray") is not None and importlib.util.find_spec("ray.serve") is not None,
         "ray[serve] is not installed (pip install 'monitord[cluster]')")
    import select

    from tests.test_serve import quiet_port, stop_session

    folder = tmp_path_factory.mktemp("serve-token")
    (folder / "serve.token").write_text(TOKEN + "\n")
    config = folder / "serve.yaml"
    config.write_text(f"""
models:
  mood: {{kind: emotion, model: {tiny_emotion}, dtype: float32}}
serve: {{token_file: {folder / "serve.token"}, replicas: 1}}
""")
    port = quiet_port()
    log = folder / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen([sys.executable, "-m", "monitord", "serve", "-c", str(config), "--port", str(port)],
                                cwd=REPO, stdout=subprocess.PIPE, stderr=err, text=True, start_new_session=True)
    try:
        line, deadline = "", time.monotonic() + 240
        while not line and time.monotonic() < deadline and proc.poll() is None:
            if select.select([proc.stdout], [], [], 1.0)[0]:
                line = proc.stdout.readline().strip()
        assert line == f"http://127.0.0.1:{port}/monitord", f"no URL line ({line!r}); log:\n{log.read_text()[-3000:]}"
        yield port, proc
    finally:
        stop_session(proc)


def _session_process(session: int, marker: str) -> int:
    import psutil

    from tests.test_serve import session_processes

    for pid in session_processes(session):
        try:
            if marker in " ".join(psutil.Process(pid).cmdline()):
                return pid
        except psutil.Error:
            continue
    raise AssertionError(f"no process {marker} in the session")


def test_on_ray_serve_a_60_mb_body_with_a_wrong_token_is_refused_on_its_headers(token_cluster):
    port, proc = token_cluster
    with post_headers(port, "/monitord/v1/score", WRONG, BIG) as sock:  # headers only: answered all the same
        assert reply_of(sock)[0] == 401
    replica = _session_process(proc.pid, "ServeReplica:monitord:MonitordInference")
    proxy = _session_process(proc.pid, "ProxyActor")
    before = {pid: proc_kb(pid, "VmHWM") * 1024 for pid in (replica, proxy)}
    sock = post_headers(port, "/monitord/v1/score", WRONG, BIG)
    with sock:
        sender = send_in_background(sock, plain_chunks(BIG))
        status, _ = reply_of(sock)
        sender.join(60)
    grown = {pid: proc_kb(pid, "VmHWM") * 1024 - before[pid] for pid in before}
    print(f"\nRay Serve, a 60 MB body with a wrong token: replica peak RSS +{grown[replica] / MB:.2f} MiB, "
          f"proxy +{grown[proxy] / MB:.2f} MiB")
    assert status == 401
    assert grown[replica] < 5 * MB, f"the replica's peak RSS grew by {grown[replica] / MB:.1f} MiB"


# the server process of the tests above


class _StubModel:
    """Probabilities from the samples themselves; no torch."""

    name, model_id, labels, sample_rate = "clap", "/m/clap", LABELS, RATE
    batch_max, batch_wait_ms, gated_by = 8, 10.0, None

    def score(self, windows, upstream=None):
        from monitord.types import Scores, frozen_mapping

        out = []
        for w in windows:
            x = np.abs(w.at_rate(RATE)[:4].astype(np.float64)) + 1e-3
            out.append(Scores(w, self.name, self.model_id, frozen_mapping(dict(zip(LABELS, map(float, x / x.sum()))))))
        return out


def main(port: int, limit_mb: float) -> None:
    """uvicorn in front of the replica's own handler (``MonitordInference.__call__``), no Ray cluster."""
    from types import SimpleNamespace

    import uvicorn
    from starlette.requests import Request

    from monitord.config import ClapModelConfig
    from monitord.serve.deployment import MonitordInference
    from monitord.serve.service import InferenceService

    replica = MonitordInference.__new__(MonitordInference)  # what __init__ sets up, without Ray's replica context
    replica.settings = SimpleNamespace(max_request_mb=limit_mb)
    replica.max_request_bytes = int(limit_mb * MB)
    replica.service = InferenceService({"clap": _StubModel()}, {"clap": ClapModelConfig(model="/m/clap", labels=LABELS)},
                                       TOKEN, replica.max_request_bytes, 30.0, replica="test")

    async def app(scope, receive, send) -> None:
        if scope["type"] != "http":
            return
        scope = {**scope, "root_path": "/monitord"}  # what Serve's proxy hands the replica
        response = await replica(Request(scope, receive))
        await response(scope, receive, send)

    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", lifespan="off")


if __name__ == "__main__":
    main(int(sys.argv[1]), float(sys.argv[2]))
