"""Push notifications of alert onsets through Apprise (ntfy, Telegram, e-mail, Pushover, JSON, ...): a sink.

One ``Notifier`` per ``notify:`` entry. ``deliver`` (the output thread) only decides and queues:
an onset of one of the entry's rules, not within the rule's ``cooldown_s`` (wall clock) of the last
message for the same source and rule, goes into a bounded queue; a full queue drops the newest
message and says so. The notifier's own thread sends: with ``attach_clip`` it first waits (at most
``clip_wait_s``) for the ``clip`` status event that says the alert's clip is written, then attaches
it. A failed send is retried with exponential backoff (``retries`` times) and reported as a
``notify_error`` status event; nothing of it ever blocks the pipeline.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from monitord.config import Config, NotifyConfig, RuleConfig
from monitord.net import url_for_bind
from monitord.types import Event

log = logging.getLogger(__name__)

QUEUE_MAX = 100
CLIPS_REMEMBERED = 256
BACKOFF_FIRST_S = 1.0
BACKOFF_MAX_S = 60.0


@dataclass
class Job:
    event: Event
    suppressed: int = 0
    """Onsets of the same source and rule left out (cooldown) since the previous message."""
    queued_at: float = field(default_factory=time.monotonic)


class Notifier:
    """One ``notify:`` entry: its Apprise target, its rules, its thread and queue."""

    wants_windows = False

    @property
    def alive(self) -> bool:
        """Its thread runs (started and not dead): the supervisor's health reads it."""
        return self._thread is not None and self._thread.is_alive()

    def __init__(self, config: NotifyConfig, index: int, rules: Mapping[str, RuleConfig], host: str,
                 dashboard: str | None, status: Callable[..., None], apprise_factory: Callable[[str], Any] | None = None):
        self.config = config
        self.name = f"notify.{index}"
        self.rules = dict(rules)
        self.host = host
        self.dashboard = dashboard
        self.status = status
        self.apprise_factory = apprise_factory or _apprise_for
        self.queue: queue.Queue[Job] = queue.Queue(QUEUE_MAX)
        self.sent = 0
        self.failed = 0
        self.dropped = 0
        self._last: dict[tuple[str, str], float] = {}
        self._suppressed: dict[tuple[str, str], int] = {}
        self._clips: OrderedDict[int, str | None] = OrderedDict()
        """onset seq -> the written clip's path (None: the clip failed)."""
        self._clip_ready = threading.Condition()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._apprise, self.target = self._open()

    def _open(self) -> tuple[Any, str]:
        """The Apprise target (read from ``url_file`` where given); PublishError naming the key if unusable."""
        from monitord.output.publish import PublishError

        url, key = self.config.url, f"{self.name}.url"
        if url is None:
            key = f"{self.name}.url_file"
            try:
                lines = Path(self.config.url_file).read_text(encoding="utf-8").splitlines()
            except OSError as exc:
                raise PublishError(f"{key}: cannot read {self.config.url_file}: {exc.strerror or exc}") from None
            url = lines[0].strip() if lines else ""
        try:
            return self.apprise_factory(url)
        except ValueError as exc:
            raise PublishError(f"{key}: {exc}") from None

    # the output stage's side (must not block)

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._thread.start()
        log.info("%s: onsets of %s go to %s", self.name, ", ".join(self.config.rules or ["every rule"]), self.target)

    def deliver(self, event: Event) -> None:
        if event.kind == "status" and event.status in ("clip", "clip_error") and "onset_seq" in event.extra:
            with self._clip_ready:
                path = event.extra.get("clip") or event.clip  # in extra when made in-process, a field when read back
                self._clips[int(event.extra["onset_seq"])] = path if event.status == "clip" else None
                while len(self._clips) > CLIPS_REMEMBERED:
                    self._clips.popitem(last=False)
                self._clip_ready.notify_all()
            return
        if event.kind != "alert" or event.phase != "onset" or event.rule not in self.rules:
            return
        if self.config.rules is not None and event.rule not in self.config.rules:
            return
        key = (event.source, event.rule)
        now = time.monotonic()
        cooldown = self.rules[event.rule].cooldown_s
        last = self._last.get(key)
        if last is not None and now - last < cooldown:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            log.info("%s: %s on %s within the rule's cooldown (%g s): no message", self.name, event.rule, event.source, cooldown)
            return
        try:
            self.queue.put_nowait(Job(event, self._suppressed.get(key, 0)))
        except queue.Full:
            # no cooldown starts: the next onset of this rule here is sent once there is room
            self.dropped += 1
            log.warning("%s: %d messages waiting already; this one (%s on %s) is dropped", self.name, QUEUE_MAX,
                        event.rule, event.source)
            return
        self._last[key] = now
        self._suppressed.pop(key, None)

    def on_rules(self, rules: tuple[RuleConfig, ...]) -> None:
        """A reload: new rules are notified (when this entry lists none, or lists them), with their
        new cooldowns; a cooldown already running keeps its start."""
        self.rules = {rule.id: rule for rule in rules}

    def stop(self, timeout: float) -> None:
        self._stop.set()
        with self._clip_ready:
            self._clip_ready.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                log.warning("%s: still sending after %g s; leaving it", self.name, timeout)

    # the notifier's thread

    def _run(self) -> None:
        while not (self._stop.is_set() and self.queue.empty()):
            try:
                job = self.queue.get(timeout=0.2)
            except queue.Empty:
                continue
            self._send(job)

    def _clip_for(self, event: Event) -> str | None:
        """The alert's clip once written (waiting at most ``clip_wait_s``), or None."""
        if not self.config.attach_clip or event.clip is None:
            return None
        deadline = time.monotonic() + self.config.clip_wait_s
        with self._clip_ready:
            while event.seq not in self._clips:
                left = deadline - time.monotonic()
                if left <= 0 or self._stop.is_set():
                    log.warning("%s: the clip of event %d was not written within %g s; sending without it",
                                self.name, event.seq, self.config.clip_wait_s)
                    return None
                self._clip_ready.wait(min(left, 0.5))
            return self._clips[event.seq]

    def message(self, job: Job) -> tuple[str, str]:
        event = job.event
        title = self.config.title.format(rule=event.rule, source=event.source, label=event.label, host=self.host)
        lines = [f"{event.rule} on {event.source}: \"{event.label}\" scored {event.score:.2f}",
                 f"time: {event.time} (host {event.host}, event #{event.seq})"]
        if job.suppressed:
            lines.append(f"{job.suppressed} more onset(s) of this rule here within its cooldown were not sent")
        if self.dashboard:
            lines.append(f"dashboard: {self.dashboard}")
        return title, "\n".join(lines)

    def _send(self, job: Job) -> None:
        import apprise

        event = job.event
        clip = self._clip_for(event)
        title, body = self.message(job)
        attach = apprise.AppriseAttachment(clip) if clip and Path(clip).is_file() else None
        delay = BACKOFF_FIRST_S
        for attempt in range(1, self.config.retries + 2):
            if attach is not None and attempt > 1 and attempt == self.config.retries + 1:
                # the service may refuse the clip itself (too large, attachments off): the alert goes without it
                attach, body = None, body + "\n(the clip could not be attached: see the event log for its path)"
            with apprise.LogCapture(level=logging.WARNING) as captured:
                ok = self._apprise.notify(body=body, title=title, attach=attach)
            if ok:
                self.sent += 1
                log.info("%s: sent %s on %s (event %d)%s", self.name, event.rule, event.source, event.seq,
                         " with its clip" if attach else "")
                return
            reason = " ".join(captured.getvalue().split())[-300:] or "the service refused it"
            last = attempt > self.config.retries
            self.failed += last
            detail = (f"{self.name}: sending the {event.rule} alert of {event.source} (event {event.seq}) to "
                      f"{self.target} failed (attempt {attempt} of {self.config.retries + 1}): {reason}; "
                      + ("gave up" if last else f"retrying in {delay:g} s"))
            log.warning("%s", detail)
            if attempt == 1 or last:
                self.status("daemon", "notify_error", detail, sink=self.name, onset_seq=event.seq, attempt=attempt)
            if last or self._stop.wait(delay):
                return
            delay = min(delay * 2, BACKOFF_MAX_S)


def _apprise_for(url: str) -> tuple[Any, str]:
    """An Apprise object for one URL, and how to name it in logs without its secrets."""
    import apprise

    target = apprise.Apprise()
    if not target.add(url):
        raise ValueError("not an Apprise URL that this Apprise supports")
    return target, target[0].url(privacy=True)


def build_notifiers(config: Config, host: str, status: Callable[..., None]) -> list[Notifier]:
    rules = {rule.id: rule for rule in config.rules}
    dashboard = url_for_bind(config.http.bind) if config.http.bind else None
    return [Notifier(entry, i, rules, host, dashboard, status) for i, entry in enumerate(config.notify)]
