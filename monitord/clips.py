"""Alert clips: the sound around an onset, cut from the source's ring buffer and kept owner-only.

The onset event is published at once with ``clip`` set to the path the clip will have; when
the post-roll has been captured and the file is complete, a ``clip`` status event (detail = the
path, ``onset_seq``) follows. Retention: oldest first, by age and by total size.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from queue import Empty, SimpleQueue

from monitord.config import ClipsConfig
from monitord.ringbuffer import Overrun, RingBuffer

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ClipRequest:
    source: str
    ring: RingBuffer
    start_index: int
    end_index: int
    path: Path
    onset_seq: int


class ClipWriter:
    def __init__(self, config: ClipsConfig, on_written) -> None:
        self.config = config
        self.folder = Path(config.dir)
        self.on_written = on_written  # (request, path | None, error | None)
        self.written = 0
        self._requests: SimpleQueue[ClipRequest] = SimpleQueue()
        self._pending: list[ClipRequest] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="clips", daemon=True)

    def start(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True, mode=0o700)
        os.chmod(self.folder, 0o700)
        self._thread.start()

    def path_for(self, source: str, rule: str, wall_start: float) -> Path:
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime(wall_start))
        return self.folder / f"{stamp}Z-{source}-{rule}-{uuid.uuid4().hex[:8]}.{self.config.format}"

    def request(self, source: str, ring: RingBuffer, window_start: int, window_end: int, path: Path, onset_seq: int) -> None:
        rate = ring.sample_rate
        start = max(0, window_start - round(self.config.pre_s * rate))
        end = window_end + round(self.config.post_s * rate)
        self._requests.put(ClipRequest(source, ring, start, end, path, onset_seq))

    def stop(self, timeout: float = 5.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    def _run(self) -> None:
        while not (self._stop.is_set() and not self._pending):
            try:
                self._pending.append(self._requests.get(timeout=0.1))
            except Empty:
                pass
            for request in list(self._pending):
                ring = request.ring
                if ring.written >= request.end_index or ring.closed or self._stop.is_set():
                    self._pending.remove(request)
                    self._write(request, min(request.end_index, ring.written))

    def _write(self, request: ClipRequest, end: int) -> None:
        import soundfile as sf

        try:
            samples = request.ring.read(request.start_index, end - request.start_index)
        except (Overrun, ValueError) as exc:
            log.error("clip %s: the audio is no longer in the ring buffer (%s)", request.path.name, exc)
            self.on_written(request, None, f"audio no longer in the ring buffer: {exc}")
            return
        fd = os.open(request.path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "wb") as f:
            sf.write(f, samples, request.ring.sample_rate, format=self.config.format.upper(),
                     subtype="PCM_16" if self.config.format == "flac" else "FLOAT")
        self.written += 1
        self.on_written(request, request.path, None)
        self.enforce_retention()

    def enforce_retention(self) -> None:
        """Delete the oldest clips beyond max_age_days or past max_total_mb."""
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
