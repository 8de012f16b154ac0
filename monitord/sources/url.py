"""Any ffmpeg input (rtmp, rtsp, HLS, http) as a source, decoded by an ffmpeg subprocess."""

from __future__ import annotations

import logging
import shutil
import subprocess
import threading
import time
from collections import deque

import numpy as np

from monitord.config import SourceConfig
from monitord.sources.common import DEFAULT_DEVICE_RATE, SourceError, StatusCallback
from monitord.sources.live import LiveSource
from monitord.sources.ring import RingBuffer

log = logging.getLogger(__name__)

READ_BLOCK_S = 0.1
"""Seconds of audio asked of ffmpeg's pipe per read."""
STDERR_LINES = 5


class StreamSource(LiveSource):
    """ffmpeg decodes the URL to mono float32 at the source rate on its stdout; a reader thread
    copies it into the ring, another keeps ffmpeg's last stderr lines (a full stderr pipe would
    stall ffmpeg). ffmpeg exiting, or no audio for ``watchdog_s`` (a stalled server keeps the
    connection open and sends nothing), is a lost stream: ``down`` with ffmpeg's last words,
    reconnect with backoff, the outage recorded as silence."""

    def __init__(self, config: SourceConfig, ring_seconds: float, on_status: StatusCallback):
        ffmpeg = shutil.which("ffmpeg")
        if ffmpeg is None:
            raise SourceError(f"source {config.id}: url sources need ffmpeg on the PATH (Debian/Ubuntu: apt install ffmpeg)")
        sample_rate = config.sample_rate or DEFAULT_DEVICE_RATE
        super().__init__(config, RingBuffer(int(ring_seconds * sample_rate), sample_rate), on_status, "stream")
        self.ffmpeg = ffmpeg
        self.url = config.url
        self._process: subprocess.Popen | None = None
        self._threads: list[threading.Thread] = []
        self._stderr: deque[str] = deque(maxlen=STDERR_LINES)

    def command(self) -> list[str]:
        pacing = ["-re"] if self.config.realtime else []
        return [self.ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", *pacing, "-i", self.url,
                "-vn", "-ac", "1", "-ar", str(self.sample_rate), "-f", "f32le", "pipe:1"]

    def waiting_detail(self) -> str:
        return f"waiting for {self.url}"

    def up_detail(self) -> str:
        return f"streaming {self.url} at {self.sample_rate} Hz"

    def connect(self) -> None:
        """Start ffmpeg and wait for its first audio; SourceError with its last words if none comes."""
        self._stderr.clear()
        process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
        self._process = process
        self._threads = [
            threading.Thread(target=self._read_audio, args=(process,), name=f"{self.name}-read", daemon=True),
            threading.Thread(target=self._read_stderr, args=(process,), name=f"{self.name}-stderr", daemon=True),
        ]
        for thread in self._threads:
            thread.start()
        wait_s = max(5.0, 2 * self.config.watchdog_s)
        blocks, deadline = self.stats.blocks, time.monotonic() + wait_s
        while self.stats.blocks == blocks:
            self.beat()
            if process.poll() is not None or time.monotonic() > deadline or self.stopping.is_set():
                reason = self.lost_reason() or f"no audio within {wait_s:g} s"
                self.disconnect()
                raise SourceError(f"cannot open {self.url}: {reason}")
            time.sleep(0.02)

    def lost_reason(self) -> str | None:
        process = self._process
        if process is None or process.poll() is None:
            return None
        code = process.returncode
        last = " | ".join(self._stderr)
        return last or (f"ffmpeg exited with status {code}" if code else "stream ended")

    def disconnect(self) -> None:
        process, self._process = self._process, None
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(2.0)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()
        for thread in self._threads:
            thread.join(2.0)
        self._threads = []
        if process is not None:
            for pipe in (process.stdout, process.stderr):
                if pipe is not None:
                    pipe.close()

    def _read_audio(self, process: subprocess.Popen) -> None:
        block_bytes = int(self.sample_rate * READ_BLOCK_S) * 4
        leftover = b""
        first = True
        try:
            while chunk := process.stdout.read1(block_bytes):
                if first:
                    self.fill_pending_gap()  # this thread is the ring's only producer now
                    first = False
                data = leftover + chunk
                usable = len(data) - len(data) % 4
                leftover = data[usable:]
                samples = np.frombuffer(data[:usable], dtype="<f4")
                self.ring.write(samples)
                self.stats.blocks += 1
                self.stats.frames += len(samples)
        except (OSError, ValueError):  # the pipe closed under us: disconnect() is at work
            pass

    def _read_stderr(self, process: subprocess.Popen) -> None:
        try:
            for raw in process.stderr:
                line = raw.decode(errors="replace").strip()
                if line:
                    self._stderr.append(line)
        except (OSError, ValueError):
            pass
