"""Class weights and per-epoch sampling plans for imbalanced training splits.

Nothing here copies images: oversampling repeats row indices, undersampling drops them, and the
plans are redrawn every epoch.

* Class weights: SSD-KD's inverse frequency ``w_c = N / n_c`` (N = training images, n_c = images
  of class c), used by the weighted cross-entropy.
* Oversampling / undersampling: each class is brought to ``target_count`` images per epoch by
  sampling with / without replacement (HierAttn rebalances ISIC to 2,500 per class).
* Instance-hardness undersampling (HierAttn, after Smith et al. 2014 as implemented by imblearn's
  InstanceHardnessThreshold): a random forest scores every training image by the out-of-fold
  probability of its true class; classes above the target keep their easiest images.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def class_weights(counts: Sequence[int], kind: str = "inverse_frequency") -> np.ndarray:
    """Per-class loss weights from the training class counts.

    ``inverse_frequency``: ``w_c = sum(n) / n_c`` (SSD-KD); a class with no images gets 0, since it
    never appears as a target. ``none``: all ones.
    """
    counts = np.asarray(counts, dtype=np.float64)
    if kind == "none":
        return np.ones_like(counts, dtype=np.float32)
    if kind != "inverse_frequency":
        raise ValueError(f"unknown class-weight kind {kind!r}; valid: 'none', 'inverse_frequency'")
    total = counts.sum()
    with np.errstate(divide="ignore"):
        w = np.where(counts > 0, total / np.maximum(counts, 1), 0.0)
    return w.astype(np.float32)


def target_counts(counts: Sequence[int], strategy: str, target: int | None = None) -> np.ndarray:
    """Images per class per epoch under ``strategy``.

    ``oversample`` raises classes below ``target`` (default: the largest class) and keeps the others;
    ``undersample`` and ``instance_hardness`` lower classes above ``target`` (default: the smallest
    non-empty class) and keep the others; ``none`` keeps the counts.
    """
    counts = np.asarray(counts, dtype=np.int64)
    if strategy == "none":
        return counts.copy()
    present = counts[counts > 0]
    if strategy == "oversample":
        t = int(present.max()) if target is None else target
        return np.where(counts > 0, np.maximum(counts, t), 0)
    if strategy in ("undersample", "instance_hardness"):
        t = int(present.min()) if target is None else target
        return np.minimum(counts, t)
    raise ValueError(
        f"unknown sampling strategy {strategy!r}; valid: none, oversample, undersample, instance_hardness"
    )


def epoch_plan(
    labels: Sequence[int],
    strategy: str,
    *,
    target: int | None = None,
    seed: int = 0,
    epoch: int = 0,
    hardness: Sequence[float] | None = None,
) -> np.ndarray:
    """Shuffled row indices for one epoch (repeats for oversampled rows).

    Every original row of a class that is not undersampled appears at least once; extra rows of an
    oversampled class are drawn uniformly with replacement; an undersampled class keeps a random
    subset (``undersample``) or its ``target`` easiest rows by ``hardness`` (``instance_hardness``,
    the same subset every epoch, as a one-off cleaning step). Deterministic in ``(seed, epoch)``.
    """
    labels = np.asarray(labels)
    num_classes = int(labels.max()) + 1 if labels.size else 0
    counts = np.bincount(labels, minlength=num_classes)
    want = target_counts(counts, strategy, target)
    rng = np.random.default_rng([seed, epoch])
    parts = []
    for c in range(num_classes):
        idx = np.flatnonzero(labels == c)
        n, k = len(idx), int(want[c])
        if k >= n:
            extra = rng.choice(idx, size=k - n, replace=True) if k > n else idx[:0]
            parts.append(np.concatenate([idx, extra]))
        elif strategy == "instance_hardness":
            if hardness is None:
                raise ValueError("instance_hardness sampling needs hardness scores (see instance_hardness())")
            h = np.asarray(hardness)[idx]
            parts.append(idx[np.argsort(-h, kind="stable")[:k]])
        else:
            parts.append(rng.choice(idx, size=k, replace=False))
    plan = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int64)
    rng.shuffle(plan)
    return plan


def repeat_counts(labels: np.ndarray, rates: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Per-row repeat counts for a streaming batch: ``floor(r) + Bernoulli(r - floor(r))``.

    ``rates[c] = target_c / n_c``. The expected number of rows of class c per epoch is exactly
    ``target_c``; this is the streaming form of :func:`epoch_plan` used inside Ray Data, where a
    batch does not see the rest of the split.
    """
    r = rates[labels]
    base = np.floor(r)
    return (base + (rng.random(len(r)) < (r - base))).astype(np.int64)


def sampling_rates(counts: Sequence[int], strategy: str, target: int | None = None) -> np.ndarray:
    """``target_c / n_c`` per class (0 for empty classes)."""
    counts = np.asarray(counts, dtype=np.float64)
    want = target_counts(counts.astype(np.int64), strategy, target)
    return np.where(counts > 0, want / np.maximum(counts, 1), 0.0)


def instance_hardness(
    features: np.ndarray, labels: Sequence[int], *, folds: int = 5, trees: int = 100, seed: int = 0
) -> np.ndarray:
    """Out-of-fold probability of each row's true class under a random forest (higher = easier).

    HierAttn ran this on flattened 256x256 pixels; callers pass any fixed-length features
    (e.g. downsampled thumbnails).
    """
    from sklearn.ensemble import RandomForestClassifier  # lazy: sklearn is heavy
    from sklearn.model_selection import StratifiedKFold

    labels = np.asarray(labels)
    x = np.asarray(features, dtype=np.float32).reshape(len(labels), -1)
    min_count = np.bincount(labels)[np.bincount(labels) > 0].min()
    k = int(max(2, min(folds, min_count)))
    scores = np.zeros(len(labels), dtype=np.float64)
    for train_idx, test_idx in StratifiedKFold(k, shuffle=True, random_state=seed).split(x, labels):
        forest = RandomForestClassifier(n_estimators=trees, random_state=seed, n_jobs=1)
        forest.fit(x[train_idx], labels[train_idx])
        proba = forest.predict_proba(x[test_idx])
        col = {c: j for j, c in enumerate(forest.classes_)}
        scores[test_idx] = [proba[i, col[y]] if y in col else 0.0 for i, y in enumerate(labels[test_idx])]
    return scores
