"""Prometheus metrics: what the daemon hears and does, on an HTTP endpoint (loopback by default)."""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)


class Metrics:
    """Counters, gauges and histograms in a registry of their own, served by prometheus-client."""

    def __init__(self) -> None:
        from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

        self.registry = CollectorRegistry()
        r = self.registry
        self.input_level = Gauge("monitord_input_level_dbfs", "RMS level of the latest window", ["source"], registry=r)
        self.windows = Counter("monitord_windows_total", "Windows cut, by what became of them", ["source", "outcome"], registry=r)
        self.dropped = Gauge("monitord_windows_dropped", "Windows dropped because the worker was behind", ["source"], registry=r)
        self.queue_depth = Gauge("monitord_queue_depth", "Windows waiting for the model worker", registry=r)
        self.model_seconds = Histogram("monitord_model_batch_seconds", "Time to score one batch", ["model"], registry=r,
                                       buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.batch_size = Histogram("monitord_model_batch_windows", "Windows per batch", ["model"], registry=r,
                                    buckets=(1, 2, 4, 8, 16, 32, 64, 128))
        self.events = Counter("monitord_events_total", "Alert events", ["source", "rule", "phase"], registry=r)
        self.source_up = Gauge("monitord_source_up", "1 while the source delivers audio", ["source"], registry=r)
        self.last_event = Gauge("monitord_last_event_timestamp_seconds", "When the last alert event was published", ["source"], registry=r)
        self._server = None

    def serve(self, bind: str) -> None:
        from prometheus_client import start_http_server

        host, _, port = bind.rpartition(":")
        self._server, _thread = start_http_server(int(port), addr=host.strip("[]"), registry=self.registry)
        log.info("metrics on http://%s/metrics", bind)

    def close(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None
