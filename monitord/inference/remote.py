"""The capture node's side of remote inference: ``RemoteModel`` and what an inference stage needs
around it. Plain ``http.client``: a node that only sends needs nothing beyond the base install.

- ``RemoteModel``: the model protocol (``score(windows) -> list[Scores]``, ``name``, ``labels``,
  ``sample_rate``...) built from the node's own config entry; no weights are loaded here.
- ``HttpTransport``: one keep-alive connection per thread; connection errors and the cluster's 5xx
  are retried with backoff, with the same request id, until ``inference.timeout_s`` has passed;
  then ``InferenceUnavailable``.
- ``InFlight``: keeps up to ``inference.max_in_flight`` batches in the air, hands results back in
  submission order.
- ``Availability``: turns outcomes into ``inference_down`` / ``inference_up`` transitions.
"""

from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import hashlib
import http.client
import json
import logging
import os
import random
import secrets
import socket
import ssl
import threading
import time
import urllib.parse
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import numpy as np

from monitord.config import EMOTIONS, InferenceConfig, yamnet_class_names
from monitord.inference.models.base import LabelsFixed, ModelBase, ModelUnavailable
from monitord.inference import wire
from monitord.types import Scores, Window, frozen_mapping

log = logging.getLogger(__name__)

MAX_ANSWER_BYTES = 64 * 2**20
"""An answer is scores and embeddings for one batch (a few KB to a few MB): a server sending more
is refused rather than read into memory."""

T = TypeVar("T")

RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
"""Statuses of the cluster (a replica died, a proxy restarting, overload); a 500 the model caused says so."""


class InferenceUnavailable(Exception):
    """The cluster gave no answer within ``inference.timeout_s``, retries included: these windows
    were not scored. The inference stage keeps them and tries again (status ``inference_down``)."""


class InferenceRefused(Exception):
    """The server refused the request (a 4xx: token, fingerprint, sample rate, format): a
    configuration problem that retrying does not mend. ``status`` is the HTTP status."""

    def __init__(self, message: str, status: int = 0):
        super().__init__(message)
        self.status = status


class RemoteModelError(Exception):
    """The model itself failed on the batch, on the server: what a local model's exception means."""


@dataclass(frozen=True)
class HttpReply:
    status: int
    headers: dict[str, str]
    """Lower-case names."""
    body: bytes

    def error(self) -> str:
        try:
            return str(json.loads(self.body)["error"])
        except (ValueError, KeyError, TypeError):
            return self.body[:200].decode("utf-8", "replace") or f"HTTP {self.status}"


class HttpTransport:
    """HTTP(S) to one base URL, bounded in time: retries connection errors and the cluster's 5xx
    with exponential backoff (jittered) until ``timeout_s`` after the first attempt."""

    def __init__(self, url: str, token: str | None, timeout_s: float, ca_file: str | None = None, max_attempts: int = 30,
                 backoff_s: float = 0.05, backoff_max_s: float = 1.0, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], None] = time.sleep):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"{url!r} is not an http(s) URL")
        self.url = url.rstrip("/")
        self._tls = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None
        self._host = parts.hostname
        self._port = parts.port
        self._prefix = parts.path.rstrip("/")
        self._token = token
        self.timeout_s = timeout_s
        self.max_attempts = max_attempts
        self.backoff_s = backoff_s
        self.backoff_max_s = backoff_max_s
        self._clock = clock
        self._sleep = sleep
        self._local = threading.local()
        self._lock = threading.Lock()
        self.retries = 0
        """Attempts after a first one, over the transport's life."""

    def send(self, method: str, path: str, body: Callable[[int], bytes] | None = None,
             content_type: str = wire.CONTENT_TYPE) -> HttpReply:
        """The first reply that is not the cluster's failure; ``body(attempt)`` makes each attempt's body.
        Raises InferenceUnavailable when no such reply came within ``timeout_s``."""
        began = self._clock()
        deadline = began + self.timeout_s
        attempt = 0
        while True:
            attempt += 1
            remaining = deadline - self._clock()
            try:
                reply = self._once(method, path, None if body is None else body(attempt), content_type, max(remaining, 0.01))
                if reply.status not in RETRIED_STATUSES or reply.headers.get(wire.ERROR_HEADER.lower()) == "model":
                    return reply
                last = f"HTTP {reply.status}: {reply.error()[:200]}"
            except ssl.SSLCertVerificationError as exc:
                self._drop_connection()
                raise InferenceRefused(f"{self.url}: the server's certificate is not trusted ({exc.verify_message}): "
                                       "give its CA in inference.ca_file") from None
            except (OSError, http.client.HTTPException) as exc:
                self._drop_connection()
                last = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            delay = min(self.backoff_max_s, self.backoff_s * 2 ** (attempt - 1)) * random.uniform(0.5, 1.0)
            if attempt >= self.max_attempts or self._clock() + delay >= deadline:
                raise InferenceUnavailable(f"inference at {self.url} did not answer {method} {path} within "
                                           f"{self._clock() - began:.1f} s ({attempt} attempts); last: {last}")
            with self._lock:
                self.retries += 1
            log.debug("%s %s%s: %s; attempt %d in %.2f s", method, self.url, path, last, attempt + 1, delay)
            self._sleep(delay)

    def _connection(self, timeout: float) -> http.client.HTTPConnection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            if self._tls is not None:
                conn = http.client.HTTPSConnection(self._host, self._port, timeout=timeout, context=self._tls)
            else:
                conn = http.client.HTTPConnection(self._host, self._port, timeout=timeout)
            self._local.conn = conn
        conn.timeout = timeout
        if conn.sock is not None:
            conn.sock.settimeout(timeout)
        return conn

    def _drop_connection(self) -> None:
        conn = getattr(self._local, "conn", None)
        if conn is not None:
            conn.close()
            self._local.conn = None

    def _once(self, method: str, path: str, body: bytes | None, content_type: str, timeout: float) -> HttpReply:
        conn = self._connection(timeout)
        headers = {"Accept": f"{wire.CONTENT_TYPE}, application/json"}
        if body is not None:
            headers["Content-Type"] = content_type
        if self._token is not None:
            headers["Authorization"] = f"Bearer {self._token}"
        conn.request(method, self._prefix + path, body=body, headers=headers)
        response = conn.getresponse()
        declared = response.getheader("content-length")
        if declared is not None and declared.isdigit() and int(declared) > MAX_ANSWER_BYTES:
            self._drop_connection()
            raise InferenceRefused(f"{self.url} answered with {int(declared)} bytes (at most {MAX_ANSWER_BYTES} expected)")
        data = response.read(MAX_ANSWER_BYTES + 1)
        if len(data) > MAX_ANSWER_BYTES:
            self._drop_connection()
            raise InferenceRefused(f"{self.url} answered with more than {MAX_ANSWER_BYTES} bytes")
        reply = HttpReply(response.status, {k.lower(): v for k, v in response.getheaders()}, data)
        if response.will_close:
            self._drop_connection()
        return reply

    def close(self) -> None:
        self._drop_connection()


def labels_of(config: Any) -> tuple[str, ...]:
    """The labels a model of this config entry scores, known without loading it."""
    if config.kind == "clap":
        return tuple(config.labels)
    if config.kind == "emotion":
        return EMOTIONS
    if config.kind == "yamnet":
        return yamnet_class_names(config.class_map) + tuple(config.groups)
    raise ValueError(f"a {config.kind} model cannot be scored remotely")


def default_node_id() -> str:
    """This process among capture nodes: host, pid and a random part (sources of two nodes may share names)."""
    return f"{socket.gethostname()[:64]}-{os.getpid()}-{secrets.token_hex(3)}"


@dataclass
class RemoteStats:
    requests: int = 0
    windows: int = 0
    batch_sizes: collections.Counter[int] = field(default_factory=collections.Counter)
    """Windows by the size of the server's forward pass that scored them (batching across nodes)."""
    replayed: int = 0
    seconds: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=1000))
    """Round trips of the last requests, retries included."""
    hop_seconds: collections.deque[float] = field(default_factory=lambda: collections.deque(maxlen=1000))
    """Of each round trip, what the replica's service did not spend: encoding, HTTP, Serve's proxy, decoding."""
    last_replica: str = ""


class RemoteModel(ModelBase):
    """A model scored by a ``monitord serve`` application, behind the same protocol as a local one.

    Built from this node's config entry: labels, gates and cascades are this node's; each request
    carries the entry's fingerprint, and the server refuses one that is not its own. At start it
    asks the server for the model's sample rate and checks the fingerprint (``verify``); a server
    that is down then is not an error (the usual rate of the kind is assumed, and the server
    refuses audio at another rate).
    """

    device = "remote"

    def __init__(self, name: str, config: Any, inference: InferenceConfig, transport: HttpTransport | None = None,
                 node: str | None = None, verify: bool = True):
        super().__init__(name, config)
        self.kind = config.kind
        self.model_id = config.model
        self.labels = labels_of(config)
        self._config = config
        self.fingerprint = wire.fingerprint(config)
        self.sample_rate = wire.DEFAULT_SAMPLE_RATES[config.kind]
        self.url = inference.url.rstrip("/")
        self.pcm = inference.pcm
        try:
            token = None if inference.token_file is None else wire.read_token(inference.token_file)
        except wire.TokenFileError as exc:
            raise ModelUnavailable(f"inference.token_file: {exc}") from None
        self.transport = transport or HttpTransport(self.url, token, inference.timeout_s, inference.ca_file)
        self.node = (node or default_node_id())[:128]
        self.stats = RemoteStats()
        self._stats_lock = threading.Lock()
        self.verified = False
        if verify:
            self.verify()

    def verify(self) -> bool:
        """Ask the server for this model: its rate, and whether its definition is this node's.
        Raises ModelUnavailable on a refusal or a mismatch; False (logged) when the server is down."""
        try:
            reply = self.transport.send("GET", "/v1/models")
        except InferenceUnavailable as exc:
            log.warning("model %s: cannot reach %s now (%s); assuming %d Hz until it answers", self.name, self.url, exc,
                        self.sample_rate)
            return False
        if reply.status != 200:
            raise ModelUnavailable(f"inference.url: {self.url} refused to describe its models (HTTP {reply.status}: {reply.error()})")
        try:
            served = json.loads(reply.body)["models"]
        except (ValueError, KeyError, TypeError):
            raise ModelUnavailable(f"inference.url: {self.url} is not a monitord serve application (GET /v1/models)") from None
        theirs = served.get(self.name)
        if theirs is None:
            raise ModelUnavailable(f"inference.models: the server at {self.url} does not serve model {self.name!r} "
                                   f"(it serves: {', '.join(served) or 'nothing'})")
        if theirs.get("fingerprint") != self.fingerprint:
            ours = wire.definition(self._config)
            differ = wire.differences(ours, theirs.get("definition") or {})
            detail = "; ".join(f"{k}: here {ours.get(k)!r}, server {(theirs.get('definition') or {}).get(k)!r}" for k in differ)
            raise ModelUnavailable(f"models.{self.name}: this node's definition differs from the server's at {self.url} "
                                   f"({detail or 'fingerprints differ'}): give both the same entry")
        self.sample_rate = int(theirs["sample_rate"])
        self.verified = True
        log.info("model %s: scored at %s (%d Hz, fingerprint %s)", self.name, self.url, self.sample_rate, self.fingerprint)
        return True

    def request_id(self, metas: Sequence[wire.WindowMeta]) -> str:
        """Made of the window ids, so a retry of the same windows is recognisable."""
        digest = hashlib.sha1("\n".join(f"{m.source}@{m.start_index}" for m in metas).encode("utf-8")).hexdigest()[:8]
        first = metas[0]
        return f"{self.node}:{self.name}:{first.source}@{first.start_index}+{len(metas)}:{digest}"

    def score(self, windows: Sequence[Window], upstream: Sequence[Scores] | None = None) -> list[Scores]:
        if not windows:
            return []
        audio = [np.asarray(w.at_rate(self.sample_rate), dtype=np.float32) for w in windows]
        metas = tuple(wire.window_meta(w, self.sample_rate, len(a)) for w, a in zip(windows, audio))
        request = wire.ScoreRequest(self.request_id(metas), self.name, self.fingerprint, self.sample_rate, metas,
                                    tuple(audio), self.pcm)
        began = time.perf_counter()
        reply = self.transport.send("POST", "/v1/score", lambda attempt: wire.encode_request(dataclasses.replace(request, attempt=attempt)))
        if reply.status == 500 and reply.headers.get(wire.ERROR_HEADER.lower()) == "model":
            raise RemoteModelError(f"model {self.name} at {self.url}: {reply.error()}")
        if reply.status != 200:
            raise InferenceRefused(f"model {self.name}: {self.url} refused the request (HTTP {reply.status}): {reply.error()}", reply.status)
        try:
            answer = wire.decode_response(reply.body)
        except wire.WireError as exc:
            raise InferenceRefused(f"model {self.name}: the answer from {self.url} is not a monitord response: {exc}") from None
        if answer.request_id != request.request_id or answer.windows != tuple(m.id for m in metas):
            raise InferenceRefused(f"model {self.name}: {self.url} answered for other windows than asked")
        if set(answer.labels) != set(self.labels) or len(answer.labels) != len(self.labels):
            raise InferenceRefused(f"model {self.name}: {self.url} answered with other labels than this node's")
        with self._stats_lock:
            s = self.stats
            s.requests += 1
            s.windows += len(windows)
            s.batch_sizes.update(answer.batch_sizes)
            s.replayed += answer.replayed
            s.seconds.append(time.perf_counter() - began)
            s.hop_seconds.append(time.perf_counter() - began - answer.server_ms / 1000)
            s.last_replica = answer.replica
        embeddings = answer.embeddings
        return [
            Scores(window=window, model=self.name, model_id=self.model_id,
                   probabilities=frozen_mapping({label: float(p) for label, p in zip(answer.labels, row)}),
                   embedding=None if embeddings is None else embeddings[i])
            for i, (window, row) in enumerate(zip(windows, answer.probabilities))
        ]

    def stats_now(self) -> tuple[int, int, dict[int, int]]:
        """(requests answered, windows scored, windows by the size of the forward pass that scored
        them): a consistent copy, for any thread."""
        with self._stats_lock:
            return self.stats.requests, self.stats.windows, dict(self.stats.batch_sizes)

    def prepare_labels(self, labels: Sequence[str], prompt: str) -> Any:
        """Refused: a remote model's labels are the server's (a change here would only make the
        server refuse this node's windows, by fingerprint); change both configs and redeploy."""
        raise LabelsFixed(f"model {self.name} is scored at {self.url}: change its labels in the server's config too, "
                          "redeploy it, then restart this node")

    def close(self) -> None:
        self.transport.close()


# around RemoteModel, for the inference stage


@dataclass(frozen=True)
class Outcome(Generic[T]):
    """One submitted call, finished: its value, or the exception it raised."""

    tag: Any
    value: T | None = None
    error: BaseException | None = None

    def result(self) -> T:
        if self.error is not None:
            raise self.error
        return self.value  # type: ignore[return-value]


class InFlight(Generic[T]):
    """Up to ``max_in_flight`` calls running at once, each on its own thread; outcomes come back in
    the order the calls were submitted (a finished call waits behind a slower earlier one, without
    holding a slot). One thread submits and collects: ``submit``, then ``ready()`` for what is done;
    ``on_done`` (called on the finishing call's thread, once its outcome can be collected) may wake it."""

    def __init__(self, max_in_flight: int, name: str = "inference", on_done: Callable[[], None] = lambda: None):
        if max_in_flight < 1:
            raise ValueError("max_in_flight must be at least 1")
        self.max_in_flight = max_in_flight
        self.on_done = on_done
        self._pool = concurrent.futures.ThreadPoolExecutor(max_in_flight, thread_name_prefix=name)
        self._pending: collections.deque[tuple[Any, concurrent.futures.Future]] = collections.deque()
        self._running = 0
        self._changed = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        """Submitted and not collected (running, or finished and waiting for an earlier one)."""
        return len(self._pending)

    @property
    def running(self) -> int:
        return self._running

    @property
    def full(self) -> bool:
        return self._running >= self.max_in_flight

    @property
    def closed(self) -> bool:
        return self._closed

    def submit(self, call: Callable[[], T], tag: Any = None, timeout: float | None = None) -> bool:
        """Start ``call`` once fewer than ``max_in_flight`` run; False if none finished within ``timeout``."""
        with self._changed:
            if not self._changed.wait_for(lambda: self._closed or self._running < self.max_in_flight, timeout):
                return False
            if self._closed:
                raise RuntimeError("InFlight is closed")
            self._running += 1
            future = self._pool.submit(call)
            self._pending.append((tag, future))
        future.add_done_callback(self._finished)
        return True

    def _finished(self, _future: concurrent.futures.Future) -> None:
        with self._changed:
            self._running -= 1
            self._changed.notify_all()
        self.on_done()

    def ready(self) -> list[Outcome[T]]:
        """The finished outcomes at the head of the line, without waiting."""
        out = []
        with self._changed:
            while self._pending and self._pending[0][1].done():
                out.append(self._outcome(*self._pending.popleft()))
        return out

    def next(self, timeout: float | None = None) -> Outcome[T] | None:
        """The oldest call's outcome, waiting up to ``timeout``; None if nothing is pending or it is not done."""
        with self._changed:
            if not self._pending:
                return None
            tag, future = self._pending[0]
        done, _ = concurrent.futures.wait([future], timeout)
        if not done:
            return None
        with self._changed:
            self._pending.popleft()
        return self._outcome(tag, future)

    def drain(self, timeout: float | None = None) -> list[Outcome[T]]:
        """Every pending outcome, in order, waiting up to ``timeout`` in all; what is still running stays pending."""
        deadline = None if timeout is None else time.monotonic() + timeout
        out = []
        while self._pending:
            left = None if deadline is None else max(0.0, deadline - time.monotonic())
            outcome = self.next(left)
            if outcome is None:
                break
            out.append(outcome)
        return out

    @staticmethod
    def _outcome(tag: Any, future: concurrent.futures.Future) -> Outcome:
        if future.cancelled():
            return Outcome(tag, error=concurrent.futures.CancelledError())
        error = future.exception()
        return Outcome(tag, error=error) if error is not None else Outcome(tag, value=future.result())

    def close(self, wait: bool = True) -> None:
        """No more submissions; calls not yet started are cancelled."""
        with self._changed:
            self._closed = True
            self._changed.notify_all()
        self._pool.shutdown(wait=wait, cancel_futures=True)


class Availability:
    """Whether the cluster answers, as transitions to publish: ``failed()`` is True once when it goes
    down (publish ``inference_down``), ``succeeded()`` gives the seconds it was down once when it
    comes back (publish ``inference_up``)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic):
        self._clock = clock
        self.down_since: float | None = None
        self.last_error = ""

    @property
    def up(self) -> bool:
        return self.down_since is None

    def failed(self, error: BaseException | str) -> bool:
        self.last_error = str(error)
        if self.down_since is not None:
            return False
        self.down_since = self._clock()
        return True

    def succeeded(self) -> float | None:
        if self.down_since is None:
            return None
        down_for = self._clock() - self.down_since
        self.down_since = None
        return down_for
