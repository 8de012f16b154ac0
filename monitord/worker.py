"""The model worker: takes batches of windows off the queue and scores them with every model."""

from __future__ import annotations

import logging
from queue import SimpleQueue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from monitord.models.base import Model, Scores
from monitord.windowqueue import WindowQueue
from monitord.windows import Window

log = logging.getLogger(__name__)


@dataclass
class WorkerStats:
    windows: int = 0
    batches: int = 0
    model_seconds: dict[str, float] = field(default_factory=dict)
    failures: int = 0
    abandoned_at_shutdown: int = 0


class ModelWorker:
    """One thread; every window that passed its gate is scored by each model, in batches.

    Results leave in queue order (so per-source order holds): ``on_scores`` for each scored
    window and model, ``on_gated`` for a window the gate rejected; ``on_error`` hears about
    windows a model could not score.
    """

    def __init__(
        self,
        queue: WindowQueue,
        models: Sequence[Model],
        on_scores: Callable[[Scores], None],
        on_error: Callable[[Model, list[Window], Exception], None],
        on_gated: Callable[[Window], None] = lambda window: None,
    ):
        self.queue = queue
        self.models = list(models)
        self.on_scores = on_scores
        self.on_error = on_error
        self.on_gated = on_gated
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
        results: dict[int, list[Scores]] = {id(w): [] for w in passed}
        for model in self.models:
            for i in range(0, len(passed), model.batch_max):
                chunk = passed[i : i + model.batch_max]
                began = time.perf_counter()
                try:
                    scored = model.score(chunk)
                except Exception as exc:  # a model failure must not stop listening
                    self.stats.failures += 1
                    log.exception("model %s failed on %d windows", model.name, len(chunk))
                    self.on_error(model, chunk, exc)
                    continue
                finally:
                    spent = time.perf_counter() - began
                    self.stats.model_seconds[model.name] = self.stats.model_seconds.get(model.name, 0.0) + spent
                for scores in scored:
                    results[id(scores.window)].append(scores)
        for window in batch:
            if not window.passed:
                self.on_gated(window)
            for scores in results.get(id(window), ()):
                self.on_scores(scores)
