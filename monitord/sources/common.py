"""What every source shares: its errors, status callback and capture counters."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

DEFAULT_DEVICE_RATE = 48000

StatusCallback = Callable[[str, str, str], None]
"""(source id, status, detail), e.g. ("kitchen", "down", "stream ended")."""


class SourceError(Exception):
    """A source cannot be opened; the message says why and what is available."""


@dataclass
class CaptureStats:
    blocks: int = 0
    frames: int = 0
    input_overflows: int = 0
    input_underflows: int = 0
    callback_seconds: float = 0.0
    """Total time spent inside the capture callback."""
