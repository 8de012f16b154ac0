"""What teaching needs of whoever runs it, handed in as one small object.

The daemon builds one at start (its event log and recent events, its sources' rings, its loaded
models, its inference thread), and the dashboard and MQTT feedback go through it; ``monitord
teach`` builds one over the event log and the model it loads. Teaching never reaches into either.
"""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from monitord.config import Config

if TYPE_CHECKING:
    import numpy as np

RingAudio = Callable[[str, float, float], "tuple[np.ndarray, int] | None"]


def _no_ring(source: str, start_s: float, seconds: float) -> None:
    return None


def run_now(fn: Callable[[], Any]) -> Future:
    """Run ``fn`` here and now (where no inference thread is shared): its result as a done Future."""
    future: Future = Future()
    try:
        future.set_result(fn())
    except BaseException as exc:  # noqa: BLE001 - handed to whoever waits on the future
        future.set_exception(exc)
    return future


@dataclass(frozen=True)
class TeachingPort:
    config: Callable[[], Config]
    """The config as it is now (a reload changes the rules)."""
    find_event: Callable[[int], "dict[str, Any] | None"]
    """A published event by seq, as its JSON (the event log, else recent events), or None."""
    embedder: Callable[[str], Any]
    """The loaded model of that name (``score(windows)``, ``sample_rate``, ``model_id``, ``batch_max``), or None."""
    run_inference: Callable[[Callable[[], Any]], Future] = run_now
    """Run ``fn`` where the models run (the daemon: on its inference thread, between two batches)."""
    ring_audio: RingAudio = _no_ring
    """(source, stream start in s, seconds) -> (samples, rate), while that source's ring still holds them."""
