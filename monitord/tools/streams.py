"""How many live streams a path keeps up with: paced trials and the search over N.

A trial runs N streams, each yielding a window every ``hop_s``, evenly staggered, for a fixed time,
and holds when no window was dropped and p99 window end -> event stayed under 1 s. Near the limit
the outcome of one trial is a coin toss: queueing delay grows like 1/(1 - load), so a few percent
of CPU taken by something else (another process on a shared box, a backlog left by the trial
before, the allocator handing memory back) moves p99 across the line. So the search runs every
N of a grid around the estimate (it does not stop at the first failure), each trial on a daemon
of its own (an empty queue) after a pause, records what else used the CPUs meanwhile, and counts
an N only when it held every time it ran, twice at least: in the grid and again on its own.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np

P99_LIMIT_MS = 1000.0
GRID = (0.5, 0.7, 0.85, 1.0, 1.15, 1.3)
QUICK_GRID = (0.6, 1.0, 1.3)


@dataclass(frozen=True)
class Trial:
    streams: int
    windows: int
    """Windows the streams yielded."""
    dropped: int
    latencies_ms: tuple[float, ...]
    """Window end -> event, one per scored window."""
    own_cores: float
    """CPU this process used, in cores (1.0 = one core busy for the whole trial)."""
    other_cores: float
    """CPU everything else used meanwhile, in cores: the machine's busy time from /proc/stat (other
    processes, and time the hypervisor gave to other guests: steal) less ours. In a container
    /proc/stat is the host's."""
    unpublished: int = 0
    """Windows that passed the gate and were not dropped, yet whose scores were never published."""
    model_ms: float = float("nan")
    """The models' compute per scored window during the trial: the same work on a slower machine
    (a busy neighbour outside this machine's view, a lower clock) takes longer."""
    note: str = ""

    @property
    def p99_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 99)) if self.latencies_ms else float("inf")

    @property
    def p50_ms(self) -> float:
        return float(np.percentile(self.latencies_ms, 50)) if self.latencies_ms else float("inf")

    @property
    def held(self) -> bool:
        return self.dropped == 0 and self.unpublished == 0 and self.p99_ms < P99_LIMIT_MS

    def line(self) -> str:
        return (f"{self.streams} streams: {'ok' if self.held else 'no'} (p50 {self.p50_ms:.0f} / p99 {self.p99_ms:.0f} ms, "
                f"{self.dropped} of {self.windows} dropped{f', {self.unpublished} unpublished' if self.unpublished else ''}, "
                f"CPU {self.own_cores:.2f} ours + {self.other_cores:.2f} others, models {self.model_ms:.1f} ms/window"
                f"{f', {self.note}' if self.note else ''})")


def _machine_busy_s() -> float:
    """Seconds of CPU time the whole machine has been busy (all cores), from /proc/stat."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return float("nan")
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    busy = sum(fields[:8]) - idle  # user nice system idle iowait irq softirq steal
    return busy / os.sysconf("SC_CLK_TCK")


def _own_cpu_s() -> float:
    t = os.times()
    return t.user + t.system


def paced(count: int, interval_s: float, put: Callable[[int, float], None]) -> None:
    """Calls ``put(i, due)`` for i in range(count), the i-th at ``interval_s * i`` from now; ``due`` is
    the epoch time it was due (a window's end: latency counts from there, so a late feeder counts too)."""
    t0, wall0 = time.perf_counter(), time.time()
    for i in range(count):
        delay = t0 + i * interval_s - time.perf_counter()
        if delay > 0:
            time.sleep(delay)
        put(i, wall0 + i * interval_s)


def wait_idle(daemon, timeout: float = 120.0) -> None:
    """Until nothing is queued or in hand anywhere between the window queue and the sinks, seen
    twice 50 ms apart (a stage takes an item a moment before it says it holds one)."""
    deadline = time.monotonic() + timeout
    seen = 0
    while seen < 2 and time.monotonic() < deadline:
        seen = seen + 1 if daemon.idle() else 0
        time.sleep(0.05 if seen else 0.005)


def measured(streams: int, run: Callable[[], tuple[int, int, list[float], int]],
             work: Callable[[], tuple[float, int]] = lambda: (float("nan"), 1)) -> Trial:
    """Runs one trial (``run`` -> windows, dropped, latencies, unpublished) and what the CPUs did
    meanwhile; ``work`` -> (model seconds, windows scored) so far."""
    own0, busy0, work0, t0 = _own_cpu_s(), _machine_busy_s(), work(), time.perf_counter()
    windows, dropped, latencies, unpublished = run()
    wall = max(time.perf_counter() - t0, 1e-9)
    own = (_own_cpu_s() - own0) / wall
    other = max(0.0, (_machine_busy_s() - busy0) / wall - own)
    work1 = work()
    model_ms = 1000 * (work1[0] - work0[0]) / max(1, work1[1] - work0[1])
    return Trial(streams, windows, dropped, tuple(latencies), own, other, unpublished, model_ms)


def search(trial: Callable[[int], Trial], estimate: int, grid: tuple[float, ...] = GRID, extra: int = 3,
           max_streams: int = 4096) -> tuple[int, list[Trial]]:
    """The largest N that held every time it ran (twice at least), and every trial in the order run.

    Every N of ``grid`` x ``estimate`` is run (ascending, none skipped after a failure); up to
    ``extra`` more above the grid while its top holds (x1.3 each), or below it while nothing holds
    (halving). Then the largest N that held is run again on its own; if it fails there, the next
    largest that held; and the smallest N above the answer that failed is run again, to show
    whether it fails on its own too (it may hold: one run at the limit is not a verdict)."""
    estimate = max(1, estimate)
    results: list[Trial] = []
    tried: set[int] = set()

    def run(n: int, note: str = "") -> Trial:
        t = trial(n)
        if note:
            t = replace(t, note=f"{note}, {t.note}" if t.note else note)
        results.append(t)
        tried.add(n)
        return t

    for n in sorted({min(max_streams, max(1, round(estimate * f))) for f in grid}):
        run(n)
    for _ in range(extra):
        held = [t.streams for t in results if t.held]
        if held and max(held) == max(tried) and max(tried) < max_streams:
            run(min(max_streams, max(max(tried) + 1, round(max(tried) * 1.3))))
        elif not held and min(tried) > 1:
            run(max(1, min(tried) // 2))
        else:
            break
    best = 0
    for n in sorted({t.streams for t in results if t.held}, reverse=True):
        if run(n, "again, on its own").held:
            best = n
            break
    failed_above = sorted({t.streams for t in results if not t.held and t.streams > best})
    if failed_above:
        run(failed_above[0], "again, on its own")
    return best, results
