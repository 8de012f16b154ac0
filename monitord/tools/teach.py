"""``monitord teach``: add examples to a bank, list them, forget them.

- ``--label NAME --files ...``: your own sound, every window of it that passes the config's gate;
- ``--not RULE --files ... | --from-clip PATH | --from-event SEQ``: a false alarm of RULE. A clip
  (or the clip of a logged alert event) contributes its alerting window, which starts
  ``clips.pre_s`` into the clip;
- ``--list`` and ``--forget ID...``.

Windows are cut with the config's own windowing and embedded by the model the bank is for: the
``embedding_model`` of the examples model that reads this bank, or the rule's model (its embedder,
for a rule on an examples model), else the config's first yamnet model (then clap). A running
daemon reads the bank again when it changes: no restart.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitord.audio import read_mono
from monitord.config import Config
from monitord.examples.bank import Bank, BankError, Embedder, load, locked, negative, save
from monitord.types import Window
from monitord.windowing.tiling import ModelInput, WindowCutter, window_starts

log = logging.getLogger(__name__)


class TeachError(Exception):
    """Something the user asked for cannot be done; the message says why."""


@dataclass(frozen=True)
class Cut:
    window: Window
    source: str
    """Where it came from, as the bank records it (``file:PATH@START``)."""


def embedding_model_for(config: Config, bank: Path, rule_id: str | None, model: str | None) -> str:
    """The name of the model whose embeddings go into ``bank``."""
    def behind(name: str) -> str:
        m = config.models[name]
        return m.embedding_model if m.kind == "examples" else name

    if model is not None:
        if model not in config.models:
            raise TeachError(f"no model {model!r} in the config")
        chosen = behind(model)
    elif rule_id is not None:
        rule = next((r for r in config.rules if r.id == rule_id), None)
        if rule is None:
            raise TeachError(f"no rule {rule_id!r} in the config (rules: {', '.join(r.id for r in config.rules) or 'none'})")
        chosen = behind(rule.model)
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


def cut_file(config: Config, path: Path, embedder, prefix: str = "file", at_s: float | None = None) -> list[Cut]:
    """The windows of a recording that pass the config's gate (or the one window at ``at_s``)."""
    samples, rate = read_mono(path)
    cutter = WindowCutter(str(path), rate, config.window, config.gate, {embedder.name: ModelInput(embedder.sample_rate)})
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


def clip_of_event(config: Config, seq: int) -> tuple[Path, dict[str, Any]]:
    """The clip of logged event SEQ (an alert onset, or a suppressed window), and the event."""
    from monitord.output.eventlog import EventLog

    if config.publish.event_log is None:
        raise TeachError("the config keeps no event log (publish.event_log)")
    log_ = EventLog(config.publish.event_log, keep=config.publish.event_log_keep)
    lines, _ = log_.read_since(seq - 1, 1)
    if not lines or json.loads(lines[0]).get("seq") != seq:
        raise TeachError(f"no event {seq} in {config.publish.event_log} (or its rotated files)")
    event = json.loads(lines[0])
    clip = event.get("clip")
    if not clip:
        raise TeachError(f"event {seq} has no clip (clips.enabled is off, or it is not an alert onset): "
                         f"teach from a recording with --files")
    if not Path(clip).is_file():
        raise TeachError(f"event {seq}'s clip {clip} is gone (clips retention, or not written yet)")
    return Path(clip), event


def embed(embedder, cuts: list[Cut]) -> np.ndarray:
    rows = []
    for i in range(0, len(cuts), embedder.batch_max):
        for scores in embedder.score([c.window for c in cuts[i : i + embedder.batch_max]]):
            if scores.embedding is None:
                raise TeachError(f"model {embedder.name} gave no embedding")
            rows.append(scores.embedding)
    return np.stack(rows).astype(np.float32)


def add(bank_path: Path, embedder: Embedder, embeddings: np.ndarray, label: str, sources: list[str],
        replacing: str | None = None) -> tuple[Bank, list[int]]:
    """Add examples under the bank's lock (written atomically, the previous version kept).

    ``replacing``: a source prefix (one event's feedback) said once: where the bank holds examples
    from it under ``label`` already, nothing is added and their ids are returned; under another
    label (a changed mind), those are replaced."""
    with locked(bank_path):
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
            raise TeachError(str(exc)) from None
        save(bank, bank_path)
    return bank, list(range(first, bank.next_id))


def forget(bank_path: Path, ids: list[int]) -> Bank:
    with locked(bank_path):
        try:
            bank = load(bank_path).forget(ids)
        except (BankError, KeyError) as exc:
            raise TeachError(str(exc).strip("'\"")) from None
        save(bank, bank_path)
    return bank


def listing(bank: Bank) -> str:
    counts: dict[str, int] = {}
    for label in bank.labels.tolist():
        counts[label] = counts.get(label, 0) + 1
    lines = [f"{len(bank)} examples of {bank.embedder.model_id} ({bank.embedder.dim}-d, {bank.embedder.window_s:g} s windows "
             f"at {bank.embedder.sample_rate} Hz): " + ", ".join(f"{k} {v}" for k, v in sorted(counts.items()))]
    lines += [f"{i:6d}  {label:24s} {added}  {source}"
              for i, label, source, added in zip(bank.ids.tolist(), bank.labels.tolist(), bank.sources.tolist(), bank.added.tolist())]
    return "\n".join(lines)


def teach(config: Config, args) -> dict[str, Any]:
    """What ``monitord teach`` does with parsed arguments; returns a summary (printed as JSON)."""
    from monitord.daemon import load_models
    from monitord.tools.classify import audio_files

    bank_path = Path(args.bank)
    if args.label is not None and args.label.startswith("not:"):
        raise TeachError("teach a false alarm with --not RULE, not --label not:...")
    name = embedding_model_for(config, bank_path, args.not_rule, args.model)
    logged = clip_of_event(config, args.from_event) if args.from_event is not None else None
    if logged is not None:  # checked before any model is loaded, as the dashboard's feedback checks it
        kind_ok = (logged[1].get("kind") == "alert" and logged[1].get("phase") == "onset") or \
            logged[1].get("status") == "suppressed"
        if not kind_ok or logged[1].get("rule") != args.not_rule:
            raise TeachError(f"event {args.from_event} is no alert onset of rule {args.not_rule} (it is "
                             f"{logged[1].get('kind')} {logged[1].get('phase') or logged[1].get('status') or ''} of rule "
                             f"{logged[1].get('rule')}): teaching it as {args.not_rule}'s false alarm would teach another rule's window")
    loaded = load_models(config, only={name})
    if name not in loaded:
        raise loaded.unavailable[name]
    embedder = loaded[name]
    pre_s = config.clips.pre_s
    if logged is not None:
        clip, event = logged
        # the clip starts pre_s before the window, or at the stream's start for an alert within pre_s of it
        at_s = min(pre_s, float(event.get("stream_start") if event.get("stream_start") is not None else pre_s))
        cuts = cut_file(config, clip, embedder, prefix=f"event:{args.from_event}:clip", at_s=at_s)
    elif args.from_clip is not None:
        cuts = cut_file(config, Path(args.from_clip), embedder, prefix="clip", at_s=pre_s)
    else:
        cuts = [c for path in audio_files([Path(f) for f in args.files]) for c in cut_file(config, path, embedder)]
    if not cuts:
        raise TeachError("no window passed the gate: nothing to teach (is the sound above gate.threshold_dbfs?)")
    embeddings = embed(embedder, cuts)
    fingerprint = Embedder(embedder.model_id, embeddings.shape[1], embedder.sample_rate, config.window.seconds)
    label = negative(args.not_rule) if args.not_rule is not None else args.label
    bank, ids = add(bank_path, fingerprint, embeddings, label, [c.source for c in cuts])
    return {"bank": str(bank_path), "label": label, "added": len(ids), "ids": [ids[0], ids[-1]], "examples": len(bank),
            "model": embedder.model_id}
