"""Feedback on an alert where it is seen (the dashboard, MQTT): "not this" or "yes, this".

One operation, ``give``: the alert event SEQ is looked up (the event log, else the dashboard's
recent events), the alerting window's audio is taken from its clip (the window starts
``min(clips.pre_s, stream_start)`` into it) or, while the source's ring still holds it, from the
ring; it is embedded by the rule's embedding model on the inference thread (between two batches,
as the try-it panel is scored) and added to the rule's ``not_like`` bank as ``not:<rule>`` (not
this) or under the rule's label (yes, this), atomically under the bank's lock. The daemon reads the
bank again when its file changes: the next window is judged with it, no restart.

``give`` blocks (file and bank I/O, the wait for the inference thread): call it off an event loop.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitord.examples.bank import Embedder, negative

log = logging.getLogger(__name__)

VERDICTS = ("not_this", "yes_this")
EMBED_TIMEOUT_S = 60.0
MAX_REQUEST_BYTES = 1024
"""A feedback request (dashboard body, MQTT payload) is a few dozen bytes: anything past this is refused."""


class FeedbackError(Exception):
    """Feedback that cannot be applied; ``status`` is the HTTP status that says why (the message the rest)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


@dataclass(frozen=True)
class Audio:
    samples: np.ndarray
    rate: int
    origin: str
    """What the bank records as the example's source."""


def parse_request(body: bytes) -> tuple[int, str]:
    """``{"seq": N, "verdict": "not_this" | "yes_this"}`` checked strictly (FeedbackError otherwise)."""
    if len(body) > MAX_REQUEST_BYTES:
        raise FeedbackError(f"a feedback request is at most {MAX_REQUEST_BYTES} bytes", 413)
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError, RecursionError):  # RecursionError: a kilobyte of '[' (deep nesting)
        raise FeedbackError('send JSON: {"seq": N, "verdict": "not_this" or "yes_this"}', 400) from None
    if not isinstance(data, dict) or set(data) != {"seq", "verdict"}:
        raise FeedbackError('send exactly {"seq": N, "verdict": "not_this" or "yes_this"}', 400)
    seq, verdict = data["seq"], data["verdict"]
    if type(seq) is not int or not 0 < seq < 2**63:
        raise FeedbackError("seq must be a positive integer", 400)
    if verdict not in VERDICTS:
        raise FeedbackError(f"verdict must be one of {', '.join(VERDICTS)}", 400)
    return seq, verdict


def find_event(daemon, seq: int) -> dict[str, Any]:
    """The logged alert onset (or ``suppressed`` status event) SEQ."""
    event = None
    event_log = getattr(daemon.publisher, "event_log", None)
    if event_log is not None:
        lines, _ = event_log.read_since(seq - 1, 1)
        try:
            candidate = json.loads(lines[0]) if lines else None
        except ValueError:  # a line being appended
            candidate = None
        if isinstance(candidate, dict) and candidate.get("seq") == seq:
            event = candidate
    dashboard = getattr(daemon, "dashboard", None)
    if event is None and dashboard is not None:
        event = next((e for e in list(dashboard.broadcaster.recent_events) if e.get("seq") == seq), None)
    if event is None:
        raise FeedbackError(f"no event {seq} (not in the event log, nor among the recent events)", 404)
    is_onset = event.get("kind") == "alert" and event.get("phase") == "onset"
    if not (is_onset or event.get("status") == "suppressed") or not event.get("rule"):
        raise FeedbackError(f"event {seq} is no alert onset (nor a suppressed window): nothing to teach from it", 400)
    return event


def window_audio(daemon, event: dict[str, Any]) -> Audio:
    """The alerting window's audio: from its clip when it is written, else from the source's ring
    while the ring still holds it."""
    from monitord.audio import read_mono
    from monitord.sources.ring import Overrun

    seconds = daemon.config.window.seconds
    start_s = float(event.get("stream_start") or 0.0)
    clip = event.get("clip")
    if clip and Path(clip).is_file():
        try:
            samples, rate = read_mono(Path(clip))
        except Exception as exc:  # noqa: BLE001 - a clip being rewritten, or damaged: the ring may still hold it
            log.warning("feedback on event %s: clip %s unreadable (%s)", event["seq"], clip, exc)
        else:
            at = min(daemon.config.clips.pre_s, start_s)
            begin = round(at * rate)
            if len(samples) >= begin + round(seconds * rate):  # a clip still being written falls back to the ring
                return Audio(samples[begin : begin + round(seconds * rate)], rate, f"event:{event['seq']}:clip:{clip}@{at:.3f}")
    ring = next((s.ring for s in getattr(daemon, "sources", []) if getattr(s, "id", None) == event.get("source")), None)
    if ring is not None:
        rate = ring.sample_rate
        begin, n = round(start_s * rate), round(seconds * rate)
        try:
            samples = ring.read(begin, n)
        except (Overrun, ValueError):
            pass
        else:
            return Audio(samples, rate, f"event:{event['seq']}:ring:{event['source']}@{start_s:.3f}")
    raise FeedbackError(f"event {event['seq']}'s audio is gone: it has no clip (clips.enabled) and the ring of "
                        f"{event.get('source')} no longer holds it", 410)


def give(daemon, seq: int, verdict: str, via: str = "api", expect: tuple[str, str] | None = None) -> dict[str, Any]:
    """Teach the alerting window of event SEQ as not this / yes this; the summary, or FeedbackError.
    ``expect``: the (source, rule) the request was addressed to (an MQTT topic), which the event must match."""
    from monitord.config import GateConfig
    from monitord.tools.teach import TeachError, add, embedding_model_for
    from monitord.windowing.tiling import ModelInput, WindowCutter

    if verdict not in VERDICTS:
        raise FeedbackError(f"verdict must be one of {', '.join(VERDICTS)}", 400)
    config = daemon.config
    event = find_event(daemon, seq)
    if expect is not None and (event.get("source"), event.get("rule")) != tuple(expect):
        raise FeedbackError(f"event {seq} is an alert of {event.get('source')}/{event.get('rule')}, "
                            f"not of {expect[0]}/{expect[1]}", 400)
    rule = next((r for r in config.rules if r.id == event["rule"]), None)
    if rule is None:
        raise FeedbackError(f"rule {event['rule']} is no longer in the config", 409)
    if rule.not_like is None:
        raise FeedbackError(f"rule {rule.id} has no not_like bank (add not_like: {{bank: FILE}} to the rule)", 409)
    bank_path = Path(rule.not_like.bank)
    try:
        name = embedding_model_for(config, bank_path, rule.id, None)
    except TeachError as exc:
        raise FeedbackError(str(exc), 409) from None
    model = daemon.models.get(name)
    if model is None or getattr(model, "device", "cpu") == "remote":
        raise FeedbackError(f"model {name}, which embeds rule {rule.id}'s windows, is not loaded here", 409)
    audio = window_audio(daemon, event)
    cutter = WindowCutter(event.get("source") or "feedback", audio.rate, config.window, GateConfig(mode="always"),
                          {name: ModelInput(model.sample_rate)})
    window = cutter.cut(audio.samples, 0, 0.0, 0.0)
    from concurrent.futures import TimeoutError as FutureTimeout

    try:
        scored = daemon.score_upload(lambda: model.score([window])).result(timeout=EMBED_TIMEOUT_S)
    except FutureTimeout:
        raise FeedbackError(f"the inference stage did not embed the window within {EMBED_TIMEOUT_S:g} s: try again", 503) from None
    embedding = scored[0].embedding
    if embedding is None:
        raise FeedbackError(f"model {name} gave no embedding", 500)
    embeddings = np.asarray(embedding, dtype=np.float32)[None, :]
    label = negative(rule.id) if verdict == "not_this" else rule.label
    fingerprint = Embedder(model.model_id, embeddings.shape[1], model.sample_rate, config.window.seconds)
    try:
        # one event, one verdict: a second click (or an MQTT redelivery) adds nothing; the other verdict replaces it
        bank, ids = add(bank_path, fingerprint, embeddings, label, [audio.origin], replacing=f"event:{seq}:")
    except TeachError as exc:
        raise FeedbackError(str(exc), 409) from None
    log.info("feedback (%s) on event %d: %s taught to %s as example #%d", via, seq, label, bank_path, ids[0])
    return {"seq": seq, "rule": rule.id, "verdict": verdict, "label": label, "example": ids[0], "bank": str(bank_path),
            "examples": len(bank), "from": audio.origin.split(":")[2], "source": audio.origin}
