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


class DeviceSource:
    """A PortAudio input stream; the callback copies each block into the ring and returns."""

    def __init__(self, config: SourceConfig, ring_seconds: float, on_status: StatusCallback):
        import sounddevice as sd

        self._sd = sd
        self.config = config
        self.id = config.id
        self.device = resolve_device(config.device if config.device is not None else "default")
        self.sample_rate = config.sample_rate or DEFAULT_DEVICE_RATE
        self.channels = min(config.channels, self.device["channels"])
        self.ring = RingBuffer(int(ring_seconds * self.sample_rate), self.sample_rate)
        self.writer = BlockWriter(self.ring, self.channels, config.blocksize)
        self.stats = self.writer.stats
        self.on_status = on_status
        self.waits_for_worker = False
        self._stopping = False
        try:
            self._stream = sd.InputStream(
                device=self.device["index"],
                channels=self.channels,
                samplerate=self.sample_rate,
                dtype="float32",
                blocksize=config.blocksize,
                callback=self.writer,
                finished_callback=self._finished,
            )
        except (sd.PortAudioError, ValueError) as exc:
            raise SourceError(
                f"cannot open input device {self.device['index']} ({self.device['name']}) at "
                f"{self.sample_rate} Hz with {self.channels} channel(s): {exc}"
            ) from None

    def _finished(self) -> None:
        if not self._stopping:
            log.warning("source %s: input stream ended unexpectedly", self.id)
            self.on_status(self.id, "down", "input stream ended")

    def start(self) -> None:
        self._stream.start()
        log.info("source %s: capturing %s at %d Hz, %d ch", self.id, self.device["name"], self.sample_rate, self.channels)
        self.on_status(self.id, "up", f"capturing {self.device['name']} at {self.sample_rate} Hz")

    def stop(self) -> None:
        self._stopping = True
        try:
            self._stream.stop()
            self._stream.close()
        except self._sd.PortAudioError as exc:
            log.warning("source %s: error closing stream: %s", self.id, exc)
        self.ring.close()

    def join(self, timeout: float) -> bool:
        return True


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


def open_source(config: SourceConfig, ring_seconds: float, on_status: StatusCallback) -> DeviceSource | FileSource:
    if config.file is not None:
        return FileSource(config, ring_seconds, on_status)
    return DeviceSource(config, ring_seconds, on_status)
