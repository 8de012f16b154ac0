"""Teaching a bank: cut and embed windows, add them as examples, list and forget them.

Every way of teaching goes through here: ``monitord teach`` (your own recordings, a clip, a logged
event), and "not this" / "yes, this" on an alert (``feedback``, through the dashboard and MQTT).

- Windows are cut with the config's own windowing (``cut_file``) and embedded by the model the
  bank is for (``embedding_model_for``): the ``embedding_model`` of the examples model that reads
  the bank, or the rule's model (its embedder, for a rule on an examples model), else the config's
  first yamnet model (then clap).
- An event's window (``event_window``) comes from its clip, which starts ``min(clips.pre_s,
  stream_start)`` before the window, else from its source's ring while the ring still holds it.
- One event is taught once (``add(..., replacing=event_key(event))``): the same verdict again adds
  nothing, the other verdict replaces it. Events are told apart by their ``id``: ``seq`` restarts
  at 1 without an event log, and two daemons sharing a bank have the same seqs.

A running daemon reads a bank again when it changes: no restart.
"""

from __future__ import annotations

import contextlib
import errno
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitord.audio import read_mono
from monitord.config import Config, GateConfig
from monitord.teaching.bank import Bank, BankError, Embedder, load, locked, negative, save
from monitord.teaching.port import TeachingPort
from monitord.types import Window
from monitord.windowing.tiling import ModelInput, WindowCutter, window_starts

log = logging.getLogger(__name__)


class TeachError(Exception):
    """Something asked of teaching cannot be done; the message says why. ``kind`` sorts it for
    whoever answers (HTTP status, exit code): "bad request", "not found", "conflict", "gone",
    "busy", "storage"."""

    def __init__(self, message: str, kind: str = "conflict") -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class Cut:
    window: Window
    source: str
    """Where it came from, as the bank records it (``file:PATH@START``)."""


def resolve_bank(config_dir: Path | None, bank: str | Path) -> Path:
    """A bank path given on the command line, read as the config reads one: relative to the
    config file's folder."""
    path = Path(bank).expanduser()
    return path if path.is_absolute() or config_dir is None else config_dir / path


def embedding_model_for(config: Config, bank: Path, rule_id: str | None, model: str | None) -> str:
    """The name of the model whose embeddings go into ``bank``."""
    def behind(name: str) -> str:
        m = config.models[name]
        return m.embedding_model if m.kind == "examples" else name

    if model is not None:
        if model not in config.models:
            raise TeachError(f"no model {model!r} in the config", "bad request")
        chosen = behind(model)
    elif rule_id is not None:
        chosen = behind(rule_of(config, rule_id).model)
    else:
        readers = [m.embedding_model for m in config.models.values()
                   if m.kind == "examples" and Path(m.bank).resolve() == bank.resolve()]
        firsts = [n for kind in ("yamnet", "clap") for n, m in config.models.items() if m.kind == kind]
        if not readers and not firsts:
            raise TeachError("the config has no yamnet or clap model to embed windows with")
        chosen = (readers or firsts)[0]
    if config.models[chosen].kind not in ("yamnet", "clap"):
        raise TeachError(f"model {chosen} ({config.models[chosen].kind}) gives no window embeddings: use a yamnet or clap model")
    return chosen


def rule_of(config: Config, rule_id: str):
    rule = next((r for r in config.rules if r.id == rule_id), None)
    if rule is None:
        raise TeachError(f"no rule {rule_id!r} in the config (rules: {', '.join(r.id for r in config.rules) or 'none'})",
                         "bad request")
    return rule


def not_like_bank(config: Config, rule_id: str, bank: Path | None = None) -> Path:
    """The bank a false alarm of ``rule_id`` is taught to: the rule's ``not_like`` bank. A ``bank``
    named besides must be that one (teaching another bank would suppress nothing)."""
    rule = rule_of(config, rule_id)
    if rule.not_like is None:
        raise TeachError(f"rule {rule.id} has no not_like bank, so nothing taught as its false alarm would be used "
                         f"(add not_like: {{}} to the rule)")
    own = Path(rule.not_like.bank)
    if bank is not None and bank.resolve() != own.resolve():
        raise TeachError(f"rule {rule.id} reads its taught false alarms from {own}, not {bank}: leave --bank out "
                         f"(or give that path)", "bad request")
    return own


def is_teachable(event: dict[str, Any]) -> bool:
    """An alert onset, or a window suppressed as like a taught false alarm: a window to teach from."""
    onset = event.get("kind") == "alert" and event.get("phase") == "onset"
    return bool(event.get("rule")) and (onset or (event.get("kind") == "status" and event.get("status") == "suppressed"))


def event_key(event: dict[str, Any]) -> str:
    """The source prefix of what one event taught: ``event:SEQ:ID:``. The ``id`` tells it apart
    (a seq is not unique: it restarts at 1 without an event log, and daemons sharing a bank repeat
    each other's); the seq is there for the reader."""
    return f"event:{event.get('seq')}:{event.get('id') or '-'}:"


def cutter_for(config: Config, source: str, rate: int, embedder, gate: GateConfig | None = None) -> WindowCutter:
    return WindowCutter(source, rate, config.window, gate or config.gate, {embedder.name: ModelInput(embedder.sample_rate)})


def cut_file(config: Config, path: Path, embedder, prefix: str = "file", at_s: float | None = None) -> list[Cut]:
    """The windows of a recording that pass the config's gate (or the one window at ``at_s``)."""
    samples, rate = read_mono(path)
    cutter = cutter_for(config, str(path), rate, embedder)
    if at_s is not None:
        start = min(max(0, round(at_s * rate)), max(0, len(samples) - cutter.length))
        window = cutter.cut(samples[start : start + cutter.length], start, 0.0, 0.0)
        return [Cut(window, f"{prefix}:{path}@{start / rate:.3f}")]
    cuts = []
    for start in window_starts(len(samples), cutter.length, cutter.hop):
        window = cutter.cut(samples[start : start + cutter.length], start, 0.0, 0.0)
        if window.passed:
            cuts.append(Cut(window, f"{prefix}:{path}@{start / rate:.3f}"))
    return cuts


def embed(embedder, cuts: list[Cut]) -> np.ndarray:
    rows = []
    for i in range(0, len(cuts), embedder.batch_max):
        for scores in embedder.score([c.window for c in cuts[i : i + embedder.batch_max]]):
            if scores.embedding is None:
                raise TeachError(f"model {embedder.name} gave no embedding")
            rows.append(scores.embedding)
    return np.stack(rows).astype(np.float32)


def fingerprint(config: Config, embedder, dim: int) -> Embedder:
    """What makes a bank's embeddings comparable: the model, its dimension and rate, the window length."""
    return Embedder(embedder.model_id, dim, embedder.sample_rate, config.window.seconds)


def event_window(port: TeachingPort, event: dict[str, Any], embedder) -> Cut:
    """The window event ``event`` was raised on: from its clip when it is written, else from its
    source's ring while the ring still holds it (TeachError "gone" otherwise)."""
    config = port.config()
    seconds = config.window.seconds
    start_s = float(event["stream_start"]) if event.get("stream_start") is not None else None
    key = event_key(event)
    clip = event.get("clip")
    audio = None
    if clip and Path(clip).is_file():
        try:
            samples, rate = read_mono(Path(clip))
        except Exception as exc:  # noqa: BLE001 - a clip being rewritten, or damaged: the ring may still hold it
            log.warning("event %s: clip %s unreadable (%s)", event.get("seq"), clip, exc)
        else:
            # the clip starts pre_s before the window, or at the stream's start for an alert within pre_s of it
            at = config.clips.pre_s if start_s is None else min(config.clips.pre_s, start_s)
            begin, n = round(at * rate), round(seconds * rate)
            if len(samples) >= begin + n:  # a clip still being written falls back to the ring
                audio = (samples[begin : begin + n], rate, f"{key}clip:{clip}@{at:.3f}")
    if audio is None and start_s is not None:
        held = port.ring_audio(str(event.get("source")), start_s, seconds)
        if held is not None:
            audio = (held[0], held[1], f"{key}ring:{event.get('source')}@{start_s:.3f}")
    if audio is None:
        raise TeachError(f"event {event.get('seq')}'s audio is gone: it has no clip (clips.enabled) and the ring of "
                         f"{event.get('source')} no longer holds it", "gone")
    samples, rate, origin = audio
    cutter = cutter_for(config, str(event.get("source") or "event"), rate, embedder, GateConfig(mode="always"))
    return Cut(cutter.cut(samples, 0, 0.0, 0.0), origin)


def teach_event(port: TeachingPort, seq: int, label_of: str, expect_rule: str | None = None,
                expect: tuple[str, str] | None = None, timeout_s: float = 60.0) -> dict[str, Any]:
    """Teach the window of logged event SEQ to its rule's ``not_like`` bank: as the rule's false
    alarm (``label_of="not"``) or as its own sound (``"yes"``). ``expect_rule``/``expect``: the rule /
    (source, rule) the request was addressed to, which the event must be of."""
    from concurrent.futures import TimeoutError as FutureTimeout

    config = port.config()
    event = port.find_event(seq)
    if event is None:
        raise TeachError(f"no event {seq} (not in the event log, nor among the recent events)", "not found")
    if not is_teachable(event) or (expect_rule is not None and event.get("rule") != expect_rule):
        what = f"{event.get('kind')} {event.get('phase') or event.get('status') or ''} of rule {event.get('rule')}"
        no_clip = "" if event.get("clip") else " has no clip and"
        if expect_rule is None:
            raise TeachError(f"event {seq}{no_clip} is no alert onset (nor a suppressed window), but {what}: nothing to "
                             f"teach from it", "bad request")
        raise TeachError(f"event {seq}{no_clip} is no alert onset of rule {expect_rule} (it is {what}): teaching it as "
                         f"{expect_rule}'s false alarm would teach another rule's window", "bad request")
    if expect is not None and (event.get("source"), event.get("rule")) != tuple(expect):
        raise TeachError(f"event {seq} is an alert of {event.get('source')}/{event.get('rule')}, "
                         f"not of {expect[0]}/{expect[1]}", "bad request")
    rule = next((r for r in config.rules if r.id == event["rule"]), None)
    if rule is None:
        raise TeachError(f"rule {event['rule']} is no longer in the config")
    bank_path = not_like_bank(config, rule.id)
    name = embedding_model_for(config, bank_path, rule.id, None)
    embedder = port.embedder(name)
    if embedder is None or getattr(embedder, "device", "cpu") == "remote":
        raise TeachError(f"model {name}, which embeds rule {rule.id}'s windows, is not loaded here")
    cut = event_window(port, event, embedder)
    try:
        embeddings = port.run_inference(lambda: embed(embedder, [cut])).result(timeout=timeout_s)
    except FutureTimeout:
        raise TeachError(f"the inference stage did not embed the window within {timeout_s:g} s: try again", "busy") from None
    label = negative(rule.id) if label_of == "not" else rule.label
    bank, ids = add(bank_path, fingerprint(config, embedder, embeddings.shape[1]), embeddings, label, [cut.source],
                    replacing=event_key(event))
    return {"seq": seq, "rule": rule.id, "label": label, "example": ids[0], "added": len(ids), "bank": str(bank_path),
            "examples": len(bank), "from": cut.source.split(":")[3], "source": cut.source}


def teach_recordings(config: Config, embedder, bank_path: Path, label: str, cuts: list[Cut]) -> dict[str, Any]:
    """Add the windows ``cuts`` (of recordings or a clip) under ``label``."""
    if not cuts:
        raise TeachError("no window passed the gate: nothing to teach (is the sound above gate.threshold_dbfs?)", "bad request")
    embeddings = embed(embedder, cuts)
    bank, ids = add(bank_path, fingerprint(config, embedder, embeddings.shape[1]), embeddings, label, [c.source for c in cuts])
    return {"bank": str(bank_path), "label": label, "added": len(ids), "ids": [ids[0], ids[-1]], "examples": len(bank),
            "model": embedder.model_id}


def add(bank_path: Path, embedder: Embedder, embeddings: np.ndarray, label: str, sources: list[str],
        replacing: str | None = None) -> tuple[Bank, list[int]]:
    """Add examples under the bank's lock (written atomically, the previous version kept).

    ``replacing``: a source prefix (one event's teaching) said once: where the bank holds examples
    from it under ``label`` already, nothing is added and their ids are returned; under another
    label (a changed mind), those are replaced."""
    with _writing(bank_path), locked(bank_path):
        try:
            bank = load(bank_path)
            bank.check(embedder, f"bank {bank_path}")
        except BankError as exc:
            if bank_path.exists():
                raise TeachError(str(exc)) from None
            bank = Bank.empty(embedder)
        if replacing is not None:
            earlier = np.char.startswith(bank.sources.astype(str), replacing)
            if earlier.any() and np.all(bank.labels[earlier].astype(str) == label):
                return bank, bank.ids[earlier].tolist()
            if earlier.any():
                bank = bank.forget(bank.ids[earlier].tolist())
        first = bank.next_id
        try:
            bank = bank.add(embeddings, label, sources)
        except ValueError as exc:
            raise TeachError(str(exc), "bad request") from None
        save(bank, bank_path)
    return bank, list(range(first, bank.next_id))


def forget(bank_path: Path, ids: list[int]) -> Bank:
    with _writing(bank_path), locked(bank_path):
        try:
            bank = load(bank_path).forget(ids)
        except (BankError, KeyError) as exc:
            raise TeachError(str(exc).strip("'\""), "not found") from None
        save(bank, bank_path)
    return bank


@contextlib.contextmanager
def _writing(path: Path) -> Iterator[None]:
    """An OSError while a bank is written (a read-only or full disk, no permission) as a TeachError
    that names the bank and the cause; the bank on disk is as it was (``save`` is atomic)."""
    try:
        yield
    except OSError as exc:
        cause = {errno.ENOSPC: "the disk is full", errno.EROFS: "the file system is read-only",
                 errno.EACCES: "permission denied", errno.EDQUOT: "the disk quota is used up"}.get(exc.errno)
        raise TeachError(f"cannot write bank {path}: {cause or exc.strerror or exc}; nothing was taught "
                         f"(the bank is as it was)", "storage") from None


def listing(bank: Bank) -> str:
    counts: dict[str, int] = {}
    for label in bank.labels.tolist():
        counts[label] = counts.get(label, 0) + 1
    lines = [f"{len(bank)} examples of {bank.embedder.model_id} ({bank.embedder.dim}-d, {bank.embedder.window_s:g} s windows "
             f"at {bank.embedder.sample_rate} Hz): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    lines += [f"{i:6d}  {label:24s} {added}  {source}"
              for i, label, source, added in zip(bank.ids.tolist(), bank.labels.tolist(), bank.sources.tolist(), bank.added.tolist())]
    return "\n".join(lines)

