"""The inference stage: windows in, scores out. Models only: no disk, no sockets.

One thread takes batches off the window queue and scores every window that passed a model's gate
with that model, in cascade order; what became of each window for each model (scored, quiet,
skipped by sampling or by a cascade, failed) leaves as one ``ScoredWindow``, in queue order, so
per-source order holds. ``StreamEnd`` markers pass through in their place.

A batch a model fails on (CUDA out of memory, say) is split in halves and retried down to single
windows; a window that still fails is FAILED for that model, with a ``model_error`` status. After
``fallback_after`` failed batches in a row a model on an accelerator moves to the CPU
(``model_fallback`` status, stage degraded). Capture never stops for any of it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from queue import Empty, PriorityQueue

from monitord.config import CascadeConfig
from monitord.inference.models.base import Model
from monitord.inference.queue import Item, WindowQueue
from monitord.stage import Channel, Stage
from monitord.types import Outcome, Scores, ScoredWindow, StreamEnd, Verdict, Window

log = logging.getLogger(__name__)

StatusCallback = Callable[[str, str, str], None]
"""(source, status, detail)."""


@dataclass
class InferenceStats:
    windows: int = 0
    """Windows that passed at least one gate."""
    batches: int = 0
    scored: Counter[str] = field(default_factory=Counter)
    """Windows scored, per model (a cascaded model sees fewer)."""
    model_seconds: Counter[str] = field(default_factory=Counter)
    batch_sizes: Counter[int] = field(default_factory=Counter)
    failures: int = 0
    """Failed model calls (a split batch counts each try)."""
    dropped_after_failure: int = 0
    abandoned_at_shutdown: int = 0


def cascade_order(models: Sequence[Model]) -> list[Model]:
    """Models that others build on first: gating models before gated ones (one level deep, checked
    by the config), embedding models before those that use their embeddings."""
    return sorted(models, key=lambda m: (m.depends_on is not None, m.gated_by is not None))


def cascade_passes(scores: Scores, cascade: CascadeConfig) -> bool:
    return max(scores.probabilities.get(label, 0.0) for label in cascade.labels) >= cascade.threshold


class Scorer:
    """Scores a batch of windows with every model: the stage's work without the thread, so
    offline tools (classify, eval) run exactly what the daemon runs."""

    def __init__(self, models: Sequence[Model], status: StatusCallback = lambda source, status, detail: None,
                 fallback_after: int = 3, on_batch: Callable[[str, int, float], None] = lambda model, n, seconds: None):
        self.models = cascade_order(models)
        self.status = status
        self.fallback_after = fallback_after
        self.on_batch = on_batch
        self.stats = InferenceStats()
        self._consecutive_failures: Counter[str] = Counter()
        self.batch_max = max((m.batch_max for m in self.models), default=8)  # no model loaded: windows still flow
        self.batch_wait_s = max((m.batch_wait_ms for m in self.models), default=0.0) / 1000.0
        self.degraded: str = ""
        """Why the stage is degraded (a model moved to the CPU), if it is."""

    def process(self, windows: Sequence[Window]) -> list[ScoredWindow]:
        verdicts = [dict(w.gates) for w in windows]
        scores: list[dict[str, Scores]] = [{} for _ in windows]
        self.stats.windows += sum(w.passed for w in windows)
        for model in self.models:
            todo: list[int] = []
            for i, w in enumerate(windows):
                verdict = verdicts[i].get(model.name, Verdict.QUIET)
                if verdict is not Verdict.PASSED:
                    continue
                if model.depends_on is not None and model.depends_on not in scores[i]:
                    upstream = verdicts[i].get(model.depends_on, Verdict.QUIET)
                    verdicts[i][model.name] = Verdict.QUIET if upstream is Verdict.PASSED else upstream
                elif not model.accepts(w):
                    verdicts[i][model.name] = Verdict.QUIET
                elif model.gated_by is not None and not self._cascade_passes(scores[i], model.gated_by):
                    verdicts[i][model.name] = Verdict.CASCADE
                else:
                    todo.append(i)
            upstream = [scores[i][model.depends_on] for i in todo] if model.depends_on is not None else None
            results = self._score(model, [windows[i] for i in todo], upstream)
            for i, result in zip(todo, results):
                if result is None:
                    verdicts[i][model.name] = Verdict.FAILED
                else:
                    verdicts[i][model.name] = Verdict.SCORED
                    scores[i][model.name] = result
        return [
            ScoredWindow(w, tuple(Outcome(m.name, verdicts[i][m.name], scores[i].get(m.name)) for m in self.models
                                  if m.name in verdicts[i]))
            for i, w in enumerate(windows)
        ]

    @staticmethod
    def _cascade_passes(scores: dict[str, Scores], cascade: CascadeConfig) -> bool:
        gating = scores.get(cascade.model)
        return gating is not None and cascade_passes(gating, cascade)

    def _score(self, model: Model, windows: list[Window], upstream: list[Scores] | None) -> list[Scores | None]:
        out: list[Scores | None] = []
        for i in range(0, len(windows), model.batch_max):
            chunk = windows[i : i + model.batch_max]
            up = None if upstream is None else upstream[i : i + model.batch_max]
            began = time.perf_counter()
            try:
                out.extend(self._score_or_split(model, chunk, up))
            finally:
                spent = time.perf_counter() - began
                self.stats.model_seconds[model.name] += spent
                self.stats.batch_sizes[len(chunk)] += 1
                self.on_batch(model.name, len(chunk), spent)
        return out

    def _score_or_split(self, model: Model, windows: list[Window], upstream: list[Scores] | None) -> list[Scores | None]:
        try:
            scored = model.score(windows, upstream)
            if len(scored) != len(windows):
                raise RuntimeError(f"model {model.name} returned {len(scored)} scores for {len(windows)} windows")
        except Exception as exc:  # a model failure must not stop listening
            self.stats.failures += 1
            self._consecutive_failures[model.name] += 1
            self._maybe_fall_back(model, windows, exc)
            if len(windows) > 1:
                log.warning("model %s failed on %d windows (%s); retrying in halves", model.name, len(windows), exc)
                half = len(windows) // 2
                up = (None, None) if upstream is None else (upstream[:half], upstream[half:])
                return self._score_or_split(model, windows[:half], up[0]) + self._score_or_split(model, windows[half:], up[1])
            window = windows[0]
            log.error("model %s failed on the window at %.2f s of %s: %r; dropped", model.name, window.stream_start, window.source, exc)
            self.stats.dropped_after_failure += 1
            self.status(window.source, "model_error", f"model {model.name} failed on the window at "
                        f"{window.stream_start:.2f} s and dropped it: {exc}")
            return [None]
        self._consecutive_failures[model.name] = 0
        self.stats.scored[model.name] += len(windows)
        return list(scored)

    def _maybe_fall_back(self, model: Model, windows: list[Window], exc: Exception) -> None:
        if self._consecutive_failures[model.name] < self.fallback_after or model.device in ("cpu", "remote"):
            return
        previous = model.device
        model.fall_back_to_cpu()
        self._consecutive_failures[model.name] = 0
        self.degraded = f"model {model.name} moved from {previous} to the CPU"
        log.error("model %s failed %d times in a row on %s (%s); now on the CPU", model.name, self.fallback_after, previous, exc)
        for source in sorted({w.source for w in windows}):
            self.status(source, "model_fallback", f"model {model.name} moved from {previous} to cpu after repeated failures: {exc}")


@dataclass(order=True)
class _Job:
    priority: int
    order: int
    fn: Callable[[], object] = field(compare=False)
    future: Future = field(compare=False)


URGENT, LOW = 0, 10


class InferenceStage(Stage):
    """The thread around a Scorer: batches from the window queue, results into ``out`` in order.

    Work other stages need done by the models (a label swap on reload, the dashboard's try-it)
    goes through ``submit``: urgent jobs run before the next batch, low-priority ones only when
    no window is waiting.
    """

    def __init__(self, queue: WindowQueue, scorer: Scorer, out: Channel, stall_s: float = 60.0):
        super().__init__("inference", stall_s)
        self.queue = queue
        self.scorer = scorer
        self.stats = scorer.stats
        self.out = out
        self._jobs: PriorityQueue[_Job] = PriorityQueue()
        self._job_order = 0
        self._job_lock = threading.Lock()
        self._in_hand: list[Item] = []
        """What of the current batch has not been handed on yet: put back at the queue's front if
        the thread dies with it, so a restart loses and repeats nothing."""
        self._drain_deadline: float | None = None

    def submit(self, fn: Callable[[], object], priority: int = URGENT) -> Future:
        """Run ``fn`` on the inference thread; its result (or exception) arrives in the Future."""
        future: Future = Future()
        with self._job_lock:
            self._job_order += 1
            self._jobs.put(_Job(priority, self._job_order, fn, future))
        return future

    @property
    def idle(self) -> bool:
        """No batch in hand and no job waiting."""
        return not self._in_hand and self._jobs.empty()

    def finish(self, drain_timeout_s: float) -> None:
        """Stop after the queue is empty, or after ``drain_timeout_s``, whichever is first."""
        self._drain_deadline = time.monotonic() + drain_timeout_s
        self.queue.close()

    def run(self) -> None:
        if self._in_hand:  # a restart: the batch the dead thread held goes first
            self.queue.put_back(self._in_hand)
            self._in_hand = []
        while not self.stopping.is_set():
            self.beat()
            self._run_jobs(URGENT)
            if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                self.stats.abandoned_at_shutdown = sum(isinstance(i, Window) for i in self.queue.get_batch(10**9, 0, 0))
                if self.stats.abandoned_at_shutdown:
                    log.warning("shutdown: %d queued windows not scored (drain timeout)", self.stats.abandoned_at_shutdown)
                return
            batch = self.queue.get_batch(self.scorer.batch_max, self.scorer.batch_wait_s, timeout=0.2, taken=self._in_hand)
            if not batch:
                if self.queue.closed:
                    return
                self._run_jobs(LOW)
                continue
            self._process(batch)
            if self.scorer.degraded:
                self.set_degraded(self.scorer.degraded)

    def _process(self, batch: list[Item]) -> None:
        windows = [item for item in batch if isinstance(item, Window)]
        self.stats.batches += 1
        results = iter(self.scorer.process(windows))
        for item in batch:
            if not self.out.put(next(results) if isinstance(item, Window) else item, self.stopping, self.beat):
                return  # stopping: what is left in hand is abandoned with the queue
            self._in_hand.pop(0)

    def emit(self, item: object) -> bool:
        """Hand something on to the alerts stage in order with the results (from a job on this thread)."""
        return self.out.put(item, self.stopping, self.beat)

    def _run_jobs(self, up_to: int) -> None:
        while True:
            try:
                job = self._jobs.get_nowait()
            except Empty:
                return
            if job.priority > up_to:
                self._jobs.put(job)
                return
            if not job.future.set_running_or_notify_cancel():
                continue
            try:
                job.future.set_result(job.fn())
            except Exception as exc:  # the job's failure is its caller's to report, not ours
                job.future.set_exception(exc)
            self.beat()
