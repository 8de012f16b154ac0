"""The model worker: takes batches of windows off the queue and scores them with every model."""

from __future__ import annotations

import logging
from queue import SimpleQueue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from monitord.config import CascadeConfig
from monitord.models.base import Model, Scores
from monitord.windowqueue import WindowQueue
from monitord.windows import Window

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    windows: int = 0
    """Windows that passed their gate."""
    batches: int = 0
    scored: Counter[str] = field(default_factory=Counter)
    """Windows scored, per model (a cascaded model sees fewer)."""
    model_seconds: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    """Failed model calls (a split batch counts each try)."""
    dropped_after_failure: int = 0
    abandoned_at_shutdown: int = 0


def cascade_order(models: Sequence[Model]) -> list[Model]:
    """Models that others build on first: gating models before gated ones (one level deep, checked
    by the config), embedding models before those that use their embeddings."""
    return sorted(models, key=lambda m: (getattr(m, "depends_on", None) is not None, m.gated_by is not None))


def cascade_passes(scores: Scores, cascade: CascadeConfig) -> bool:
    return max(scores.probabilities.get(label, 0.0) for label in cascade.labels) >= cascade.threshold


class ModelWorker:
    """One thread; every window that passed its gate is scored by each model, in batches.

    Results leave in queue order (so per-source order holds): ``on_scores`` for each scored
    window and model; ``on_quiet(window, None)`` for a window the gate rejected and
    ``on_quiet(window, model)`` for one the model's own gate or a cascade kept from it; ``on_error`` hears about
    windows a model could not score, as (model, windows, status, detail).

    A batch a model fails on (CUDA out of memory, say) is split in halves and retried down to
    single windows; a window that still fails is dropped with a ``model_error`` status. After
    ``fallback_after`` failed batches in a row a model on a GPU is moved to the CPU
    (``model_fallback`` status). Capture never stops for any of it.
    """

    def __init__(
        self,
        queue: WindowQueue,
        models: Sequence[Model],
        on_scores: Callable[[Scores], None],
        on_error: Callable[[Model, list[Window], str, str], None],
        on_quiet: Callable[[Window, str | None], None] = lambda window, model: None,
        fallback_after: int = 3,
        on_batch: Callable[[str, int, float], None] = lambda model, windows, seconds: None,
    ):
        self.queue = queue
        self.models = cascade_order(models)
        self.on_scores = on_scores
        self.on_error = on_error
        self.on_quiet = on_quiet
        self.fallback_after = fallback_after
        self.on_batch = on_batch
        self._consecutive_failures: Counter[str] = Counter()
        self.stats = WorkerStats()
        self.batch_max = max(m.batch_max for m in self.models)
        self.batch_wait_s = max(m.batch_wait_ms for m in self.models) / 1000.0
        self._drain_deadline: float | None = None
        self._pending: SimpleQueue[Callable[[], None]] = SimpleQueue()
        self.heartbeat = time.monotonic()
        """When the worker last came back to its queue (stale while one batch takes long, or stuck)."""
        self._thread = threading.Thread(target=self._run, name="model-worker", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def call_soon(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` on the worker thread between two batches (e.g. swapping rules or labels)."""
        self._pending.put(fn)

    def finish(self, drain_timeout_s: float) -> None:
        """Stop after the queue is empty, or after ``drain_timeout_s``, whichever is first."""
        self._drain_deadline = time.monotonic() + drain_timeout_s
        self.queue.close()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    def _run(self) -> None:
        while True:
            self.heartbeat = time.monotonic()
            while not self._pending.empty():
                self._pending.get()()
            if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                self.stats.abandoned_at_shutdown = len(self.queue)
                if self.stats.abandoned_at_shutdown:
                    log.warning("shutdown: %d queued windows not scored (drain timeout)", self.stats.abandoned_at_shutdown)
                return
            batch = self.queue.get_batch(self.batch_max, self.batch_wait_s, timeout=0.2)
            if not batch:
                if self._drain_deadline is not None:
                    return
                continue
            self.process(batch)

    def process(self, batch: list[Window]) -> None:
        self.stats.batches += 1
        passed = [w for w in batch if w.passed]
        self.stats.windows += len(passed)
        results: dict[int, dict[str, Scores]] = {id(w): {} for w in passed}
        skipped: dict[int, list[str]] = {}
        for model in self.models:
            accepts = getattr(model, "accepts", None)
            todo = [w for w in passed if w.passes(model.name) and (accepts is None or accepts(w))]
            todo_ids = {id(w) for w in todo}
            for w in passed:
                if id(w) not in todo_ids:
                    skipped.setdefault(id(w), []).append(model.name)
            if model.gated_by is not None:
                cascade = model.gated_by
                gating = {id(w): results[id(w)].get(cascade.model) for w in passed}
                kept = [w for w in todo if gating[id(w)] is not None and cascade_passes(gating[id(w)], cascade)]
                kept_ids = {id(w) for w in kept}
                for w in todo:
                    if id(w) not in kept_ids:
                        skipped.setdefault(id(w), []).append(model.name)
                todo = kept
            for scores in self._score(model, todo):
                results[id(scores.window)][model.name] = scores
                if scores.embedding is not None:
                    scores.window.embeddings[model.name] = scores.embedding
        for window in batch:
            if not window.passed:
                if not window.unsampled(None):
                    self.on_quiet(window, None)
                continue
            for scores in results[id(window)].values():
                self.on_scores(scores)
            for model_name in skipped.get(id(window), ()):
                if not window.unsampled(model_name):
                    self.on_quiet(window, model_name)

    def _score(self, model: Model, windows: list[Window]) -> list[Scores]:
        out: list[Scores] = []
        for i in range(0, len(windows), model.batch_max):
            chunk = windows[i : i + model.batch_max]
            began = time.perf_counter()
            try:
                out.extend(self._score_or_split(model, chunk))
            finally:
                spent = time.perf_counter() - began
                self.stats.model_seconds[model.name] = self.stats.model_seconds.get(model.name, 0.0) + spent
                self.on_batch(model.name, len(chunk), spent)
        return out

    def _score_or_split(self, model: Model, windows: list[Window]) -> list[Scores]:
        try:
            scored = model.score(windows)
        except Exception as exc:  # a model failure must not stop listening
            self.stats.failures += 1
            self._consecutive_failures[model.name] += 1
            self._maybe_fall_back(model, windows, exc)
            if len(windows) > 1:
                log.warning("model %s failed on %d windows (%s); retrying in halves", model.name, len(windows), exc)
                half = len(windows) // 2
                return self._score_or_split(model, windows[:half]) + self._score_or_split(model, windows[half:])
            log.error("model %s failed on the window at %.2f s of %s: %r; dropped", model.name,
                      windows[0].stream_start, windows[0].source, exc)
            self.stats.dropped_after_failure += 1
            self.on_error(model, windows, "model_error", f"model {model.name} failed on this window and dropped it: {exc}")
            return []
        self._consecutive_failures[model.name] = 0
        self.stats.scored[model.name] += len(windows)
        return scored

    def _maybe_fall_back(self, model: Model, windows: list[Window], exc: Exception) -> None:
        if self._consecutive_failures[model.name] < self.fallback_after:
            return
        fall_back = getattr(model, "fall_back_to_cpu", None)
        if fall_back is None or getattr(model, "device", "cpu") == "cpu":
            return
        previous = model.device
        fall_back()
        self._consecutive_failures[model.name] = 0
        log.error("model %s failed %d times in a row on %s (%s); now on the CPU", model.name, self.fallback_after, previous, exc)
        self.on_error(model, windows, "model_fallback", f"model {model.name} moved from {previous} to cpu after repeated failures: {exc}")
