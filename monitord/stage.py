"""What every pipeline stage is: a thread with a lifecycle and a state a supervisor can read,
and the bounded channel between two stages.

A stage reads one bounded channel and writes one. Its loop calls ``beat()`` on every turn
(every wait in a stage is bounded, so a healthy idle stage beats several times a second): the
supervisor reads ``health()``, which is a fact, not a guess. A stage is healthy while its
thread runs (state running or degraded) and it beat within ``stall_s``, or after it finished
its work (a file source at its end). An exception that escapes the loop leaves the stage
``failed`` with the exception and traceback kept; the supervisor decides what follows.
"""

from __future__ import annotations

import logging
import threading
import time
import traceback
from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Generic, TypeVar

from monitord.types import StageState

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class Health:
    ok: bool
    reason: str = ""


class Stage:
    """Subclasses implement ``run()``: a loop that calls ``self.beat()`` each turn, returns when
    ``self.stopping`` is set (or its work is done), and keeps whatever must survive a restart on
    ``self``, so that a restarted ``run()`` resumes where the dead one stopped."""

    def __init__(self, name: str, stall_s: float = 10.0):
        self.name = name
        self.stall_s = stall_s
        self.state = StageState.STOPPED
        self.detail = ""
        """Why the state is what it is (degraded: what is missing)."""
        self.error: BaseException | None = None
        self.error_trace = ""
        self.finished = False
        """run() returned on its own: the work is done (a file read to its end)."""
        self.restarts = 0
        self.last_beat = time.monotonic()
        self.stopping = threading.Event()
        self._thread: threading.Thread | None = None
        self._injected: BaseException | None = None
        self.on_failure: Callable[["Stage"], None] = lambda stage: None
        """Called on the dying thread once the stage is marked failed (the supervisor's hook)."""

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.name} {self.state.value}>"

    # lifecycle

    def start(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            raise RuntimeError(f"stage {self.name} is already running")
        self.state, self.error, self.error_trace, self.finished = StageState.STARTING, None, "", False
        self.beat()
        self._thread = threading.Thread(target=self._main, name=self.name, daemon=True)
        self._thread.start()

    def restart(self) -> None:
        """Run again after a failure, with the state the stage object kept."""
        self.restarts += 1
        self.stopping.clear()
        self.start()

    def stop(self) -> None:
        """Ask the loop to end; ``join`` waits for it."""
        self.stopping.set()

    def join(self, timeout: float) -> bool:
        """True once the thread has ended (or never started)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
            return not thread.is_alive()
        return True

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _main(self) -> None:
        try:
            if self.state is StageState.STARTING:
                self.state = StageState.RUNNING
            self.run()
        except BaseException as exc:  # noqa: BLE001 - the supervisor must hear of every death
            self.error, self.error_trace = exc, traceback.format_exc()
            self.state = StageState.FAILED
            log.error("stage %s failed: %r\n%s", self.name, exc, self.error_trace.rstrip())
            try:
                self.on_failure(self)
            except Exception:
                log.exception("stage %s: failure hook failed", self.name)
            return
        self.finished = not self.stopping.is_set()
        self.state = StageState.STOPPED

    def run(self) -> None:
        raise NotImplementedError

    # progress and health

    def beat(self) -> None:
        """Progress: called on every turn of the loop. Raises an injected fault (tests, drills)."""
        self.last_beat = time.monotonic()
        if self._injected is not None:
            fault, self._injected = self._injected, None
            raise fault

    def pause(self, seconds: float) -> bool:
        """Wait ``seconds`` (a backoff) while still beating; True if the stage is stopping."""
        deadline = time.monotonic() + seconds
        while (left := deadline - time.monotonic()) > 0:
            if self.stopping.wait(min(left, 0.5)):
                return True
            self.beat()
        return self.stopping.is_set()

    def inject_failure(self, fault: BaseException) -> None:
        """Make the stage's thread raise ``fault`` at its next beat: how tests kill a stage."""
        self._injected = fault

    def set_degraded(self, detail: str) -> None:
        if self.state in (StageState.RUNNING, StageState.DEGRADED):
            self.state, self.detail = StageState.DEGRADED, detail

    def set_running(self) -> None:
        if self.state in (StageState.RUNNING, StageState.DEGRADED):
            self.state, self.detail = StageState.RUNNING, ""

    def health(self, now: float | None = None) -> Health:
        if self.state is StageState.STOPPED and self.finished:
            return Health(True, "finished")
        if self.state not in (StageState.RUNNING, StageState.DEGRADED, StageState.STARTING):
            return Health(False, f"{self.state.value}" + (f": {self.error!r}" if self.error else ""))
        if not self.alive and self.state is not StageState.STARTING:
            return Health(False, "thread is not running")
        stalled = (time.monotonic() if now is None else now) - self.last_beat
        if stalled > self.stall_s:
            return Health(False, f"no progress for {stalled:.1f} s (bound {self.stall_s:g} s)")
        return Health(True, self.detail)


class Closed(Exception):
    """The channel was closed: no more items will come (or be taken)."""


class Channel(Generic[T]):
    """A bounded FIFO between stages. ``put`` waits while full (checking ``stop`` and calling
    ``beat`` so a waiting producer still shows progress); ``get`` waits at most ``timeout``."""

    def __init__(self, max_items: int, name: str = ""):
        self.max_items = max_items
        self.name = name
        self._items: deque[T] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def __len__(self) -> int:
        return len(self._items)

    @property
    def closed(self) -> bool:
        return self._closed

    def put(self, item: T, stop: threading.Event | None = None, beat: Callable[[], None] | None = None) -> bool:
        """Enqueue, waiting while full; False if ``stop`` was set or the channel closed first."""
        with self._cond:
            while len(self._items) >= self.max_items:
                if self._closed or (stop is not None and stop.is_set()):
                    return False
                self._cond.wait(0.1)
                if beat is not None:
                    beat()
            if self._closed:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def put_nowait(self, item: T) -> bool:
        """Enqueue unless full or closed (for what may be lost: live score streams)."""
        with self._cond:
            if self._closed or len(self._items) >= self.max_items:
                return False
            self._items.append(item)
            self._cond.notify_all()
            return True

    def get(self, timeout: float) -> T | None:
        """The next item, or None after ``timeout``; raises Closed once closed and empty."""
        with self._cond:
            if not self._items:
                if self._closed:
                    raise Closed(self.name)
                self._cond.wait(timeout)
            if not self._items:
                if self._closed:
                    raise Closed(self.name)
                return None
            item = self._items.popleft()
            self._cond.notify_all()
            return item

    def drain(self) -> list[T]:
        with self._cond:
            items = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return items

    def put_back(self, items: Iterable[T]) -> None:
        """Return items to the front, in order (a stage that could not finish them before it died)."""
        with self._cond:
            self._items.extendleft(reversed(list(items)))
            self._cond.notify_all()

    def close(self) -> None:
        """No more puts; gets return what is left, then raise Closed."""
        with self._cond:
            self._closed = True
            self._cond.notify_all()
