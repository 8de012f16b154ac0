"""Alert clips: the sound around an onset, cut from the source's ring buffer and kept owner-only.

The onset event is published at once with ``clip`` set to the path the clip will have; when
the post-roll has been captured and the file is complete, a ``clip`` status event (detail = the
path, ``onset_seq``) follows; a clip that cannot be written (disk full, permissions, audio no
longer in the ring) gives a ``clip_error`` status instead. Retention: oldest first, by age and by
total size. Driven by the output stage's thread (``poll`` on every turn): nothing here blocks.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

from monitord.config import ClipsConfig
from monitord.sources.ring import Overrun, RingBuffer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipRequest:
    source: str
    ring: RingBuffer
    start_index: int
    end_index: int
    path: Path
    onset_seq: int


@dataclass(frozen=True)
class ClipResult:
    request: ClipRequest
    path: Path | None
    """The clip written; None when it could not be."""
    detail: str
    """What was written (and how much pre-roll the ring still held), or why nothing was."""


class ClipWriter:
    def __init__(self, config: ClipsConfig) -> None:
        self.config = config
        self.folder = Path(config.dir)
        self.written = 0
        self.failed = 0
        self._pending: list[ClipRequest] = []

    def open(self) -> None:
        """Create the folder (owner-only); OSError when it cannot be."""
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)

    def path_for(self, source: str, rule: str, when: str) -> Path:
        """A new clip's path; ``when`` is the onset's ISO time (2026-11-22T02:31:07.512Z)."""
        stamp = when.replace("-", "").replace(":", "")[:15]
        return self.folder / f"{stamp}Z-{source}-{rule}-{uuid.uuid4().hex[:8]}.{self.config.format}"

    def request(self, source: str, ring: RingBuffer, window_start: int, window_end: int, path: Path, onset_seq: int) -> None:
        rate = ring.sample_rate
        start = max(0, window_start - round(self.config.pre_s * rate))
        end = window_end + round(self.config.post_s * rate)
        self._pending.append(ClipRequest(source, ring, start, end, path, onset_seq))

    @property
    def pending(self) -> int:
        return len(self._pending)

    def poll(self, flush: bool = False) -> list[ClipResult]:
        """Write the clips whose post-roll has arrived (all of them with ``flush``, with what there is)."""
        results = []
        for request in list(self._pending):
            ring = request.ring
            if ring.written >= request.end_index or ring.closed or flush:
                self._pending.remove(request)
                results.append(self._write(request, min(request.end_index, ring.written)))
        return results

    def _write(self, request: ClipRequest, end: int) -> ClipResult:
        import soundfile as sf

        rate = request.ring.sample_rate
        # what the ring still holds, less a margin so a live writer cannot lap us while we copy
        start = max(request.start_index, request.ring.written - request.ring.capacity + rate // 4)
        try:
            samples = request.ring.read(start, end - start)
        except (Overrun, ValueError) as exc:
            self.failed += 1
            log.error("clip %s: the audio is no longer in the ring buffer (%s)", request.path.name, exc)
            return ClipResult(request, None, f"clip {request.path.name} not written: the audio is no longer in the ring buffer")
        try:
            fd = os.open(request.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "wb") as f:
                sf.write(f, samples, rate, format=self.config.format.upper(),
                         subtype="PCM_16" if self.config.format == "flac" else "FLOAT")
        except (OSError, RuntimeError, sf.LibsndfileError) as exc:
            self.failed += 1
            try:
                request.path.unlink(missing_ok=True)  # no half-written clip left behind
            except OSError:
                pass
            log.error("clip %s not written: %s", request.path, exc)
            return ClipResult(request, None, f"clip {request.path.name} not written: {exc}")
        self.written += 1
        self.enforce_retention()
        cut = (start - request.start_index) / rate
        detail = str(request.path) if cut <= 0 else f"{request.path} (pre-roll cut by {cut:.2f} s: the ring no longer held it)"
        return ClipResult(request, request.path, detail)

    def enforce_retention(self) -> None:
        """Delete the oldest clips beyond max_age_days or past max_total_mb."""
        try:
            clips = sorted((p for p in self.folder.glob(f"*.{self.config.format}") if p.is_file()), key=lambda p: p.stat().st_mtime)
            now = time.time()
            if self.config.max_age_days is not None:
                for p in [p for p in clips if now - p.stat().st_mtime > self.config.max_age_days * 86400]:
                    p.unlink(missing_ok=True)
                    clips.remove(p)
            if self.config.max_total_mb is not None:
                total = sum(p.stat().st_size for p in clips)
                while clips and total > self.config.max_total_mb * 2**20:
                    oldest = clips.pop(0)
                    total -= oldest.stat().st_size
                    oldest.unlink(missing_ok=True)
        except OSError as exc:  # a clip vanishing under us, or the folder unreadable: retention waits for the next clip
            log.warning("clip retention in %s: %s", self.folder, exc)
