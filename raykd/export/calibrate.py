"""Calibration and the cancer-vs-benign operating point of an exported model.

A classifier trained with cross-entropy (and, more so, one distilled from a sharpened teacher) is
usually over-confident: its top probability exceeds its accuracy. A clinic that reads "0.97 MEL"
needs 0.97 to mean 97 %. *Temperature scaling* (Guo et al., "On Calibration of Modern Neural
Networks", ICML 2017) divides every logit by one scalar ``T > 0`` fitted on the validation split;
it leaves the argmax, hence accuracy and BMA, unchanged, and is what both predictors apply
(``softmax(logits / meta.temperature)``, :mod:`raykd.artifact.predict`).

Measures (all on probabilities, computed in float64):

* :func:`ece`: expected calibration error, ``sum_b |B_b| / N * |acc(B_b) - conf(B_b)|`` over
  equal-width confidence bins ``(b/B, (b+1)/B]`` of the top-class probability (Guo et al., eq. 3).
* :func:`brier`: multi-class Brier score, ``mean_i sum_k (p_ik - y_ik)^2`` with one-hot ``y``
  (range 0 to 2; Brier, 1950).
* :func:`nll`: mean negative log-likelihood of the true class, the quantity the temperature
  minimises.

The operating point (:func:`choose_threshold`) turns the malignant probability (the sum over the
malignant classes, as in SkinDistilViT's cancer-vs-benign view) into a decision: "malignant when
``P(malignant) >= threshold``", with the threshold chosen on the validation split as the largest
one that still reaches the target sensitivity, i.e. the most specific screen that misses at most
``1 - target`` of the cancers seen in validation.

Example:
    >>> t = fit_temperature(val_logits, val_labels)
    >>> probs = softmax_t(val_logits, t)
    >>> ece(probs, val_labels), brier(probs, val_labels)
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from raykd.artifact.predict import softmax64
from raykd.export.options import ExportConfig
from raykd.metrics.plots import save_figure

log = logging.getLogger(__name__)

__all__ = [
    "DEFAULT_BINS",
    "DEFAULT_TARGET_SENSITIVITY",
    "T_BOUNDS",
    "CalibrationScores",
    "brier",
    "choose_threshold",
    "ece",
    "fit_temperature",
    "nll",
    "operating_point",
    "reliability_diagram",
    "softmax_t",
]

DEFAULT_BINS = 15
DEFAULT_TARGET_SENSITIVITY = ExportConfig.target_sensitivity
#: The temperature is searched in this interval: wide enough for any real model (a 20x sharpening or
#: flattening), bounded so that a validation split the model separates perfectly (whose NLL keeps
#: falling as T -> 0) still gets a finite answer.
T_BOUNDS = (0.05, 20.0)


def _check(probs_or_logits: np.ndarray, labels: np.ndarray, what: str) -> tuple[np.ndarray, np.ndarray]:
    """float64 ``(N, C)`` and int64 ``(N,)`` arrays, with the mistakes a caller can make named."""
    x = np.asarray(probs_or_logits, dtype=np.float64)
    y = np.asarray(labels).astype(np.int64)
    if x.ndim != 2 or x.shape[0] == 0:
        raise ValueError(f"{what} must have shape (N, C) with N > 0, got {x.shape}")
    if y.shape != (x.shape[0],):
        raise ValueError(f"labels must have shape ({x.shape[0]},) to match {what}, got {y.shape}")
    if y.min() < 0 or y.max() >= x.shape[1]:
        raise ValueError(f"labels must lie in [0, {x.shape[1] - 1}], got [{y.min()}, {y.max()}]")
    if not np.isfinite(x).all():
        raise ValueError(f"{what} hold NaN or inf values; the model diverged or the inputs are broken")
    return x, y


def softmax_t(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    """Row-wise ``softmax(logits / temperature)`` in float64."""
    return softmax64(np.asarray(logits, dtype=np.float64) / temperature)


def _nll_at(z: np.ndarray, y: np.ndarray, temperature: float) -> float:
    s = z / temperature
    m = s.max(axis=1)
    lse = m + np.log(np.exp(s - m[:, None]).sum(axis=1))
    return float(np.mean(lse - s[np.arange(len(y)), y]))


def nll(logits: np.ndarray, labels: np.ndarray, temperature: float = 1.0) -> float:
    """Mean negative log-likelihood of the true class under ``softmax(logits / temperature)``."""
    z, y = _check(logits, labels, "logits")
    return _nll_at(z, y, temperature)


def fit_temperature(logits: np.ndarray, labels: np.ndarray, *, bounds: tuple[float, float] = T_BOUNDS) -> float:
    """The temperature ``T`` minimising the validation NLL of ``softmax(logits / T)``.

    With ``b = 1/T`` the NLL is ``mean(logsumexp(b z_i) - b z_iy)``, a convex function of ``b``, so
    it is unimodal in ``log T`` too and a bounded Brent search on ``log T`` (scipy's
    ``minimize_scalar``) finds the one minimum deterministically, with no learning rate or start
    point to tune. ``T = 1`` lies inside the interval, so the fitted NLL is never above the
    uncalibrated one; when it would be by rounding, 1.0 is returned.

    Args:
        logits: ``(N, C)`` raw logits of the validation split (not probabilities).
        labels: ``(N,)`` integer class indices.
        bounds: Interval searched for ``T``.

    Returns:
        The temperature (a plain float in ``bounds``).
    """
    from scipy.optimize import minimize_scalar  # lazy: scipy is heavy

    z, y = _check(logits, labels, "logits")
    lo, hi = bounds
    if not 0 < lo < 1 < hi:
        raise ValueError(f"temperature bounds must satisfy 0 < low < 1 < high, got {bounds}")
    res = minimize_scalar(lambda u: _nll_at(z, y, math.exp(u)), bounds=(math.log(lo), math.log(hi)),
                          method="bounded", options={"xatol": 1e-5})
    t = float(math.exp(res.x))
    base = _nll_at(z, y, 1.0)
    if not _nll_at(z, y, t) <= base:
        return 1.0
    if abs(t - hi) < 1e-3 * hi:
        log.warning("fitted temperature %.3g sits at the upper bound %g: on its %d validation images the "
                    "model's logits carry almost no information about the labels (served probabilities are "
                    "close to uniform)", t, hi, len(y))
    elif abs(t - lo) < 1e-3 * lo:
        log.warning("fitted temperature %.3g sits at the lower bound %g: the model separates its %d "
                    "validation images perfectly, too few to calibrate on", t, lo, len(y))
    return t


def _confidence_bins(probs: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Bin index ``b`` of each row's top probability in ``(b/B, (b+1)/B]``, the top probability, argmax."""
    conf = probs.max(axis=1)
    edges = np.linspace(0.0, 1.0, bins + 1)
    idx = np.digitize(conf, edges[1:-1], right=True)
    return idx, conf, probs.argmax(axis=1)


def ece(probs: np.ndarray, labels: np.ndarray, bins: int = DEFAULT_BINS) -> float:
    """Expected calibration error over ``bins`` equal-width bins of the top-class probability.

    ``ECE = sum_b |B_b| / N * |acc(B_b) - conf(B_b)|``, where ``acc`` is the share of correct
    argmax predictions and ``conf`` the mean top probability of the rows in bin ``b`` (bins are
    ``(b/B, (b+1)/B]``; empty bins add nothing). 0 is perfectly calibrated.
    """
    p, y = _check(probs, labels, "probs")
    if bins < 1:
        raise ValueError(f"bins must be >= 1, got {bins}")
    idx, conf, pred = _confidence_bins(p, bins)
    correct = (pred == y).astype(np.float64)
    total = 0.0
    for b in range(bins):
        mask = idx == b
        if mask.any():
            total += mask.sum() / len(y) * abs(correct[mask].mean() - conf[mask].mean())
    return float(total)


def brier(probs: np.ndarray, labels: np.ndarray) -> float:
    """Multi-class Brier score ``mean_i sum_k (p_ik - y_ik)^2`` (one-hot ``y``; 0 best, 2 worst)."""
    p, y = _check(probs, labels, "probs")
    onehot = np.zeros_like(p)
    onehot[np.arange(len(y)), y] = 1.0
    return float(np.mean(((p - onehot) ** 2).sum(axis=1)))


def choose_threshold(malignant_prob: np.ndarray, is_malignant: np.ndarray,
                     target_sensitivity: float = DEFAULT_TARGET_SENSITIVITY) -> float:
    """The largest threshold ``t`` whose sensitivity ``P(p >= t | malignant)`` reaches the target.

    With ``n`` malignant validation cases, at least ``k = ceil(target * n)`` of them must score
    ``>= t``; the largest such ``t`` is the ``k``-th highest malignant probability among them. Any
    higher threshold misses one more cancer and drops below the target; any lower one only flags
    more benign lesions.

    Args:
        malignant_prob: ``(N,)`` probability of malignancy (sum over the malignant classes).
        is_malignant: ``(N,)`` booleans, the truth.
        target_sensitivity: In ``(0, 1]``.

    Raises:
        ValueError: on a target outside ``(0, 1]`` or when no case is malignant.
    """
    p = np.asarray(malignant_prob, dtype=np.float64).ravel()
    pos = np.asarray(is_malignant, dtype=bool).ravel()
    if p.shape != pos.shape:
        raise ValueError(f"malignant_prob {p.shape} and is_malignant {pos.shape} must have the same length")
    if not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must lie in (0, 1], got {target_sensitivity}")
    scores = np.sort(p[pos])[::-1]
    if scores.size == 0:
        raise ValueError("no malignant case among the validation labels: a sensitivity cannot be reached")
    k = max(1, math.ceil(target_sensitivity * scores.size - 1e-9))
    return float(scores[k - 1])


def operating_point(malignant_prob: np.ndarray, is_malignant: np.ndarray, threshold: float) -> dict[str, float | None]:
    """Sensitivity and specificity of "malignant when ``p >= threshold``" (None where undefined)."""
    p = np.asarray(malignant_prob, dtype=np.float64).ravel()
    pos = np.asarray(is_malignant, dtype=bool).ravel()
    flagged = p >= threshold
    sens = float(flagged[pos].mean()) if pos.any() else None
    spec = float((~flagged[~pos]).mean()) if (~pos).any() else None
    return {"sensitivity": sens, "specificity": spec, "positives": int(pos.sum()), "negatives": int((~pos).sum())}


@dataclass
class CalibrationScores:
    """ECE, Brier and NLL of one split before (T = 1) and after temperature scaling."""

    num_images: int
    ece_before: float
    ece_after: float
    brier_before: float
    brier_after: float
    nll_before: float
    nll_after: float

    @classmethod
    def of(cls, logits: np.ndarray, labels: np.ndarray, temperature: float,
           bins: int = DEFAULT_BINS) -> CalibrationScores:
        before, after = softmax_t(logits, 1.0), softmax_t(logits, temperature)
        return cls(num_images=len(labels), ece_before=ece(before, labels, bins), ece_after=ece(after, labels, bins),
                   brier_before=brier(before, labels), brier_after=brier(after, labels),
                   nll_before=nll(logits, labels, 1.0), nll_after=nll(logits, labels, temperature))

    def to_dict(self) -> dict:
        return asdict(self)


def reliability_diagram(probs_before: np.ndarray, probs_after: np.ndarray, labels: np.ndarray,
                        path: str | Path, *, bins: int = DEFAULT_BINS, title: str = "") -> Path:
    """Write a two-panel reliability diagram (before / after temperature scaling) as a PNG.

    Each panel plots the accuracy of every confidence bin against its mean confidence (bars) with
    the diagonal of perfect calibration and the share of images per bin (grey line), titled with the
    ECE; drawn on matplotlib's Agg canvas directly so no global backend is touched.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg  # lazy: matplotlib is heavy
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 4))
    FigureCanvasAgg(fig)
    width = 1.0 / bins
    centres = (np.arange(bins) + 0.5) * width
    for i, (name, probs) in enumerate((("before", probs_before), ("after", probs_after))):
        p, y = _check(probs, labels, f"probs_{name}")
        idx, _, pred = _confidence_bins(p, bins)
        acc = np.array([(pred[idx == b] == y[idx == b]).mean() if (idx == b).any() else 0.0 for b in range(bins)])
        share = np.bincount(idx, minlength=bins) / len(y)
        ax = fig.add_subplot(1, 2, i + 1)
        ax.bar(centres, acc, width=width * 0.9, color="tab:blue", alpha=0.8, edgecolor="k", label="accuracy")
        ax.plot(centres, share, "o-", color="0.35", markersize=3, label="share of images")
        ax.plot([0, 1], [0, 1], "--", color="tab:red", label="perfect calibration")
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence (top-class probability)")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{name} temperature scaling: ECE {ece(p, y, bins):.3f}")
        if i == 0:
            ax.legend(loc="upper left", fontsize=8)
    if title:
        fig.suptitle(title)

    return save_figure(fig, path, dpi=100)
