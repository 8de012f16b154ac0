"""The window queue between windowing and inference: who waits, who drops, and whose windows go."""

from __future__ import annotations

import threading
import time

import numpy as np

from monitord.windowing.queue import WindowQueue
from monitord.types import StreamEnd, Verdict, Window, WindowFacts, frozen_mapping

FACTS = WindowFacts(-20.0, -10.0, -25.0, 0.0, 0, 0.0)


def window(source: str, i: int) -> Window:
    return Window(source, i * 8000, 16000, np.zeros(16000, np.float32), 16000, 0.0, 0.0, FACTS,
                  gates=frozen_mapping({"m": Verdict.PASSED}))


def test_a_live_source_drops_only_its_own_oldest_windows_and_never_a_files():
    queue = WindowQueue(4)
    for i in range(3):
        assert queue.put(window("file", i), live=False) is None
    assert queue.put(window("mic", 0), live=True) is None  # full now
    dropped = queue.put(window("mic", 1), live=True)
    assert dropped.source == "mic" and dropped.start_index == 0  # its own oldest, not the file's
    dropped = queue.put(window("mic", 2), live=True)
    assert dropped.source == "mic" and dropped.start_index == 8000
    assert queue.dropped == {"mic": 2}
    batch = queue.get_batch(10, 0.0, 0.0)
    assert [(w.source, w.start_index) for w in batch] == [("file", 0), ("file", 8000), ("file", 16000), ("mic", 16000)]


def test_a_live_window_with_nothing_of_its_own_queued_is_the_one_dropped():
    queue = WindowQueue(2)
    queue.put(window("file", 0), live=False)
    queue.put(window("file", 1), live=False)
    dropped = queue.put(window("mic", 0), live=True)
    assert dropped.source == "mic" and queue.dropped == {"mic": 1} and len(queue) == 2


def test_a_file_waits_for_room_and_markers_are_never_dropped():
    queue = WindowQueue(1)
    queue.put(window("file", 0), live=False)
    done = threading.Event()
    threading.Thread(target=lambda: (queue.put(window("file", 1), live=False), done.set()), daemon=True).start()
    time.sleep(0.3)
    assert not done.is_set()  # waiting, not dropping
    queue.put(StreamEnd("mic", 3.0), live=True)  # a marker goes in even when full
    assert [type(x).__name__ for x in queue.get_batch(1, 0.0, 0.0)] == ["Window", "StreamEnd"]
    assert done.wait(2)


def test_put_after_close_never_exceeds_the_bound():
    queue = WindowQueue(2)
    queue.put(window("file", 0), live=False)
    queue.close()
    for i in range(5):
        assert queue.put(window("file", i + 1), live=False).start_index == (i + 1) * 8000
        assert queue.put(window("mic", i), live=True) is not None
    assert len(queue) == 1 and queue.dropped == {"file": 5, "mic": 5}


def test_windows_cannot_be_changed_once_cut():
    import pytest

    from monitord.config import GateConfig, WindowConfig
    from monitord.windowing.tiling import ModelInput, WindowCutter

    w = WindowCutter("s", 16000, WindowConfig(), GateConfig(mode="always"), {"m": ModelInput(48000)}).cut(
        np.ones(32000, np.float32) * 0.1, 0, 0.0, 0.0)
    with pytest.raises(ValueError):
        w.samples[0] = 1.0
    with pytest.raises(ValueError):
        w.at_rate(48000)[0] = 1.0
    with pytest.raises(TypeError):
        w.gates["m"] = Verdict.QUIET
    with pytest.raises(TypeError):
        w.facts.speech["silero"] = 1.0


def test_models_are_scored_after_the_models_they_build_on():
    """A model gated by an anomaly model must come after it (and it after the CLAP whose embedding it
    scores), or the gated model would find no gate scores and skip every window as CASCADE."""
    from types import SimpleNamespace

    from monitord.inference.scoring import cascade_order

    def model(name, depends_on=None, gate=None):
        return SimpleNamespace(name=name, depends_on=depends_on, gated_by=None if gate is None else SimpleNamespace(model=gate))

    clap, health, alarm, yam = model("clap"), model("health", depends_on="clap"), model("alarm", gate="health"), model("yam")
    order = [m.name for m in cascade_order([alarm, health, yam, clap])]
    assert order.index("clap") < order.index("health") < order.index("alarm") and set(order) == {"clap", "health", "alarm", "yam"}
