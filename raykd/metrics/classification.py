"""Validation metrics for skin-lesion classifiers, balanced multi-class accuracy first.

ISIC 2019 is heavily imbalanced (NV alone is ~51 % of the images), so plain accuracy rewards a
model that ignores the rare classes. The seed papers therefore rank models by *balanced
multi-class accuracy* (BMA): SkinDistilViT (Kasparian et al., arXiv 2308.08669) computes it as
torchmetrics' macro recall, SSD-KD (Wang et al., MedIA 84, 2023) as sklearn's
``balanced_accuracy_score``. Both are the same number whenever every class occurs in the
validation targets; this module uses the sklearn definition, which also stays meaningful when a
class is missing (see *Conventions*).

Every metric is computed once per epoch over the WHOLE validation split: predictions are
accumulated batch by batch (:class:`ClassificationMetrics`), gathered across DDP ranks
(:func:`gather_predictions`, padding uneven shards) and reduced by :func:`compute_from_arrays`.
Per-class values come from ``torchmetrics.functional`` (``average=None``); the averaging over
classes is written out here so that the conventions are explicit and equal to sklearn's.

Conventions (all checked against sklearn in ``tests/metrics``):

* ``bma``: mean per-class recall over the classes that occur in the targets
  (``sklearn.metrics.balanced_accuracy_score``). A class absent from the targets has no recall and
  is left out of the mean (torchmetrics' ``macro`` recall would count it as 0 when it is predicted).
* Per-class precision / recall / F1 / specificity with a zero denominator are 0.0 (sklearn's
  ``zero_division`` default), e.g. ``recall/<LABEL>`` of a class absent from the targets is 0.0.
  The ``*_weighted`` averages weight by support, so absent classes do not move them.
* ``auroc_macro`` and ``map_macro``: one-vs-rest AUROC / average precision per class, averaged over
  the classes whose one-vs-rest problem is defined (at least one positive and one negative). With
  every class present this equals ``roc_auc_score(multi_class="ovr", average="macro")`` and
  ``average_precision_score(one_hot, probs, average="macro")``; sklearn raises (AUROC) or counts 0
  (AP) for an absent class, torchmetrics returns 0 (AUROC) or NaN (AP). NaN when no class qualifies
  (a batch holding one class only).
* ``specificity_macro``: TN / (TN + FP) per class, averaged over classes with at least one negative.
* ``mcc``: multi-class Matthews correlation (Gorodkin's R_K) from the confusion matrix, 0.0 when
  undefined, as sklearn's ``matthews_corrcoef`` for any number of classes (two included).
* Binary cancer-vs-benign view (only when ``malignant`` names classes, e.g. MEL, BCC, SCC as in
  SkinDistilViT): a sample is *predicted* malignant when its argmax class is malignant, so the
  binary view scores the very predictions the multi-class metrics score; the malignant
  *probability* (sum of the malignant class probabilities) feeds the threshold-free
  ``binary/auroc``. Malignant is the positive class.
"""

from __future__ import annotations

import logging
import math
import warnings
from typing import Sequence

import numpy as np
import torch
import torch.distributed as dist
import torchmetrics.functional.classification as tmf
from torch import Tensor
from torchmetrics.utilities.distributed import gather_all_tensors

from raykd.distributed import world_size

__all__ = [
    "ClassificationMetrics",
    "compute_from_arrays",
    "gather_predictions",
    "is_better",
    "metric_mode",
    "per_class_table",
]

_logger = logging.getLogger(__name__)

#: Tolerance on ``probs.sum(1) == 1``; loose enough for fp16/bf16 softmax outputs.
_PROB_SUM_ATOL = 1e-2


def _check_labels(num_classes: int, label_names: Sequence[str], malignant: Sequence[str]) -> list[int]:
    """Validates names and returns the class indices of ``malignant``."""
    names = list(label_names)
    if len(names) != num_classes:
        raise ValueError(
            f"label_names has {len(names)} entries but num_classes is {num_classes}; "
            "pass one name per class, in label-index order (the manifest's label_names)."
        )
    if len(set(names)) != len(names):
        raise ValueError(f"label_names {names} holds duplicates; class names must be unique.")
    if isinstance(malignant, str):
        raise ValueError(f"malignant must be a sequence of class names, not the string {malignant!r}.")
    unknown = [m for m in malignant if m not in names]
    if unknown:
        raise ValueError(f"malignant names {unknown} are not in label_names {names}; fix the malignant list.")
    return sorted({names.index(m) for m in malignant})


def _as_tensors(
    probs: np.ndarray | Tensor, targets: np.ndarray | Tensor, num_classes: int
) -> tuple[Tensor, Tensor]:
    """Checks shapes and values; returns CPU float64 probabilities and int64 targets."""
    p = torch.as_tensor(probs).detach().to("cpu", torch.float64)
    t = torch.as_tensor(targets).detach().to("cpu")
    if p.ndim != 2 or p.shape[1] != num_classes:
        raise ValueError(f"probs must have shape (N, {num_classes}), got {tuple(p.shape)}.")
    if t.ndim != 1 or t.shape[0] != p.shape[0]:
        raise ValueError(f"targets must have shape ({p.shape[0]},) to match probs, got {tuple(t.shape)}.")
    if p.shape[0] == 0:
        raise ValueError(
            "no predictions to score (empty state): call update(logits, targets) on at least one "
            "validation batch before compute(), and check that the validation split is not empty."
        )
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError("targets must be integer class indices, got non-integer values.")
    t = t.long()
    if int(t.min()) < 0 or int(t.max()) >= num_classes:
        raise ValueError(f"targets must lie in [0, {num_classes - 1}], got [{int(t.min())}, {int(t.max())}].")
    if not torch.isfinite(p).all():
        raise ValueError("probs hold NaN or inf values; the model diverged or the inputs are broken.")
    sums = p.sum(dim=1)
    if (p.min() < 0) or (p.max() > 1) or not torch.allclose(sums, torch.ones_like(sums), atol=_PROB_SUM_ATOL):
        raise ValueError(
            "probs must be softmax probabilities (rows in [0, 1] summing to 1), got rows summing to "
            f"[{float(sums.min()):.4g}, {float(sums.max()):.4g}]; pass logits.softmax(-1), not raw logits."
        )
    return p, t


def _masked_mean(values: Tensor, mask: Tensor) -> float:
    """Mean of ``values[mask]``; NaN when the mask is empty."""
    return float(values[mask].mean()) if bool(mask.any()) else math.nan


def _matthews_corrcoef(preds: Tensor, t: Tensor, num_classes: int) -> float:
    """Multi-class MCC (Gorodkin's R_K) from the confusion matrix, as ``sklearn.metrics.matthews_corrcoef``.

    Written out rather than taken from ``torchmetrics``: for two classes torchmetrics switches to
    its own 2x2 formula, which returns a non-zero value where the MCC is undefined (targets
    ``[0, 0, 1]`` predicted all 0 gave 0.408, a one-class split scored perfectly gave 1.0; sklearn
    gives 0.0 for both). The general formula cov(y, y_hat) / sqrt(cov(y, y) * cov(y_hat, y_hat))
    reduces to the binary MCC when ``C == 2``, and the covariances are computed in float64 so large
    splits do not overflow. An undefined MCC (a zero denominator: every target or every prediction
    in one class) is 0.0, sklearn's convention.
    """
    cm = torch.bincount(t * num_classes + preds, minlength=num_classes * num_classes)
    cm = cm.reshape(num_classes, num_classes).to(torch.float64)  # rows true, columns predicted
    t_sum, p_sum = cm.sum(dim=1), cm.sum(dim=0)
    n, correct = cm.sum(), cm.trace()
    cov_ytyp = correct * n - t_sum @ p_sum
    cov_ypyp = n * n - p_sum @ p_sum
    cov_ytyt = n * n - t_sum @ t_sum
    denominator = cov_ytyt * cov_ypyp
    return float(cov_ytyp / denominator.sqrt()) if float(denominator) > 0 else 0.0


def compute_from_arrays(
    probs: np.ndarray | Tensor,
    targets: np.ndarray | Tensor,
    label_names: Sequence[str],
    malignant: Sequence[str] = (),
) -> dict[str, float]:
    """Computes every validation metric over one set of predictions.

    Call it on the predictions of the whole split, i.e. after gathering all ranks
    (:func:`gather_predictions`). The conventions for absent classes are in the module docstring.

    Args:
        probs: ``(N, C)`` softmax probabilities (numpy or torch, any float dtype).
        targets: ``(N,)`` integer class indices.
        label_names: the ``C`` class names in index order; used for ``recall/<LABEL>`` keys.
        malignant: names of the cancer classes; when non-empty the ``binary/*`` keys are added.

    Returns:
        A flat ``{name: float}`` dict: ``bma``, ``accuracy``, ``precision_weighted``,
        ``recall_weighted``, ``f1_weighted``, ``auroc_macro``, ``map_macro``,
        ``specificity_macro``, ``mcc``, ``num_samples``, ``recall/<LABEL>`` per class and, with
        ``malignant``, ``binary/accuracy``, ``binary/precision``, ``binary/recall``,
        ``binary/f1`` and ``binary/auroc``. Undefined values (see module docstring) are NaN.

    Raises:
        ValueError: on empty input, mismatched shapes, out-of-range targets, logits instead of
            probabilities, or unknown ``malignant`` names.
    """
    names = list(label_names)
    num_classes = len(names)
    mal_idx = _check_labels(num_classes, names, malignant)
    p, t = _as_tensors(probs, targets, num_classes)
    preds = p.argmax(dim=1)
    with warnings.catch_warnings():
        # torchmetrics warns about absent classes; they are handled (and logged) in _multiclass_view.
        warnings.simplefilter("ignore", UserWarning)
        out = _multiclass_view(p, preds, t, names)
        if mal_idx:
            out.update(_binary_view(p, preds, t, mal_idx))
    return out


def _multiclass_view(p: Tensor, preds: Tensor, t: Tensor, names: list[str]) -> dict[str, float]:
    """The multi-class metrics and per-class recalls; absent classes are logged and masked out.

    A class with no positive target is left out of ``bma``, ``auroc_macro`` and ``map_macro``; one
    with no negative target (every sample of that class) out of the AUROC/AP and specificity means.
    """
    num_classes = len(names)
    n = t.shape[0]
    support = torch.bincount(t, minlength=num_classes)
    present = support > 0  # at least one positive
    has_negative = support < n  # at least one negative
    if not bool(present.all()):
        _logger.warning(
            "classes %s do not occur in the %d validation targets; they are left out of bma, "
            "auroc_macro, map_macro and their recall is reported as 0.0",
            [names[i] for i in range(num_classes) if not present[i]],
            n,
        )
    kw = {"num_classes": num_classes, "validate_args": False}
    recall = tmf.multiclass_recall(preds, t, average=None, **kw)
    auroc = tmf.multiclass_auroc(p, t, average=None, **kw)
    ap = tmf.multiclass_average_precision(p, t, average=None, **kw)
    specificity = tmf.multiclass_specificity(preds, t, average=None, **kw)
    out: dict[str, float] = {
        "bma": _masked_mean(recall, present),
        "accuracy": float(tmf.multiclass_accuracy(preds, t, average="micro", **kw)),
        "precision_weighted": float(tmf.multiclass_precision(preds, t, average="weighted", **kw)),
        "recall_weighted": float(tmf.multiclass_recall(preds, t, average="weighted", **kw)),
        "f1_weighted": float(tmf.multiclass_f1_score(preds, t, average="weighted", **kw)),
        "auroc_macro": _masked_mean(auroc, present & has_negative),
        "map_macro": _masked_mean(ap, present & has_negative),
        "specificity_macro": _masked_mean(specificity, has_negative),
        "mcc": _matthews_corrcoef(preds, t, num_classes),
        "num_samples": float(n),
    }
    for i, name in enumerate(names):
        out[f"recall/{name}"] = float(recall[i])
    return out


def _binary_view(p: Tensor, preds: Tensor, t: Tensor, mal_idx: list[int]) -> dict[str, float]:
    """Cancer-vs-benign metrics; malignant (1) is the positive class."""
    mal = torch.tensor(mal_idx)
    yb = torch.isin(t, mal).long()
    pb = torch.isin(preds, mal).long()
    kw = {"validate_args": False}
    both_classes = 0 < int(yb.sum()) < yb.numel()
    return {
        "binary/accuracy": float(tmf.binary_accuracy(pb, yb, **kw)),
        "binary/precision": float(tmf.binary_precision(pb, yb, **kw)),
        "binary/recall": float(tmf.binary_recall(pb, yb, **kw)),
        "binary/f1": float(tmf.binary_f1_score(pb, yb, **kw)),
        "binary/auroc": float(tmf.binary_auroc(p[:, mal].sum(dim=1), yb, **kw)) if both_classes else math.nan,
    }


def gather_predictions(probs: Tensor, targets: Tensor) -> tuple[Tensor, Tensor]:
    """All-gathers predictions from every DDP rank, in rank order, onto every rank.

    Shards may differ in size (a rank may even hold none): tensors are padded for the collective
    and trimmed afterwards (``torchmetrics.utilities.distributed.gather_all_tensors``). Without an
    initialised process group (or with one rank) the inputs are returned unchanged. This is a
    collective: every rank must call it. Samples a sampler duplicated to even out shards
    (``DistributedSampler`` padding) are scored twice; feed validation through a loader that does
    not pad.

    Returns:
        ``(probs, targets)`` of the whole split, on the CPU.
    """
    if world_size() == 1:
        return probs.detach().cpu(), targets.detach().cpu()
    device = probs.device
    if dist.get_backend() == "nccl" and device.type != "cuda":
        device = torch.device("cuda", torch.cuda.current_device())
    gathered_p = gather_all_tensors(probs.detach().to(device).contiguous())
    gathered_t = gather_all_tensors(targets.detach().to(device).long().contiguous())
    return torch.cat(gathered_p).cpu(), torch.cat(gathered_t).cpu()


class ClassificationMetrics:
    """Accumulates one epoch of validation predictions and scores them.

    Plain torch (no Ray): ``update`` stores softmax probabilities and targets on the device they
    arrive on; ``compute`` (and ``confusion_matrix``) gather every rank's predictions first when
    ``torch.distributed`` is initialised, so they are collectives that every rank must call, like
    torchmetrics' own ``Metric.compute``. The gathered result is cached until the next
    ``update``/``reset``, so calling ``confusion_matrix`` after ``compute`` on rank 0 only is safe.

    Example::

        metrics = ClassificationMetrics(8, ISIC2019_CLASSES, malignant=("MEL", "BCC", "SCC"))
        for images, targets in val_loader:
            metrics.update(model(images), targets)
        scores = metrics.compute()          # {"bma": ..., "recall/MEL": ..., ...}
        cm = metrics.confusion_matrix()
        metrics.reset()

    Args:
        num_classes: number of classes ``C``.
        label_names: the ``C`` class names in label-index order.
        malignant: names of the cancer classes for the binary view (empty: no binary view).
    """

    def __init__(self, num_classes: int, label_names: Sequence[str], malignant: Sequence[str] = ()) -> None:
        _check_labels(num_classes, label_names, malignant)
        self.num_classes = num_classes
        self.label_names = list(label_names)
        self.malignant = list(malignant)
        self._probs: list[Tensor] = []
        self._targets: list[Tensor] = []
        self._gathered: tuple[Tensor, Tensor] | None = None

    def update(self, logits: Tensor, targets: Tensor) -> None:
        """Adds one batch: raw ``(B, C)`` logits and ``(B,)`` integer targets."""
        if logits.ndim != 2 or logits.shape[1] != self.num_classes:
            raise ValueError(f"logits must have shape (B, {self.num_classes}), got {tuple(logits.shape)}.")
        if targets.ndim != 1 or targets.shape[0] != logits.shape[0]:
            raise ValueError(f"targets must have shape ({logits.shape[0]},), got {tuple(targets.shape)}.")
        self._probs.append(logits.detach().float().softmax(dim=1))
        self._targets.append(targets.detach().long())
        self._gathered = None

    def reset(self) -> None:
        """Forgets every accumulated batch (call at the start of each validation epoch)."""
        self._probs.clear()
        self._targets.clear()
        self._gathered = None

    def state(self) -> tuple[Tensor, Tensor]:
        """This rank's accumulated ``(probs (N, C) float32, targets (N,) int64)``.

        The first element holds softmax *probabilities* (what :func:`compute_from_arrays` takes),
        not logits. An empty state gives ``(0, C)`` and ``(0,)`` tensors, so a rank without
        validation samples can still take part in a gather.
        """
        if not self._probs:
            return torch.empty(0, self.num_classes), torch.empty(0, dtype=torch.long)
        return torch.cat(self._probs), torch.cat(self._targets)

    def _synced(self) -> tuple[Tensor, Tensor]:
        if self._gathered is None:
            self._gathered = gather_predictions(*self.state())
        return self._gathered

    def compute(self) -> dict[str, float]:
        """Scores the whole split (all ranks); see :func:`compute_from_arrays` for the keys."""
        probs, targets = self._synced()
        return compute_from_arrays(probs, targets, self.label_names, self.malignant)

    def confusion_matrix(self) -> np.ndarray:
        """``(C, C)`` int64 counts over the whole split; rows = true class, columns = predicted."""
        probs, targets = self._synced()
        p, t = _as_tensors(probs, targets, self.num_classes)
        cm = tmf.multiclass_confusion_matrix(p.argmax(dim=1), t, self.num_classes, validate_args=False)
        return cm.numpy().astype(np.int64)


def metric_mode(metric: str) -> str:
    """``"min"`` for loss-like metrics (the name contains ``loss``, any case), else ``"max"``."""
    return "min" if "loss" in metric.lower() else "max"


def is_better(metric: str, new: float, best: float | None, *, mode: str | None = None) -> bool:
    """Whether ``new`` beats ``best`` for best-epoch selection (default metric: validation BMA).

    Rule: a metric whose name contains ``loss`` (``val/loss``, ``val_loss_ce``) is minimised,
    every other metric (BMA, accuracy, AUROC, MCC, ...) is maximised; ``mode`` ("min"/"max")
    overrides the rule. Ties are not improvements (the earlier epoch is kept). A NaN or infinite
    ``new`` never wins; any finite ``new`` beats a missing (``None``) or NaN ``best``.
    """
    mode = mode or metric_mode(metric)
    if mode not in ("min", "max"):
        raise ValueError(f"mode must be 'min' or 'max', got {mode!r}.")
    if new is None or not math.isfinite(new):
        return False
    if best is None or math.isnan(best):
        return True
    return new < best if mode == "min" else new > best


def per_class_table(source: np.ndarray | ClassificationMetrics, label_names: Sequence[str]) -> list[dict]:
    """Per-class precision, recall, F1, specificity and support, one row per class.

    Args:
        source: a ``(C, C)`` confusion matrix (rows true, columns predicted) or a
            :class:`ClassificationMetrics` (its gathered confusion matrix is used).
        label_names: the ``C`` class names.

    Returns:
        ``[{"label", "precision", "recall", "f1", "specificity", "support", "predicted"}, ...]``,
        ready for ``csv.DictWriter`` or JSON. Zero denominators give 0.0 (sklearn's convention).
    """
    cm = source.confusion_matrix() if isinstance(source, ClassificationMetrics) else np.asarray(source)
    names = list(label_names)
    if cm.ndim != 2 or cm.shape != (len(names), len(names)):
        raise ValueError(
            f"confusion matrix must be ({len(names)}, {len(names)}) to match label_names, got {cm.shape}."
        )
    cm = cm.astype(np.float64)
    tp = np.diag(cm)
    support = cm.sum(axis=1)
    predicted = cm.sum(axis=0)
    negatives = cm.sum() - support
    tn = negatives - (predicted - tp)

    def div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
        return np.divide(a, b, out=np.zeros_like(a), where=b > 0)

    precision, recall, specificity = div(tp, predicted), div(tp, support), div(tn, negatives)
    f1 = div(2 * precision * recall, precision + recall)
    return [
        {
            "label": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "specificity": float(specificity[i]),
            "support": int(support[i]),
            "predicted": int(predicted[i]),
        }
        for i, name in enumerate(names)
    ]
