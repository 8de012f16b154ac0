"""An audio file as a source: decoded block by block into the ring."""

from __future__ import annotations

import logging
import time

from monitord.audio import AudioFileError, audio_file_info, to_mono
from monitord.config import SourceConfig
from monitord.config.checks import FILE_BLOCK_S
from monitord.sources.common import CaptureStats, SourceError, StatusCallback
from monitord.sources.ring import RingBuffer
from monitord.stage import Stage

log = logging.getLogger(__name__)



class FileSource(Stage):
    """Decodes a file into the ring, paced in real time (``realtime: true``) or as fast as the
    windowing stage takes the samples (back-pressure: nothing of a file is skipped).

    Samples are dated as if the file had been playing live since it was opened. The read
    position lives on the object, so a restarted stage goes on from where the dead one was.
    """

    def __init__(self, config: SourceConfig, ring_seconds: float, on_status: StatusCallback):
        super().__init__(f"file-{config.id}", stall_s=30.0)
        assert config.file is not None
        self.config = config
        self.id = config.id
        self.path = config.file
        try:
            info = audio_file_info(self.path)
        except AudioFileError as exc:
            raise SourceError(str(exc)) from None
        self.sample_rate = int(info.samplerate)
        self.ring = RingBuffer(int(ring_seconds * self.sample_rate), self.sample_rate)
        self.on_status = on_status
        self.waits_for_worker = not config.realtime
        self.stats = CaptureStats()
        self._started_at: float | None = None

    def run(self) -> None:
        import soundfile as sf

        block = max(1, int(self.sample_rate * FILE_BLOCK_S))
        if self._started_at is None:
            self._started_at = time.time()
            self.on_status(self.id, "up", f"reading {self.path} at {self.sample_rate} Hz")
        decode_errors = (RuntimeError, sf.LibsndfileError)
        try:
            f = sf.SoundFile(self.path)
            f.seek(self.ring.written)  # a restarted stage goes on where the dead one was
        except decode_errors as exc:
            self._failed(exc)
            return
        claimed = f.frames
        with f:
            while not self.stopping.is_set():
                self.beat()
                try:
                    # read until a read gives nothing: soundfile's blocks() counts down the header's length
                    # and hands out its last buffer again where a damaged file decodes to less
                    chunk = f.read(block, dtype="float32", always_2d=True)
                except decode_errors as exc:  # only decoding: the loop's own faults kill the stage
                    self._failed(exc)
                    return
                if len(chunk) == 0:
                    break
                mono = to_mono(chunk)
                if not self._wait_turn(len(mono)):
                    break
                self.ring.write(mono, wall_time_end=self._started_at + (self.ring.written + len(mono)) / self.sample_rate)
                self.stats.blocks += 1
                self.stats.frames += len(mono)
        self.ring.close()
        if not self.stopping.is_set():
            # a header without a frame count (an MP3's) is an estimate from the bitrate: a little off
            short = (f" (its header says {claimed / self.sample_rate:.2f} s: the file is cut short or damaged)"
                     if self.ring.written < claimed - max(0.5 * self.sample_rate, 0.02 * claimed) else "")
            self.on_status(self.id, "eof", f"end of file after {self.ring.written / self.sample_rate:.2f} s{short}")

    def _failed(self, exc: Exception) -> None:
        """A file that cannot be decoded (further) is bad input, not a crash: an ``error`` status, no ``eof``."""
        log.error("source %s: error decoding %s after %d samples: %s", self.id, self.path, self.ring.written, exc)
        self.ring.close()
        self.on_status(self.id, "error", f"decoding failed after {self.ring.written / self.sample_rate:.2f} s: {exc}")

    def _wait_turn(self, n: int) -> bool:
        """Real time: wait until these samples are due; otherwise until the ring has room for them."""
        if self.config.realtime:
            due = self._started_at + (self.ring.written + n) / self.sample_rate
            while (remaining := due - time.time()) > 0:
                if self.stopping.wait(min(remaining, 0.5)):
                    return False
                self.beat()
            return True
        return self.ring.wait_for_space(n, self.stopping, self.beat)

    def stop(self) -> None:
        super().stop()
        if not self.alive:
            self.ring.close()
