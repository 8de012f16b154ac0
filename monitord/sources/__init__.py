"""Sources of sound, each writing mono float32 into its own ring buffer.

- ``device``: a PortAudio input stream (sounddevice), supervised and reconnected;
- ``file``: an audio file, paced in real time or as fast as windows are taken;
- ``url``: any ffmpeg input (rtmp, rtsp, HLS, http), decoded by an ffmpeg subprocess;
- ``live``: what devices and URLs share: lost-stream detection, reconnect with backoff, the gap
  written as silence so stream time stays wall-clock time;
- ``ring``: the ring buffer they write and the windowing stage reads.

Each source is a stage (``monitord.stage.Stage``): its thread reads a file, or supervises a
device's callback or an ffmpeg process, and it is restarted like any other stage.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from monitord.config import SourceConfig

from monitord.sources.common import DEFAULT_DEVICE_RATE, CaptureStats, SourceError, StatusCallback

__all__ = ["DEFAULT_DEVICE_RATE", "CaptureStats", "SourceError", "StatusCallback", "open_source"]


def open_source(config: SourceConfig, ring_seconds: float, on_status: StatusCallback) -> "Source":
    """The source a config entry describes, opened (devices: resolved and opened) but not started."""
    if config.file is not None:
        from monitord.sources.file import FileSource

        return FileSource(config, ring_seconds, on_status)
    if config.url is not None:
        from monitord.sources.url import StreamSource

        return StreamSource(config, ring_seconds, on_status)
    from monitord.sources.device import DeviceSource

    return DeviceSource(config, ring_seconds, on_status)


if TYPE_CHECKING:
    from monitord.sources.device import DeviceSource
    from monitord.sources.file import FileSource
    from monitord.sources.url import StreamSource

    Source = DeviceSource | FileSource | StreamSource
