"""Capture-node runs for the remote-inference tests: in-process daemons on file sources whose
models record every score they hand out, and the comparison of a local run with a remote one."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from tests.conftest import free_port
from tests.test_e2e import read_log
from tests.tiny_models import TRAIN_LABELS

ATOL = 1e-6


def write_node(tmp_path: Path, name: str, clap: Path, url: str | None, files: list[str], remote: list[str] | None = None,
               emotion: Path | None = None, batch_max: int = 4, timeout_s: float = 20.0, extra: str = "") -> Path:
    """A capture node's config in tmp_path/name: file sources, CLAP (and an emotion model gated by
    it), two rules; with ``url``, the ``remote`` models are scored there."""
    folder = tmp_path / name
    folder.mkdir(exist_ok=True)
    sources = "\n".join(f"  - {{id: rec{i}, file: {(tmp_path / f).resolve()}}}" for i, f in enumerate(files))
    emotion_entry = "" if emotion is None else (
        f"  mood: {{kind: emotion, model: {emotion}, dtype: float32, batch_max: {batch_max}, batch_wait_ms: 10,"
        f" gated_by: {{model: clap, labels: [tone], threshold: 0.3}}}}\n")
    inference = "" if url is None else f"inference: {{url: '{url}', models: [{', '.join(remote or [])}], timeout_s: {timeout_s}}}\n"
    path = folder / "monitord.yaml"
    path.write_text(f"""
sources:
{sources}
gate: {{mode: energy, threshold_dbfs: -45}}
window: {{seconds: 2.0, hop_s: 0.5}}
models:
  clap: {{kind: clap, model: {clap}, labels: [{", ".join(TRAIN_LABELS)}], dtype: float32, batch_max: {batch_max}, batch_wait_ms: 10}}
{emotion_entry}rules:
  - {{id: tone, model: clap, label: tone, threshold: 0.6, release: 0.4}}
  - {{id: noise, model: clap, label: noise, threshold: 0.6, release: 0.4, min_windows: 2, of_windows: 3}}
publish: {{endpoint: "tcp://127.0.0.1:{free_port()}", event_log: events.jsonl}}
{inference}{extra}""")
    return path


class Recorder:
    """A model that keeps every score it hands out (and otherwise is the model it wraps)."""

    def __init__(self, model):
        self._model = model
        self.scored: list = []
        self.busy = threading.Event()
        """Set while a score() call is in progress (remote models: several may be, on their own threads)."""
        self._calls = 0
        self._lock = threading.Lock()

    def __getattr__(self, name: str):
        return getattr(self._model, name)

    def score(self, windows, upstream=None):
        with self._lock:
            self._calls += 1
            self.busy.set()
        try:
            out = self._model.score(windows, upstream)
        finally:
            with self._lock:
                self._calls -= 1
                if not self._calls:
                    self.busy.clear()
        with self._lock:
            self.scored.extend(out)
        return out


@dataclass
class NodeRun:
    events: list[dict]
    models: dict[str, Recorder]
    scores: dict[tuple[str, str, int], object] = field(default_factory=dict)
    """(model, source, start_index) -> Scores."""
    duplicates: list[tuple[str, str, int]] = field(default_factory=list)
    windows_passed: int = 0


def run_node(config_path: Path, on_models=None) -> NodeRun:
    """`monitord run --until-done`, in this process; ``on_models(models)`` sees the recording models first."""
    from monitord.config import load_config
    from monitord.daemon import Daemon
    from monitord.inference.build import load_models

    config = load_config(config_path)
    models = {name: Recorder(m) for name, m in load_models(config).items()}
    if on_models is not None:
        on_models(models)
    daemon = Daemon(config, models)
    daemon.start()
    try:
        daemon.wait(threading.Event(), until_done=True)
    finally:
        daemon.stop()
    run = NodeRun(read_log(config_path.parent / "events.jsonl"), models, windows_passed=daemon.inference.stats.windows)
    for recorder in models.values():
        for s in recorder.scored:
            key = (s.model, s.window.source, s.window.start_index)
            if key in run.scores:
                run.duplicates.append(key)
            run.scores[key] = s
    return run


def _alerts(events: list[dict]) -> list[dict]:
    keys = ("rule", "phase", "source", "label", "model", "stream_start", "stream_end")
    return [{k: e.get(k) for k in keys} | {"score": e["score"], "scores": e.get("scores")} for e in events if e["kind"] == "alert"]


def compare_runs(local: NodeRun, remote: NodeRun, atol: float = ATOL) -> None:
    """Every window scored once in each, the same windows, scores within atol, the same alerts."""
    assert not local.duplicates and not remote.duplicates, f"scored twice: {remote.duplicates or local.duplicates}"
    assert set(remote.scores) == set(local.scores), f"missing {set(local.scores) - set(remote.scores)}, extra {set(remote.scores) - set(local.scores)}"
    assert local.scores, "nothing was scored"
    for key, ours in local.scores.items():
        theirs = remote.scores[key]
        assert list(theirs.probabilities) == list(ours.probabilities)
        worst = max(abs(theirs.probabilities[k] - p) for k, p in ours.probabilities.items())
        assert worst <= atol, f"{key}: probabilities differ by {worst}"
        if ours.embedding is not None:
            assert theirs.embedding is not None and theirs.embedding.dtype == ours.embedding.dtype
            assert np.abs(theirs.embedding - ours.embedding).max() <= atol, key
    a, b = _alerts(local.events), _alerts(remote.events)
    strip = lambda rows: [{k: v for k, v in r.items() if k not in ("score", "scores")} for r in rows]  # noqa: E731
    assert strip(a) == strip(b)
    for x, y in zip(a, b):
        assert abs(x["score"] - y["score"]) <= atol
        if x["scores"] is None or y["scores"] is None:  # an offset on a window no model scored
            assert x["scores"] is y["scores"] is None
            continue
        assert x["scores"].keys() == y["scores"].keys() and all(abs(x["scores"][k] - y["scores"][k]) <= atol for k in x["scores"])
