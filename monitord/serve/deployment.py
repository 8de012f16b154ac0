"""The inference stage as a Ray Serve application: replicas of every served model, ``@serve.batch``
per model across all capture nodes, health checks with a real forward pass.

Imported only where Ray is installed (``pip install 'monitord[cluster]'``); capture nodes never import it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from ray import serve
from ray.serve import Application
from starlette.requests import Request
from starlette.responses import Response

from monitord.config import ServeFile, load_serve_config
from monitord.inference.models.base import Model
from monitord.inference import wire
from monitord.serve.service import InferenceService, Scored, is_loopback
from monitord.types import Window

log = logging.getLogger(__name__)

APP_NAME = "monitord"
DEPLOYMENT_NAME = "MonitordInference"
BATCH_SIZE_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128, 256]


def build_models(served: ServeFile) -> dict[str, Model]:
    """The servable models of a config (anomaly models stay on capture nodes), loaded."""
    from monitord.inference.models import build_model

    return {name: build_model(name, m) for name, m in served.models.items() if m.kind != "anomaly"}


class MonitordInference:
    """One replica: every served model, a batch queue per model, the HTTP API of InferenceService."""

    def __init__(self, config_path: str):
        served = load_serve_config(config_path)
        self.settings = served.serve
        models = build_models(served)
        context = serve.get_replica_context()
        replica = getattr(getattr(context, "replica_id", None), "unique_id", "") or str(os.getpid())
        token = None if self.settings.token_file is None else wire.read_token(self.settings.token_file)
        self.max_request_bytes = int(self.settings.max_request_mb * 1024 * 1024)
        self.service = InferenceService(models, served.models, token, self.max_request_bytes, self.settings.canary_every_s,
                                        replica=replica, score=self._score)
        from ray.serve.metrics import Counter, Histogram

        self._batch_sizes = Histogram("monitord_serve_batch_windows", description="Windows per forward pass (all capture nodes)",
                                      boundaries=BATCH_SIZE_BOUNDARIES, tag_keys=("model",))
        self._windows = Counter("monitord_serve_windows", description="Windows scored", tag_keys=("model",))
        self._batchers = {
            name: serve.batch(max_batch_size=model.batch_max, batch_wait_timeout_s=model.batch_wait_ms / 1000.0)(self._batch_fn(name))
            for name, model in models.items()
        }
        log.info("replica %s: serving %s", replica, {n: m.model_id for n, m in models.items()})

    def _batch_fn(self, name: str):
        async def score_batch(windows: list[Window]) -> list[Scored]:
            began = time.perf_counter()
            scores = await asyncio.to_thread(self.service.score_now, name, windows)
            took = time.perf_counter() - began
            self._batch_sizes.observe(len(windows), tags={"model": name})
            self._windows.inc(len(windows), tags={"model": name})
            return [Scored(s, len(windows), took) for s in scores]

        score_batch.__name__ = score_batch.__qualname__ = f"score_{name}"
        return score_batch

    async def _score(self, name: str, windows: list[Window]) -> list[Scored]:
        """Each window joins its model's batch queue, with the windows of every other request."""
        return list(await asyncio.gather(*(self._batchers[name](w) for w in windows)))

    async def __call__(self, request: Request) -> Response:
        # refused on the headers (token, declared size) before any of the body is read; see handle_asgi
        return _response(await self.service.handle_asgi(request.scope, request.receive))

    async def check_health(self) -> None:
        await self.service.check_health()


def _response(reply) -> Response:
    return Response(reply.body, status_code=reply.status, media_type=reply.content_type, headers=reply.headers)


def build_app(config_path: str, replicas: int | None = None, gpus_per_replica: float | None = None,
              cpus_per_replica: float | None = None) -> Application:
    """The Serve application for a config's models; arguments override its ``serve:`` section.
    The config (and the weights it names) must be at this path on every node of the cluster."""
    path = str(Path(config_path).resolve())
    served = load_serve_config(path)  # ConfigError here, in the driver, rather than in every replica
    s = served.serve
    batch_max = max((m.batch_max for m in served.models.values() if m.kind != "anomaly"), default=1)
    deployment = serve.deployment(
        name=DEPLOYMENT_NAME,
        num_replicas=replicas or s.replicas,
        ray_actor_options={"num_cpus": s.cpus_per_replica if cpus_per_replica is None else cpus_per_replica,
                           "num_gpus": s.gpus_per_replica if gpus_per_replica is None else gpus_per_replica},
        max_ongoing_requests=max(s.max_ongoing_requests, batch_max),
        health_check_period_s=s.health_check_period_s,
        health_check_timeout_s=s.health_check_timeout_s,
    )(MonitordInference)
    return deployment.bind(path)


def serve_forever(config_path: str, address: str | None, host: str, port: int, replicas: int | None,
                  gpus_per_replica: float | None, stop: threading.Event, out=sys.stdout) -> int:
    """``monitord serve``: deploy, print the URL capture nodes use, wait for ``stop``, take it down.
    Returns the exit status; raises ConfigError before starting anything."""
    import ray

    served = load_serve_config(config_path)
    if not is_loopback(host) and served.serve.token_file is None:
        raise ValueError(f"serve.token_file is required to serve on {host} (not loopback)")
    began = time.monotonic()
    started_ray = address is None
    options: dict[str, Any] = {"include_dashboard": False} if started_ray else {"address": address}
    ray.init(logging_level=logging.WARNING, **options)
    if threading.current_thread() is threading.main_thread():
        install_stop_handlers(stop)  # again: ours, not whatever starting Ray left
    ray_s = time.monotonic() - began
    try:
        tls = served.serve.ssl_certfile is not None
        http_options: dict[str, Any] = {"host": host, "port": port}
        if tls:
            http_options.update(ssl_certfile=served.serve.ssl_certfile, ssl_keyfile=served.serve.ssl_keyfile)
        serve.start(http_options=http_options)
        app = build_app(config_path, replicas, gpus_per_replica)
        prefix = served.serve.route_prefix.rstrip("/") or "/"
        serve.run(app, name=APP_NAME, route_prefix=prefix)
        shown = socket.getfqdn() if host in ("0.0.0.0", "::") else host
        shown = f"[{shown}]" if ":" in shown else shown
        log.info("Ray %s in %.1f s, application up in %.1f s", "started" if started_ray else "joined", ray_s, time.monotonic() - began - ray_s)
        print(f"{'https' if tls else 'http'}://{shown}:{port}{'' if prefix == '/' else prefix}", file=out, flush=True)
        while not stop.wait(0.5):
            pass
        _take_down(started_ray)
        return 0
    finally:
        ray.shutdown()


def _take_down(started_ray: bool, timeout_s: float = 30.0) -> None:
    """Delete the application (and Serve, where this process started Ray), bounded in time: a
    cluster whose raylet went with the same signal must not keep the process from exiting."""

    def down() -> None:
        serve.delete(APP_NAME)
        if started_ray:
            serve.shutdown()

    log.info("stopping: deleting the application")
    thread = threading.Thread(target=down, name="serve-shutdown", daemon=True)
    thread.start()
    thread.join(timeout_s)
    if thread.is_alive():
        log.warning("the application did not shut down within %.0f s; leaving it to Ray", timeout_s)


def install_stop_handlers(stop: threading.Event) -> None:
    def on_signal(signum: int, _frame: Any) -> None:
        log.info("received %s", signal.Signals(signum).name)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
