"""The supervisor: builds the stages, starts them in order, watches them, owns health.

    sources -> [ring] -> windowing + gate (one per source) -> [window queue] -> inference
        -> [alerts channel] -> alerts -> [output channel] -> output (log, ZeroMQ, clips, sinks, dashboard)

Stages start downstream first (output, alerts, inference, windowing, sources), so nothing waits
for a stage that is not there yet, and stop upstream first, each draining what it holds. The daemon
is healthy only while every stage is: running (or degraded) and beating within its bound, or
finished with its work. A stage that dies publishes a ``stage_failed`` status naming it and the
exception and is restarted with backoff; one that dies ``MAX_RESTARTS`` times within
``RESTART_WINDOW_S`` ends the daemon with exit status 1 (systemd then restarts the process).
"""

from __future__ import annotations

import logging
import socket
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass

import numpy as np

from monitord.alerts.engine import AlertEngine
from monitord.alerts.stage import AlertsStage
from monitord.config import Config, inactive_without
from monitord.config.memory import ring_seconds  # in config: check-config counts the rings against the memory budget
from monitord.inference.build import model_inputs
from monitord.inference.models import Model, ModelUnavailable, build_model
from monitord.windowing.queue import WindowQueue
from monitord.inference.worker import LOW, InferenceStage
from monitord.inference.scoring import Scorer
from monitord.output.clips import ClipWriter
from monitord.output.metrics import Metrics, RemoteFigures, Snapshot
from monitord.output.publish import Publisher, PublishError
from monitord.output.stage import OutputStage, Sink
from monitord.sdnotify import Watchdog
from monitord.sources import open_source
from monitord.stage import Channel, Health, Stage
from monitord.types import Event, Publication, RulesChange, StageState, Window, iso_utc
from monitord.windowing.stage import WindowingStage
from monitord.windowing.tiling import WindowCutter

log = logging.getLogger(__name__)

DAEMON = "daemon"
"""The source name of status events about the daemon itself (topic ``status.daemon``)."""
MAX_RESTARTS = 3
RESTART_WINDOW_S = 600.0
ALERTS_QUEUE = 4096
OUTPUT_QUEUE = 10000
LOADER_THREAD = "load-models"
"""The thread that loads optional models after the start (``Daemon.load_later``)."""
RESTART_ONLY = ("sources", "gate", "window", "publish", "pipeline", "clips", "metrics", "http", "inference", "notify")
"""Sections a reload cannot apply while running: changing them needs a restart."""


class ReloadError(Exception):
    """A new config cannot be applied while running."""


class LabelsChanged(Exception):
    """A reload changed the labels (or prompt) of a model while it loaded: it joins once it has them."""

    def __init__(self, labels: tuple[tuple[str, ...], str]):
        super().__init__(labels)
        self.labels = labels


def labels_in(config: Config, name: str) -> tuple[tuple[str, ...], str] | None:
    """A model's configured labels and prompt (None for a model whose labels are not configured)."""
    model_config = config.models[name]
    labels = getattr(model_config, "labels", None)
    return None if labels is None else (tuple(labels), getattr(model_config, "prompt", ""))


@dataclass(frozen=True)
class Availability:
    """Which configured models score and which rules can fire, for the config it was worked out
    for. The daemon rebinds it whole (a model joins, one fails, a reload changes the rules), so a
    reader on another thread (the dashboard) sees one state or the next, never half of each."""

    config: Config
    models: Mapping[str, Model]
    unavailable: Mapping[str, ModelUnavailable]
    inactive_models: Mapping[str, str]
    """{model: why} for the models that are not loaded and those built on them (why: ``loading``
    while a background load may still bring it)."""
    inactive_rules: Mapping[str, str]
    loading_models: frozenset[str]
    """Those of the inactive models that wait on a load only; ``loading_rules`` likewise."""
    loading_rules: frozenset[str]


class Daemon:
    """start() opens everything and starts the stages; wait() supervises; stop() drains and closes.

    Models, the publisher and sinks may be injected (tests, the benchmark)."""

    def __init__(self, config: Config, models: Mapping[str, Model], publisher: Publisher | None = None,
                 sinks: Sequence[Sink] = (), unavailable: Mapping[str, ModelUnavailable] | None = None,
                 loading: Collection[str] = ()):
        self.config = config
        self.models = dict(models)
        """The models scoring, by name (rebound, never changed in place, when one loaded later is added)."""
        self.unavailable = dict(getattr(models, "unavailable", {}) if unavailable is None else unavailable)
        """Optional models that could not be loaded, and why (each gets a model_unavailable status at start)."""
        self.loading: frozenset[str] = frozenset(loading)
        """Optional models still loading on a background thread (``load_later``), added when they are loaded."""
        self._update_inactive()
        self.host = config.publish.host or socket.gethostname()
        self.publisher = publisher or Publisher(config.publish)
        self.sinks = [*self._configured_sinks(), *sinks]
        self.clips = ClipWriter(config.clips) if config.clips.enabled else None
        self.metrics = Metrics(self.snapshot) if config.metrics.bind else None
        self.dashboard = None
        self.queue = WindowQueue(config.pipeline.queue_max_windows)
        self.alerts_inbox: Channel = Channel(ALERTS_QUEUE, "alerts")
        self.output_inbox: Channel = Channel(OUTPUT_QUEUE, "output")
        # statuses from the inference thread never wait on the output channel (inference waits on no disk or socket)
        self.scorer = Scorer(list(self.models.values()), status=self._status_nowait,
                             on_batch=self.metrics.on_batch if self.metrics else lambda model, n, seconds: None)
        remote = config.inference
        self.inference = InferenceStage(self.queue, self.scorer, self.alerts_inbox, stall_s=config.pipeline.inference_stall_s,
                                        max_in_flight=remote.max_in_flight if remote else 4,
                                        max_waiting_windows=remote.max_waiting_windows if remote else 128,
                                        overlap_tiers=config.pipeline.overlap_tiers,
                                        status=self._status_nowait, on_remote_drop=self._on_remote_drop,
                                        status_interval_s=config.pipeline.overload_status_interval_s)
        self.alerts = AlertsStage(AlertEngine(config.rules), self.alerts_inbox, self.output_inbox, self.host,
                                  {name: m.model_id for name, m in self.models.items()}, config.publish.scores,
                                  feed_windows=config.http.bind is not None or any(getattr(s, "wants_windows", False)
                                                                                    for s in self.sinks))
        self.output: OutputStage | None = None
        self.sources: list[Stage] = []
        self.windowing: list[WindowingStage] = []
        self.exit_code = 0
        self.fatal: str | None = None
        self._closing = threading.Event()
        self._failures: dict[str, list[float]] = {}
        self._restart_at: dict[str, float] = {}
        self._last_overload: dict[str, float] = {}
        self._last_remote_overload: dict[str, float] = {}
        self._idle_turns = 0
        self._reference_round = 0

    def _configured_sinks(self) -> list[Sink]:
        """The sinks the config asks for (MQTT, notifications); PublishError naming the extra to
        install when its package is missing."""
        from monitord.config.checks import extra_missing

        sinks: list[Sink] = []
        if self.config.publish.mqtt is not None:
            if extra_missing("paho.mqtt"):
                raise PublishError("publish.mqtt: needs paho-mqtt, which is not installed: pip install 'monitord[mqtt]'")
            from monitord.output.mqtt import build_mqtt_sink

            sinks.append(build_mqtt_sink(self.config, self.host, self.publisher.event_log, self.status, feedback=self.feedback))
        if self.config.notify:
            if extra_missing("apprise"):
                raise PublishError("notify: needs apprise, which is not installed: pip install 'monitord[notify]'")
            from monitord.output.notify import build_notifiers

            sinks.extend(build_notifiers(self.config, self.host, self.status))
        return sinks

    @property
    def stages(self) -> list[Stage]:
        """In start order: downstream first."""
        head = [self.output] if self.output is not None else []
        return [*head, self.alerts, self.inference, *self.windowing, *self.sources]

    # lifecycle

    def start(self, open_sources: bool = True) -> None:
        """Open the log, sockets and servers, then every source, then start the stages; raises
        SourceError/PublishError (naming the key to fix) before capturing anything, having closed
        what it had opened. Without ``open_sources`` the pipeline runs from the window queue on
        (the benchmark feeds it windows). A rule's reference recordings that cannot be read raise
        ReferenceUnreadable before anything is opened."""
        # a file read as fast as it is scored is judged whole with them; live sound starts at once, its
        # rules suppressing nothing until their references are embedded (a moment; then kept)
        offline = any(s.file is not None and not s.realtime for s in self.config.sources)
        self.alerts.not_like.references = self._references(self.config, only_cached=not offline)
        self.publisher.start()
        try:
            self._start_servers()
            if self.clips is not None:
                try:
                    self.clips.open()
                except OSError as exc:
                    raise PublishError(f"clips.dir: cannot create {self.clips.folder}: {exc.strerror or exc}") from None
            seconds = ring_seconds(self.config)
            self.sources = [open_source(s, seconds, self.status) for s in self.config.sources] if open_sources else []
        except Exception:
            self._close_servers()
            raise
        rings = {source.id: source.ring for source in self.sources}
        self.output = OutputStage(self.output_inbox, self.publisher, self.host, rings, self.clips, self.sinks,
                                  self.dashboard, self.metrics.on_published if self.metrics else lambda event: None)
        inputs = model_inputs(self.config, self.models)
        for source in self.sources:
            cutter = WindowCutter(source.id, source.sample_rate, self.config.window, self.config.gate_for(source.config), inputs)
            self.windowing.append(WindowingStage(source.ring, cutter, self.queue, live=not source.waits_for_worker,
                                                 on_drop=self._on_drop))
        for sink in self.sinks:
            sink.start()
        for stage in self.stages:
            stage.on_failure = self._on_stage_failure
            stage.start()
        for name, reason in self.unavailable.items():
            self._report_unavailable(name, reason)
        self._embed_references_soon(self.config)

    def _update_inactive(self) -> None:
        """Work ``availability`` out again from the config, the models loaded, those unavailable and
        those loading."""
        absent = set(self.config.models) - set(self.models)
        models, rules = inactive_without(self.config, absent, loading=self.loading)
        settled_models, settled_rules = inactive_without(self.config, absent - self.loading)
        self.availability = Availability(self.config, self.models, dict(self.unavailable), models, rules,
                                         frozenset(models) - frozenset(settled_models),
                                         frozenset(rules) - frozenset(settled_rules))

    def load_later(self, names: Sequence[str], load: Callable[[str, Config], Model] | None = None) -> threading.Thread | None:
        """Load these optional models (``loading``) one after the other on a background thread, after
        ``start``: each that loads is added to the running pipeline (``add_model``: a ``model_loaded``
        status), each that cannot be is reported as a model that could not be loaded at the start is
        (``model_unavailable``). ``load(name, config)`` builds one (by default as ``load_models`` would).
        A reload that changes a model's labels while it loads reaches it before it joins. The thread is
        a daemon thread: a stop does not wait for it, and what it loads after the stop is dropped."""
        if not names:
            return None
        if load is None:
            from monitord.inference.build import load_one

            load = lambda name, config: load_one(config, name, self.models, self.unavailable)  # noqa: E731

        def run() -> None:
            for name in names:
                if self._closing.is_set():
                    return
                began = time.monotonic()
                log.info("model %s: loading in the background (its rules start when it is loaded)", name)
                config = self.config
                labels = labels_in(config, name)
                try:
                    model = load(name, config)
                except ModelUnavailable as exc:
                    self._not_loaded(name, exc)
                    continue
                except Exception as exc:  # noqa: BLE001 - an optional model's failure must not end the daemon
                    log.exception("model %s: loading failed", name)
                    self._not_loaded(name, ModelUnavailable(f"model {name}: loading failed: {exc!r}",
                                                            missing=f"it failed to load ({exc!r})", fix="see the log"))
                    continue
                try:
                    while True:
                        try:
                            self.add_model(name, model, time.monotonic() - began, labels)
                            break
                        except LabelsChanged as changed:  # off the inference thread: CLAP loads its text tower for it
                            log.info("model %s: a reload changed its labels while it loaded; preparing them", name)
                            labels = changed.labels
                            if labels is not None:
                                model.use_labels(model.prepare_labels(list(labels[0]), labels[1]))
                except Exception as exc:  # noqa: BLE001 - the next models still load; this one is reported
                    log.exception("model %s: loaded, but it could not join the pipeline", name)
                    self._not_loaded(name, ModelUnavailable(f"model {name}: it could not join the pipeline: {exc!r}",
                                                            missing=f"it failed to join ({exc!r})", fix="see the log"))

        thread = threading.Thread(target=run, name=LOADER_THREAD, daemon=True)
        thread.start()
        return thread

    def _not_loaded(self, name: str, reason: ModelUnavailable) -> None:
        if self._closing.is_set():
            return
        self.unavailable = {**self.unavailable, name: reason}
        self.loading = self.loading - {name}
        self._update_inactive()
        self._report_unavailable(name, reason)

    def add_model(self, name: str, model: Model, seconds: float | None = None,
                  labels: tuple[tuple[str, ...], str] | None = None) -> bool:
        """Add a model loaded after the start to the running pipeline, between two batches on the
        inference thread (where a reload swaps labels): its id to the alerts stage first, its input
        to each source's windowing, then to the scorer; its rules' references are embedded after.
        A ``model_loaded`` status says it is active (``seconds``: how long its load took). False
        where the daemon was stopping first: the model is dropped. LabelsChanged where a reload gave it
        other labels than ``labels``, those it was built with: nothing is added."""
        def add() -> frozenset[str]:
            if self._closing.is_set():
                return frozenset()
            # a reload sets the config on this thread too (its swap): what it says now is what the model joins with
            if labels_in(self.config, name) != labels:
                raise LabelsChanged(labels_in(self.config, name))
            waiting = frozenset(self.availability.inactive_rules)
            try:
                self.alerts.add_model(name, model.model_id)  # before it can score: its events name it
                model_input = model_inputs(self.config, {name: model})[name]
                for stage in self.windowing:
                    stage.cutter.add_model(name, model_input)
                self.scorer.add_model(model)
                self.inference.models_changed()
            except Exception:
                # all or nothing: windows are not judged and resampled for a model that never scores
                self.alerts.remove_model(name)
                for stage in self.windowing:
                    stage.cutter.remove_model(name)
                self.scorer.remove_model(name)
                self.inference.models_changed()
                raise
            self.models = {**self.models, name: model}
            self.loading = self.loading - {name}
            self._update_inactive()
            self._embed_references_soon(self.config)
            return waiting - frozenset(self.availability.inactive_rules)

        if self._closing.is_set():
            log.info("model %s: loaded after the stop began; dropped", name)
            return False
        future = self.inference.submit(add)
        while True:
            try:
                activated = future.result(timeout=0.5)
                break
            except FutureTimeout:
                if self._closing.is_set() and future.cancel():  # the stage stopped before it came to it
                    log.info("model %s: loaded after the stop began; dropped", name)
                    return False
        if name not in self.models:
            log.info("model %s: loaded after the stop began; dropped", name)
            return False
        ref = getattr(self.config.models[name], "model", None) or getattr(model, "model_id", "")
        took = "" if seconds is None else f" in {seconds:.1f} s"
        rules = f"rules {', '.join(sorted(activated))} active now" if activated else "no rule waited on it"
        detail = f"optional model {name} ({ref}) loaded{took} and scoring; {rules}"
        log.info("%s", detail)
        self.status(DAEMON, "model_loaded", detail, model=name, seconds=None if seconds is None else round(seconds, 3),
                    active_rules=sorted(activated))
        return True

    def _report_unavailable(self, name: str, reason: ModelUnavailable) -> None:
        """One status event (and log line) per optional model left out: what is missing, what fixes it, what is off."""
        model_config = self.config.models[name]
        ref = getattr(model_config, "model", None) or getattr(model_config, "embedding_model", "")
        models, rules = inactive_without(self.config, {name})
        dependents = [f"rules {', '.join(sorted(rules))}" if rules else "",
                      f"models {', '.join(sorted(m for m in models if m != name))}" if len(models) > 1 else ""]
        missing = reason.missing or str(reason)
        fix = reason.fix or "see the log"
        detail = (f"optional model {name} ({ref}) is not loaded: {missing}. Fix: {fix}; then restart monitord. "
                  f"Inactive until then: {'; '.join(d for d in dependents if d) or 'nothing'}.")
        log.warning("%s", detail)
        self.status(DAEMON, "model_unavailable", detail, model=name, missing=missing, fix=fix,
                    inactive_rules=sorted(rules), inactive_models=sorted(models))

    def _start_servers(self) -> None:
        if self.metrics is not None:
            try:
                self.metrics.serve(self.config.metrics.bind)
            except OSError as exc:
                raise PublishError(f"metrics.bind: cannot serve on {self.config.metrics.bind}: {exc.strerror or exc}") from None
        if self.config.http.bind:
            from monitord.output.dashboard import Dashboard

            dashboard = Dashboard(self, self.config.http.bind, self.config.http.token, self.config.http.max_upload_mb,
                                  self.config.http.allowed_hosts)
            try:
                dashboard.start()
            except OSError as exc:
                raise PublishError(f"http.bind: cannot serve on {self.config.http.bind}: {exc.strerror or exc}") from None
            self.dashboard = dashboard

    def _close_servers(self) -> None:
        if self.dashboard is not None:
            self.dashboard.stop()
        if self.metrics is not None:
            self.metrics.close()
        self.publisher.close()

    def stop(self, drain_timeout_s: float | None = None) -> None:
        """Stop sources, let windowing hand on what it holds, drain the window queue for at most
        ``drain_timeout_s`` (``pipeline.shutdown_timeout_s`` by default), end open alerts, write
        every event out, close sockets."""
        timeout = self.config.pipeline.shutdown_timeout_s if drain_timeout_s is None else drain_timeout_s
        self._closing.set()
        for stage in (self.output, self.alerts, self.inference):  # downstream first
            if stage is not None and stage.state is StageState.FAILED and stage.join(1.0):
                log.warning("restarting stage %s to drain what it holds", stage.name)
                stage.restart()  # a stage waiting out its restart backoff would drop all it had to hand on
        for source in self.sources:
            source.stop()
        for stage in [*self.sources, *self.windowing]:
            if not stage.join(1.0):
                stage.stop()
                if not stage.join(2.0):
                    log.warning("%s did not stop within 3 s", stage.name)
        self.inference.finish(drain_timeout_s=timeout)
        if not self.inference.join(min(timeout, 3600.0) + 5.0):
            log.warning("inference still busy after %.1f s; stopping without it", timeout + 5.0)
        self.alerts_inbox.close()
        if not self.alerts.join(10.0):
            log.warning("alerts stage did not drain within 10 s")
        self.output_inbox.close()
        if self.output is not None and not self.output.join(30.0):
            log.warning("output stage did not drain within 30 s")
        for sink in self.sinks:
            sink.stop(5.0)
        self._close_servers()
        for stage in self.stages:
            stage.stop()
        log.info("stopped: %d windows scored, %d events published, dropped per source %s",
                 self.inference.stats.windows, self.publisher.published, dict(self.queue.dropped) or "{}")

    # supervision

    def health(self) -> dict[str, Health]:
        """Every stage's health, and the threads the output stage relies on (the dashboard's server,
        the replay server, each sink's thread): one that died is not healthy either."""
        now = time.monotonic()
        health = {stage.name: stage.health(now) for stage in self.stages}
        if self.output is not None and self.output.state is not StageState.STOPPED:
            helpers = [("dashboard", self.dashboard), ("replay", self.publisher.replay),
                       *((f"sink-{sink.name}", sink) for sink in self.sinks)]
            for name, helper in helpers:
                if helper is not None and getattr(helper, "alive", True) is False:
                    health[name] = Health(False, "its thread is not running")
        return health

    def healthy(self) -> bool:
        return self.fatal is None and all(h.ok for h in self.health().values())

    def wait(self, stop: threading.Event, until_done: bool = False, watchdog: Watchdog | None = None,
             hangup: threading.Event | None = None, on_hangup: Callable[[], None] = lambda: None) -> None:
        """Supervise until ``stop`` is set (a signal), a stage has failed too often (``exit_code``
        1), or with ``until_done`` until every source has ended and its windows were handed on.
        Pings ``watchdog`` only while every stage is healthy; runs ``on_hangup`` (a reload) here,
        on this thread, when ``hangup`` is set."""
        while not stop.is_set():
            if not self.supervise():
                self.exit_code = 1
                return
            if hangup is not None and hangup.is_set():
                hangup.clear()
                on_hangup()
            if watchdog is not None and watchdog.enabled:
                watchdog.tick(self.healthy())
            if until_done and self._sources_done():
                return
            stop.wait(0.1)

    def _sources_done(self) -> bool:
        """Every source has ended and everything it gave has gone all the way through (seen idle
        on two turns in a row: a stage takes an item a moment before it says it holds one)."""
        done = all(stage.finished for stage in [*self.sources, *self.windowing]) and self.idle()
        self._idle_turns = self._idle_turns + 1 if done else 0
        return self._idle_turns >= 2

    def idle(self) -> bool:
        """Nothing queued or in hand between the windowing stages and the event log."""
        return (len(self.queue) == 0 and self.inference.idle and len(self.alerts_inbox) == 0
                and self.alerts.idle and len(self.output_inbox) == 0 and (self.output is None or self.output.idle))

    def supervise(self) -> bool:
        """Restart failed stages (with backoff); False once one has failed too often."""
        now = time.monotonic()
        for stage in self.stages:
            if stage.state is not StageState.FAILED:
                continue
            name = stage.name
            if name in self._restart_at:
                if now >= self._restart_at[name]:
                    del self._restart_at[name]
                    log.warning("restarting stage %s (restart %d)", name, stage.restarts + 1)
                    stage.restart()
                    self._status_nowait(self._status_source(stage), "stage_restarted", f"stage {name} restarted", stage=name)
                continue
            recent = [t for t in self._failures.get(name, []) if now - t < RESTART_WINDOW_S]
            if len(recent) >= MAX_RESTARTS:
                self.fatal = (f"stage {name} failed {len(recent) + 1} times within {RESTART_WINDOW_S:g} s "
                              f"(last: {stage.error!r}); stopping so that the service manager restarts monitord")
                log.critical("%s", self.fatal)
                self._status_nowait(DAEMON, "fatal", self.fatal, stage=name)
                return False
            self._failures[name] = [*recent, now]
            self._restart_at[name] = now + 2.0 ** len(recent)
        return True

    def _on_stage_failure(self, stage: Stage) -> None:
        """On the dying thread: say so at once (the output stage may be the one that died: its inbox keeps it)."""
        detail = f"stage {stage.name} failed: {stage.error!r}"
        self.output_inbox.put_nowait(Publication(self._status_event(self._status_source(stage), "stage_failed", detail,
                                                                    stage=stage.name)))

    def _status_nowait(self, source: str, status: str, detail: str, **extra: object) -> None:
        """Statuses from threads that must never wait on the output stage: the supervising loop (it may
        have to restart that stage) and a live source's windowing."""
        if not self.output_inbox.put_nowait(Publication(self._status_event(source, status, detail, **extra))):
            log.warning("status %s (%s) not published: the output channel is full", status, detail)

    def _status_source(self, stage: Stage) -> str:
        return getattr(stage, "id", None) or getattr(getattr(stage, "cutter", None), "source", None) or DAEMON

    # status events, from any thread

    def status(self, source: str, status: str, detail: str, **extra: object) -> None:
        """Publish a status event (through the output stage, in order with everything else)."""
        self.output_inbox.put(Publication(self._status_event(source, status, detail, **extra)), stop=self._closing)

    def _status_event(self, source: str, status: str, detail: str, **extra: object) -> Event:
        return Event(kind="status", source=source, time=iso_utc(time.time()), host=self.host, status=status,
                     detail=detail, extra=dict(extra))

    def _status_due(self, last_said: dict[str, float], source: str) -> bool:
        """At most one overload status per ``overload_status_interval_s`` per source (and kind)."""
        now = time.monotonic()
        last = last_said.get(source)
        if last is not None and now - last < self.config.pipeline.overload_status_interval_s:
            return False
        last_said[source] = now
        return True

    def _on_drop(self, dropped: Window) -> None:
        """A live source dropped a window (inference behind): a status, at most one per interval per source."""
        source = dropped.source
        if not self._status_due(self._last_overload, source):
            return
        count = self.queue.dropped[source]
        log.warning("source %s: inference behind, %d windows dropped so far", source, count)
        # on the windowing thread of a live source, which must not wait: an overload status is a
        # running count, so one lost to a full output channel is made good by the next
        self._status_nowait(source, "overload", f"window queue full: {count} windows dropped so far", dropped=count)

    def _on_remote_drop(self, dropped: Window) -> None:
        """A live source's window was taken off remote scoring (too many waiting for the cluster): a
        status, at most one per interval per source."""
        source = dropped.source
        if not self._status_due(self._last_remote_overload, source):
            return
        count = self.inference.stats.remote_dropped[source]
        models = ", ".join(m.name for m in self.inference.remote_models)
        log.warning("source %s: remote inference behind, %d windows not scored remotely so far", source, count)
        self._status_nowait(source, "overload", f"remote inference behind: {count} windows of this source not scored by "
                    f"{models} so far (unavailable; at most {self.inference.max_waiting_windows} wait)",
                    dropped=count, remote=True)

    # reload (SIGHUP)

    def apply_reload(self, new: Config) -> bool:
        """Apply new rules, thresholds, labels and prompts without stopping capture, or refuse the
        whole change with a ``reload_failed`` status saying why; the running config then stays."""
        try:
            weights = self.reload(new)
        except ReloadError as exc:
            log.error("reload refused: %s; the running configuration stays", exc)
            self._status_nowait(DAEMON, "reload_failed", str(exc))
            return False
        log.info("reloaded: %d rules, labels %s, new weights %s", len(new.rules), {n: len(m.labels) for n, m in new.models.items()
                                                                                   if hasattr(m, "labels")}, weights or "none")
        self._status_nowait(DAEMON, "reloaded", f"{len(new.rules)} rules; labels and prompts applied"
                            + (f"; new weights for {', '.join(weights)}" if weights else ""))
        return True

    def reload(self, new: Config) -> list[str]:
        """Apply ``new`` (see apply_reload); the names of the models whose weights were loaded again."""
        restart_only = [k for k in RESTART_ONLY if getattr(new, k) != getattr(self.config, k)]
        swappable = {"labels", "prompt"}
        old_models = {n: m.model_dump(exclude=swappable) for n, m in self.config.models.items()}
        new_models = {n: m.model_dump(exclude=swappable) for n, m in new.models.items()}
        if old_models != new_models:
            restart_only.append("models (other than labels and prompt)")
        if restart_only:
            raise ReloadError(f"{', '.join(restart_only)} changed: restart monitord to apply them")
        from monitord.teaching.references import ReferenceUnreadable, needed

        try:  # before anything is swapped: a reference is otherwise first read inside swap()
            needed(new, self.models.get)
        except ReferenceUnreadable as exc:
            raise ReloadError(str(exc)) from None
        reloaded = self._load_changed_weights(new)
        loaded_before = set(self.models)
        prepared = {}
        for name, model_config in new.models.items():
            if name not in loaded_before or name in reloaded:  # not loaded: nothing to swap; reloaded: has the new labels
                continue
            old = self.config.models[name]
            if getattr(model_config, "labels", None) != getattr(old, "labels", None) or \
                    getattr(model_config, "prompt", None) != getattr(old, "prompt", None):
                try:
                    prepared[name] = self.models[name].prepare_labels(model_config.labels, getattr(model_config, "prompt", ""))
                except Exception as exc:  # the old labels keep scoring
                    raise ReloadError(f"models.{name}: new labels could not be prepared: {exc}") from None

        def swap() -> bool:  # on the inference thread, between two batches; False: nothing done, prepare again
            # a model that joined since the labels were prepared did so with the running config's labels
            if any(name in self.models and name not in loaded_before and labels_in(self.config, name) != labels_in(new, name)
                   for name in new.models):
                return False
            for name, loaded in reloaded.items():
                self.models[name].use_weights(loaded)
            for name, labels in prepared.items():
                self.models[name].use_labels(labels)
            self.alerts.not_like.references = self._references(new, only_cached=True)  # before the rules that use them
            self.inference.emit(RulesChange(new.rules))
            # here, not on the caller's thread after: a model still loading joins with it (add_model, on this thread)
            self.config = self.config.model_copy(update={"rules": new.rules, "models": new.models})
            self._update_inactive()  # the new rules on a model not loaded (yet) are inactive too
            self._embed_references_soon(new)
            return True

        if not self.inference.alive:
            raise ReloadError("the inference stage is not running (see the stage_failed status)")
        future = self.inference.submit(swap)
        try:
            try:
                swapped = future.result(timeout=self.inference.stall_s)
            except FutureTimeout:
                if future.cancel():  # not begun: it never will, so the running config really stays
                    raise ReloadError(f"the inference stage did not swap the labels in within "
                                      f"{self.inference.stall_s:g} s") from None
                swapped = future.result()  # it had begun (a swap is quick): the reload is applied
        except ReloadError:
            raise
        except Exception as exc:
            raise ReloadError(f"the new labels could not be swapped in: {exc!r}") from None
        if not swapped:  # once per model that joined meanwhile at most: it is among the loaded ones now
            return self.reload(new)
        return sorted(reloaded)

    def _load_changed_weights(self, new: Config) -> dict[str, Model]:
        """The local models whose files were replaced since they were loaded (an administrator
        copied new weights over the folder), loaded again from them, off the inference thread. One
        that cannot be loaded refuses the reload: the old weights, in memory, keep scoring."""
        loaded: dict[str, Model] = {}
        for name, model in self.models.items():
            changed = getattr(model, "weights_changed", None)
            if name not in new.models or changed is None or not changed():
                continue
            log.info("model %s: the files in %s changed since they were loaded; loading them", name, model.weights_path)
            try:
                loaded[name] = build_model(name, new.models[name])
            except Exception as exc:  # noqa: BLE001 - whatever a half-copied folder raises
                raise ReloadError(f"models.{name}: the weights in {model.weights_path} could not be loaded ({exc}); "
                                  f"the old ones keep scoring") from None
        return loaded

    def _references(self, config: Config, only_cached: bool = False, on_unreadable=None, embed_with=None) -> dict:
        """Each rule's reference positives (``not_like.reference``), embedded by its model: what
        "not this" can never teach the rule away from. Kept in the state directory between starts;
        ``only_cached``: those alone (a rule whose references are not ready suppresses nothing)."""
        from monitord.teaching.references import for_rules, kept_folder

        return for_rules(config, self.models.get, kept_folder(), only_cached=only_cached,
                         on_unreadable=on_unreadable, embed_with=embed_with)

    def _embed_on_inference(self, embedder, cuts: list) -> np.ndarray:
        """``teach.embed`` batch by batch, each a low-priority job on the inference thread (live windows
        go first, and the stage beats between them); called from a helper thread."""
        from monitord.teaching.teach import embed

        rows = []
        step = max(1, int(getattr(embedder, "batch_max", 1)))
        for i in range(0, len(cuts), step):
            future = self.inference.submit(lambda part=cuts[i : i + step]: embed(embedder, part), priority=LOW)
            while True:
                try:
                    rows.append(future.result(timeout=0.5))
                    break
                except FutureTimeout:
                    if self._closing.is_set():
                        future.cancel()
                        raise RuntimeError("the daemon is stopping") from None
        return np.concatenate(rows)

    def _embed_references_soon(self, config: Config) -> None:
        """Embed the references not kept yet: cut (and kept) on a helper thread, embedded by the inference
        thread between two batches, and handed to the alerts stage on the inference thread (in order with
        a reload's swap)."""
        from monitord.teaching.references import needed

        self._reference_round += 1
        round_ = self._reference_round
        missing = [n for n in needed(config, self.models.get) if n.rule_id not in self.alerts.not_like.references]
        if not missing:
            return

        def unreadable(message: str) -> None:  # that rule's taught false alarms suppress nothing; the others' do
            log.error("%s: its taught false alarms suppress nothing", message)
            self._status_nowait(DAEMON, "reference_unreadable", f"{message}: its taught false alarms suppress nothing")

        def embed() -> None:  # on a helper thread
            try:
                found = self._references(config, on_unreadable=unreadable, embed_with=self._embed_on_inference)
            except Exception as exc:  # noqa: BLE001 - the rules stay as they are: suppressing nothing
                if not self._closing.is_set():
                    log.error("references could not be embedded (%s): the taught false alarms of rules %s suppress "
                              "nothing", exc, ", ".join(n.rule_id for n in missing))
                return

            def assign() -> None:  # on the inference thread, where a reload swaps them too
                if round_ == self._reference_round:  # not overtaken by a reload
                    self.alerts.not_like.references = found
                    log.info("references ready for rules %s", ", ".join(sorted(found)))

            self.inference.submit(assign)

        threading.Thread(target=embed, name=f"references-{round_}", daemon=True).start()

    # feedback on an alert (the dashboard, MQTT): "not this" / "yes, this"

    def feedback(self, seq: int, verdict: str, via: str = "api", expect: tuple[str, str] | None = None) -> dict:
        """Teach the alerting window of event SEQ to its rule's not_like bank (blocks: call it off
        an event loop); FeedbackError says why not."""
        from monitord.teaching.feedback import give

        return give(self.teaching_port, seq, verdict, via, expect)

    @property
    def teaching_port(self):
        """What teaching may ask of the daemon: a logged event, a window's audio, an embedding."""
        from monitord.teaching.port import TeachingPort

        return TeachingPort(config=lambda: self.config, find_event=self._find_event, embedder=self.models.get,
                            run_inference=self.score_upload, ring_audio=self._ring_audio)

    def _find_event(self, seq: int) -> dict | None:
        """Published event SEQ: from the event log, else the dashboard's recent events."""
        event_log = self.publisher.event_log
        found = event_log.find(seq) if event_log is not None else None
        if found is not None:
            return found
        if self.dashboard is not None:
            return next((e for e in list(self.dashboard.broadcaster.recent_events) if e.get("seq") == seq), None)
        return None

    def _ring_audio(self, source: str, start_s: float, seconds: float):
        """(samples, rate) of ``source`` from stream time ``start_s`` on, while its ring still holds them."""
        from monitord.sources.ring import Overrun

        ring = next((s.ring for s in self.sources if s.id == source), None)
        if ring is None:
            return None
        rate = ring.sample_rate
        try:
            return ring.read(round(start_s * rate), round(seconds * rate)), rate
        except (Overrun, ValueError):
            return None

    # the dashboard's try-it panel

    def score_upload(self, fn):
        """Run ``fn`` on the inference thread when no window is waiting (a Future)."""
        return self.inference.submit(fn, priority=LOW)

    # metrics

    def snapshot(self) -> Snapshot:
        s = Snapshot(dropped=dict(self.queue.dropped), queue_depth=len(self.queue))
        for stage in self.windowing:
            source = stage.cutter.source
            s.windows[(source, "cut")] = stage.stats.cut
            s.windows[(source, "passed")] = stage.stats.passed
            s.input_level[source] = stage.stats.level_dbfs
        for (source, model, verdict), n in list(self.alerts.outcomes.items()):
            s.outcomes[(source, model, verdict)] = n
        for source in self.sources:
            s.source_up[source.id] = source.state is StageState.RUNNING
        now = time.monotonic()
        for stage in self.stages:
            s.stages[stage.name] = (stage.state.value, stage.health(now).ok, stage.restarts)
        inference = self.inference
        if inference.remote_models:
            s.inference_up = inference.availability.up
            s.remote_waiting = inference.remote_waiting
            s.remote_in_flight = inference.remote_in_flight
            s.remote_dropped = dict(inference.stats.remote_dropped)
            for model in inference.remote_models:
                requests, windows, sizes = model.stats_now()
                s.remote[model.name] = RemoteFigures(requests, windows, sizes, inference.stats.remote_resends[model.name],
                                                     model.transport.retries)
        return s
