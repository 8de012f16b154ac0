"""Emotion curves of classified files, and a comparison across recordings.

``monitord classify A.wav B.wav -c CONFIG --timeline DIR`` writes, for frame-level models
(``granularity: frame``), ``DIR/<stem>/<model>.frames.csv`` (one row per 20 ms frame, merged from
the overlapping windows: see ``monitord.alerts.frames``) and ``<model>.heatmap.png``; and, for every
emotion model, one row per file in ``DIR/summary.csv`` and one heat map per file in
``DIR/summary.png`` on a shared time scale. A window-level model's curve is its window scores at
the window centres.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from monitord.alerts.frames import Curve, merge_windows, runs_at_or_above

if TYPE_CHECKING:
    from monitord.tools.classify import WindowResult

PEAK_THRESHOLD = 0.7
PEAK_MIN_S = 0.2
KEY_MOMENTS = 3
MOMENT_SPACING_S = 1.0
"""Key moments are the strongest scores of an emotion at least this far apart from each other."""
NOT_KEY = ("neutral", "other", "unknown")
"""Labels whose peaks are not key moments."""


@dataclass(frozen=True, eq=False)
class FileCurve:
    """One model's curve over one file, with what the summary needs besides."""

    file: str
    model: str
    granularity: str
    """frame or window."""
    labels: tuple[str, ...]
    curve: Curve
    duration_s: float
    windows: int
    scored: int


def frame_curve(results: Sequence[WindowResult], model: str) -> Curve | None:
    """The merged frames of a frame-level model, or None for a window-level one."""
    scored = [(r.window.stream_start, r.window.stream_end, r.frames[model]) for r in results if model in r.frames]
    return merge_windows(scored) if scored else None


def window_curve(results: Sequence[WindowResult], model: str, labels: Sequence[str], hop_s: float) -> Curve:
    """A window-level model's scores at its scored windows' centres."""
    scored = [r for r in results if model in r.scores]
    times = np.array([(r.window.stream_start + r.window.stream_end) / 2 for r in scored], dtype=np.float64)
    values = np.array([[r.scores[model][label] for label in labels] for r in scored], dtype=np.float32)
    return Curve(hop_s, times, values.reshape(len(scored), len(labels)))


def file_curve(path: Path, results: Sequence[WindowResult], model: str, duration_s: float, hop_s: float) -> FileCurve:
    scored = [r for r in results if model in r.scores]
    labels = tuple(scored[0].scores[model]) if scored else ()
    curve = frame_curve(results, model)
    granularity = "frame" if curve is not None else "window"
    if curve is None:
        curve = window_curve(results, model, labels, hop_s)
    return FileCurve(path.name, model, granularity, labels, curve, duration_s, len(results), len(scored))


# --- one recording -----------------------------------------------------------------------------


def write_frames_csv(path: Path, curve: Curve, labels: Sequence[str]) -> None:
    """One row per frame: its stream time (centre) and one column per label."""
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["time", *labels])
        for t, row in zip(curve.times, curve.values):
            writer.writerow([f"{t:.4f}", *(f"{v:.6f}" for v in row)])


def frames_json(curve: Curve, labels: Sequence[str]) -> dict[str, Any]:
    return {
        "hop_s": curve.hop_s,
        "labels": list(labels),
        "times": [round(float(t), 4) for t in curve.times],
        "values": [[round(float(v), 6) for v in row] for row in curve.values],
    }


def write_frame_files(folder: Path, title: str, model: str, results: Sequence[WindowResult]) -> dict[str, Any] | None:
    """``<model>.frames.csv`` and ``<model>.heatmap.png`` for a frame-level model; its frames for
    result.json. None (nothing written) for a window-level model."""
    curve = frame_curve(results, model)
    if curve is None:
        return None
    labels = next(tuple(r.scores[model]) for r in results if model in r.frames)
    write_frames_csv(folder / f"{model}.frames.csv", curve, labels)
    duration = max(r.window.stream_end for r in results)
    plot_heatmaps(folder / f"{model}.heatmap.png", [(f"{title} - {model} (frames)", curve, duration)], labels)
    return frames_json(curve, labels)


# --- the comparison ----------------------------------------------------------------------------


def entropy_bits(p: np.ndarray) -> float:
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, None)
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p[p > 0] / total
    return float(-(p * np.log2(p)).sum()) + 0.0


def key_moments(curve: Curve, labels: Sequence[str], count: int = KEY_MOMENTS,
                spacing_s: float = MOMENT_SPACING_S) -> list[dict[str, Any]]:
    """The strongest scores of the emotions other than neutral/other/unknown, at least
    ``spacing_s`` apart: the highest first."""
    columns = [j for j, label in enumerate(labels) if label not in NOT_KEY]
    if not len(curve) or not columns:
        return []
    values = curve.values[:, columns].astype(np.float64).copy()
    out = []
    for _ in range(count):
        if not np.isfinite(values).any():
            break
        i, j = np.unravel_index(int(np.nanargmax(values)), values.shape)
        t = float(curve.times[i])
        out.append({"time": round(t, 4), "emotion": labels[columns[j]], "score": round(float(values[i, j]), 6)})
        values[np.abs(curve.times - t) < spacing_s] = np.nan
    return out


def summarise_curve(fc: FileCurve, peak_threshold: float = PEAK_THRESHOLD, peak_min_s: float = PEAK_MIN_S) -> dict[str, Any]:
    """One file's emotion profile from one model.

    - speech_share: windows the model scored (its gate passed: a speech gate for emotion models) / all;
    - per emotion: mean score over the curve, share of the curve where it is the top one
      (dominant_share), volatility (standard deviation of the curve), and peaks (stretches at or
      above ``peak_threshold`` lasting at least ``peak_min_s``, a point counting one hop);
    - entropy_bits: Shannon entropy of the mean scores (how spread the recording's emotions are);
    - key_moments: the three strongest non-neutral scores, 1 s apart at least.
    """
    curve, labels = fc.curve, fc.labels
    row: dict[str, Any] = {
        "file": fc.file, "model": fc.model, "granularity": fc.granularity, "duration_s": round(fc.duration_s, 3),
        "windows": fc.windows, "scored_windows": fc.scored,
        "speech_share": round(fc.scored / fc.windows, 4) if fc.windows else 0.0,
        "points": len(curve), "hop_s": curve.hop_s,
    }
    emotions: dict[str, dict[str, Any]] = {}
    if len(curve):
        values = curve.values.astype(np.float64)
        top = values.argmax(axis=1)
        mean = values.mean(axis=0)
        min_points = max(1, math.ceil(peak_min_s / curve.hop_s - 1e-9))
        for j, label in enumerate(labels):
            runs = runs_at_or_above(curve.times, values[:, j], peak_threshold, curve.hop_s)
            emotions[label] = {
                "mean": round(float(mean[j]), 6),
                "dominant_share": round(float((top == j).mean()), 4),
                "volatility": round(float(values[:, j].std()), 6),
                "peaks": sum(1 for a, b in runs if b - a >= min_points),
            }
        row["entropy_bits"] = round(entropy_bits(mean), 4)
    else:
        for label in labels:
            emotions[label] = {"mean": None, "dominant_share": None, "volatility": None, "peaks": 0}
        row["entropy_bits"] = None
    row["neutral_share"] = emotions.get("neutral", {}).get("dominant_share")
    row["emotions"] = emotions
    row["key_moments"] = key_moments(curve, labels)
    row["peak_threshold"], row["peak_min_s"] = peak_threshold, peak_min_s
    return row


SCALARS = ("file", "model", "granularity", "duration_s", "windows", "scored_windows", "speech_share", "points", "hop_s",
           "neutral_share", "entropy_bits")
STATS = ("mean", "dominant_share", "volatility", "peaks")


def flatten(row: dict[str, Any], labels: Sequence[str]) -> dict[str, Any]:
    """A summary row as summary.csv's columns."""
    flat = {key: row[key] for key in SCALARS}
    for stat in STATS:
        for label in labels:
            flat[f"{stat}_{label}"] = row["emotions"].get(label, {}).get(stat)
    for k in range(KEY_MOMENTS):
        moment = row["key_moments"][k] if k < len(row["key_moments"]) else {}
        for field in ("time", "emotion", "score"):
            flat[f"moment{k + 1}_{field}"] = moment.get(field)
    return flat


def write_summary(out_dir: Path, curves: Sequence[FileCurve], rows: Sequence[dict[str, Any]]) -> tuple[Path, Path]:
    """``summary.csv`` (one row per file and model) and ``summary.png`` (a heat map per row, one time scale)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    labels = next((fc.labels for fc in curves if fc.labels), ())
    flat = [flatten(row, labels) for row in rows]
    csv_path = out_dir / "summary.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(flatten(rows[0], labels)) if rows else list(SCALARS))
        writer.writeheader()
        for r in flat:
            writer.writerow({k: "" if v is None else v for k, v in r.items()})
    png_path = out_dir / "summary.png"
    plot_heatmaps(png_path, [(f"{fc.file} - {fc.model} ({fc.granularity})", fc.curve, fc.duration_s) for fc in curves], labels)
    return csv_path, png_path


def _grid(curve: Curve, n_labels: int, duration_s: float) -> np.ndarray:
    """The curve on a regular time grid (one column per hop from 0): each column takes the point
    nearest its centre if one is within a hop, else NaN (nothing scored there)."""
    hop = curve.hop_s or 1.0
    columns = max(1, math.ceil(duration_s / hop))
    grid = np.full((n_labels, columns), np.nan, dtype=np.float32)
    if len(curve):
        centres = (np.arange(columns) + 0.5) * hop
        right = np.clip(np.searchsorted(curve.times, centres), 1, len(curve) - 1) if len(curve) > 1 else np.zeros(columns, int)
        left = np.maximum(right - 1, 0)
        nearest = np.where(np.abs(curve.times[left] - centres) <= np.abs(curve.times[right] - centres), left, right)
        close = np.abs(curve.times[nearest] - centres) <= hop
        grid[:, close] = curve.values[nearest[close]].T
    return grid


def plot_heatmaps(path: Path, rows: Sequence[tuple[str, Curve, float]], labels: Sequence[str]) -> None:
    """One heat map (labels x time) per (title, curve, duration) row, all on one time axis; unscored
    stretches are grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = max(1, len(rows))
    height = 1.0 + 2.2 * n
    fig, axes = plt.subplots(n, 1, figsize=(12, height), dpi=100, sharex=True, squeeze=False)
    fig.subplots_adjust(left=0.08, right=0.9, top=1 - 0.35 / height, bottom=0.6 / height, hspace=0.5)  # room for the axis label
    cmap = matplotlib.colormaps["magma"].with_extremes(bad="#d9d9d9")
    longest = max([d for _, _, d in rows] or [1.0])
    image = None
    for ax, (title, curve, duration) in zip(axes[:, 0], rows):
        grid = _grid(curve, len(labels), duration)
        hop = curve.hop_s or 1.0
        image = ax.imshow(np.ma.masked_invalid(grid), aspect="auto", origin="lower", cmap=cmap, vmin=0.0, vmax=1.0,
                          interpolation="nearest", extent=(0.0, grid.shape[1] * hop, -0.5, len(labels) - 0.5))
        ax.set_yticks(range(len(labels)), labels, fontsize=7)
        ax.set_title(title, fontsize=9, loc="left")
        ax.set_xlim(0.0, longest)
    for ax in axes[len(rows):, 0]:
        ax.set_axis_off()
    axes[-1, 0].set_xlabel("stream time (s)")
    if image is not None:
        fig.colorbar(image, ax=axes[:, 0].tolist(), fraction=0.025, pad=0.01, label="score")
    fig.savefig(path)
    plt.close(fig)
