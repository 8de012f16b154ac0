"""``monitord enroll`` (anomaly banks) and ``monitord eval`` (the evaluation harness).

eval runs a configured model over a labelled set through the daemon's own window path
(``classify_file``: gate, resampling, batching, cascades) and reports:
  - classifiers: per-label precision, recall and F1 and a confusion matrix, with a file's
    prediction being the label (of those in the data set) with the highest score in any window;
    detection latency from the true onset (when the CSV gives ``onset``) to the window whose
    end raises the rule's onset; false alarms per hour of audio labelled ``background``;
  - anomaly models: AUC and pAUC (FPR <= 0.1, DCASE's anomalous-sound metric) of each file's
    highest window score, ``normal`` vs ``abnormal``.
A file none of whose windows the model scored (all gated out) has no prediction and no score: it is
listed in ``unscored_files``, left out of the confusion matrix and of AUC/pAUC, and counted as a
miss: in its label's recall (and in accuracy) for classifiers, in ``abnormal_unscored`` for anomaly
models (a machine fault the gate hides is never alerted on).
With random-weight test models the figures say nothing about accuracy: the harness is what gives
real figures the day real weights are present.
"""

from __future__ import annotations

import csv
import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from monitord.alerts.engine import AlertEngine, Transition
from monitord.audio import read_mono
from monitord.config import Config, RuleConfig, SourceConfig
from monitord.inference.models.anomaly import build_bank, roc_auc
from monitord.windowing.queue import WindowQueue
from monitord.tools.classify import WindowResult, audio_files, classify_file
from monitord.types import StreamEnd, Window
from monitord.windowing.stage import WindowingStage
from monitord.windowing.tiling import ModelInput, WindowCutter, window_starts

log = logging.getLogger(__name__)

BACKGROUND = "background"


@dataclass(frozen=True)
class Example:
    path: Path
    label: str
    onset_s: float | None = None


def load_dataset(where: Path) -> list[Example]:
    """A folder with one subfolder per label, or a CSV with columns file, label[, onset]."""
    if where.is_dir():
        return [Example(f, sub.name) for sub in sorted(p for p in where.iterdir() if p.is_dir()) for f in audio_files([sub])]
    with where.open(newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"file", "label"} <= set(rows[0]):
        raise ValueError(f"{where}: expected a CSV with columns file,label[,onset]")
    return [Example((where.parent / r["file"]).resolve(), r["label"], float(r["onset"]) if r.get("onset") else None) for r in rows]


def evaluate(config: Config, models: dict, model_name: str, examples: list[Example]) -> dict[str, Any]:
    model = models[model_name]
    per_file = []
    for example in examples:
        rows = list(classify_file(example.path, config, models))
        per_file.append((example, rows))
    if getattr(model, "labels", ()) == ("anomaly",):
        return _anomaly_report(model_name, per_file)
    from monitord.teaching.references import for_rules, kept_folder

    return _classifier_report(config, model_name, model, per_file, for_rules(config, models.get, kept_folder()))


def _anomaly_report(model_name: str, per_file) -> dict[str, Any]:
    labels, scores, file_scores, unscored = [], [], [], []
    for example, rows in per_file:
        if example.label not in ("normal", "abnormal"):
            raise ValueError(f"{example.path}: anomaly data sets label files normal or abnormal, not {example.label!r}")
        window_scores = [r.scores[model_name]["anomaly"] for r in rows if model_name in r.scores]
        score = max(window_scores) if window_scores else None
        file_scores.append({"file": str(example.path), "label": example.label, "score": score})
        if score is None:
            unscored.append({"file": str(example.path), "label": example.label})
            continue
        labels.append(example.label == "abnormal")
        scores.append(score)
    if not any(e.label == "abnormal" for e, _ in per_file) or all(e.label == "abnormal" for e, _ in per_file):
        raise ValueError("AUC needs both normal and abnormal examples")
    truth, best = np.array(labels, dtype=bool), np.array(scores)
    rankable = truth.any() and not truth.all()  # else too many files went unscored to rank anything
    return {
        "model": model_name, "kind": "anomaly", "files": len(per_file),
        "abnormal": sum(e.label == "abnormal" for e, _ in per_file), "scored_files": len(labels),
        "auc": roc_auc(truth, best) if rankable else None, "pauc": roc_auc(truth, best, max_fpr=0.1) if rankable else None,
        "unscored_files": unscored, "abnormal_unscored": sum(u["label"] == "abnormal" for u in unscored),
        "file_scores": file_scores,
    }


def _classifier_report(config: Config, model_name: str, model, per_file, references=None) -> dict[str, Any]:
    targets = sorted({e.label for e, _ in per_file if e.label != BACKGROUND})
    unknown = [t for t in targets if t not in model.labels]
    if unknown:
        raise ValueError(f"labels {unknown} of the data set are not labels of model {model_name!r}")
    index = {label: i for i, label in enumerate(targets)}
    confusion = np.zeros((len(targets), len(targets)), dtype=int)
    latencies: dict[str, list[float]] = {}
    background_seconds, false_alarms = 0.0, 0
    unscored: list[Example] = []
    rules = tuple(r for r in config.rules if r.model == model_name)
    for example, rows in per_file:
        scored = [r for r in rows if model_name in r.scores]
        onsets = _onsets(rules, model_name, rows)
        if example.label == BACKGROUND:
            background_seconds += rows[-1].window.stream_end if rows else 0.0
            false_alarms += len(onsets)
            continue
        if not scored:
            unscored.append(example)  # no window reached the model: no prediction, a miss
            continue
        best = {label: max((r.scores[model_name][label] for r in scored), default=0.0) for label in targets}
        confusion[index[example.label], index[max(best, key=best.get)]] += 1
        if example.onset_s is not None:
            hits = [t for rule, t in onsets if rule.label == example.label and t >= example.onset_s]
            if hits:
                latencies.setdefault(example.label, []).append(hits[0] - example.onset_s)
    missed = {label: sum(e.label == label for e in unscored) for label in targets}
    per_label = {}
    for label, i in index.items():
        tp, predicted, actual = confusion[i, i], confusion[:, i].sum(), confusion[i, :].sum() + missed[label]
        precision = tp / predicted if predicted else 0.0
        recall = tp / actual if actual else 0.0
        f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
        entry = {"precision": float(precision), "recall": float(recall), "f1": float(f1), "files": int(actual),
                 "unscored": missed[label]}
        if label in latencies:
            entry["detection_latency_s"] = {"mean": float(np.mean(latencies[label])), "median": float(np.median(latencies[label])),
                                            "detected": len(latencies[label])}
        per_label[label] = entry
    return {
        "model": model_name, "kind": "classifier", "labels": targets, "per_label": per_label,
        "accuracy": float(np.trace(confusion) / (confusion.sum() + len(unscored))) if confusion.sum() + len(unscored) else 0.0,
        "confusion": confusion.tolist(),
        "unscored_files": [str(e.path) for e in unscored],
        "false_alarms_per_hour": (false_alarms / (background_seconds / 3600.0)) if background_seconds else None,
        "background_seconds": background_seconds,
        "rules": _rules_report(rules, model_name, per_file, references),
    }


def _rules_report(rules, model_name: str, per_file, references=None) -> dict[str, Any]:
    """Per rule: the files of its label on which it raised an onset, and its false alarms per hour on
    background files, naming the files (and times) that raised them, to teach from; for a rule with
    ``not_like``, also both without its bank (taught false alarms), and whether the bank exists."""
    from monitord.teaching.bank import BankError, load

    report: dict[str, Any] = {}
    for rule in rules:
        variants = {"with_bank": True, "without_bank": False} if rule.not_like is not None else {"as_is": False}
        entry: dict[str, Any] = {"label": rule.label}
        if rule.not_like is not None:
            try:
                bank = load(rule.not_like.bank)
                entry["bank"] = {"path": rule.not_like.bank, "taught_false_alarms": int(bank.where(f"not:{rule.id}").sum())}
            except BankError as exc:
                entry["bank"] = {"path": rule.not_like.bank, "taught_false_alarms": 0, "note": str(exc)}
                log.warning("rule %s: %s: with_bank is the same as without_bank", rule.id, exc)
        for name, not_like in variants.items():
            detected = files = false_alarms = 0
            seconds = 0.0
            raised: list[dict[str, Any]] = []
            for example, rows in per_file:
                onsets = _onsets((rule,), model_name, rows, not_like, references)
                if example.label == BACKGROUND:
                    seconds += rows[-1].window.stream_end if rows else 0.0
                    false_alarms += len(onsets)
                    if onsets:
                        raised.append({"file": str(example.path), "at_s": [round(t, 3) for _, t in onsets]})
                elif example.label == rule.label:
                    files += 1
                    detected += bool(onsets)
            figures = {"events_detected": detected, "event_files": files,
                       "false_alarms_per_hour": false_alarms / (seconds / 3600.0) if seconds else None,
                       "false_alarm_files": raised}
            entry.update(figures if name == "as_is" else {name: figures})
        report[rule.id] = entry
    return report


class RuleRun:
    """The daemon's alert engine over one file's windows, in order: ``step(row)`` gives what the
    window raises (onsets, offsets), ``end()`` the offsets the end of the file gives. With
    ``not_like``, a window like one of a rule's taught false alarms (its ``not_like`` bank) does not
    count for it, as in the daemon; without, the banks are left out."""

    def __init__(self, rules: Sequence[RuleConfig], not_like: bool, references=None) -> None:
        from monitord.teaching.suppress import NotLike

        self.engine = AlertEngine(tuple(rules))
        self.not_like = NotLike(references) if not_like else None

    def step(self, row: WindowResult) -> list[Transition]:
        fired = []
        for outcome in row.scored.outcomes:
            suppressed = self.not_like.matches(self.engine.rules, outcome.scores, row.window.source) \
                if self.not_like is not None else ()
            fired += self.engine.observe(row.window.source, outcome, row.window.stream_end, suppressed)
        return fired

    def end(self) -> list[Transition]:
        return self.engine.end(None, "end of stream")


class RuleOutcomes:
    """``monitord classify --rules``: per window, what the config's rules raise under the daemon's
    alert engine (``raised``) and, where a rule has a ``not_like`` bank, what they would raise
    without the banks (``without_not_like``): the windows a taught false alarm keeps quiet."""

    def __init__(self, rules: Sequence[RuleConfig], references=None) -> None:
        self.daemon = RuleRun(rules, not_like=True, references=references)
        self.bare = RuleRun(rules, not_like=False) if any(r.not_like is not None for r in rules) else None

    def step(self, row: WindowResult) -> dict[str, list[dict[str, Any]]]:
        return self._both(self.daemon.step(row), self.bare.step(row) if self.bare is not None else None)

    def end(self) -> dict[str, list[dict[str, Any]]]:
        return self._both(self.daemon.end(), self.bare.end() if self.bare is not None else None)

    @staticmethod
    def _both(raised: list[Transition], bare: list[Transition] | None) -> dict[str, list[dict[str, Any]]]:
        def listed(transitions: list[Transition]) -> list[dict[str, Any]]:
            return [{"rule": t.rule.id, "phase": t.phase, "score": round(t.score, 6)} for t in transitions]

        return {"raised": listed(raised)} | ({"without_not_like": listed(bare)} if bare is not None else {})

    @staticmethod
    def text(outcomes: dict[str, list[dict[str, Any]]]) -> str:
        """`` | onset alarm (0.912)``, and what the window would raise without not_like where that differs; "" for nothing."""
        def said(listed: list[dict[str, Any]]) -> str:
            return ", ".join(f"{t['phase']} {t['rule']} ({t['score']:.3f})" for t in listed)

        parts = [said(outcomes["raised"])] if outcomes["raised"] else []
        bare = outcomes.get("without_not_like")
        if bare is not None and bare != outcomes["raised"]:
            parts.append(f"without not_like: {said(bare) or 'nothing'}")
        return "  | " + "; ".join(parts) if parts else ""


def _onsets(rules, model_name: str, rows, not_like: bool = False, references=None) -> list[tuple[Any, float]]:
    """(rule, stream time) of each onset the alert engine raises over one file's windows (``rules``
    are ``model_name``'s); with ``not_like``, windows like a rule's taught false alarms (and nearer to
    them than to its references) do not count for it."""
    run = RuleRun(rules, not_like, references)
    return [(f.rule, r.window.stream_end) for r in rows for f in run.step(r) if f.phase == "onset"]


def plot_confusion(report: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels, matrix = report["labels"], np.array(report["confusion"])
    fig, ax = plt.subplots(figsize=(1.2 * len(labels) + 3, 1.2 * len(labels) + 2.5), dpi=100)
    ax.imshow(matrix, cmap="Blues")
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    for i in range(len(labels)):
        for j in range(len(labels)):
            ax.text(j, i, str(matrix[i, j]), ha="center", va="center", color="black")
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(f"{report['model']}: accuracy {report['accuracy']:.2f}")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def enrol_from_files(config: Config, embedder, files: list[Path]) -> list[Window]:
    windows = []
    for path in files:
        samples, rate = read_mono(path)
        cutter = WindowCutter(str(path), rate, config.window, config.gate,  # the source names the bank's recording
                              {embedder.name: ModelInput(embedder.sample_rate)})
        for start in window_starts(len(samples), cutter.length, cutter.hop):
            window = cutter.cut(samples[start : start + cutter.length], start, 0.0, 0.0)
            if window.passed:
                windows.append(window)
    return windows


def enrol_from_source(config: Config, embedder, source: SourceConfig, seconds: float) -> list[Window]:
    """Windows of a live source (or file source) until ``seconds`` of sound have been captured."""
    from monitord.sources import open_source

    src = open_source(source, config.pipeline.ring_seconds, lambda *a: None)
    cutter = WindowCutter(src.id, src.sample_rate, config.window, config.gate_for(source),
                          {embedder.name: ModelInput(embedder.sample_rate)})
    queue = WindowQueue(max_windows=1 << 20)
    windowing = WindowingStage(src.ring, cutter, queue, live=False)
    windowing.start()
    src.start()
    target = int(seconds * src.sample_rate)
    while src.ring.written < target and not windowing.finished:
        time.sleep(0.05)
    src.stop()
    windowing.join(5)
    windowing.stop()
    items = queue.get_batch(1 << 20, 0.0, 0.0)
    return [w for w in items if not isinstance(w, StreamEnd) and w.passed]


def embed(embedder, windows: list[Window]) -> np.ndarray:
    rows = []
    for i in range(0, len(windows), embedder.batch_max):
        rows.append(embedder.audio_embeddings(windows[i : i + embedder.batch_max]).cpu().numpy())
    return np.concatenate(rows)


def enrol(config: Config, embedder, windows: list[Window], k: int, out: Path) -> dict[str, Any]:
    import os

    if not windows:
        raise ValueError("no window passed the gate: nothing to enrol (is the gate threshold above the machine's level?)")
    rate = embedder.sample_rate
    starts = [round(w.start_index * rate / w.sample_rate) for w in windows]  # at the bank's rate, as its window length
    bank = build_bank(embed(embedder, windows), embedder.model_id, rate, config.window.seconds, config.window.hop_s, k,
                      [w.source for w in windows], starts)
    bank.save(out)
    os.chmod(out, 0o600)
    return {"bank": str(out), "windows": len(windows), "recordings": len(set(bank.recordings)), "k": k,
            "reference_distance": bank.reference, "loo_median": float(np.median(bank.loo)), "model": embedder.model_id}


def write_report(report: dict[str, Any], out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "eval.json").write_text(json.dumps(report, indent=1))
    if report["kind"] == "classifier" and report["labels"]:  # a data set of background alone has no confusion matrix
        plot_confusion(report, out / "confusion.png")
