"""Wires the stages together and owns their lifecycle.

sources -> ring buffers -> windowers (gate) -> window queue -> model worker -> alert engine -> publisher
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Mapping

from monitord.alerts import AlertEngine
from monitord.capture import DeviceSource, FileSource, open_source
from monitord.config import Config
from monitord.events import Event, iso_utc
from monitord.models import Model, Scores, build_model
from monitord.publish import Publisher, PublishError
from monitord.ringbuffer import RingBuffer
from monitord.sdnotify import Watchdog
from monitord.windowqueue import WindowQueue
from monitord.windows import Window, WindowCutter, Windower
from monitord.worker import ModelWorker

log = logging.getLogger(__name__)


class ReloadError(Exception):
    """A new config cannot be applied while running."""


def load_models(config: Config, only: set[str] | None = None) -> dict[str, Model]:
    """Build the configured models (or ``only`` these); raises ModelUnavailable with a readable reason.
    Anomaly models are built last, on the embedding model they use."""
    from monitord.models.anomaly import AnomalyDetector

    wanted = {n: m for n, m in config.models.items() if only is None or n in only}
    remote = set(config.inference.models) if config.inference is not None else set()

    def build(name: str, m) -> Model:
        if name in remote:  # scored by a `monitord serve` application; no weights here
            from monitord.serve.client import RemoteModel

            return RemoteModel(name, m, config.inference)
        return build_model(name, m)

    models = {name: build(name, m) for name, m in wanted.items() if m.kind != "anomaly"}
    for name, m in wanted.items():
        if m.kind == "anomaly":
            if m.embedding_model not in models:
                models[m.embedding_model] = build(m.embedding_model, config.models[m.embedding_model])
            models[name] = AnomalyDetector(name, m, models[m.embedding_model], config.window.seconds, config.window.hop_s)
    return models


EVENT_TOP_LABELS = 10


def event_scores(probabilities: dict[str, float], label: str) -> dict[str, float]:
    """The scores an event carries: the rule's label and the best EVENT_TOP_LABELS others
    (all of them for a CLAP label set; YAMNet has 521 classes)."""
    best = sorted(probabilities, key=probabilities.get, reverse=True)[:EVENT_TOP_LABELS]
    keep = best if label in best else [*best, label]
    return {name: round(probabilities[name], 6) for name in keep}


class Daemon:
    """start() opens everything, stop() closes it in order; models and publisher may be injected."""

    def __init__(self, config: Config, models: Mapping[str, Model], publisher: Publisher | None = None):
        from monitord.clips import ClipWriter
        from monitord.metrics import Metrics

        self.config = config
        self.metrics = Metrics() if config.metrics.bind else None
        self.clips = ClipWriter(config.clips, self._on_clip) if config.clips.enabled else None
        self.dashboard = None
        self._rings: dict[str, RingBuffer] = {}
        self.models = dict(models)
        self.publisher = publisher or Publisher(config.publish)
        self.host = config.publish.host or socket.gethostname()
        self.engine = AlertEngine(config.rules)
        self.queue = WindowQueue(config.pipeline.queue_max_windows)
        self.stop_event = threading.Event()
        self.sources: list[DeviceSource | FileSource] = []
        self.windowers: list[Windower] = []
        self.worker = ModelWorker(self.queue, list(self.models.values()), self._on_scores, self._on_model_error, self._on_quiet,
                                  on_batch=self._on_batch)
        self._finished_windowers = 0
        self._finished_lock = threading.Lock()
        self._all_sources_done = threading.Event()
        self._last_overload: dict[str, float] = {}

    # lifecycle

    def start(self) -> None:
        """Open the sockets and servers, then every source; raises SourceError/PublishError (with the
        key to fix) before capturing anything, having closed what it had opened."""
        self.publisher.start()
        try:
            self._start_servers()
            self.sources = [open_source(s, self.config.pipeline.ring_seconds, self._on_status) for s in self.config.sources]
        except Exception:
            self._close_servers()
            raise
        self._rings = {source.id: source.ring for source in self.sources}
        if self.clips is not None:
            self.clips.start()
        rates = {model.sample_rate for model in self.models.values()}
        for source in self.sources:
            cutter = WindowCutter(source.id, source.sample_rate, self.config.window, self.config.gate_for(source.config), rates,
                                  self.config.model_gates())
            self.windowers.append(
                Windower(source.ring, cutter, self._sink_for(source), self.stop_event, on_finished=self._windower_finished)
            )
        self.worker.start()
        for windower in self.windowers:
            windower.start()
        for source in self.sources:
            source.start()

    def _start_servers(self) -> None:
        if self.metrics is not None:
            try:
                self.metrics.serve(self.config.metrics.bind)
            except OSError as exc:
                raise PublishError(f"metrics.bind: cannot serve on {self.config.metrics.bind}: {exc.strerror or exc}") from None
        if self.config.http.bind:
            from monitord.dashboard import Dashboard

            self.dashboard = Dashboard(self, self.config.http.bind, self.config.http.token)
            try:
                self.dashboard.start()
            except OSError as exc:
                self.dashboard = None
                raise PublishError(f"http.bind: cannot serve on {self.config.http.bind}: {exc.strerror or exc}") from None
            self.publisher.listeners.append(self.dashboard.on_event)

    def _close_servers(self) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.publisher.close()

    def healthy(self, max_age_s: float) -> bool:
        """The pipeline is moving: the worker came back to its queue within ``max_age_s`` and no
        windower has crashed."""
        worker_ok = not self.worker.alive or time.monotonic() - self.worker.heartbeat < max_age_s
        return worker_ok and not any(w.crashed for w in self.windowers)

    def wait(self, stop: threading.Event, until_done: bool = False, watchdog: Watchdog | None = None) -> None:
        """Block until ``stop`` is set (a signal), or with ``until_done`` until every source has ended
        and every window it produced has been scored. Pings ``watchdog`` while the pipeline is healthy."""
        finishing = False
        while not stop.is_set():
            if watchdog is not None and watchdog.enabled:
                watchdog.tick(self.healthy(max_age_s=watchdog.timeout_s / 2))
            if until_done and self._all_sources_done.is_set():
                if not finishing:
                    self.worker.finish(drain_timeout_s=float("inf"))
                    finishing = True
                if not self.worker.alive:
                    return
            stop.wait(0.1)

    def stop(self) -> None:
        """Stop sources, drain the queue for at most shutdown_timeout_s, flush the log, close sockets."""
        timeout = self.config.pipeline.shutdown_timeout_s
        for source in self.sources:
            source.stop()
        self.stop_event.set()
        for thread in [*self.sources, *self.windowers]:
            if not thread.join(timeout=2.0):
                log.warning("%s did not stop within 2 s", thread)
        self.worker.finish(drain_timeout_s=timeout)
        if not self.worker.join(timeout + 5.0):
            log.warning("model worker still busy after %.1f s; exiting without it", timeout + 5.0)
        if self.clips is not None:
            self.clips.stop()
        self._close_servers()
        log.info(
            "stopped: %d windows scored, %d events published, dropped per source %s",
            self.worker.stats.windows,
            self.publisher.published,
            dict(self.queue.dropped) or "{}",
        )

    def reload(self, new: Config) -> None:
        """Apply new rules, thresholds, labels and prompts without stopping capture.

        Sources, gates, windows, publishing and model weights need a restart: a config that
        changes them is refused whole (ReloadError) and the running one stays.
        """
        restart_only = [k for k in ("sources", "gate", "window", "publish", "pipeline") if getattr(new, k) != getattr(self.config, k)]
        swappable = {"labels", "prompt"}
        old_models = {n: m.model_dump(exclude=swappable) for n, m in self.config.models.items()}
        new_models = {n: m.model_dump(exclude=swappable) for n, m in new.models.items()}
        if old_models != new_models:
            restart_only.append("models (other than labels and prompt)")
        if restart_only:
            raise ReloadError(f"{', '.join(restart_only)} changed: restart monitord to apply them")
        self.worker.call_soon(lambda: self._apply(new))

    def _apply(self, new: Config) -> None:
        for name, model_config in new.models.items():
            old = self.config.models[name]
            if model_config.kind == "clap" and (model_config.labels, model_config.prompt) != (old.labels, old.prompt):
                self.models[name].set_labels(model_config.labels, model_config.prompt)
        unchanged = {r.id for r in self.config.rules if r in new.rules}
        engine = AlertEngine(new.rules)
        engine.states.update({key: state for key, state in self.engine.states.items() if key[0] in unchanged})
        self.engine, self.config = engine, new
        log.info("reloaded: %d rules (%d kept their state), labels %s", len(new.rules), len(unchanged),
                 {n: len(m.labels) for n, m in new.models.items()})

    # stage hand-offs

    def _sink_for(self, source: DeviceSource | FileSource):
        def sink(window: Window) -> None:
            dropped = self.queue.put(window, wait=source.waits_for_worker, stop=self.stop_event)
            if dropped is not None:
                self._report_overload(dropped.source)
            if self.dashboard is not None:
                self.dashboard.on_window(window)
            if self.metrics is not None:
                m = self.metrics
                m.input_level.labels(window.source).set(max(window.facts.rms_dbfs, -200.0))
                m.windows.labels(window.source, "queued" if window.passed else "gated").inc()
                m.queue_depth.set(len(self.queue))
                if dropped is not None:
                    m.dropped.labels(dropped.source).set(self.queue.dropped[dropped.source])

        return sink

    def _windower_finished(self) -> None:
        with self._finished_lock:
            self._finished_windowers += 1
            if self._finished_windowers == len(self.windowers):
                self._all_sources_done.set()

    def _report_overload(self, source: str) -> None:
        now = time.monotonic()
        last = self._last_overload.get(source)
        if last is not None and now - last < self.config.pipeline.overload_status_interval_s:
            return
        self._last_overload[source] = now
        dropped = self.queue.dropped[source]
        log.warning("source %s: model worker behind, %d windows dropped so far", source, dropped)
        self._publish_status(source, "overload", f"window queue full: {dropped} windows dropped so far", dropped=dropped)

    def _on_status(self, source: str, status: str, detail: str) -> None:
        if self.metrics is not None and status in ("up", "down", "eof", "error"):
            self.metrics.source_up.labels(source).set(1 if status == "up" else 0)
        self._publish_status(source, status, detail)

    def _on_batch(self, model: str, windows: int, seconds: float) -> None:
        if self.metrics is not None:
            self.metrics.model_seconds.labels(model).observe(seconds)
            self.metrics.batch_size.labels(model).observe(windows)
            self.metrics.queue_depth.set(len(self.queue))

    def _on_clip(self, request, path, error) -> None:
        if path is not None:
            self._publish_status(request.source, "clip", str(path), clip=str(path), onset_seq=request.onset_seq)
        else:
            self._publish_status(request.source, "clip_error", f"clip {request.path.name} not written: {error}", onset_seq=request.onset_seq)

    def _publish_status(self, source: str, status: str, detail: str, clip: str | None = None, **extra: object) -> None:
        event = Event(kind="status", source=source, time=iso_utc(time.time()), host=self.host, status=status, detail=detail,
                      clip=clip, extra=extra)
        self.publisher.publish(event)

    def _on_scores(self, scores: Scores) -> None:
        window = scores.window
        if self.metrics is not None:
            self.metrics.windows.labels(window.source, f"scored:{scores.model}").inc()
        fired = self.engine.observe(scores.model, window.source, scores.probabilities, window.stream_end)
        self._publish_alerts(window, fired, scores)
        wanted = self.config.publish.scores
        if wanted is True or (wanted and (scores.model in wanted or window.source in wanted)):
            self.publisher.publish_unlogged(self._scores_event(scores), ready_at=window.ready_at)
        elif self.dashboard is not None:  # the page shows every window's scores, published or not
            self.dashboard.on_event(self._scores_event(scores))

    def _scores_event(self, scores: Scores) -> Event:
        window = scores.window
        (label, score), = scores.top(1)
        return Event(
            kind="scores",
            source=window.source,
            time=iso_utc(window.wall_start),
            host=self.host,
            label=label,
            score=round(score, 6),
            scores=event_scores(scores.probabilities, label),
            model=scores.model_id,
            model_name=scores.model,
            stream_start=round(window.stream_start, 6),
            stream_end=round(window.stream_end, 6),
            facts=window.facts.to_dict(),
        )

    def _on_quiet(self, window: Window, model: str | None) -> None:
        self._publish_alerts(window, self.engine.observe_quiet(window.source, window.stream_end, model), None)

    def _publish_alerts(self, window: Window, fired: list, scores: Scores | None) -> None:
        for rule, phase, score in fired:
            clip = None
            if self.clips is not None and phase == "onset" and window.source in self._rings:
                clip = self.clips.path_for(window.source, rule.id, window.wall_start)
            event = Event(
                kind="alert",
                source=window.source,
                time=iso_utc(window.wall_start),
                host=self.host,
                rule=rule.id,
                label=rule.label,
                phase=phase,
                score=round(score, 6),
                scores=None if scores is None else event_scores(scores.probabilities, rule.label),
                model=self.models[rule.model].model_id,
                model_name=rule.model,
                stream_start=round(window.stream_start, 6),
                stream_end=round(window.stream_end, 6),
                facts=window.facts.to_dict(),
                clip=None if clip is None else str(clip),
            )
            published = self.publisher.publish(event, ready_at=window.ready_at)
            if clip is not None:
                self.clips.request(window.source, self._rings[window.source], window.start_index,
                                   window.start_index + window.valid, clip, published.seq)
            if self.metrics is not None:
                self.metrics.events.labels(window.source, rule.id, phase).inc()
                self.metrics.last_event.labels(window.source).set(time.time())
            log.info("%s %s score=%.3f stream %.2f-%.2f s", published.topic, phase, score, window.stream_start, window.stream_end)

    def _on_model_error(self, model: Model, windows: list[Window], status: str, detail: str) -> None:
        for source in sorted({w.source for w in windows}):
            self._publish_status(source, status, detail)
