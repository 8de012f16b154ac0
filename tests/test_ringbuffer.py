"""The ring buffer under a concurrent producer: no torn read is ever returned as valid."""

from __future__ import annotations

import sys
import threading
import time

import numpy as np
import pytest

from monitord.sources.ring import Overrun, RingBuffer

EXACT = 2**24  # every integer below this is exact in float32


def ramp(start: int, n: int) -> np.ndarray:
    """Samples whose values are their own absolute indices (modulo 2**24)."""
    return (np.arange(start, start + n, dtype=np.int64) % EXACT).astype(np.float32)


def test_reads_near_the_oldest_samples_are_never_torn():
    # Blocks above ~500 samples: numpy lets go of the GIL while it copies them, so the producer's
    # and the reader's copies really overlap (as a PortAudio callback thread's would).
    capacity, block, span = 4800, 1024, 1024
    ring = RingBuffer(capacity, 48000)
    stop = threading.Event()

    def produce() -> None:
        written = 0
        while not stop.is_set():
            ring.write(ramp(written, block))
            written += block

    reads = overruns = torn = 0
    rng = np.random.default_rng(0)
    offsets = rng.integers(0, block, size=4096)
    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-4)  # hand the GIL over often: more interleavings
    writer = threading.Thread(target=produce, daemon=True)
    writer.start()
    deadline = time.monotonic() + 20
    try:
        while reads < 100_000 and time.monotonic() < deadline:
            written = ring.written
            # the oldest retained samples: the next write overwrites them
            start = max(0, written - capacity + int(offsets[reads % len(offsets)]))
            n = min(span, written - start)
            if n <= 0:
                continue
            reads += 1
            try:
                got = ring.read(start, n)
            except Overrun:
                overruns += 1
                continue
            if not np.array_equal(got, ramp(start, n)):
                torn += 1
    finally:
        stop.set()
        writer.join(5)
        sys.setswitchinterval(old_interval)
    print(f"\n[ring] {reads} reads, {overruns} overruns, {torn} torn reads returned as valid")
    assert reads >= 100_000, f"only {reads} reads in 20 s"
    assert overruns > 0 and reads - overruns >= 1000  # the reads raced the producer, and many returned samples
    assert torn == 0


def test_the_write_path_takes_no_lock():
    """The capture callback must not block: nothing in write() or skip() calls into threading or acquires a lock."""
    ring = RingBuffer(1000, 48000)
    calls: list[str] = []

    def watch(frame, event, arg) -> None:
        if event == "c_call":
            calls.append(f"{getattr(arg, '__module__', None)}.{getattr(arg, '__qualname__', arg)}")
        elif event == "call":
            calls.append(f"{frame.f_globals.get('__name__')}.{frame.f_code.co_name}")

    block = np.ones(300, dtype=np.float32)
    sys.setprofile(watch)
    try:
        for _ in range(5):
            ring.write(block)
        ring.skip(10)
    finally:
        sys.setprofile(None)
    locking = [c for c in calls if c.startswith("threading.") or "acquire" in c or "notify" in c or c.endswith(".wait")]
    assert not locking, locking


def test_waiting_readers_see_writes_and_close():
    ring = RingBuffer(1000, 48000)
    assert not ring.wait_for(10, timeout=0.02)
    threading.Timer(0.05, lambda: ring.write(np.zeros(20, dtype=np.float32))).start()
    began = time.monotonic()
    assert ring.wait_for(10, timeout=5)
    assert time.monotonic() - began < 1
    threading.Timer(0.05, ring.close).start()
    assert not ring.wait_for(100, timeout=5) and ring.closed


def test_a_block_longer_than_the_ring_keeps_its_newest_samples():
    ring = RingBuffer(100, 48000)
    ring.write(ramp(0, 250))
    assert ring.written == 250
    np.testing.assert_array_equal(ring.read(150, 100), ramp(150, 100))
    with pytest.raises(Overrun):
        ring.read(149, 10)


def test_skip_advances_the_index_and_overruns_what_it_passed():
    ring = RingBuffer(100, 48000)
    ring.write(ramp(0, 100))
    ring.skip(50)
    assert ring.written == 150
    with pytest.raises(Overrun):
        ring.read(40, 10)
    np.testing.assert_array_equal(ring.read(50, 50), ramp(50, 50))
