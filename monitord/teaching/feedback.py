"""Feedback on an alert where it is seen (the dashboard, MQTT): "not this" or "yes, this".

``give`` teaches the window of alert event SEQ (``teach.teach_event``, through the daemon's
``TeachingPort``) to the rule's ``not_like`` bank: as ``not:<rule>`` (not this) or under the rule's
label (yes, this). The daemon reads the bank again when its file changes: the next window is judged
with it, no restart.

What "not this" does: it removes **repeats of that sound** (the same dish, the same door, the same
television jingle), not a class of sounds. A window is only suppressed when it is nearer to a taught
false alarm than to any example of the rule's own sound (the rule's reference recordings and every
"yes, this"), so it cannot teach the rule deaf to the real thing.

``give`` blocks (file and bank I/O, the wait for the inference thread): call it off an event loop.
"""

from __future__ import annotations

import json
import logging
from typing import Any

from monitord.teaching.port import TeachingPort
from monitord.teaching.teach import TeachError, teach_event

log = logging.getLogger(__name__)

VERDICTS = ("not_this", "yes_this")
EMBED_TIMEOUT_S = 60.0
MAX_REQUEST_BYTES = 1024
"""A feedback request (dashboard body, MQTT payload) is a few dozen bytes: anything past this is refused."""
WHAT_TEACHING_DOES = {
    "not_this": "Repeats of this sound will not raise the rule again. Teaching removes repeats of a sound, not a class "
                "of sounds, and never a window nearer to the rule's own sound than to what was taught.",
    "yes_this": "Windows like this one are the rule's own sound: never suppressed.",
}
STATUS = {"bad request": 400, "not found": 404, "conflict": 409, "gone": 410, "busy": 503, "storage": 507}


class FeedbackError(Exception):
    """Feedback that cannot be applied; ``status`` is the HTTP status that says why (the message the rest)."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.status = status


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


def give(port: TeachingPort, seq: int, verdict: str, via: str = "api", expect: tuple[str, str] | None = None) -> dict[str, Any]:
    """Teach the alerting window of event SEQ as not this / yes this; the summary, or FeedbackError.
    ``expect``: the (source, rule) the request was addressed to (an MQTT topic), which the event must match."""
    if verdict not in VERDICTS:
        raise FeedbackError(f"verdict must be one of {', '.join(VERDICTS)}", 400)
    try:
        # one event, one verdict: a second click (or an MQTT redelivery) adds nothing; the other verdict replaces it
        taught = teach_event(port, seq, "not" if verdict == "not_this" else "yes", expect=expect, timeout_s=EMBED_TIMEOUT_S)
    except TeachError as exc:
        raise FeedbackError(str(exc), STATUS.get(exc.kind, 409)) from None
    log.info("feedback (%s) on event %d: %s taught to %s as example #%d", via, seq, taught["label"], taught["bank"],
             taught["example"])
    return {**taught, "verdict": verdict, "means": WHAT_TEACHING_DOES[verdict]}
