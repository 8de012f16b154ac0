"""The published event: the only place its JSON schema lives."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from datetime import datetime, timezone
from typing import Any

SCHEMA = "monitord.event/1"


def iso_utc(epoch_s: float) -> str:
    """Epoch seconds as ``2026-11-22T02:31:07.512Z``."""
    return datetime.fromtimestamp(epoch_s, tz=timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


@dataclass(frozen=True)
class Event:
    """An alert transition (kind "alert"), a source status change (kind "status"), or one
    window's scores (kind "scores": published only with ``publish.scores``, never logged, no seq).

    ``seq`` and ``id`` are assigned by the publisher, so they are 0/"" until published.
    ``time`` is the wall-clock time of the window's first sample for alerts, and the time of
    the change for status events. ``latency_ms`` runs from the window's last sample to publishing.
    """

    kind: str
    source: str
    time: str
    host: str
    seq: int = 0
    id: str = ""
    rule: str | None = None
    label: str | None = None
    phase: str | None = None
    score: float | None = None
    scores: dict[str, float] | None = None
    model: str | None = None
    """The model's id (HF id or path)."""
    model_name: str | None = None
    """The model's name in the config."""
    stream_start: float | None = None
    stream_end: float | None = None
    latency_ms: float | None = None
    clip: str | None = None
    status: str | None = None
    """Status events: up, down, eof, error, overload, model_error."""
    detail: str | None = None
    facts: dict[str, Any] | None = None
    """Alert events: what the gate measured on the window (level, clipping, speech share)."""
    schema: str = SCHEMA
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def topic(self) -> str:
        if self.kind == "alert":
            return f"alert.{self.source}.{self.rule}"
        if self.kind == "scores":
            return f"scores.{self.source}.{self.model_name}"
        return f"{self.kind}.{self.source}"

    def with_sequence(self, seq: int, event_id: str, latency_ms: float | None) -> "Event":
        return replace(self, seq=seq, id=event_id, latency_ms=latency_ms)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        extra = data.pop("extra")
        ordered = {"schema": data.pop("schema"), "seq": data.pop("seq"), "id": data.pop("id"), "kind": data.pop("kind")}
        ordered.update(data)
        ordered.update(extra)
        return ordered

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), separators=(",", ":"), ensure_ascii=False, allow_nan=False)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Event":
        known = {f for f in cls.__dataclass_fields__ if f != "extra"}
        if data.get("schema") != SCHEMA:
            raise ValueError(f"not a {SCHEMA} event: schema={data.get('schema')!r}")
        return cls(**{k: v for k, v in data.items() if k in known}, extra={k: v for k, v in data.items() if k not in known})

    @classmethod
    def from_json(cls, text: str | bytes) -> "Event":
        return cls.from_dict(json.loads(text))
