"""Confusion-matrix figure and the per-epoch report files of a run folder; the search's per-class
ROC curves and its accuracy-vs-latency (Pareto) plot.

With eight imbalanced classes a single score hides which lesions are confused (MEL vs NV, BKL vs
AK, ...), so each run keeps a row-normalised confusion matrix (the diagonal is the per-class
recall whose mean is BMA) next to a per-class table. Figures are drawn with matplotlib's Agg
canvas directly, without touching the global backend, so this works on headless Ray workers.
"""

from __future__ import annotations

import csv
import json
import logging
import math
from pathlib import Path
from typing import Sequence

import numpy as np

from raykd.metrics.classification import per_class_table

__all__ = ["plot_confusion_matrix", "plot_pareto", "plot_roc_curves", "write_report"]

_logger = logging.getLogger(__name__)


def _row_normalise(cm: np.ndarray) -> np.ndarray:
    """Divides each row by its total; rows of absent classes stay 0."""
    totals = cm.sum(axis=1, keepdims=True).astype(np.float64)
    return np.divide(cm.astype(np.float64), totals, out=np.zeros(cm.shape), where=totals > 0)


def plot_confusion_matrix(
    cm: np.ndarray,
    label_names: Sequence[str],
    path: str | Path,
    normalize: bool = True,
    title: str = "",
) -> None:
    """Writes a confusion-matrix heat map as a PNG.

    Args:
        cm: ``(C, C)`` counts, rows = true class, columns = predicted class.
        label_names: the ``C`` class names.
        path: output file (``.png``); parent folders are created.
        normalize: colour and label cells by the row fraction (recall on the diagonal) and show the
            count beneath; otherwise show counts only.
        title: figure title (e.g. ``"val epoch 7 - BMA 0.712"``).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is heavy
    from matplotlib.figure import Figure

    cm = np.asarray(cm)
    names = list(label_names)
    if cm.ndim != 2 or cm.shape != (len(names), len(names)):
        raise ValueError(f"cm must be ({len(names)}, {len(names)}) to match label_names, got {cm.shape}.")
    values = _row_normalise(cm) if normalize else cm.astype(np.float64)
    num = len(names)
    side = max(4.0, 0.7 * num + 2.0)
    fig = Figure(figsize=(side + 1.0, side))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    vmax = 1.0 if normalize else max(float(values.max()), 1.0)
    image = ax.imshow(values, cmap="Blues", vmin=0.0, vmax=vmax)
    bar_label = "fraction of true class" if normalize else "count"
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label=bar_label)
    ax.set_xticks(range(num), labels=names, rotation=45, ha="right")
    ax.set_yticks(range(num), labels=names)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    if title:
        ax.set_title(title)
    font = 9 if num <= 10 else 6
    for i in range(num):
        for j in range(num):
            text = f"{values[i, j]:.2f}\n({int(cm[i, j])})" if normalize else f"{int(cm[i, j])}"
            colour = "white" if values[i, j] > 0.6 * vmax else "black"
            ax.text(j, i, text, ha="center", va="center", color=colour, fontsize=font)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=120)
    _logger.debug("wrote confusion matrix to %s", path)


def _json_safe(value: float) -> float | None:
    """NaN/inf are not JSON; write them as null."""
    return value if math.isfinite(value) else None


def write_report(
    out_dir: str | Path,
    cm: np.ndarray,
    label_names: Sequence[str],
    metrics: dict[str, float] | None = None,
    prefix: str = "val",
    title: str = "",
) -> dict[str, Path]:
    """Writes a run folder's metric files: confusion-matrix PNG, per-class CSV and a JSON summary.

    Files (in ``out_dir``): ``{prefix}_confusion_matrix.png``, ``{prefix}_per_class.csv`` and
    ``{prefix}_metrics.json`` (``metrics``, per-class rows and the raw confusion matrix; NaN
    written as ``null``). Call it on rank 0 only.

    Returns:
        ``{"confusion_matrix": path, "per_class": path, "metrics": path}``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = per_class_table(np.asarray(cm), label_names)
    paths = {
        "confusion_matrix": out_dir / f"{prefix}_confusion_matrix.png",
        "per_class": out_dir / f"{prefix}_per_class.csv",
        "metrics": out_dir / f"{prefix}_metrics.json",
    }
    plot_confusion_matrix(cm, label_names, paths["confusion_matrix"], normalize=True, title=title)
    with paths["per_class"].open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {
        "metrics": {k: _json_safe(float(v)) for k, v in (metrics or {}).items()},
        "per_class": rows,
        "label_names": list(label_names),
        "confusion_matrix": np.asarray(cm).astype(int).tolist(),
    }
    paths["metrics"].write_text(json.dumps(summary, indent=2))
    return paths


def plot_roc_curves(
    probs: np.ndarray,
    targets: np.ndarray,
    label_names: Sequence[str],
    path: str | Path,
    title: str = "",
) -> Path:
    """Writes one-vs-rest ROC curves, one per class, into one PNG (the AUROC of each in the legend).

    A class whose one-vs-rest problem is undefined (no positive or no negative target) has no
    curve and is named in the legend as such, the same classes :func:`compute_from_arrays` leaves
    out of ``auroc_macro``.

    Args:
        probs: ``(N, C)`` probabilities.
        targets: ``(N,)`` integer labels.
        label_names: the ``C`` class names.
        path: output ``.png``; parent folders are created.
        title: figure title.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is heavy
    from matplotlib.figure import Figure
    from sklearn.metrics import roc_auc_score, roc_curve

    p = np.asarray(probs, dtype=np.float64)
    t = np.asarray(targets).astype(np.int64)
    names = list(label_names)
    if p.ndim != 2 or p.shape != (t.shape[0], len(names)):
        raise ValueError(f"probs must be (N, {len(names)}) with N = {t.shape[0]} targets, got {p.shape}.")
    fig = Figure(figsize=(6, 5.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    for k, name in enumerate(names):
        y = t == k
        if y.all() or not y.any():
            ax.plot([], [], " ", label=f"{name}: undefined ({int(y.sum())} of {len(y)} positive)")
            continue
        fpr, tpr, _ = roc_curve(y, p[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUROC {roc_auc_score(y, p[:, k]):.3f}, n={int(y.sum())})")
    ax.plot([0, 1], [0, 1], "--", color="0.6", linewidth=1)
    ax.set_xlabel("false positive rate (1 - specificity)")
    ax.set_ylabel("true positive rate (sensitivity)")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.legend(loc="lower right", fontsize=7)
    if title:
        ax.set_title(title)
    return save_figure(fig, path, dpi=120)


def save_figure(fig, path: str | Path, *, dpi: int = 100) -> Path:
    """Lay out ``fig`` and write it as a PNG at ``path`` (its folder made if missing)."""
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=dpi)
    return path


def plot_pareto(
    latency_ms: Sequence[float],
    scores: Sequence[float],
    names: Sequence[str],
    highlight: Sequence[bool],
    path: str | Path,
    metric: str = "bma",
    title: str = "",
    front: Sequence[bool] | None = None,
) -> Path:
    """Writes the accuracy-vs-latency scatter of a search: every model, the highlighted ones named.

    The highlighted points (the published family: the winner and, in multi-objective mode, the
    Pareto front) are joined in latency order, so the trade-off a user picks from reads as one
    line; ``front`` marks the models no other beats on both axes, drawn as a dashed line even when
    the search optimised the metric alone.

    Args:
        latency_ms: CPU milliseconds per image of each model.
        scores: its validation ``metric``.
        names: its run name.
        highlight: whether it belongs to the published family.
        path: output ``.png``.
        metric: name of the score for the axis label.
        title: figure title.
        front: whether it is on the metric-vs-latency Pareto front (None: no front line).
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is heavy
    from matplotlib.figure import Figure

    pts = list(zip(latency_ms, scores, names, highlight, strict=True))
    if not pts:
        raise ValueError("plot_pareto needs at least one model with a latency and a score.")
    fig = Figure(figsize=(6.5, 4.5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    rest = [(x, y) for x, y, _, h in pts if not h]
    fam = sorted((x, y, n) for x, y, n, h in pts if h)
    if rest:
        ax.scatter([x for x, _ in rest], [y for _, y in rest], color="0.6", s=18, label="other trials")
    if front is not None:
        on_front = sorted((x, y) for (x, y, _, _), f in zip(pts, front, strict=True) if f)
        ax.plot([x for x, _ in on_front], [y for _, y in on_front], "--", color="0.3", linewidth=1,
                drawstyle="steps-post", label=f"Pareto front (val {metric} vs latency)")
    if fam:
        ax.plot([x for x, _, _ in fam], [y for _, y, _ in fam], "o-", color="tab:red", label="published family")
        for x, y, n in fam:
            ax.annotate(n, (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
    ax.set_xlabel("CPU latency (ms per image, batch 1, one thread)")
    ax.set_ylabel(f"val {metric}")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    if title:
        ax.set_title(title)
    return save_figure(fig, path, dpi=120)
