"""Scoring a batch of windows with every model, in cascade order: the inference stage's work
without its thread, so offline tools (classify, eval, the benchmarks) run exactly what the daemon runs.

A batch a model fails on (CUDA out of memory, say) is split in halves and retried down to single
windows; a window that still fails is FAILED for that model, with a ``model_error`` status. After
``fallback_after`` failed batches in a row a model on an accelerator moves to the CPU
(``model_fallback`` status, stage degraded).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field

from monitord.config import CascadeConfig
from monitord.inference.models.base import Model
from monitord.types import Outcome, ScoredWindow, Scores, Verdict, Window

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
    remote_resends: Counter[str] = field(default_factory=Counter)
    """Remote requests sent again (same windows, same id) after the cluster did not answer, per model."""
    remote_dropped: Counter[str] = field(default_factory=Counter)
    """Windows a live source took off remote scoring (too many waiting), per source."""
    remote_refused: int = 0
    """Windows the server refused (4xx: configuration): FAILED, not retried."""
    spans: deque[BatchSpan] = field(default_factory=lambda: deque(maxlen=SPANS_KEPT))
    """The latest model calls, when each began and ended: what shows the tiers overlapping."""


SPANS_KEPT = 1024


@dataclass(frozen=True)
class BatchSpan:
    """One model call: ``windows`` scored from ``began`` to ``ended`` (``time.monotonic``)."""

    model: str
    windows: int
    began: float
    ended: float


def cascade_order(models: Sequence[Model]) -> list[Model]:
    """Every model after the models it builds on: its cascade's gate and the model whose embedding
    it scores (a model gated by an anomaly model comes after the anomaly model, which comes after
    CLAP). Otherwise the configured order. The config refuses cycles (cascades are one level deep)."""
    by_name = {m.name: m for m in models}
    ordered: list[Model] = []

    def place(model: Model, path: tuple[str, ...] = ()) -> None:
        if model in ordered or model.name in path:
            return
        for needed in (model.depends_on, model.gated_by.model if model.gated_by is not None else None):
            if needed in by_name:
                place(by_name[needed], (*path, model.name))
        ordered.append(model)

    for model in models:
        place(model)
    return ordered


def cascade_passes(scores: Scores, cascade: CascadeConfig) -> bool:
    return max(scores.probabilities.get(label, 0.0) for label in cascade.labels) >= cascade.threshold


@dataclass(eq=False)
class BatchState:
    """A batch on its way through the models: each window's verdict and scores so far, per model."""

    windows: list[Window]
    verdicts: list[dict[str, Verdict]]
    scores: list[dict[str, Scores]]


class Scorer:
    """Scores a batch of windows with every model: the stage's work without the thread, so
    offline tools (classify, eval) run exactly what the daemon runs.

    ``process`` does it all at once; ``begin``, ``run_model`` (or ``todo`` then ``apply``) and
    ``outcomes`` are its steps, for a stage that scores some models of a batch later than others
    (remote ones, and what builds on them)."""

    def __init__(self, models: Sequence[Model], status: StatusCallback = lambda source, status, detail: None,
                 fallback_after: int = 3, on_batch: Callable[[str, int, float], None] = lambda model, n, seconds: None):
        self.models = cascade_order(models)
        self.status = status
        self.fallback_after = fallback_after
        self.on_batch = on_batch
        self.stats = InferenceStats()
        self._consecutive_failures: Counter[str] = Counter()
        self._derive()
        self.degraded: str = ""
        """Why the stage is degraded (a model moved to the CPU), if it is."""

    def _derive(self) -> None:
        self.batch_max = max((m.batch_max for m in self.models), default=8)  # no model loaded: windows still flow
        self.batch_wait_s = max((m.batch_wait_ms for m in self.models), default=0.0) / 1000.0

    def add_model(self, model: Model) -> None:
        """Score with ``model`` too from the next batch on (one loaded after the start): the cascade
        order, batch size and wait are derived again. Call it between two batches (the inference
        thread's ``submit``); ``models`` is rebound, not changed in place."""
        self.models = cascade_order([*self.models, model])
        self._derive()

    def remove_model(self, name: str) -> None:
        """Undo ``add_model`` (a model that could not join the pipeline); nothing where it is not scored."""
        self.models = [m for m in self.models if m.name != name]
        self._derive()

    def process(self, windows: Sequence[Window]) -> list[ScoredWindow]:
        state = self.begin(windows)
        for model in self.models:
            self.run_model(model, state)
        return [ScoredWindow(w, self.outcomes(state, i, self.models)) for i, w in enumerate(windows)]

    def begin(self, windows: Sequence[Window]) -> BatchState:
        self.stats.windows += sum(w.passed for w in windows)
        return BatchState(list(windows), [dict(w.gates) for w in windows], [{} for _ in windows])

    def run_model(self, model: Model, state: BatchState) -> None:
        """Score the batch with one model, here and now (the models it builds on have had their turn)."""
        todo = self.todo(model, state)
        upstream = [state.scores[i][model.depends_on] for i in todo] if model.depends_on is not None else None
        self.apply(model, state, todo, self._score(model, [state.windows[i] for i in todo], upstream))

    def todo(self, model: Model, state: BatchState, unavailable: Collection[int] = ()) -> list[int]:
        """The windows ``model`` must score; every other window's verdict for it is settled here
        (quiet, skipped by its cascade, or no evidence because what it builds on had none). Windows
        in ``unavailable`` that it would score are UNAVAILABLE instead."""
        todo: list[int] = []
        for i, w in enumerate(state.windows):
            verdicts, scores = state.verdicts[i], state.scores[i]
            if verdicts.get(model.name, Verdict.QUIET) is not Verdict.PASSED:
                continue
            if model.depends_on is not None and model.depends_on not in scores:
                upstream = verdicts.get(model.depends_on, Verdict.QUIET)
                verdicts[model.name] = Verdict.QUIET if upstream is Verdict.PASSED else upstream
            elif not model.accepts(w):
                verdicts[model.name] = Verdict.QUIET
            elif model.gated_by is not None and verdicts.get(model.gated_by.model) is Verdict.UNAVAILABLE:
                verdicts[model.name] = Verdict.UNAVAILABLE  # its gate could not be asked: no evidence either way
            elif model.gated_by is not None and not self._cascade_passes(scores, model.gated_by):
                verdicts[model.name] = Verdict.CASCADE
            elif i in unavailable:
                verdicts[model.name] = Verdict.UNAVAILABLE
            else:
                todo.append(i)
        return todo

    @staticmethod
    def apply(model: Model, state: BatchState, indices: Sequence[int], results: Sequence[Scores | None]) -> None:
        """A model's results for these windows (None: it failed on that one)."""
        for i, result in zip(indices, results):
            if result is None:
                state.verdicts[i][model.name] = Verdict.FAILED
            else:
                state.verdicts[i][model.name] = Verdict.SCORED
                state.scores[i][model.name] = result

    @staticmethod
    def outcomes(state: BatchState, i: int, models: Sequence[Model]) -> tuple[Outcome, ...]:
        """Window ``i``'s outcomes for these models (those its gates named)."""
        verdicts, scores = state.verdicts[i], state.scores[i]
        return tuple(Outcome(m.name, verdicts[m.name], scores.get(m.name)) for m in models if m.name in verdicts)

    @staticmethod
    def _cascade_passes(scores: dict[str, Scores], cascade: CascadeConfig) -> bool:
        gating = scores.get(cascade.model)
        return gating is not None and cascade_passes(gating, cascade)

    def _score(self, model: Model, windows: list[Window], upstream: list[Scores] | None) -> list[Scores | None]:
        out: list[Scores | None] = []
        for i in range(0, len(windows), model.batch_max):
            chunk = windows[i : i + model.batch_max]
            up = None if upstream is None else upstream[i : i + model.batch_max]
            began = time.monotonic()
            try:
                out.extend(self._score_or_split(model, chunk, up))
            finally:
                self.record(model, len(chunk), began, time.monotonic())
        return out

    def record(self, model: Model, windows: int, began: float, ended: float) -> None:
        """A model call's figures (a tier's or a remote call's too, once its answer is in)."""
        self.stats.model_seconds[model.name] += ended - began
        self.stats.batch_sizes[windows] += 1
        self.stats.spans.append(BatchSpan(model.name, windows, began, ended))
        self.on_batch(model.name, windows, ended - began)

    def succeeded(self, model: Model, windows: int) -> None:
        self._consecutive_failures[model.name] = 0
        self.stats.scored[model.name] += windows

    def failed(self, model: Model, windows: Sequence[Window], exc: BaseException) -> None:
        """A failed call: counted, and after ``fallback_after`` in a row on an accelerator, the model moves to the CPU."""
        self.stats.failures += 1
        self._consecutive_failures[model.name] += 1
        self._maybe_fall_back(model, windows, exc)

    def _score_or_split(self, model: Model, windows: list[Window], upstream: list[Scores] | None) -> list[Scores | None]:
        try:
            scored = model.score(windows, upstream)
            if len(scored) != len(windows):
                raise RuntimeError(f"model {model.name} returned {len(scored)} scores for {len(windows)} windows")
        except Exception as exc:  # a model failure must not stop listening
            self.failed(model, windows, exc)
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
        self.succeeded(model, len(windows))
        return list(scored)

    def _maybe_fall_back(self, model: Model, windows: Sequence[Window], exc: BaseException) -> None:
        if self._consecutive_failures[model.name] < self.fallback_after or model.device in ("cpu", "remote"):
            return
        previous = model.device
        model.fall_back_to_cpu()
        self._consecutive_failures[model.name] = 0
        self.degraded = f"model {model.name} moved from {previous} to the CPU"
        log.error("model %s failed %d times in a row on %s (%s); now on the CPU", model.name, self.fallback_after, previous, exc)
        for source in sorted({w.source for w in windows}):
            self.status(source, "model_fallback", f"model {model.name} moved from {previous} to cpu after repeated failures: {exc}")


def _timed_score(model: Model, windows: list[Window]) -> tuple[list[Scores], float, float]:
    """(scores, began, ended): a call made on another thread, timed there."""
    began = time.monotonic()
    scores = model.score(windows)
    return scores, began, time.monotonic()


def _locked_timed_score(lock: threading.Lock, model: Model, windows: list[Window]) -> tuple[list[Scores], float, float]:
    with lock:
        return _timed_score(model, windows)
