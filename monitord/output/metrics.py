"""Prometheus metrics on an HTTP endpoint (loopback by default).

Most figures are read from the stages when Prometheus scrapes (a collector over the supervisor's
snapshot), so no stage pushes numbers across threads: windows cut and passed per source, each
model's outcomes per source, drops, queue depth, input level, every stage's state and restarts.
What only the output stage sees (events published) and the inference stage's batch timings are
recorded where they happen.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from monitord.net import split_host_port

log = logging.getLogger(__name__)


@dataclass
class Snapshot:
    """What the collector reports, read off the stages at scrape time."""

    windows: dict[tuple[str, str], int] = field(default_factory=dict)
    """(source, "cut" | "passed") -> windows."""
    outcomes: dict[tuple[str, str, str], int] = field(default_factory=dict)
    """(source, model, verdict) -> windows."""
    dropped: dict[str, int] = field(default_factory=dict)
    queue_depth: int = 0
    input_level: dict[str, float] = field(default_factory=dict)
    source_up: dict[str, bool] = field(default_factory=dict)
    stages: dict[str, tuple[str, bool, int]] = field(default_factory=dict)
    """stage -> (state, healthy, restarts)."""
    remote: dict[str, RemoteFigures] = field(default_factory=dict)
    """Remote models (``inference.models``) by name."""
    remote_dropped: dict[str, int] = field(default_factory=dict)
    """Windows a live source took off remote scoring (too many waiting), per source."""
    remote_waiting: int = 0
    remote_in_flight: int = 0
    inference_up: bool | None = None
    """Whether the cluster answers (None: no remote model)."""


@dataclass
class RemoteFigures:
    requests: int = 0
    windows: int = 0
    forward_sizes: dict[int, int] = field(default_factory=dict)
    """Windows by the size of the server's forward pass that scored them (batching across nodes)."""
    resends: int = 0
    """Requests sent again (same windows, same id) after the cluster did not answer within timeout_s."""
    http_retries: int = 0
    """Attempts after a first one within a request (connection errors, the cluster's 5xx)."""


STATES = ("starting", "running", "degraded", "failed", "stopped")
FORWARD_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, snapshot: Callable[[], Snapshot]) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.model_seconds = Histogram("monitord_model_batch_seconds", "Time to score one batch", ["model"], registry=r,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("monitord_model_batch_windows", "Windows per batch", ["model"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.events = Counter("monitord_events_total", "Alert events", ["source", "rule", "phase"], registry=r)
        self.last_event = Gauge("monitord_last_event_timestamp_seconds", "When the last alert event was published", ["source"], registry=r)
        r.register(_Collector(snapshot))
        self._server = None

    def on_batch(self, model: str, windows: int, seconds: float) -> None:
        self.model_seconds.labels(model).observe(seconds)
        self.batch_size.labels(model).observe(windows)

    def on_published(self, event) -> None:
        if event.kind == "alert":
            self.events.labels(event.source, event.rule, event.phase).inc()
            import time

            self.last_event.labels(event.source).set(time.time())

    def serve(self, bind: str) -> None:
        import threading

        from prometheus_client import make_wsgi_app

        host, port = split_host_port(bind)
        self._server = guarded_wsgi_server(host, port, make_wsgi_app(self.registry))
        threading.Thread(target=self._server.serve_forever, name="metrics", daemon=True).start()
        log.info("metrics on http://%s/metrics", bind)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def guarded_wsgi_server(host: str, port: int, app: Callable):
    """prometheus_client's server (a thread per connection), where a request head must come whole
    within REQUEST_HEAD_S and each write of the answer within as long again, with at most
    MAX_HTTP_CONNECTIONS at once: its own kept a connection that never finished its request, and
    its thread, for good."""
    import socket
    import threading
    from socketserver import ThreadingMixIn
    from wsgiref.simple_server import WSGIRequestHandler, WSGIServer

    from monitord import net

    class Handler(WSGIRequestHandler):
        def setup(self) -> None:
            super().setup()
            # a deadline for the whole head, not a socket timeout, which each trickled byte restarts
            self._late = threading.Timer(net.REQUEST_HEAD_S, self._cut_off)
            self._late.daemon = True
            self._late.start()

        def _cut_off(self) -> None:
            try:
                self.connection.shutdown(socket.SHUT_RDWR)  # the handler's blocked read returns: it ends
            except OSError:
                pass

        def parse_request(self) -> bool:
            whole = super().parse_request()
            self._late.cancel()
            self.connection.settimeout(net.REQUEST_HEAD_S)  # and an answer its client does not read ends too
            return whole

        def finish(self) -> None:
            self._late.cancel()
            super().finish()

        def log_message(self, format: str, *args) -> None:  # noqa: A002 - the base class's name
            pass

    class Server(ThreadingMixIn, WSGIServer):
        daemon_threads = True
        address_family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]  # localhost may be ::1
        places = threading.BoundedSemaphore(net.MAX_HTTP_CONNECTIONS)

        def process_request(self, request, client_address) -> None:
            if not self.places.acquire(blocking=False):
                log.warning("metrics: %d connections open; one more closed", net.MAX_HTTP_CONNECTIONS)
                self.shutdown_request(request)
                return
            try:
                super().process_request(request, client_address)
            except BaseException:  # no thread started: its place is free again
                self.places.release()
                raise

        def process_request_thread(self, request, client_address) -> None:
            try:
                super().process_request_thread(request, client_address)
            finally:
                self.places.release()

    server = Server((host, port), Handler)
    server.set_app(app)
    return server


class _Collector:
    def __init__(self, snapshot: Callable[[], Snapshot]):
        self.snapshot = snapshot

    def collect(self) -> Iterator:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily

        s = self.snapshot()
        windows = CounterMetricFamily("monitord_windows", "Windows cut, and those some model's gate passed",
                                      labels=["source", "outcome"])
        for (source, outcome), n in sorted(s.windows.items()):
            windows.add_metric([source, outcome], n)
        yield windows
        outcomes = CounterMetricFamily("monitord_model_windows", "What became of windows, per model",
                                       labels=["source", "model", "verdict"])
        for (source, model, verdict), n in sorted(s.outcomes.items()):
            outcomes.add_metric([source, model, verdict], n)
        yield outcomes
        dropped = CounterMetricFamily("monitord_windows_dropped", "Windows dropped because inference was behind", labels=["source"])
        for source, n in sorted(s.dropped.items()):
            dropped.add_metric([source], n)
        yield dropped
        yield GaugeMetricFamily("monitord_queue_depth", "Windows waiting for inference", value=s.queue_depth)
        level = GaugeMetricFamily("monitord_input_level_dbfs", "RMS level of the latest window", labels=["source"])
        for source, value in sorted(s.input_level.items()):
            level.add_metric([source], max(value, -200.0))
        yield level
        up = GaugeMetricFamily("monitord_source_up", "1 while the source delivers audio", labels=["source"])
        for source, value in sorted(s.source_up.items()):
            up.add_metric([source], 1.0 if value else 0.0)
        yield up
        state = GaugeMetricFamily("monitord_stage_state", "1 for the state each stage is in", labels=["stage", "state"])
        healthy = GaugeMetricFamily("monitord_stage_healthy", "1 while the stage runs and makes progress", labels=["stage"])
        restarts = CounterMetricFamily("monitord_stage_restarts", "Times the supervisor restarted the stage", labels=["stage"])
        for stage, (current, ok, n) in sorted(s.stages.items()):
            for name in STATES:
                state.add_metric([stage, name], 1.0 if name == current else 0.0)
            healthy.add_metric([stage], 1.0 if ok else 0.0)
            restarts.add_metric([stage], n)
        yield state
        yield healthy
        yield restarts
        if s.inference_up is None:
            return
        yield GaugeMetricFamily("monitord_inference_up", "1 while the remote inference cluster answers", value=1.0 if s.inference_up else 0.0)
        yield GaugeMetricFamily("monitord_remote_waiting_windows", "Windows waiting for remote scoring (in the air included)",
                                value=s.remote_waiting)
        yield GaugeMetricFamily("monitord_remote_in_flight", "Remote requests in the air", value=s.remote_in_flight)
        forward = HistogramMetricFamily("monitord_remote_forward_batch_windows",
                                        "Windows scored remotely, by the size of the server's forward pass that scored them",
                                        labels=["model"])
        requests = CounterMetricFamily("monitord_remote_requests", "Remote requests answered", labels=["model"])
        resends = CounterMetricFamily("monitord_remote_resends", "Remote requests sent again after the cluster did not answer",
                                      labels=["model"])
        retries = CounterMetricFamily("monitord_remote_http_retries", "Attempts retried within a remote request "
                                      "(connection errors, the cluster's 5xx)", labels=["model"])
        for model, f in sorted(s.remote.items()):
            buckets = [(str(float(le)), sum(n for size, n in f.forward_sizes.items() if size <= le)) for le in FORWARD_BUCKETS]
            forward.add_metric([model], buckets + [("+Inf", sum(f.forward_sizes.values()))],
                               sum_value=float(sum(size * n for size, n in f.forward_sizes.items())))
            requests.add_metric([model], f.requests)
            resends.add_metric([model], f.resends)
            retries.add_metric([model], f.http_retries)
        yield forward
        yield requests
        yield resends
        yield retries
        dropped = CounterMetricFamily("monitord_remote_windows_dropped", "Windows a live source took off remote scoring "
                                      "(too many waiting for the cluster)", labels=["source"])
        for source, n in sorted(s.remote_dropped.items()):
            dropped.add_metric([source], n)
        yield dropped
