"""The memory a config's own numbers imply (ring buffers, window queues, subscriber queues), checked
against ``pipeline.memory_budget_mb`` before anything is allocated.

Models' weights are not counted (they are what they are); what is counted is what the config can
grow without bound by itself: a 100000-window queue, or clips that make every ring long enough to
outlive it. A config that would need more than its budget is refused with the keys that drive it.
"""

from __future__ import annotations

from dataclasses import dataclass

from monitord.config.errors import Problem
from monitord.config.schema import Config, SourceConfig

SAMPLE_BYTES = 4
"""Mono float32."""
DEFAULT_RATE = 48000
"""Devices and URLs without sample_rate; files whose rate cannot be read here."""
MODEL_RATES = {"clap": 48000, "yamnet": 16000, "emotion": 16000}
"""The rate each kind of model hears at: a queued window carries a copy at each (kinds not listed
score embeddings, not audio)."""
EVENT_BYTES = 1024
"""About one published event (an alert with its ten best scores is 600-900 bytes of JSON)."""


@dataclass(frozen=True)
class Share:
    """One buffer's share of the memory: bytes, and the keys that size it."""

    what: str
    bytes: int
    keys: tuple[str, ...]


def ring_seconds(config: Config) -> float:
    """The ring buffer each source gets: the configured length, or more when clips need their
    pre-roll to survive the worst lag before an alert (a full window queue of one source's windows,
    and with remote inference as many again waiting for the cluster)."""
    seconds = config.pipeline.ring_seconds
    if config.clips.enabled:
        waiting = config.pipeline.queue_max_windows + (config.inference.max_waiting_windows if config.inference else 0)
        lag = waiting * config.window.hop_s
        seconds = max(seconds, config.window.seconds + lag + config.clips.pre_s + config.clips.post_s + 2.0)
    return seconds


def source_rate(source: SourceConfig) -> int:
    """The rate a source's ring holds: its own for a file (where it can be read), else sample_rate."""
    if source.file is not None:
        try:
            import soundfile

            return int(soundfile.info(source.file).samplerate)
        except Exception:  # an unreadable file is reported where it is opened; size it as a default one
            return DEFAULT_RATE
    return source.sample_rate or DEFAULT_RATE


def window_bytes(config: Config, rate: int) -> int:
    """One queued window of a source at ``rate``: its samples and a copy at each model's rate."""
    rates = {MODEL_RATES[m.kind] for m in config.models.values() if m.kind in MODEL_RATES} - {rate}
    return int(config.window.seconds * (rate + sum(rates))) * SAMPLE_BYTES


def shares(config: Config) -> list[Share]:
    """Where the memory a config implies goes, largest first."""
    rates = [source_rate(s) for s in config.sources]
    ring_keys = ("pipeline.ring_seconds",) + (
        ("pipeline.queue_max_windows", "window.hop_s", "clips.pre_s", "clips.post_s") if config.clips.enabled else ())
    if config.clips.enabled and config.inference is not None:
        ring_keys += ("inference.max_waiting_windows",)
    window = max(window_bytes(config, rate) for rate in rates)
    found = [
        Share(f"ring buffers ({len(rates)} sources)", int(ring_seconds(config) * sum(rates)) * SAMPLE_BYTES, ring_keys),
        Share("window queue", config.pipeline.queue_max_windows * window, ("pipeline.queue_max_windows", "window.seconds")),
        Share("published events held for a slow subscriber", config.publish.send_hwm * EVENT_BYTES, ("publish.send_hwm",)),
    ]
    if config.inference is not None:
        found.append(Share("windows waiting for remote inference", config.inference.max_waiting_windows * window,
                           ("inference.max_waiting_windows", "window.seconds")))
    return sorted(found, key=lambda s: s.bytes, reverse=True)


def check_memory(config: Config) -> list[Problem]:
    """A problem at the key that drives most of it when the config needs more than its budget."""
    found = shares(config)
    total = sum(s.bytes for s in found)
    budget = config.pipeline.memory_budget_mb * 2**20
    if total <= budget:
        return []
    parts = "; ".join(f"{s.what} {_size(s.bytes)} ({', '.join(s.keys)})" for s in found if s.bytes >= 0.01 * total)
    return [Problem(found[0].keys[0], f"this config's buffers need about {_size(total)}, over pipeline.memory_budget_mb "
                                     f"({config.pipeline.memory_budget_mb:g} MB): {parts}; lower those keys, or raise "
                                     "pipeline.memory_budget_mb if this machine has the memory")]


def _size(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024:
            return f"{n:.3g} {unit}"
        n /= 1024
    return f"{n:.3g} TiB"
