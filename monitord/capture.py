"""Sources of sound: a sounddevice input stream or an audio file, both into a RingBuffer."""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np

from monitord.config import SourceConfig
from monitord.ringbuffer import RingBuffer

log = logging.getLogger(__name__)

DEFAULT_DEVICE_RATE = 48000
FILE_BLOCK_S = 0.1

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


def list_input_devices() -> list[dict[str, Any]]:
    """Input-capable devices as sounddevice reports them, with their index."""
    import sounddevice as sd

    return [
        {"index": i, "name": d["name"], "channels": d["max_input_channels"], "sample_rate": d["default_samplerate"]}
        for i, d in enumerate(sd.query_devices())
        if d["max_input_channels"] > 0
    ]


def _describe(devices: list[dict[str, Any]]) -> str:
    if not devices:
        return "no input devices are available (is a sound server running, and can this user reach it?)"
    rows = [f"  {d['index']}: {d['name']} ({d['channels']} ch, {d['sample_rate']:.0f} Hz)" for d in devices]
    return "available input devices:\n" + "\n".join(rows)


def resolve_device(spec: int | str) -> dict[str, Any]:
    """The input device meant by an index, a name substring or "default"; SourceError if none."""
    import sounddevice as sd

    try:
        devices = list_input_devices()
    except sd.PortAudioError as exc:
        raise SourceError(f"cannot list audio devices: {exc}") from None
    if spec == "default":
        default_index = sd.default.device[0]
        if default_index is None or default_index < 0:
            if devices:
                return devices[0]
            raise SourceError("no default input device; " + _describe(devices))
        match = [d for d in devices if d["index"] == default_index]
        if match:
            return match[0]
        raise SourceError(f"the default device ({default_index}) has no inputs; " + _describe(devices))
    if isinstance(spec, int) or (isinstance(spec, str) and spec.isdigit()):
        match = [d for d in devices if d["index"] == int(spec)]
        if match:
            return match[0]
        raise SourceError(f"no input device with index {spec}; " + _describe(devices))
    exact = [d for d in devices if d["name"] == spec]
    partial = [d for d in devices if spec.lower() in d["name"].lower()]
    if exact or partial:
        return (exact or partial)[0]
    raise SourceError(f"no input device matching {spec!r}; " + _describe(devices))


class BlockWriter:
    """The capture callback: mixes a block to mono into the ring buffer and counts; nothing else.

    No locks, no logging, no allocation after the first block of a given size.
    """

    def __init__(self, ring: RingBuffer, channels: int, blocksize: int = 0):
        self.ring = ring
        self.channels = channels
        self.stats = CaptureStats()
        self._mix = np.zeros(max(blocksize, 4096), dtype=np.float32)  # grown only if a block is larger

    def __call__(self, indata: np.ndarray, frames: int, time_info: Any, status: Any) -> None:
        began = time.perf_counter()
        if status:
            self.stats.input_overflows += int(bool(status.input_overflow))
            self.stats.input_underflows += int(bool(status.input_underflow))
        if self.channels == 1:
            self.ring.write(indata[:, 0])
        else:
            if self._mix.size < frames:
                self._mix = np.zeros(frames, dtype=np.float32)
            mix = self._mix[:frames]
            np.mean(indata, axis=1, out=mix)
            self.ring.write(mix)
        self.stats.blocks += 1
        self.stats.frames += frames
        self.stats.callback_seconds += time.perf_counter() - began


def fill_gap(source_id: str, ring: RingBuffer, lost_at: float, latency_s: float = 0.0) -> None:
    """Silence for the time a live source was away, so stream time keeps pace with the clock:
    from the last sample heard (``lost_at``) to the first the reopened source will deliver."""
    missing = int((time.time() + latency_s - lost_at) * ring.sample_rate)
    if missing <= 0:
        return
    ring.write(np.zeros(min(missing, ring.capacity), dtype=np.float32))
    if missing > ring.capacity:
        ring.skip(missing - ring.capacity)
    log.info("source %s: %.2f s gap recorded in the stream", source_id, missing / ring.sample_rate)


class DeviceSource:
    """A PortAudio input stream, supervised: the callback copies each block into the ring and
    returns; a supervisor thread notices a lost stream and reopens it.

    Loss shows in three ways on PortAudio/ALSA/PulseAudio: ``finished_callback`` fires,
    ``stream.active`` turns False while we did not stop it, or no block arrives for
    ``watchdog_s`` (seen: killing the sound server stops callbacks with no status flag and no
    exception). Then: a ``down`` status, reopen with exponential backoff (re-initialising
    PortAudio, which lists no devices if it started while the server was down), an ``up``
    status, and silence written for the time lost, so stream time stays wall-clock time and
    events after the gap carry their true stream times.
    """

    _portaudio_lock = threading.Lock()  # PortAudio re-initialisation is process-wide

    def __init__(self, config: SourceConfig, ring_seconds: float, on_status: StatusCallback):
        import sounddevice as sd

        self._sd = sd
        self.config = config
        self.id = config.id
        self.spec: int | str = config.device if config.device is not None else "default"
        self.sample_rate = config.sample_rate or DEFAULT_DEVICE_RATE
        self.device: dict[str, Any] | None = None
        self._stream = None
        self.ring = RingBuffer(int(ring_seconds * self.sample_rate), self.sample_rate)
        self.writer = BlockWriter(self.ring, config.channels, config.blocksize)  # the stream's callback itself
        self.stats = self.writer.stats
        try:
            self._open()
        except SourceError:
            if not config.retry:
                raise
            log.warning("source %s: device not available yet; retrying (retry: true)", self.id)
        self.on_status = on_status
        self.waits_for_worker = False
        self.reconnects = 0
        self._stop = threading.Event()
        self._finished_flag = threading.Event()
        self._thread = threading.Thread(target=self._supervise, name=f"device-{self.id}", daemon=True)
        DeviceSource._active.add(self)

    @property
    def channels(self) -> int:
        return min(self.config.channels, self.device["channels"]) if self.device else self.config.channels

    def _open(self) -> None:
        """Resolve the device and open (not start) a stream on it; SourceError if impossible."""
        sd = self._sd
        self.device = resolve_device(self.spec)
        try:
            self._stream = sd.InputStream(
                device=self.device["index"],
                channels=self.channels,
                samplerate=self.sample_rate,
                dtype="float32",
                blocksize=self.config.blocksize,
                callback=self.writer,
                finished_callback=self._finished,
            )
        except (sd.PortAudioError, ValueError) as exc:
            raise SourceError(
                f"cannot open input device {self.device['index']} ({self.device['name']}) at "
                f"{self.sample_rate} Hz with {self.channels} channel(s): {exc}"
            ) from None

    def _finished(self) -> None:
        self._finished_flag.set()

    def start(self) -> None:
        if self._stream is not None:
            self._start_stream()
        else:
            self.on_status(self.id, "down", f"waiting for input device {self.spec!r}")
        self._thread.start()

    def _start_stream(self) -> None:
        self._finished_flag.clear()
        self.writer.channels = self.channels
        self._stream.start()
        log.info("source %s: capturing %s at %d Hz, %d ch", self.id, self.device["name"], self.sample_rate, self.channels)
        self.on_status(self.id, "up", f"capturing {self.device['name']} at {self.sample_rate} Hz")

    def _lost(self, last_block_at: float) -> str | None:
        """Why the stream is considered lost, or None while it is healthy."""
        if self._finished_flag.is_set():
            return "input stream ended"
        if self._stream is not None and not self._stream.active:
            return "input stream stopped"
        if time.monotonic() - last_block_at > self.config.watchdog_s:
            return f"no audio for {self.config.watchdog_s:g} s"
        return None

    def _supervise(self) -> None:
        blocks, last_block_at = -1, time.monotonic()
        lost_at: float | None = None if self._stream is not None else time.time()
        backoff = 0.5
        while not self._stop.wait(0.1 if lost_at is None else backoff):
            if lost_at is None:
                if self.stats.blocks != blocks:
                    blocks, last_block_at = self.stats.blocks, time.monotonic()
                reason = self._lost(last_block_at)
                if reason is None:
                    continue
                self._close_stream()
                if not self.config.reconnect:
                    log.error("source %s: %s; not reconnecting (reconnect: false)", self.id, reason)
                    self.on_status(self.id, "down", f"{reason}; not reconnecting")
                    return
                log.warning("source %s: %s; reconnecting", self.id, reason)
                self.on_status(self.id, "down", reason)
                lost_at, backoff = self.ring.wall_time(self.ring.written), 0.5  # when the last sample was heard
                continue
            try:
                self._reopen()
            except SourceError as exc:
                log.info("source %s: reconnect failed (%s); next try in %.1f s", self.id, exc, min(backoff * 2, self.config.backoff_max_s))
                backoff = min(backoff * 2, self.config.backoff_max_s)
                continue
            self._fill_gap(lost_at)
            self.reconnects += 1
            self._start_stream()
            lost_at, last_block_at = None, time.monotonic()

    def _reopen(self) -> None:
        with DeviceSource._portaudio_lock:
            if DeviceSource._others_active(self):
                self._open()
                return
            self._sd._terminate()  # PortAudio lists devices as they were when it was initialised
            self._sd._initialize()
            self._open()

    _active: set["DeviceSource"] = set()

    @classmethod
    def _others_active(cls, me: "DeviceSource") -> bool:
        return any(s is not me and s._stream is not None and s._stream.active for s in cls._active)

    def _fill_gap(self, lost_at: float) -> None:
        if self.stats.blocks:
            fill_gap(self.id, self.ring, lost_at, float(getattr(self._stream, "latency", 0.0) or 0.0))

    def _close_stream(self) -> None:
        stream, self._stream = self._stream, None
        if stream is None:
            return
        try:
            stream.abort()
            stream.close()
        except self._sd.PortAudioError as exc:
            log.debug("source %s: closing a lost stream: %s", self.id, exc)

    def stop(self) -> None:
        self._stop.set()
        self._close_stream()
        DeviceSource._active.discard(self)
        self.ring.close()

    def join(self, timeout: float) -> bool:
        if self._thread.is_alive():
            self._thread.join(timeout)
        return not self._thread.is_alive()


class FileSource:
    """Decodes a file block by block into the ring, paced in real time or as fast as windows are taken."""

    def __init__(self, config: SourceConfig, ring_seconds: float, on_status: StatusCallback):
        import soundfile as sf

        assert config.file is not None
        self.config = config
        self.id = config.id
        self.path = config.file
        try:
            info = sf.info(self.path)
        except (RuntimeError, sf.LibsndfileError) as exc:
            raise SourceError(f"cannot read audio file {self.path}: {exc}") from None
        if info.frames == 0:
            raise SourceError(f"audio file {self.path} holds no samples")
        self.sample_rate = int(info.samplerate)
        self.ring = RingBuffer(int(ring_seconds * self.sample_rate), self.sample_rate)
        self.on_status = on_status
        self.waits_for_worker = not config.realtime
        self.stats = CaptureStats()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"file-{self.id}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        import soundfile as sf

        block = max(1, int(self.sample_rate * FILE_BLOCK_S))
        started = time.time()
        self.on_status(self.id, "up", f"reading {self.path} at {self.sample_rate} Hz")
        try:
            with sf.SoundFile(self.path) as f:
                for chunk in f.blocks(blocksize=block, dtype="float32", always_2d=True):
                    if self._stop.is_set():
                        break
                    mono = chunk[:, 0] if chunk.shape[1] == 1 else chunk.mean(axis=1, dtype=np.float32)
                    if self.config.realtime:
                        due = started + (self.ring.written + len(mono)) / self.sample_rate
                        if self._stop.wait(max(0.0, due - time.time())):
                            break
                    elif not self.ring.wait_for_space(len(mono), self._stop):
                        break
                    # Samples are dated as if the file had been playing live since it was opened.
                    self.ring.write(mono, wall_time_end=started + (self.ring.written + len(mono)) / self.sample_rate)
                    self.stats.blocks += 1
                    self.stats.frames += len(mono)
        except (RuntimeError, sf.LibsndfileError) as exc:
            log.error("source %s: error decoding %s after %d samples: %s", self.id, self.path, self.ring.written, exc)
            self.on_status(self.id, "error", f"decoding failed after {self.ring.written / self.sample_rate:.2f} s: {exc}")
        finally:
            self.ring.close()
        if not self._stop.is_set():
            self.on_status(self.id, "eof", f"end of file after {self.ring.written / self.sample_rate:.2f} s")


class StreamSource:
    """Any ffmpeg input (rtmp://, rtsp://, https://...m3u8, http://...wav) decoded by an ffmpeg
    subprocess to mono float32 at the source rate, into the ring. When ffmpeg ends (the stream
    ended, the server went away) a ``down`` status, a restart with exponential backoff, an ``up``
    status, and the outage recorded as silence."""

    def __init__(self, config: SourceConfig, ring_seconds: float, on_status: StatusCallback):
        import shutil

        self.config = config
        self.id = config.id
        self.url = config.url
        self.ffmpeg = shutil.which("ffmpeg")
        if self.ffmpeg is None:
            raise SourceError(f"source {self.id}: url sources need ffmpeg on the PATH (Debian/Ubuntu: apt install ffmpeg)")
        self.sample_rate = config.sample_rate or DEFAULT_DEVICE_RATE
        self.ring = RingBuffer(int(ring_seconds * self.sample_rate), self.sample_rate)
        self.on_status = on_status
        self.waits_for_worker = False
        self.stats = CaptureStats()
        self.restarts = 0
        self._process = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"stream-{self.id}", daemon=True)

    def command(self) -> list[str]:
        pacing = ["-re"] if self.config.realtime else []
        return [self.ffmpeg, "-hide_banner", "-nostdin", "-loglevel", "error", *pacing, "-i", self.url,
                "-vn", "-ac", "1", "-ar", str(self.sample_rate), "-f", "f32le", "pipe:1"]

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        process = self._process
        if process is not None and process.poll() is None:
            process.terminate()

    def join(self, timeout: float) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    def _run(self) -> None:
        import subprocess

        backoff = 0.5
        lost_at: float | None = None
        block_bytes = int(self.sample_rate * FILE_BLOCK_S) * 4
        while not self._stop.is_set():
            self._process = subprocess.Popen(self.command(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
            got_audio = False
            leftover = b""
            while not self._stop.is_set():
                chunk = self._process.stdout.read1(block_bytes)
                if not chunk:
                    break
                if not got_audio:
                    got_audio = True
                    if lost_at is not None and self.stats.blocks:
                        fill_gap(self.id, self.ring, lost_at)
                    self.on_status(self.id, "up", f"streaming {self.url} at {self.sample_rate} Hz")
                    lost_at, backoff = None, 0.5
                data = leftover + chunk
                usable = len(data) - len(data) % 4
                leftover = data[usable:]
                samples = np.frombuffer(data[:usable], dtype="<f4")
                self.ring.write(samples)
                self.stats.blocks += 1
                self.stats.frames += len(samples)
            self._process.stdout.close()
            error = self._process.stderr.read().decode(errors="replace").strip().splitlines()
            code = self._process.wait()
            if self._stop.is_set():
                break
            reason = error[-1] if error else f"ffmpeg exited with status {code}" if code else "stream ended"
            if got_audio:
                lost_at = self.ring.wall_time(self.ring.written)
                log.warning("source %s: %s; reconnecting", self.id, reason)
                self.on_status(self.id, "down", reason)
            elif lost_at is None:
                lost_at = time.time()
                self.on_status(self.id, "down", f"cannot open {self.url}: {reason}")
            self.restarts += 1
            if self._stop.wait(backoff):
                break
            backoff = min(backoff * 2, self.config.backoff_max_s)
        self.ring.close()


def open_source(config: SourceConfig, ring_seconds: float, on_status: StatusCallback) -> DeviceSource | FileSource | StreamSource:
    if config.file is not None:
        return FileSource(config, ring_seconds, on_status)
    if config.url is not None:
        return StreamSource(config, ring_seconds, on_status)
    return DeviceSource(config, ring_seconds, on_status)
