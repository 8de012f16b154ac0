"""The inference application's HTTP API, without Ray: authorise, parse, check, score, answer.

``monitord.serve.deployment`` puts it behind Ray Serve (``@serve.batch`` across capture nodes,
replicas, health checks); tests and tools can put it behind any HTTP server. Paths, under the
application's route (``/monitord`` by default):

- ``POST /v1/score``: a wire-format request (``monitord.inference.wire``) -> scores.
- ``GET /v1/models``: the models served, with their rate, fingerprint and definition (JSON).
- ``GET /v1/stats``: this replica's counters: forward passes by batch size, windows, requests.

Every path needs the token (``Authorization: Bearer TOKEN``) when one is configured; without one
only loopback clients are answered (and none that came through a proxy).
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import hmac
import json
import logging
import os
import threading
import time
import zlib
from collections import Counter, OrderedDict
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from monitord import net
from monitord.inference.models.base import Model
from monitord.types import Scores
from monitord.inference import wire
from monitord.types import Window

log = logging.getLogger(__name__)

CANARY_SECONDS = 2.0
REPLAY_ENTRIES = 64
"""Answers kept per replica, so a retry whose answer was lost on the way is not computed again."""



@dataclass(frozen=True)
class Scored:
    """One window's scores, and the forward pass they came from."""

    scores: Scores
    batch_size: int
    forward_s: float


ScoreHook = Callable[[str, list[Window]], Awaitable[list[Scored]]]
"""(model, windows) -> each window's Scored, in order."""

Receive = Callable[[], Awaitable[Mapping[str, Any]]]
"""An ASGI ``receive``: the request body arrives as ``http.request`` messages."""


@dataclass(frozen=True)
class Reply:
    status: int
    body: bytes
    content_type: str = "application/json"
    headers: dict[str, str] = field(default_factory=dict)


def json_reply(status: int, data: dict[str, Any], headers: dict[str, str] | None = None) -> Reply:
    return Reply(status, json.dumps(data).encode("utf-8"), "application/json", headers or {})


def error_reply(status: int, message: str, **headers: str) -> Reply:
    return json_reply(status, {"error": message}, headers)


@dataclass
class ServiceStats:
    requests: Counter[int] = field(default_factory=Counter)
    """Requests by HTTP status."""
    batches: dict[str, Counter[int]] = field(default_factory=dict)
    """Forward passes per model, by batch size."""
    windows: Counter[str] = field(default_factory=Counter)
    retried_requests: int = 0
    """Requests that said they were a retry (attempt > 1)."""
    replayed: int = 0
    canaries: int = 0


def is_loopback(host: str | None) -> bool:
    return host is not None and net.is_loopback(host)


def canary_window(sample_rate: int) -> Window:
    """A fixed window (a tone in a little noise) for the health check's forward pass."""
    n = int(CANARY_SECONDS * sample_rate)
    t = np.arange(n) / sample_rate
    samples = 0.1 * np.sin(2 * np.pi * 440.0 * t) + 0.01 * np.random.default_rng(0).standard_normal(n)
    meta = wire.WindowMeta("canary", 0, sample_rate, n, time.time(), time.time())
    return wire.make_window(meta, samples.astype(np.float32), sample_rate)


class InferenceService:
    """One replica's API over its loaded models; ``score`` decides how windows meet in forward passes."""

    def __init__(
        self,
        models: Mapping[str, Model],
        configs: Mapping[str, Any],
        token: str | None,
        max_request_bytes: int,
        canary_every_s: float,
        replica: str = "",
        score: ScoreHook | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.models = dict(models)
        self.definitions = {name: wire.definition(configs[name]) for name in self.models}
        self.fingerprints = {name: wire.fingerprint(configs[name]) for name in self.models}
        if token is not None and len(token) < wire.MIN_TOKEN_CHARS:
            raise wire.TokenFileError(f"a token of {len(token)} characters; it needs at least {wire.MIN_TOKEN_CHARS}")
        self._token = None if token is None else _digest(token.encode("utf-8"))
        self.max_request_bytes = max_request_bytes
        self.canary_every_s = canary_every_s
        self.replica = replica
        self._score_hook = score or self._score_each_request
        self._clock = clock
        self._locks = {name: threading.Lock() for name in self.models}
        self._recent: OrderedDict[tuple[str, str, int], wire.ScoreResponse] = OrderedDict()
        self._last_ok = clock()
        self._failed_since_ok: str | None = None
        self.stats = ServiceStats(batches={name: Counter() for name in self.models})

    # the models

    def score_now(self, name: str, windows: Sequence[Window], record: bool = True) -> list[Scores]:
        """One forward pass (blocking, one at a time per model); what every path ends in."""
        model = self.models[name]
        with self._locks[name]:
            try:
                scores = model.score(list(windows))
                if len(scores) != len(windows):
                    raise RuntimeError(f"model {name} returned {len(scores)} scores for {len(windows)} windows")
            except Exception as exc:
                self._failed_since_ok = f"{name}: {exc!r}"
                raise
        self._last_ok = self._clock()
        self._failed_since_ok = None
        if record:
            self.stats.batches[name][len(windows)] += 1
            self.stats.windows[name] += len(windows)
        return scores

    async def _score_each_request(self, name: str, windows: list[Window]) -> list[Scored]:
        """Without Ray: each request is its own forward pass."""
        began = time.perf_counter()
        scores = await asyncio.to_thread(self.score_now, name, windows)
        took = time.perf_counter() - began
        return [Scored(s, len(windows), took) for s in scores]

    async def check_health(self) -> None:
        """Raises when a model cannot score. A forward pass on a canary window runs at most every
        ``canary_every_s``, and only when no real batch succeeded since then or the last one failed."""
        if self._failed_since_ok is None and self._clock() - self._last_ok < self.canary_every_s:
            return
        for name, model in self.models.items():
            window = canary_window(model.sample_rate)
            scores = await asyncio.to_thread(self.score_now, name, [window], False)
            values = np.array(list(scores[0].probabilities.values()), dtype=np.float64)
            if not values.size or not np.isfinite(values).all():
                self._failed_since_ok = f"{name}: non-finite scores on the canary window"
                raise RuntimeError(f"model {name} gives non-finite scores on the canary window")
            self.stats.canaries += 1

    # HTTP

    async def handle(self, method: str, path: str, headers: Mapping[str, str], body: bytes, client: str | None) -> Reply:
        """``headers`` with lower-case names; ``path`` below the application's route."""
        reply = self._refuse(headers, client) or await self._answer(method, path, body)
        self.stats.requests[reply.status] += 1
        return reply

    async def handle_asgi(self, scope: Mapping[str, Any], receive: Receive) -> Reply:
        """An ASGI HTTP request (``scope["path"]`` under ``scope["root_path"]``, the application's
        route), refused on its headers before any of its body is read: token, then declared size.
        A body without a Content-Length (chunked) is read up to ``max_request_bytes``, never past it."""
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", ())}
        method, path = scope.get("method", "GET"), _route_path(scope)
        client = (scope.get("client") or (None,))[0]
        reply = self._refuse(headers, client) or self._refuse_length(method, headers)
        if reply is None:
            body = b""
            if method == "POST":
                body, reply = await read_body(receive, self.max_request_bytes)
            reply = reply or await self._answer(method, path, body)
        self.stats.requests[reply.status] += 1
        return reply

    async def _answer(self, method: str, path: str, body: bytes) -> Reply:
        try:
            return await self._route(method, path.rstrip("/") or "/", body)
        except Exception:  # never a crash for one request
            log.exception("request %s %s failed", method, path)
            return error_reply(500, "internal error (see the replica's log)")

    def _refuse_length(self, method: str, headers: Mapping[str, str]) -> Reply | None:
        """413 for a declared body over the limit, before any of it is read."""
        length = headers.get("content-length")
        if method != "POST" or length is None:
            return None
        digits = length.strip()
        if not (digits.isascii() and digits.isdigit()):  # str.isdigit alone takes '²', which int() does not
            return error_reply(400, f"Content-Length {length[:40]!r} is not a number")
        if len(digits.lstrip("0")) > 18 or int(digits) > self.max_request_bytes:  # int() refuses 4300+ digits
            return error_reply(413, f"body of {digits[:40]} bytes exceeds serve.max_request_mb "
                                    f"({self.max_request_bytes / (1024 * 1024):g} MiB)")
        return None

    def _refuse(self, headers: Mapping[str, str], client: str | None) -> Reply | None:
        if self._token is None:
            proxied = "x-forwarded-for" in headers or "forwarded" in headers
            # a loopback Host too: a page whose own name an attacker re-points at 127.0.0.1 (DNS
            # rebinding) reaches a loopback server from the browser's loopback address, with its own name
            host = headers.get("host")
            if is_loopback(client) and not proxied and (host is None or net.host_allowed(host, frozenset())):
                return None
            if is_loopback(client) and not proxied:
                return error_reply(421, f"this server has no token (serve.token_file): it answers only to loopback "
                                        f"host names, not {host[:80]!r} (use 127.0.0.1, or set a token)")
            return error_reply(401, "this server has no token (serve.token_file): it answers loopback clients only",
                               **{"WWW-Authenticate": "Bearer"})
        scheme, _, given = headers.get("authorization", "").partition(" ")
        # digests of equal length: the comparison's time says nothing of the token, its length included
        if hmac.compare_digest(_digest(given.strip().encode("utf-8", "replace")), self._token) and scheme.lower() == "bearer":
            return None
        return error_reply(401, "missing or wrong token: send Authorization: Bearer <the contents of inference.token_file>",
                           **{"WWW-Authenticate": "Bearer"})

    async def _route(self, method: str, path: str, body: bytes) -> Reply:
        routes = {"/v1/score": ("POST", self._score), "/v1/models": ("GET", self._describe), "/v1/stats": ("GET", self._stats)}
        if path not in routes:
            return error_reply(404, f"no such path {path!r} (paths: {', '.join(routes)})")
        wanted, handler = routes[path]
        if method != wanted:
            return error_reply(405, f"{path} takes {wanted}", Allow=wanted)
        return await handler(body)

    async def _describe(self, _body: bytes) -> Reply:
        models = {
            name: {"kind": self.definitions[name].get("kind"), "model_id": model.model_id, "sample_rate": model.sample_rate,
                   "labels": len(model.labels), "fingerprint": self.fingerprints[name], "definition": self.definitions[name],
                   "batch_max": model.batch_max, "batch_wait_ms": model.batch_wait_ms}
            for name, model in self.models.items()
        }
        return json_reply(200, {"wire_version": wire.VERSION, "replica": self.replica, "models": models})

    async def _stats(self, _body: bytes) -> Reply:
        s = self.stats
        return json_reply(200, {
            "replica": self.replica, "pid": os.getpid(),
            "batches": {m: {str(size): n for size, n in sorted(c.items())} for m, c in s.batches.items()},
            "windows": dict(s.windows), "requests": {str(k): v for k, v in s.requests.items()},
            "retried_requests": s.retried_requests, "replayed": s.replayed, "canaries": s.canaries,
        })

    async def _score(self, body: bytes) -> Reply:
        began = time.perf_counter()
        try:
            request = wire.decode_request(body, self.max_request_bytes)
        except wire.WireError as exc:
            return error_reply(exc.status, str(exc))
        name = request.model
        model = self.models.get(name)
        if model is None:
            return error_reply(404, f"model {name!r} is not served here (served: {', '.join(self.models) or 'none'})")
        if request.fingerprint != self.fingerprints[name]:
            return error_reply(409, f"model {name!r}: the capture node's definition (fingerprint {request.fingerprint}) differs "
                                    f"from this server's ({self.fingerprints[name]}): kind, model, labels, prompt, label_map "
                                    f"and groups must be the same on both; GET /v1/models shows the server's")
        if request.sample_rate != model.sample_rate:
            return error_reply(400, f"model {name!r} takes {model.sample_rate} Hz audio; the request's is at "
                                    f"{request.sample_rate} Hz (resample on the capture node)")
        if request.attempt > 1:
            self.stats.retried_requests += 1
        key = (request.request_id, request.fingerprint, _content_crc(request))
        if key in self._recent:
            self.stats.replayed += 1
            self._recent.move_to_end(key)
            return Reply(200, wire.encode_response(dataclasses.replace(self._recent[key], replayed=True)), wire.CONTENT_TYPE)
        windows = [wire.make_window(meta, samples, request.sample_rate) for meta, samples in zip(request.windows, request.audio)]
        try:
            results = await self._score_hook(name, windows)
            answer = self._response(request, results, began)
        except Exception as exc:
            log.warning("model %s failed on %d windows of request %s: %r", name, len(windows), request.request_id, exc)
            return error_reply(500, f"model {name!r} failed on this batch: {exc!r}", **{wire.ERROR_HEADER: "model"})
        self._recent[key] = answer
        while len(self._recent) > REPLAY_ENTRIES:
            self._recent.popitem(last=False)
        return Reply(200, wire.encode_response(answer), wire.CONTENT_TYPE)

    def _response(self, request: wire.ScoreRequest, results: list[Scored], began: float) -> wire.ScoreResponse:
        labels = tuple(results[0].scores.probabilities)
        if any(tuple(r.scores.probabilities) != labels for r in results):
            raise RuntimeError("the model gave different labels for windows of one batch")
        probabilities = np.array([[r.scores.probabilities[label] for label in labels] for r in results], dtype=np.float64)
        embeddings = [r.scores.embedding for r in results]
        if all(e is None for e in embeddings):
            stacked = None
        elif any(e is None for e in embeddings) or len({np.shape(e) for e in embeddings}) != 1 or np.ndim(embeddings[0]) != 1:
            raise RuntimeError("the model gave embeddings for some windows of a batch and not others, or of different shapes")
        else:
            stacked = np.stack([np.asarray(e, dtype=np.float32) for e in embeddings])
        return wire.ScoreResponse(request.request_id, request.model, labels, tuple(m.id for m in request.windows), probabilities,
                                  stacked, tuple(r.batch_size for r in results), self.replica,
                                  server_ms=(time.perf_counter() - began) * 1000,
                                  forward_ms=max(r.forward_s for r in results) * 1000)


async def read_body(receive: Receive, limit: int) -> tuple[bytes, Reply | None]:
    """The request body from ASGI ``receive``, or a refusal as soon as more than ``limit`` bytes came
    (413, the rest never read) or the client went away."""
    body = bytearray()
    while True:
        message = await receive()
        if message.get("type") == "http.disconnect":
            return b"", error_reply(400, "the client went away before the whole body arrived")
        body += message.get("body", b"")
        if len(body) > limit:
            return b"", error_reply(413, f"body exceeds serve.max_request_mb ({limit / (1024 * 1024):g} MiB)")
        if not message.get("more_body", False):
            return bytes(body), None


def _route_path(scope: Mapping[str, Any]) -> str:
    """The path below the application's route (Serve and uvicorn put the route in ``root_path``)."""
    path, root = scope.get("path", "/"), scope.get("root_path", "")
    return path[len(root):] if root and path.startswith(root) else path


def _digest(token: bytes) -> bytes:
    return hashlib.sha256(token).digest()


def _content_crc(request: wire.ScoreRequest) -> int:
    """A digest of what a request asks to score, the same for every attempt of it."""
    crc = zlib.crc32(repr(request.windows).encode("utf-8"))
    for samples in request.audio:
        crc = zlib.crc32(samples.tobytes(), crc)
    return crc
