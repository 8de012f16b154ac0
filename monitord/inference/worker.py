"""The inference stage: windows in, scores out. Models only: no disk, no sockets.

One thread takes batches off the window queue and scores every window that passed a model's gate
with that model, in cascade order (``scoring.Scorer``); what became of each window for each model
(scored, quiet, skipped by sampling or by a cascade, failed) leaves as ``ScoredWindow``s, in
queue order, so per-source order holds. ``StreamEnd`` markers pass through in their place. Capture
never stops for a model's failure.

A cascade's second tier (a local model gated by another, CLAP behind YAMNet) scores on a thread of
its own, so that it scores batch k while the first tier scores batch k+1; remote models
(``monitord serve``) are asked without blocking the thread either: see ``InferenceStage``.
"""

from __future__ import annotations

import bisect
import contextlib
import functools
import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import CancelledError, Future
from dataclasses import dataclass, field
from queue import Empty, PriorityQueue

from monitord.inference.models.base import Model
from monitord.inference.scoring import BatchState, Scorer, _locked_timed_score, _timed_score
from monitord.windowing.queue import Item, WindowQueue
from monitord.inference.remote import Availability, InferenceRefused, InferenceUnavailable, InFlight, RemoteModelError
from monitord.inference.remote import Outcome as RemoteOutcome
from monitord.stage import Channel, Stage
from monitord.types import ScoredWindow, Scores, StreamEnd, Verdict, Window

log = logging.getLogger(__name__)

@dataclass(order=True)
class _Task:
    priority: int
    order: int
    fn: Callable[[], object] = field(compare=False)
    future: Future = field(compare=False)


URGENT, LOW = 0, 10


class _Job:
    """One batch's windows on their way through the models that wait on a remote one (the remote
    models, and local ones gated by or built on them), a step per model in cascade order."""

    __slots__ = ("calls", "dropped", "models", "order", "released", "state", "step")

    def __init__(self, order: int, state: BatchState, models: list[Model]):
        self.order = order
        self.state = state
        self.models = models
        self.step = 0
        """Index into ``models`` of the model being scored (remotely: ``calls`` are out)."""
        self.calls: list[_Call] = []
        """The current step's remote requests not answered yet (waiting to be sent, or in the air)."""
        self.dropped: set[int] = set()
        """Windows taken off remote scoring (a live source over the bound): UNAVAILABLE for what is left."""
        self.released: set[int] = set()
        """Windows already handed on (each as soon as it is settled and nothing earlier of its source is not)."""

    @property
    def done(self) -> bool:
        return self.step >= len(self.models) and not self.calls


@dataclass(eq=False)
class _Call:
    """One remote request: some windows of a job for one remote model. Sent again, unchanged (same
    windows, so the same request id), until the cluster answers."""

    job: _Job
    model: Model
    indices: list[int]
    flying: bool = False
    sent: int = 0

    @property
    def key(self) -> tuple[int, int, int]:
        """Queue order: its job, its step, its first window (split halves keep their order)."""
        return self.job.order, self.job.step, self.indices[0]


DAEMON = "daemon"


class InferenceStage(Stage):
    """The thread around a Scorer: batches from the window queue, results into ``out`` in order.

    Work other stages need done by the models (a label swap on reload, the dashboard's try-it)
    goes through ``submit``: urgent jobs run before the next batch, low-priority ones only when
    no window is waiting.

    Remote models (device "remote") never block this thread. A batch's local models that do not
    wait on a remote one score at once and their outcomes go on at once (one ScoredWindow per
    window); the rest of the batch (remote models, and local ones gated by or built on them)
    becomes a job whose requests go out through ``InFlight`` (``max_in_flight`` in the air) and
    whose outcomes go on, in a second ScoredWindow per window, in queue order once answered;
    ``StreamEnd`` markers wait behind them. While the cluster does not answer its requests are
    kept and sent again with backoff (one at a time until one is answered: ``inference_down`` /
    ``inference_up`` statuses). At most ``max_waiting_windows`` windows wait for remote scoring:
    past that a live source's window makes room by taking its own source's oldest waiting window
    off remote scoring (UNAVAILABLE, counted, ``on_remote_drop``), and sources that wait (files)
    are held at the window queue (their windowing waits; what they had queued still comes in).
    Everything the thread holds lives on the object, so a restarted thread goes on where the dead
    one stopped: nothing lost, nothing sent or handed on twice. The requests themselves run on
    ``InFlight``'s pool, whose threads outlive a dead stage thread (a call's exception is its
    outcome, never a thread's death); the stage thread is the only one that collects them.
    """

    def __init__(self, queue: WindowQueue, scorer: Scorer, out: Channel, stall_s: float = 60.0, *,
                 max_in_flight: int = 4, max_waiting_windows: int = 128, overlap_tiers: bool = True,
                 status: Callable[..., None] | None = None, on_remote_drop: Callable[[Window], None] = lambda w: None,
                 status_interval_s: float = 10.0, retry_backoff_s: float = 0.25, retry_backoff_max_s: float = 5.0):
        super().__init__("inference", stall_s)
        self.queue = queue
        self.scorer = scorer
        self.stats = scorer.stats
        self.out = out
        self.status = status or (lambda source, status, detail, **extra: scorer.status(source, status, detail))
        self.on_remote_drop = on_remote_drop
        self.status_interval_s = status_interval_s
        self._jobs: PriorityQueue[_Task] = PriorityQueue()
        self._job_order = 0
        self._job_lock = threading.Lock()
        self._in_hand: list[Item] = []
        """What of the current batch is not yet accounted for: put back at the queue's front if the
        thread dies with it, so a restart loses and repeats nothing."""
        self._outbox: deque[object] = deque()
        """Ready for the alerts channel, in order; taken off only once it is in."""
        self._drain_deadline: float | None = None
        # remote inference, and the tiers that score on threads of their own
        self.overlap_tiers = overlap_tiers
        self._tier_locks: dict[str, threading.Lock] = {}
        """Held while a tier model scores: a job of this thread (a label swap, an upload scored,
        references embedded) or a move to the CPU never uses the model at the same time."""
        self._tier_flights: dict[str, InFlight] = {}
        self.models_changed()
        self.max_in_flight = max_in_flight
        self.max_waiting_windows = max_waiting_windows
        self.retry_backoff_s = retry_backoff_s
        self.retry_backoff_max_s = retry_backoff_max_s
        self.availability = Availability()
        self._flight: InFlight | None = None
        self._pending: deque[_Job | StreamEnd] = deque()
        """Jobs (and the markers behind them) in queue order: handed on from the front once done."""
        self._to_send: list[_Call] = []
        """Requests waiting to be sent, in queue order (``_Call.key``)."""
        self._batches = 0
        self._failed_sends = 0
        self._retry_at = 0.0
        self._last_refusal: dict[str, float] = {}
        self._wake = threading.Event()
        self._answer_in_hand: RemoteOutcome | None = None
        """The remote answer being handled: handled again by a restarted thread if its call is still out."""

    def models_changed(self) -> None:
        """Derive again what follows from the scorer's models (which are remote, which score on a
        tier's thread, which are scored at once): at construction, and after a model was added (on
        this thread, between two batches)."""
        scorer = self.scorer
        names = {m.name for m in scorer.models}
        self.remote_models = [m for m in scorer.models if getattr(m, "device", None) == "remote"]
        self._remote = {m.name for m in self.remote_models}
        self.tier_models = [m for m in scorer.models if self.overlap_tiers and m.name not in self._remote
                            and m.depends_on is None and m.gated_by is not None and m.gated_by.model in names]
        """Local models gated by another (a cascade's second tier): each scores on its own thread."""
        self._offloaded = self._remote | {m.name for m in self.tier_models}
        deferred = set(self._offloaded)
        grew = True
        while grew:
            grew = False
            for m in scorer.models:
                if m.name not in deferred and (m.depends_on in deferred or (m.gated_by is not None and m.gated_by.model in deferred)):
                    deferred.add(m.name)
                    grew = True
        self._first = [m for m in scorer.models if m.name not in deferred]
        """Scored as each batch is taken: local models that wait on no remote or tier model."""
        self._deferred = [m for m in scorer.models if m.name in deferred]
        self._tier_locks = {m.name: self._tier_locks.get(m.name) or threading.Lock() for m in self.tier_models}
        self._tier_backlog_max = 2 * max((m.batch_max for m in self.tier_models), default=0)
        """Windows queued for or being scored by a tier, past which no new batch is taken: one batch
        scoring and one waiting keep the tier busy; more would only add latency (the window queue,
        with its drop policy for live sources, takes the rest)."""
        self.url = next((str(getattr(m, "url", "")) for m in self.remote_models), "")
        if self._thread is not None:  # a model added to a running stage: its calls need their pool now
            self._open_flights()

    def _open_flights(self) -> None:
        """The pools remote calls and tiers' calls run on, where absent or closed (a start, a
        restart, a model added to a running stage)."""
        if self.remote_models and (self._flight is None or self._flight.closed):
            self._flight = InFlight(self.max_in_flight, "inference-remote", on_done=self._woken)
        for model in self.tier_models:
            flight = self._tier_flights.get(model.name)
            if flight is None or flight.closed:
                self._tier_flights[model.name] = InFlight(1, f"inference-{model.name}", on_done=self._woken)

    def submit(self, fn: Callable[[], object], priority: int = URGENT) -> Future:
        """Run ``fn`` on the inference thread; its result (or exception) arrives in the Future."""
        future: Future = Future()
        with self._job_lock:
            self._job_order += 1
            self._jobs.put(_Task(priority, self._job_order, fn, future))
        self._woken()
        return future

    @property
    def idle(self) -> bool:
        """No batch in hand, no job waiting, nothing waiting for remote scoring or to be handed on."""
        return not self._in_hand and self._jobs.empty() and not self._pending and not self._outbox

    @property
    def remote_waiting(self) -> int:
        """Windows waiting for remote scoring (in the air included); read from any thread (a snapshot)."""
        try:
            return self._held()
        except RuntimeError:  # the thread changed what was being counted
            return 0

    @property
    def remote_in_flight(self) -> int:
        return 0 if self._flight is None else self._flight.running

    def finish(self, drain_timeout_s: float) -> None:
        """Stop after the queue is empty and every remote result is in, or after ``drain_timeout_s``,
        whichever is first."""
        self._drain_deadline = time.monotonic() + drain_timeout_s
        self.queue.close()
        self._woken()

    def _woken(self) -> None:
        self._wake.set()
        self.queue.wake()

    def run(self) -> None:
        if self._in_hand:  # a restart: the batch the dead thread held goes first
            self.queue.put_back(self._in_hand)
            self._in_hand = []
        self._open_flights()
        self._recover()
        while not self.stopping.is_set():
            self.beat()
            self._wake.clear()
            self._run_jobs(URGENT)
            if not self._flush():
                continue
            self._collect()
            self._send()
            self._release()
            self._update_state()
            if not self._flush():
                continue
            if self._drain_deadline is not None and time.monotonic() > self._drain_deadline:
                self._abandon()
                return
            if self.queue.closed and len(self.queue) == 0:
                if not self._pending and not self._outbox:
                    self._close_flight()
                    self.queue.hold_waiting(False)
                    return
                self._wake.wait(0.2)  # remote results still to come
                continue
            if self.remote_models:
                self.queue.hold_waiting(self._held() >= self.max_waiting_windows)
            if self._tier_backlog() >= self._tier_backlog_max > 0:
                self._wake.wait(0.2)  # a tier's answer wakes it
                continue
            batch = self.queue.get_batch(self.scorer.batch_max, self.scorer.batch_wait_s, timeout=0.2, taken=self._in_hand)
            if batch:
                self._intake(batch)
            if not len(self.queue):  # no window waiting: low-priority jobs now, not after a 0.2 s lull
                self._run_jobs(LOW)

    def _update_state(self) -> None:
        reasons = [r for r in (self.scorer.degraded, "" if self.availability.up else
                               f"remote inference at {self.url} does not answer") if r]
        if reasons:
            self.set_degraded("; ".join(reasons))
        else:
            self.set_running()

    # a batch comes in

    def _intake(self, batch: list[Item]) -> None:
        windows = [item for item in batch if isinstance(item, Window)]
        self.stats.batches += 1
        state = self.scorer.begin(windows)
        for model in self._first:
            self.scorer.run_model(model, state)
        job, calls = None, []
        if self._deferred and windows:
            self._batches += 1
            job = _Job(self._batches, state, self._deferred)
            calls = self._advance(job)
        # from here on nothing waits or beats (where an injected fault lands), so a thread that dies
        # finds the batch either in hand (scored again) or in the outbox and pending jobs, not both
        if (job is None or job.done) and not self._pending:
            results = iter([ScoredWindow(w, self.scorer.outcomes(state, i, self.scorer.models)) for i, w in enumerate(windows)])
            self._outbox.extend(next(results) if isinstance(item, Window) else item for item in batch)
        else:
            for i, w in enumerate(windows):
                local = self.scorer.outcomes(state, i, self._first)
                if local:
                    self._outbox.append(ScoredWindow(w, local))
            if job is not None:
                self._pending.append(job)
            self._pending.extend(item for item in batch if isinstance(item, StreamEnd))
            for call in calls:
                bisect.insort(self._to_send, call, key=_Call.key.fget)
        self._in_hand.clear()
        if job is not None:
            self._make_room(job)
        self._release()

    def _advance(self, job: _Job, abandon: bool = False) -> list[_Call]:
        """Take the job through its models until it needs a remote answer (the new requests) or is
        done. With ``abandon``, remote models are UNAVAILABLE for every window instead."""
        calls: list[_Call] = []
        while job.step < len(job.models) and not job.calls:
            model = job.models[job.step]
            if model.name not in self._offloaded:
                self.scorer.run_model(model, job.state)
                job.step += 1
                continue
            skip = range(len(job.state.windows)) if abandon else job.dropped
            todo = self.scorer.todo(model, job.state, unavailable=skip)
            if not todo:
                job.step += 1
                continue
            for k in range(0, len(todo), model.batch_max):
                call = _Call(job, model, todo[k : k + model.batch_max])
                job.calls.append(call)
                calls.append(call)
        return calls

    def _call_done(self, call: _Call) -> None:
        job = call.job
        job.calls.remove(call)
        if not job.calls:
            job.step += 1
            for new in self._advance(job):
                bisect.insort(self._to_send, new, key=_Call.key.fget)

    # requests out, answers in

    def _send(self) -> None:
        """Send waiting requests, oldest first: to the cluster while fewer than ``max_in_flight`` are
        in the air (while it is down, one at a time after the backoff), to each tier's thread one at
        a time."""
        i = 0
        while i < len(self._to_send):
            call = self._to_send[i]
            flight = self._flight_for(call.model)
            if flight is None or flight.full or (call.model.name in self._remote and not self.availability.up
                                                 and (len(flight) or time.monotonic() < self._retry_at)):
                i += 1
                continue
            windows = [call.job.state.windows[k] for k in call.indices]
            lock = self._tier_locks.get(call.model.name)
            score = functools.partial(_timed_score, call.model, windows) if lock is None else \
                functools.partial(_locked_timed_score, lock, call.model, windows)
            if not flight.submit(score, tag=call, timeout=0):
                i += 1
                continue
            self._to_send.pop(i)
            call.flying = True
            if call.sent and call.model.name in self._remote:
                self.stats.remote_resends[call.model.name] += 1
            call.sent += 1

    def _flight_for(self, model: Model) -> InFlight | None:
        return self._flight if model.name in self._remote else self._tier_flights.get(model.name)

    def _flights(self) -> list[InFlight]:
        return [f for f in (self._flight, *self._tier_flights.values()) if f is not None]

    def _tier_backlog(self) -> int:
        """Windows waiting for a tier's thread or being scored there."""
        if not self.tier_models:
            return 0
        tiers = self._tier_locks
        waiting = sum(len(c.indices) for c in self._to_send if c.model.name in tiers)
        return waiting + sum(len(c.indices) for job in self._pending if isinstance(job, _Job)
                             for c in job.calls if c.flying and c.model.name in tiers)

    def _collect(self) -> None:
        """Every answer that came back, in the order sent (per flight)."""
        for flight in self._flights():
            while (answer := flight.next(timeout=0)) is not None:
                self._answer_in_hand = answer
                self._on_answer(answer.tag, answer.value, answer.error)
                self._answer_in_hand = None

    def _recover(self) -> None:
        """A restarted thread: finish what the dead one was doing with the remote work it left on
        the object (an answer half handled, a request taken out of line, a job between two steps)."""
        answer, self._answer_in_hand = self._answer_in_hand, None
        if answer is not None and answer.tag in answer.tag.job.calls:
            self._on_answer(answer.tag, answer.value, answer.error)  # applying the same scores again changes nothing
        queued = {id(call) for call in self._to_send}
        for job in self._pending:
            if not isinstance(job, _Job):
                continue
            if not job.calls and job.step < len(job.models):
                self._advance(job)  # its new requests are in job.calls, queued just below
            for call in job.calls:
                if not call.flying and id(call) not in queued:
                    bisect.insort(self._to_send, call, key=_Call.key.fget)
                    queued.add(id(call))

    def _on_answer(self, call: _Call, value: tuple[list[Scores], float, float] | None, error: BaseException | None) -> None:
        call.flying = False
        model, job, n = call.model, call.job, len(call.indices)
        remote = model.name in self._remote
        if error is None:
            scores, began, ended = value
            if len(scores) != n:
                error = RemoteModelError(f"model {model.name} returned {len(scores)} scores for {n} windows")
        # windows taken off remote scoring while their request was in the air: their answer is not used
        kept = [k for k, i in enumerate(call.indices) if i not in job.dropped]
        if len(kept) < n:
            call.indices = [call.indices[k] for k in kept]
            if error is None:
                scores = [scores[k] for k in kept]
            n = len(kept)
            if not n:
                self._call_done(call)
                return
        if error is None:
            if remote:
                self._answered()
            self.scorer.apply(model, job.state, call.indices, scores)
            self._call_done(call)
            self.scorer.succeeded(model, n)
            self.scorer.record(model, n, began, ended)
        elif isinstance(error, CancelledError) and not remote:  # its thread was closed under it (a stop): sent again if the stage goes on
            bisect.insort(self._to_send, call, key=_Call.key.fget)
        elif isinstance(error, (InferenceUnavailable, CancelledError)):
            self._unreachable(error)
            bisect.insort(self._to_send, call, key=_Call.key.fget)  # sent again: the same windows, less any dropped
        elif isinstance(error, InferenceRefused):
            self._answered()
            self.stats.failures += 1
            self.stats.remote_refused += n
            self.scorer.apply(model, job.state, call.indices, [None] * n)
            self._refused(call, error)
            self._call_done(call)
        else:  # the model failed on the server (or the answer was wrong): what a local model's exception means
            if isinstance(error, RemoteModelError):
                self._answered()
            if remote:
                self.stats.failures += 1
            else:
                with self._tier_locks[model.name]:  # no call of it runs while it may move to the CPU
                    self.scorer.failed(model, [job.state.windows[i] for i in call.indices], error)
            if n > 1:
                log.warning("model %s failed on %d windows (%s); retrying in halves", model.name, n, error)
                half = n // 2
                halves = [_Call(job, model, call.indices[:half]), _Call(job, model, call.indices[half:])]
                job.calls[job.calls.index(call)] = halves[0]
                job.calls.append(halves[1])
                for new in halves:
                    bisect.insort(self._to_send, new, key=_Call.key.fget)
                return
            window = job.state.windows[call.indices[0]]
            log.error("model %s failed on the window at %.2f s of %s: %s; dropped", model.name, window.stream_start,
                      window.source, error)
            self.stats.dropped_after_failure += 1
            self.scorer.apply(model, job.state, call.indices, [None])
            self.status(window.source, "model_error", f"model {model.name} failed on the window at "
                        f"{window.stream_start:.2f} s and dropped it: {error}")
            self._call_done(call)

    def _unreachable(self, error: BaseException) -> None:
        self._failed_sends += 1
        delay = min(self.retry_backoff_max_s, self.retry_backoff_s * 2 ** min(self._failed_sends - 1, 30))
        self._retry_at = time.monotonic() + delay
        if self.availability.failed(error):
            log.error("remote inference at %s does not answer: %s; windows wait for it", self.url, error)
            self.status(DAEMON, "inference_down", f"remote inference at {self.url} does not answer ({error}); "
                        f"windows wait for it (at most {self.max_waiting_windows}), local models go on", url=self.url)

    def _answered(self) -> None:
        self._failed_sends = 0
        down_for = self.availability.succeeded()
        if down_for is not None:
            log.warning("remote inference at %s answers again after %.1f s", self.url, down_for)
            self.status(DAEMON, "inference_up", f"remote inference at {self.url} answers again after {down_for:.1f} s; "
                        f"{self._held()} waiting windows go out now", url=self.url, down_s=round(down_for, 3))

    def _refused(self, call: _Call, error: InferenceRefused) -> None:
        """A configuration problem: FAILED, not retried; a model_error status per model at most once an interval."""
        name = call.model.name
        log.error("%s; %d windows not scored", error, len(call.indices))
        now = time.monotonic()
        last = self._last_refusal.get(name)
        if last is not None and now - last < self.status_interval_s:
            return
        self._last_refusal[name] = now
        for source in sorted({call.job.state.windows[i].source for i in call.indices}):
            self.status(source, "model_error", f"{error}; windows refused are not scored (not retried: fix the "
                        f"configuration); {self.stats.remote_refused} so far", refused=self.stats.remote_refused)

    # the bound on windows waiting for remote scoring

    def _waits(self, job: _Job, i: int, asked: set[int]) -> bool:
        """Whether window ``i`` of ``job`` still waits for a remote answer (``asked``: the windows of its current requests)."""
        if i in job.dropped:
            return False
        if i in asked:
            return True
        verdicts = job.state.verdicts[i]
        return any(verdicts.get(m.name) is Verdict.PASSED for m in job.models[job.step + 1 :] if m.name in self._remote)

    def _held(self) -> int:
        """Windows held on the stage for the remote part, samples and all: every window of a job not
        handed on yet, whether it still waits for an answer or waits behind one that does (results
        leave in order). This is what the bound bounds."""
        return sum(len(job.state.windows) - len(job.released) for job in list(self._pending) if isinstance(job, _Job))

    def _make_room(self, job: _Job) -> None:
        """Over the bound, each live window of the new job takes its own source's oldest window still
        waiting for a remote answer (possibly itself) off remote scoring: that frees the windows
        held behind it too, whether or not they needed the cluster themselves."""
        excess = self._held() - self.max_waiting_windows
        for window in job.state.windows:
            if excess <= 0:
                return
            if not self.queue.live.get(window.source, False):
                continue
            victim = self._oldest_waiting(window.source)
            if victim is not None:
                self._drop(*victim)
                self._release()
                excess = self._held() - self.max_waiting_windows

    def _oldest_waiting(self, source: str) -> tuple[_Job, int] | None:
        """The source's oldest window still waiting for a remote answer, in the air or not (one in the
        air is taken off all the same: its answer will not be used, and the windows behind it go on)."""
        for job in self._pending:
            if not isinstance(job, _Job) or job.done:
                continue
            asked = {i for c in job.calls if c.model.name in self._remote for i in c.indices}
            for i, window in enumerate(job.state.windows):
                if window.source == source and self._waits(job, i, asked):
                    return job, i
        return None

    def _drop(self, job: _Job, i: int) -> None:
        window = job.state.windows[i]
        job.dropped.add(i)
        for call in job.calls:
            if i in call.indices and call.model.name in self._remote:
                job.state.verdicts[i][call.model.name] = Verdict.UNAVAILABLE
                if call.flying:
                    break  # its answer, when it comes, is not used for this window (_on_answer)
                call.indices.remove(i)
                if not call.indices:
                    self._to_send.remove(call)
                    self._call_done(call)
                break
        self.stats.remote_dropped[window.source] += 1
        self.on_remote_drop(window)

    # results out, in order

    def _release(self) -> None:
        """Hand on every window whose remaining outcomes are settled (its second ScoredWindow), and the
        markers, as soon as nothing earlier of the same source is unsettled: results keep their order
        per source, which is what the alerts need, and one source waiting for the cluster holds back
        none of the others."""
        blocked: set[str] = set()
        kept: deque = deque()
        for item in self._pending:
            if not isinstance(item, _Job):
                if item.source in blocked:
                    kept.append(item)
                else:
                    self._outbox.append(item)
                continue
            asked = {i for c in item.calls for i in c.indices}
            for i, window in enumerate(item.state.windows):
                if i in item.released:
                    continue
                if window.source in blocked or not self._settled(item, i, asked):
                    blocked.add(window.source)
                    continue
                self._outbox.append(ScoredWindow(window, self.scorer.outcomes(item.state, i, item.models)))  # the job's own: a model added since may have moved
                item.released.add(i)
            if len(item.released) < len(item.state.windows):
                kept.append(item)
        self._pending = kept

    def _settled(self, job: _Job, i: int, asked: set[int]) -> bool:
        """Whether window ``i`` of ``job`` will get no further outcome: the job is done, or nothing of
        what is left of it will score the window (a window taken off remote scoring is settled once
        the models after it have ruled on it)."""
        if job.done:
            return True
        if i in asked and i not in job.dropped:
            return False
        verdicts = job.state.verdicts[i]
        return not any(verdicts.get(m.name) is Verdict.PASSED for m in job.models[job.step:])

    def _flush(self) -> bool:
        """Put what is ready into the alerts channel (waiting for room); False if stopping first."""
        while self._outbox:
            if not self.out.put(self._outbox[0], self.stopping, self.beat):
                return False
            self._outbox.popleft()
        return True

    def emit(self, item: object) -> bool:
        """Hand something on to the alerts stage in order with the results (from a job on this thread)."""
        self._outbox.append(item)
        return self._flush()

    # the end

    def _abandon(self) -> None:
        """The drain timeout passed: what is queued is not scored; what waits for remote scoring is
        UNAVAILABLE there, and what was scored goes on."""
        left = sum(isinstance(i, Window) for i in self.queue.get_batch(10**9, 0, 0))
        waiting = self._held()
        self.stats.abandoned_at_shutdown = left + waiting
        if self.stats.abandoned_at_shutdown:
            log.warning("shutdown: %d queued windows not scored, %d not scored remotely (drain timeout)", left, waiting)
        self._to_send.clear()
        for job in self._pending:
            if isinstance(job, _Job) and not job.done:
                for call in job.calls:
                    for i in call.indices:
                        job.state.verdicts[i][call.model.name] = Verdict.UNAVAILABLE
                job.calls.clear()
                job.step += 1
                self._advance(job, abandon=True)
        self._release()
        self._close_flight()
        self.queue.hold_waiting(False)
        self._flush()

    def _close_flight(self) -> None:
        for flight in self._flights():
            flight.close(wait=False)

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
                with contextlib.ExitStack() as held:  # a job may use any model: none scores on its tier's thread meanwhile
                    for lock in self._tier_locks.values():
                        held.enter_context(lock)
                    result = job.fn()
                job.future.set_result(result)
            except Exception as exc:  # the job's failure is its caller's to report, not ours
                job.future.set_exception(exc)
            self.beat()
