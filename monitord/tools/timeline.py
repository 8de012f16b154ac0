"""Frame-level view of a file: every model's per-window scores over time, as CSV, JSON and a plot.

``monitord classify FILE... -c CONFIG --timeline DIR`` writes, per file, into ``DIR/<file stem>/``:
  - ``<model>.csv``: one row per window (start, end, gate verdict, one column per label);
  - ``result.json``: the file, its models, every window with its scores and label entropy,
    and a summary per model: the dominant label overall and per segment, entropy over time,
    and key moments (the top label changes, or a label's score peaks);
  - ``<model>.png``: each label's score over time (the top labels for models with many);
  - frame-level models (``granularity: frame``): ``<model>.frames.csv`` (one row per 20 ms frame)
    and ``<model>.heatmap.png``, and the frames in result.json (see ``monitord.tools.summary``);
  - with ``--embeddings``: ``<model>.embeddings.npy`` and ``<model>.windows.csv`` (their times).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from monitord.tools.classify import WindowResult

PLOT_LABELS = 8
PEAK_MIN = 0.5
PEAK_PROMINENCE = 0.2


def entropy(probabilities: dict[str, float]) -> float:
    """Shannon entropy (bits) of the scores, normalised to sum to 1 (YAMNet's do not)."""
    values = np.array([max(p, 0.0) for p in probabilities.values()], dtype=np.float64)
    total = values.sum()
    if total <= 0:
        return 0.0
    p = values[values > 0] / total
    return float(-(p * np.log2(p)).sum())


def summarise(times: list[tuple[float, float]], scores: list[dict[str, float]], segment_s: float) -> dict[str, Any]:
    """Dominant labels, entropy and key moments of one model's scored windows."""
    if not scores:
        return {"windows": 0}
    labels = list(scores[0])
    matrix = np.array([[s[label] for label in labels] for s in scores])
    mean = matrix.mean(axis=0)
    segments = []
    end = times[-1][1]
    for k in range(max(1, math.ceil(end / segment_s))):
        lo, hi = k * segment_s, (k + 1) * segment_s
        inside = [i for i, (a, b) in enumerate(times) if a < hi and b > lo]
        if inside:
            seg_mean = matrix[inside].mean(axis=0)
            segments.append({"start": lo, "end": min(hi, end), "label": labels[int(seg_mean.argmax())],
                             "score": round(float(seg_mean.max()), 6), "windows": len(inside)})
    entropies = [entropy(s) for s in scores]
    moments = []
    top = matrix.argmax(axis=1)
    for i in range(len(scores)):
        if i and top[i] != top[i - 1]:
            moments.append({"time": times[i][0], "kind": "change", "label": labels[top[i]], "from": labels[top[i - 1]],
                            "score": round(float(matrix[i, top[i]]), 6)})
        for j, label in enumerate(labels):
            value = matrix[i, j]
            left = matrix[i - 1, j] if i else value  # no peaks at the edges: a plateau is not a peak
            right = matrix[i + 1, j] if i + 1 < len(scores) else value
            if value >= PEAK_MIN and value > left and value >= right and value - min(left, right) >= PEAK_PROMINENCE:
                moments.append({"time": times[i][0], "kind": "peak", "label": label, "score": round(float(value), 6)})
    return {
        "windows": len(scores),
        "dominant": {"label": labels[int(mean.argmax())], "mean_score": round(float(mean.max()), 6)},
        "segments": segments,
        "entropy": {"mean": round(float(np.mean(entropies)), 4), "min": round(float(np.min(entropies)), 4),
                    "max": round(float(np.max(entropies)), 4)},
        "key_moments": moments,
    }


def write_timeline(path: Path, results: Sequence[WindowResult], models: Sequence[str], out_dir: Path,
                   embeddings: bool = False, segment_s: float = 10.0) -> Path:
    """Write the timeline files for one audio file; returns its folder."""
    folder = out_dir / path.stem
    folder.mkdir(parents=True, exist_ok=True)
    windows_json = []
    for r in results:
        entry = r.to_dict()
        entry["entropy"] = {m: round(entropy(p), 4) for m, p in r.scores.items()}
        windows_json.append(entry)
    summary = {}
    frames = {}
    for model in models:
        scored = [r for r in results if model in r.scores]
        times = [(r.window.stream_start, r.window.stream_end) for r in scored]
        summary[model] = summarise(times, [r.scores[model] for r in scored], segment_s)
        labels = list(scored[0].scores[model]) if scored else []
        _write_csv(folder / f"{model}.csv", results, model, labels)
        _plot(folder / f"{model}.png", path.name, model, results, labels)
        if any(model in r.frames for r in results):
            from monitord.tools.summary import write_frame_files

            frames[model] = write_frame_files(folder, path.name, model, results)
        if embeddings and scored and all(model in r.embeddings for r in scored):
            np.save(folder / f"{model}.embeddings.npy", np.stack([r.embeddings[model] for r in scored]))
            with (folder / f"{model}.windows.csv").open("w", newline="") as f:
                writer = csv.writer(f)
                writer.writerow(["row", "stream_start", "stream_end"])
                writer.writerows((i, f"{a:.6f}", f"{b:.6f}") for i, (a, b) in enumerate(times))
    result = {"file": str(path), "models": list(models), "windows": windows_json, "summary": summary}
    if frames:
        result["frames"] = frames
    (folder / "result.json").write_text(json.dumps(result, indent=1))
    return folder


def _write_csv(path: Path, results: Sequence[WindowResult], model: str, labels: list[str]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["stream_start", "stream_end", "scored", *labels])
        for r in results:
            probs = r.scores.get(model)
            values = [f"{probs[label]:.6f}" for label in labels] if probs else [""] * len(labels)
            writer.writerow([f"{r.window.stream_start:.6f}", f"{r.window.stream_end:.6f}", int(probs is not None), *values])


def _plot(path: Path, title: str, model: str, results: Sequence[WindowResult], labels: list[str]) -> None:
    """Each label's score at each window centre; windows the model did not score are gaps."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(12, 4.5), dpi=100)
    if labels:
        matrix = np.array([[r.scores[model][label] if model in r.scores else np.nan for label in labels] for r in results])
        shown = np.argsort(-np.nan_to_num(matrix, nan=-1.0).max(axis=0))[:PLOT_LABELS]
        centres = [(r.window.stream_start + r.window.stream_end) / 2 for r in results]
        for j in shown:
            ax.plot(centres, matrix[:, j], marker=".", linewidth=1.2, label=labels[j])
        ax.legend(loc="upper right", fontsize=8, ncols=2)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("stream time (s, window centre)")
    ax.set_ylabel("score")
    ax.set_title(f"{title} - {model}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
