"""The model worker: takes batches of windows off the queue and scores them with every model."""

from __future__ import annotations

import logging
from queue import SimpleQueue
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

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
    abandoned_at_shutdown: int = 0


def cascade_order(models: Sequence[Model]) -> list[Model]:
    """Models that gate others first (cascades are one level deep, checked by the config)."""
    return sorted(models, key=lambda m: m.gated_by is not None)


def cascade_passes(scores: Scores, cascade) -> bool:
    return max(scores.probabilities.get(label, 0.0) for label in cascade.labels) >= cascade.threshold


class ModelWorker:
    """One thread; every window that passed its gate is scored by each model, in batches.

    Results leave in queue order (so per-source order holds): ``on_scores`` for each scored
    window and model; ``on_quiet(window, None)`` for a window the gate rejected and
    ``on_quiet(window, model)`` for one a cascade kept from ``model``; ``on_error`` hears about
    windows a model could not score.
    """

    def __init__(
        self,
        queue: WindowQueue,
        models: Sequence[Model],
        on_scores: Callable[[Scores], None],
        on_error: Callable[[Model, list[Window], Exception], None],
        on_quiet: Callable[[Window, str | None], None] = lambda window, model: None,
    ):
        self.queue = queue
        self.models = cascade_order(models)
        self.on_scores = on_scores
        self.on_error = on_error
        self.on_quiet = on_quiet
        self.stats = WorkerStats()
        self.batch_max = max(m.batch_max for m in self.models)
        self.batch_wait_s = max(m.batch_wait_ms for m in self.models) / 1000.0
        self._drain_deadline: float | None = None
        self._pending: SimpleQueue[Callable[[], None]] = SimpleQueue()
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
            todo = passed
            if model.gated_by is not None:
                cascade = model.gated_by
                gating = {id(w): results[id(w)].get(cascade.model) for w in passed}
                todo = [w for w in passed if gating[id(w)] is not None and cascade_passes(gating[id(w)], cascade)]
                kept = {id(w) for w in todo}
                for w in passed:
                    if id(w) not in kept:
                        skipped.setdefault(id(w), []).append(model.name)
            for scores in self._score(model, todo):
                results[id(scores.window)][model.name] = scores
        for window in batch:
            if not window.passed:
                self.on_quiet(window, None)
                continue
            for scores in results[id(window)].values():
                self.on_scores(scores)
            for model_name in skipped.get(id(window), ()):
                self.on_quiet(window, model_name)

    def _score(self, model: Model, windows: list[Window]) -> list[Scores]:
        out: list[Scores] = []
        for i in range(0, len(windows), model.batch_max):
            chunk = windows[i : i + model.batch_max]
            began = time.perf_counter()
            try:
                out.extend(model.score(chunk))
                self.stats.scored[model.name] += len(chunk)
            except Exception as exc:  # a model failure must not stop listening
                self.stats.failures += 1
                log.exception("model %s failed on %d windows", model.name, len(chunk))
                self.on_error(model, chunk, exc)
            finally:
                spent = time.perf_counter() - began
                self.stats.model_seconds[model.name] = self.stats.model_seconds.get(model.name, 0.0) + spent
        return out
