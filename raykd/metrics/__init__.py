"""Validation metrics: balanced multi-class accuracy first, then the rest; cancer-vs-benign view;
confusion matrix and report files. Plain torch + torchmetrics + numpy, no Ray."""

from raykd.metrics.classification import (
    ClassificationMetrics,
    compute_from_arrays,
    gather_predictions,
    is_better,
    metric_mode,
    per_class_table,
)
from raykd.metrics.plots import plot_confusion_matrix, write_report

__all__ = [
    "ClassificationMetrics",
    "compute_from_arrays",
    "gather_predictions",
    "is_better",
    "metric_mode",
    "per_class_table",
    "plot_confusion_matrix",
    "write_report",
]
