"""Validation metrics equal sklearn's on the same predictions, and hold up on awkward splits."""

from __future__ import annotations

import math
import socket
from datetime import timedelta

import numpy as np
import pytest
import torch
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    balanced_accuracy_score,
    confusion_matrix,
    matthews_corrcoef,
    precision_recall_fscore_support,
    recall_score,
    roc_auc_score,
)
from sklearn.preprocessing import label_binarize

from raykd.metrics.classification import (
    ClassificationMetrics,
    compute_from_arrays,
    gather_predictions,
    is_better,
    per_class_table,
)

NAMES = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]
MALIGNANT = ("MEL", "BCC", "SCC")
TOL = 1e-6  # torchmetrics returns float32 scores; sklearn float64


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=1, keepdims=True))
    return e / e.sum(axis=1, keepdims=True)


def _imbalanced_predictions(seed: int = 0, n: int = 400) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """ISIC-like class skew (DF/VASC get a handful of samples) and logits that carry some signal."""
    rng = np.random.default_rng(seed)
    prior = np.array([0.18, 0.50, 0.13, 0.035, 0.10, 0.01, 0.01, 0.025])
    prior /= prior.sum()
    targets = rng.choice(len(NAMES), size=n, p=prior)
    targets[:2] = 5  # DF and VASC: at least two samples each, still "few"
    targets[2:4] = 6
    logits = rng.normal(size=(n, len(NAMES))) + 1.5 * np.eye(len(NAMES))[targets]
    return _softmax(logits), targets, logits


# ---------------------------------------------------------------- hand-worked case

# 6 samples, 3 classes (MEL, NV, BCC); malignant = MEL, BCC.
HAND_PROBS = np.array(
    [
        [0.7, 0.2, 0.1],  # true MEL, predicted MEL
        [0.6, 0.3, 0.1],  # true MEL, predicted MEL
        [0.3, 0.6, 0.1],  # true MEL, predicted NV
        [0.2, 0.7, 0.1],  # true NV,  predicted NV
        [0.5, 0.4, 0.1],  # true NV,  predicted MEL
        [0.1, 0.2, 0.7],  # true BCC, predicted BCC
    ]
)
HAND_TARGETS = np.array([0, 0, 0, 1, 1, 2])


def test_hand_worked_example_matches_the_arithmetic():
    out = compute_from_arrays(HAND_PROBS, HAND_TARGETS, ["MEL", "NV", "BCC"], malignant=("MEL", "BCC"))
    # Confusion matrix (rows true): [[2,1,0],[1,1,0],[0,0,1]].
    # Recall: MEL 2/3, NV 1/2, BCC 1/1 -> BMA = (2/3 + 1/2 + 1)/3 = (13/6)/3 = 13/18.
    assert out["bma"] == pytest.approx(13 / 18, abs=TOL)
    assert out["recall/MEL"] == pytest.approx(2 / 3, abs=TOL)
    assert out["recall/NV"] == pytest.approx(1 / 2, abs=TOL)
    assert out["recall/BCC"] == pytest.approx(1.0, abs=TOL)
    # Accuracy = 4 correct / 6.
    assert out["accuracy"] == pytest.approx(4 / 6, abs=TOL)
    # Precision: MEL 2/3 (3 predicted), NV 1/2, BCC 1; weighted by support 3,2,1:
    # (3*2/3 + 2*1/2 + 1*1)/6 = 4/6. F1 per class equals precision here (p = r), so also 4/6.
    assert out["precision_weighted"] == pytest.approx(4 / 6, abs=TOL)
    assert out["recall_weighted"] == pytest.approx(4 / 6, abs=TOL)
    assert out["f1_weighted"] == pytest.approx(4 / 6, abs=TOL)
    # Specificity TN/(TN+FP): MEL 2/3 (sample 5 is a FP), NV 3/4 (sample 3), BCC 5/5 -> mean 29/36.
    assert out["specificity_macro"] == pytest.approx(29 / 36, abs=TOL)
    # MCC (Gorodkin): c=4 correct, s=6, t=p=(3,2,1): (4*6 - 14) / sqrt((36-14)*(36-14)) = 10/22.
    assert out["mcc"] == pytest.approx(10 / 22, abs=TOL)
    # One-vs-rest AUROC, counting positive > negative pairs:
    # MEL: pos {.7,.6,.3}, neg {.2,.5,.1} -> 3+3+2 = 8/9; NV: pos {.7,.4}, neg {.2,.3,.6,.2} -> 4+3 = 7/8;
    # BCC: pos {.7}, neg all .1 -> 1. Macro = (8/9 + 7/8 + 1)/3 = 199/216.
    assert out["auroc_macro"] == pytest.approx(199 / 216, abs=TOL)
    # AP = mean precision at each positive's rank: MEL ranks P,P,N,P -> (1 + 1 + 3/4)/3 = 11/12;
    # NV ranks P,N,P -> (1 + 2/3)/2 = 5/6; BCC 1. mAP = (11/12 + 10/12 + 12/12)/3 = 11/12.
    assert out["map_macro"] == pytest.approx(11 / 12, abs=TOL)
    # Binary (MEL, BCC malignant): true [1,1,1,0,0,1], predicted [1,1,0,0,1,1] -> TP 3, FN 1, FP 1, TN 1.
    assert out["binary/accuracy"] == pytest.approx(4 / 6, abs=TOL)
    assert out["binary/precision"] == pytest.approx(3 / 4, abs=TOL)
    assert out["binary/recall"] == pytest.approx(3 / 4, abs=TOL)
    assert out["binary/f1"] == pytest.approx(3 / 4, abs=TOL)
    # Malignant prob = MEL + BCC: pos {.8,.7,.4,.8}, neg {.3,.6} -> 2+2+1+2 = 7/8.
    assert out["binary/auroc"] == pytest.approx(7 / 8, abs=TOL)
    assert out["num_samples"] == 6


def test_hand_worked_per_class_table():
    cm = np.array([[2, 1, 0], [1, 1, 0], [0, 0, 1]])
    rows = per_class_table(cm, ["MEL", "NV", "BCC"])
    # MEL: precision 2/3, recall 2/3, F1 2/3, specificity 2/3, support 3, predicted 3.
    assert rows[0] == pytest.approx(
        {"label": "MEL", "precision": 2 / 3, "recall": 2 / 3, "f1": 2 / 3, "specificity": 2 / 3,
         "support": 3, "predicted": 3}
    )
    # NV: 1/2, 1/2, 1/2, specificity 3/4; BCC: all 1.
    assert rows[1]["specificity"] == pytest.approx(3 / 4)
    assert rows[1]["f1"] == pytest.approx(1 / 2)
    assert rows[2]["precision"] == rows[2]["recall"] == rows[2]["specificity"] == 1.0


# ---------------------------------------------------------------- against sklearn


def test_every_metric_equals_sklearn_on_imbalanced_random_predictions():
    probs, y, _ = _imbalanced_predictions(seed=0)
    pred = probs.argmax(1)
    out = compute_from_arrays(probs, y, NAMES)
    assert np.bincount(y, minlength=8).min() >= 2  # every class present, the rarest with few samples
    assert out["bma"] == pytest.approx(balanced_accuracy_score(y, pred), abs=TOL)
    assert out["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=TOL)
    p, r, f, _ = precision_recall_fscore_support(y, pred, average="weighted", zero_division=0)
    assert out["precision_weighted"] == pytest.approx(p, abs=TOL)
    assert out["recall_weighted"] == pytest.approx(r, abs=TOL)
    assert out["f1_weighted"] == pytest.approx(f, abs=TOL)
    auroc = roc_auc_score(y, probs, multi_class="ovr", average="macro")
    assert out["auroc_macro"] == pytest.approx(auroc, abs=TOL)
    one_hot = label_binarize(y, classes=range(8))
    mean_ap = average_precision_score(one_hot, probs, average="macro")
    assert out["map_macro"] == pytest.approx(mean_ap, abs=TOL)
    assert out["mcc"] == pytest.approx(matthews_corrcoef(y, pred), abs=TOL)
    per_class_recall = recall_score(y, pred, average=None, labels=range(8))
    for name, expected in zip(NAMES, per_class_recall):
        assert out[f"recall/{name}"] == pytest.approx(expected, abs=TOL)
    cm = confusion_matrix(y, pred, labels=range(8))
    negatives = len(y) - cm.sum(1)
    specificity = (negatives - (cm.sum(0) - np.diag(cm))) / negatives
    assert out["specificity_macro"] == pytest.approx(specificity.mean(), abs=TOL)


def test_binary_view_equals_sklearn_on_mapped_labels():
    probs, y, _ = _imbalanced_predictions(seed=1)
    mal = [NAMES.index(m) for m in MALIGNANT]
    yb = np.isin(y, mal).astype(int)
    pb = np.isin(probs.argmax(1), mal).astype(int)  # predicted malignant = argmax class is malignant
    out = compute_from_arrays(probs, y, NAMES, malignant=MALIGNANT)
    p, r, f, _ = precision_recall_fscore_support(yb, pb, average="binary", pos_label=1)
    assert out["binary/accuracy"] == pytest.approx(accuracy_score(yb, pb), abs=TOL)
    assert out["binary/precision"] == pytest.approx(p, abs=TOL)
    assert out["binary/recall"] == pytest.approx(r, abs=TOL)
    assert out["binary/f1"] == pytest.approx(f, abs=TOL)
    assert out["binary/auroc"] == pytest.approx(roc_auc_score(yb, probs[:, mal].sum(1)), abs=TOL)
    assert not any(k.startswith("binary/") for k in compute_from_arrays(probs, y, NAMES))


def test_per_class_table_equals_sklearn():
    probs, y, _ = _imbalanced_predictions(seed=2)
    pred = probs.argmax(1)
    rows = per_class_table(confusion_matrix(y, pred, labels=range(8)), NAMES)
    p, r, f, s = precision_recall_fscore_support(y, pred, labels=range(8), average=None, zero_division=0)
    assert [row["label"] for row in rows] == NAMES
    np.testing.assert_allclose([row["precision"] for row in rows], p)
    np.testing.assert_allclose([row["recall"] for row in rows], r)
    np.testing.assert_allclose([row["f1"] for row in rows], f)
    assert [row["support"] for row in rows] == list(s)


# ---------------------------------------------------------------- MCC against sklearn


def _mcc_of(targets: list[int] | np.ndarray, preds: list[int] | np.ndarray, num_classes: int) -> float:
    """Raykd's MCC for hard predictions: probabilities that put 0.9 + 0.1/C on each predicted class."""
    probs = np.eye(num_classes)[np.asarray(preds)] * 0.9 + 0.1 / num_classes
    return compute_from_arrays(probs, np.asarray(targets), NAMES[:num_classes])["mcc"]


def test_mcc_matches_sklearn_when_binary_prediction_is_constant():
    y, pred = [0, 0, 1], [0, 0, 0]
    assert matthews_corrcoef(y, pred) == 0.0  # undefined: no spread in the predictions
    assert _mcc_of(y, pred, 2) == 0.0  # torchmetrics' 2x2 formula gave 0.408


@pytest.mark.filterwarnings("ignore:A single label was found")
def test_mcc_matches_sklearn_when_a_one_class_binary_split_is_predicted_exactly():
    y, pred = [0, 0, 0], [0, 0, 0]
    assert matthews_corrcoef(y, pred) == 0.0  # undefined: no spread in targets or predictions
    assert _mcc_of(y, pred, 2) == 0.0  # torchmetrics' 2x2 formula gave +1.0


@pytest.mark.parametrize("inverted, expected", [(False, 1.0), (True, -1.0)])
def test_mcc_matches_sklearn_on_a_perfect_or_perfectly_inverted_binary_prediction(inverted, expected):
    y = np.array([0, 1, 1, 0, 1, 0, 0])
    pred = 1 - y if inverted else y
    assert matthews_corrcoef(y, pred) == pytest.approx(expected)
    assert _mcc_of(y, pred, 2) == pytest.approx(expected, abs=TOL)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcc_matches_sklearn_on_random_binary_predictions(seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 2, size=60)
    pred = np.where(rng.random(60) < 0.7, y, rng.integers(0, 2, size=60))  # correlated, not perfect
    assert _mcc_of(y, pred, 2) == pytest.approx(matthews_corrcoef(y, pred), abs=TOL)


@pytest.mark.parametrize("num_classes", [3, 8])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_mcc_matches_sklearn_on_random_multiclass_predictions(num_classes, seed):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, num_classes, size=80)
    pred = np.where(rng.random(80) < 0.5, y, rng.integers(0, num_classes, size=80))
    assert _mcc_of(y, pred, num_classes) == pytest.approx(matthews_corrcoef(y, pred), abs=TOL)


@pytest.mark.parametrize("num_classes", [3, 8])
def test_mcc_matches_sklearn_when_a_class_is_never_predicted(num_classes):
    rng = np.random.default_rng(7)
    y = rng.integers(0, num_classes, size=80)
    pred = np.where(rng.random(80) < 0.6, y, rng.integers(0, num_classes, size=80))
    pred[pred == 1] = 0  # class 1 occurs in the targets but is never predicted
    assert 1 in y and 1 not in pred
    assert _mcc_of(y, pred, num_classes) == pytest.approx(matthews_corrcoef(y, pred), abs=TOL)


@pytest.mark.parametrize("num_classes", [3, 8])
def test_mcc_matches_sklearn_when_every_prediction_is_one_class(num_classes):
    y = np.random.default_rng(8).integers(0, num_classes, size=40)
    pred = np.full_like(y, num_classes - 1)
    assert matthews_corrcoef(y, pred) == 0.0  # undefined: no spread in the predictions
    assert _mcc_of(y, pred, num_classes) == 0.0


# ---------------------------------------------------------------- the accumulator


def test_accumulating_batches_equals_scoring_the_concatenation():
    torch.manual_seed(0)
    _, y, logits = _imbalanced_predictions(seed=3, n=90)
    metrics = ClassificationMetrics(8, NAMES, malignant=MALIGNANT)
    for start in range(0, 90, 32):  # uneven last batch
        metrics.update(torch.tensor(logits[start:start + 32]), torch.tensor(y[start:start + 32]))
    probs, targets = metrics.state()
    assert probs.shape == (90, 8) and targets.shape == (90,)
    torch.testing.assert_close(probs.sum(1), torch.ones(90))
    expected = compute_from_arrays(_softmax(logits), y, NAMES, MALIGNANT)
    assert metrics.compute() == pytest.approx(expected, abs=TOL)
    cm = metrics.confusion_matrix()
    assert cm.dtype == np.int64
    np.testing.assert_array_equal(cm, confusion_matrix(y, logits.argmax(1), labels=range(8)))
    assert per_class_table(metrics, NAMES) == per_class_table(cm, NAMES)

    metrics.reset()
    metrics.update(torch.tensor(logits[:5]), torch.tensor(y[:5]))
    assert metrics.compute()["num_samples"] == 5


def test_empty_state_raises_a_clear_error_but_state_is_gatherable():
    metrics = ClassificationMetrics(3, ["a", "b", "c"])
    probs, targets = metrics.state()
    assert probs.shape == (0, 3) and targets.shape == (0,)
    with pytest.raises(ValueError, match="update"):
        metrics.compute()
    with pytest.raises(ValueError, match="empty"):
        metrics.confusion_matrix()


# ---------------------------------------------------------------- edge cases


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_class_absent_from_targets_follows_sklearn_conventions():
    probs, y, _ = _imbalanced_predictions(seed=4, n=200)
    keep = y != NAMES.index("DF")  # DF never occurs in the targets...
    probs, y = probs[keep], y[keep]
    probs[0] = np.eye(8)[5] * 0.9 + 0.1 / 8  # ...but is predicted once
    pred = probs.argmax(1)
    out = compute_from_arrays(probs, y, NAMES)
    # sklearn's balanced accuracy leaves the absent class out of the mean.
    assert out["bma"] == pytest.approx(balanced_accuracy_score(y, pred), abs=TOL)
    assert out["recall/DF"] == 0.0  # zero_division=0, as sklearn's recall_score
    p, r, f, _ = precision_recall_fscore_support(y, pred, average="weighted", zero_division=0)
    weighted = (out["precision_weighted"], out["recall_weighted"], out["f1_weighted"])
    assert weighted == pytest.approx((p, r, f), abs=TOL)
    assert out["mcc"] == pytest.approx(matthews_corrcoef(y, pred), abs=TOL)
    # AUROC / AP: mean over the classes whose one-vs-rest problem is defined (DF excluded).
    present = [c for c in range(8) if c != 5]
    auroc = np.mean([roc_auc_score(y == c, probs[:, c]) for c in present])
    ap = np.mean([average_precision_score(y == c, probs[:, c]) for c in present])
    assert out["auroc_macro"] == pytest.approx(auroc, abs=TOL)
    assert out["map_macro"] == pytest.approx(ap, abs=TOL)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_a_single_class_split_does_not_crash():
    rng = np.random.default_rng(5)
    probs = rng.dirichlet(np.ones(3), size=7)
    y = np.ones(7, dtype=int)
    pred = probs.argmax(1)
    out = compute_from_arrays(probs, y, ["MEL", "NV", "BCC"], malignant=("MEL",))
    assert out["bma"] == pytest.approx(balanced_accuracy_score(y, pred), abs=TOL)
    assert out["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=TOL)
    assert out["mcc"] == pytest.approx(matthews_corrcoef(y, pred), abs=TOL)
    # No class has both positives and negatives: AUROC/mAP/binary AUROC are undefined -> NaN.
    assert math.isnan(out["auroc_macro"]) and math.isnan(out["map_macro"]) and math.isnan(out["binary/auroc"])
    # Specificity only for classes with negatives (MEL, BCC): FP = samples predicted MEL (or BCC).
    spec = [1 - np.mean(pred == c) for c in (0, 2)]
    assert out["specificity_macro"] == pytest.approx(np.mean(spec), abs=TOL)


def test_bad_inputs_name_the_problem():
    probs, y = HAND_PROBS, HAND_TARGETS
    with pytest.raises(ValueError, match="softmax"):
        compute_from_arrays(np.log(probs) * 3, y, ["a", "b", "c"])  # logits, not probabilities
    with pytest.raises(ValueError, match="malignant"):
        compute_from_arrays(probs, y, ["a", "b", "c"], malignant=("MEL",))
    with pytest.raises(ValueError, match="label_names"):
        ClassificationMetrics(4, ["a", "b", "c"])
    with pytest.raises(ValueError, match=r"\[0, 2\]"):
        compute_from_arrays(probs, np.array([0, 1, 2, 3, 0, 1]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="logits"):
        ClassificationMetrics(3, ["a", "b", "c"]).update(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long))


# ---------------------------------------------------------------- best-epoch selection


def test_is_better_maximises_scores_and_minimises_losses():
    assert is_better("val/bma", 0.71, 0.70)
    assert not is_better("bma", 0.70, 0.70)  # a tie keeps the earlier epoch
    assert is_better("val/loss", 0.9, 1.0) and not is_better("val_loss", 1.1, 1.0)
    assert is_better("bma", 0.1, None) and is_better("val/loss", 5.0, None)
    assert not is_better("bma", float("nan"), 0.1) and not is_better("bma", float("nan"), None)
    assert is_better("bma", 0.2, float("nan"))
    assert is_better("ece", 0.05, 0.10, mode="min")
    with pytest.raises(ValueError, match="mode"):
        is_better("bma", 0.1, 0.2, mode="up")


# ---------------------------------------------------------------- whole split across ranks


def _rank_scores(rank: int, port: int) -> tuple[dict[str, float], np.ndarray, tuple]:
    """Joins a 2-rank gloo group, scores its uneven shard and returns the gathered results."""
    import torch.distributed as dist

    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2, timeout=timedelta(seconds=120)
    )
    try:
        _, y, logits = _imbalanced_predictions(seed=6, n=50)
        shard = slice(0, 30) if rank == 0 else slice(30, 50)  # uneven shards, as Ray Data can give
        metrics = ClassificationMetrics(8, NAMES, malignant=MALIGNANT)
        metrics.update(torch.tensor(logits[shard]), torch.tensor(y[shard]))
        out = metrics.compute()  # a collective: every rank calls it
        cm = metrics.confusion_matrix()  # cached gather: no second collective
        empty = gather_predictions(*ClassificationMetrics(8, NAMES).state())  # a rank may hold nothing
        return out, cm, tuple(t.shape for t in empty)
    finally:
        dist.destroy_process_group()


def _child_rank(port: int) -> None:
    _rank_scores(1, port)


def test_compute_gathers_the_whole_split_across_ranks():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    # This process is rank 0 and one spawned process is rank 1: a single fresh interpreter to start
    # (spawn, not fork: forking after torch has run OpenMP work can deadlock the child).
    child = torch.multiprocessing.get_context("spawn").Process(target=_child_rank, args=(port,))
    child.start()
    try:
        out, cm, empty_shapes = _rank_scores(0, port)
    finally:
        child.join(timeout=120)
    assert child.exitcode == 0
    probs, y, _ = _imbalanced_predictions(seed=6, n=50)
    assert out == pytest.approx(compute_from_arrays(probs, y, NAMES, MALIGNANT), abs=TOL)
    assert out["num_samples"] == 50
    np.testing.assert_array_equal(cm, confusion_matrix(y, probs.argmax(1), labels=range(8)))
    assert empty_shapes == ((0, 8), (0,))
