"""Confusion-matrix figure and the per-epoch report files of a run folder.

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

__all__ = ["plot_confusion_matrix", "write_report"]

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
    from matplotlib.backends.backend_agg import FigureCanvasAgg
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
