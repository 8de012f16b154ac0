"""A PortAudio input stream (sounddevice), supervised: lost streams are reopened with backoff."""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

import numpy as np

from monitord.audio import to_mono
from monitord.config import SourceConfig
from monitord.sources.common import DEFAULT_DEVICE_RATE, CaptureStats, SourceError, StatusCallback
from monitord.sources.live import LiveSource
from monitord.sources.ring import RingBuffer

log = logging.getLogger(__name__)
STOP_WAIT_S = 5.0


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

    No locks, no logging, no allocation after the first block of a given size (see the ring
    buffer for what its write costs).
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
        if self._mix.size < frames:
            self._mix = np.zeros(frames, dtype=np.float32)
        self.ring.write(to_mono(indata, out=self._mix))
        self.stats.blocks += 1
        self.stats.frames += frames
        self.stats.callback_seconds += time.perf_counter() - began


class DeviceSource(LiveSource):
    """A PortAudio input stream: the callback (``BlockWriter``) copies each block into the ring and
    returns; the stage's thread notices a lost stream and reopens it.

    Loss shows in three ways on PortAudio/ALSA/PulseAudio: ``finished_callback`` fires,
    ``stream.active`` turns False while we did not stop it, or no block arrives for
    ``watchdog_s`` (seen: killing the sound server stops callbacks with no status flag and no
    exception). Reopening re-initialises PortAudio, which lists no devices if it started while
    the server was down, unless another device stream is open (re-initialising would close it).
    """

    _portaudio_lock = threading.Lock()
    """Held around every stream's open, start, abort and close and PortAudio's re-initialisation:
    Pa_Terminate closes every open stream of the process, and a stream closed under another thread
    is a dangling pointer there (a segfault, not an exception)."""
    _active: set["DeviceSource"] = set()  # guarded by _portaudio_lock
    _unclosed: list = []
    """Streams PortAudio refused to close: kept, since freeing one frees the callback it may still call."""

    def __init__(self, config: SourceConfig, ring_seconds: float, on_status: StatusCallback):
        import sounddevice as sd

        self._sd = sd
        sample_rate = config.sample_rate or DEFAULT_DEVICE_RATE
        super().__init__(config, RingBuffer(int(ring_seconds * sample_rate), sample_rate), on_status, "device")
        self.spec: int | str = config.device if config.device is not None else "default"
        self.device: dict[str, Any] | None = None
        self._stream = None
        self.writer = BlockWriter(self.ring, config.channels, config.blocksize)  # the stream's callback itself
        self.stats = self.writer.stats
        self._finished_flag = threading.Event()
        with DeviceSource._portaudio_lock:
            try:
                self._open()
            except SourceError:
                if not config.retry:
                    raise
                log.warning("source %s: device not available yet; retrying (retry: true)", self.id)
            DeviceSource._active.add(self)

    @property
    def channels(self) -> int:
        return min(self.config.channels, self.device["channels"]) if self.device else self.config.channels

    def _open(self) -> None:
        """Resolve the device and open (not start) a stream on it; SourceError if impossible. Under
        ``_portaudio_lock``."""
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
                finished_callback=self._finished_flag.set,
            )
        except (sd.PortAudioError, ValueError) as exc:
            raise SourceError(
                f"cannot open input device {self.device['index']} ({self.device['name']}) at "
                f"{self.sample_rate} Hz with {self.channels} channel(s): {exc}"
            ) from None

    def start(self) -> None:
        if self._stream is not None and not self.connected:
            with DeviceSource._portaudio_lock:
                self._start_stream()
            self._came_up()
        elif not self.connected:
            self.waiting_at_start = True  # the stage's thread says so as its first act
        super().start()

    def _start_stream(self) -> None:
        self._finished_flag.clear()
        self.writer.channels = self.channels
        self._stream.start()
        log.info("source %s: capturing %s at %d Hz, %d ch", self.id, self.device["name"], self.sample_rate, self.channels)

    def waiting_detail(self) -> str:
        return f"waiting for a microphone (input device {self.spec!r})"

    def up_detail(self) -> str:
        return f"capturing {self.device['name']} at {self.sample_rate} Hz"

    def connect(self) -> None:
        with DeviceSource._portaudio_lock:
            # an open stream of another source, running or not (lost, its thread not at its disconnect
            # yet), would be closed under it by a re-initialisation
            others = DeviceSource._unclosed or any(s is not self and s._stream is not None for s in DeviceSource._active)
            if not others:
                self._sd._terminate()  # PortAudio lists devices as they were when it was initialised
                self._sd._initialize()
            self._open()
            self.fill_pending_gap()  # the stream is open but not started: this thread is the only producer
            try:
                self._start_stream()
                failed = None
            except self._sd.PortAudioError as exc:
                failed = exc
        if failed is not None:
            self.disconnect()
            raise SourceError(f"cannot start input device {self.device['name']}: {failed}") from None

    def lost_reason(self) -> str | None:
        if self._finished_flag.is_set():
            return "input stream ended"
        if self._stream is not None and not self._stream.active:
            return "input stream stopped"
        return None

    def gap_latency_s(self) -> float:
        return float(getattr(self._stream, "latency", 0.0) or 0.0)

    def disconnect(self) -> None:
        with DeviceSource._portaudio_lock:
            stream, self._stream = self._stream, None
            if stream is None:
                return
            try:
                stream.abort(ignore_errors=False)
            except self._sd.PortAudioError as exc:  # a lost stream may be stopped already
                log.debug("source %s: aborting a lost stream: %s", self.id, exc)
            try:
                stream.close(ignore_errors=False)
            except self._sd.PortAudioError as exc:
                log.warning("source %s: PortAudio could not close the stream (%s); it is kept, and PortAudio is "
                            "not re-initialised while it is", self.id, exc)
                DeviceSource._unclosed.append(stream)

    def stop(self) -> None:
        super().stop()
        if not self.alive:
            self.disconnect()  # a stream opened at construction that no thread ever ran (the daemon's start failed)
        # bounded: PortAudio hung in another source's close (a dead sound server) must not hold up the stop
        if not DeviceSource._portaudio_lock.acquire(timeout=STOP_WAIT_S):
            log.warning("source %s: PortAudio is busy elsewhere; stopped without waiting for it", self.id)
            return
        try:
            if self._stream is None:  # one its thread could not close stays counted: no re-initialisation under it
                DeviceSource._active.discard(self)
        finally:
            DeviceSource._portaudio_lock.release()
