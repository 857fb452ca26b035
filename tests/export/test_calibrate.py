"""Temperature scaling, ECE, Brier and the cancer-vs-benign threshold (raykd.export.calibrate)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from raykd.export.calibrate import (
    T_BOUNDS,
    CalibrationScores,
    brier,
    choose_threshold,
    ece,
    fit_temperature,
    nll,
    operating_point,
    reliability_diagram,
    softmax_t,
)


def _calibrated_logits(n: int = 4000, classes: int = 4, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true label distribution: labels are drawn from softmax(z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(0.0, 1.5, (n, classes))
    p = softmax_t(z)
    labels = np.array([rng.choice(classes, p=row) for row in p])
    return z, labels


def test_the_fit_undoes_a_five_times_over_confident_model_and_lowers_validation_nll():
    z, y = _calibrated_logits()
    sharp = 5.0 * z  # well ranked, five times too confident
    t = fit_temperature(sharp, y)
    assert 4.5 < t < 5.5
    assert nll(sharp, y, t) < nll(sharp, y, 1.0) - 0.5
    assert ece(softmax_t(sharp, t), y) < ece(softmax_t(sharp), y) / 3


def test_the_fit_leaves_a_calibrated_model_near_one_and_is_deterministic():
    z, y = _calibrated_logits(seed=1)
    t = fit_temperature(z, y)
    assert 0.9 < t < 1.1
    assert fit_temperature(z, y) == t
    assert (softmax_t(z, t).argmax(1) == z.argmax(1)).all()  # accuracy and BMA cannot move


def test_a_perfectly_separated_split_gets_a_sharp_but_finite_temperature():
    z = np.array([[3.0, 0.0], [0.0, 3.0]] * 10)
    y = np.array([0, 1] * 10)
    t = fit_temperature(z, y)  # the NLL keeps falling as T -> 0; the search stays inside its bounds
    assert T_BOUNDS[0] <= t < 0.1
    assert nll(z, y, t) < 1e-12


def test_fit_rejects_logits_that_are_not_finite_or_do_not_match_the_labels():
    with pytest.raises(ValueError, match="NaN or inf"):
        fit_temperature(np.array([[np.nan, 0.0]]), np.array([0]))
    with pytest.raises(ValueError, match="labels must have shape"):
        fit_temperature(np.zeros((3, 2)), np.array([0, 1]))


def test_ece_of_a_four_image_case_worked_out_by_hand():
    # top probabilities 0.9 (right), 0.9 (wrong), 0.62 (right), 0.55 (right); 15 bins of width 1/15:
    # 0.9 -> (13/15, 14/15]: acc 0.5, conf 0.9 -> 2/4 * 0.4 = 0.2
    # 0.62 -> (9/15, 10/15]: acc 1, conf 0.62 -> 1/4 * 0.38 = 0.095
    # 0.55 -> (8/15, 9/15]: acc 1, conf 0.55 -> 1/4 * 0.45 = 0.1125         ECE = 0.4075
    probs = np.array([[0.9, 0.1], [0.9, 0.1], [0.38, 0.62], [0.55, 0.45]])
    labels = np.array([0, 1, 1, 0])
    assert ece(probs, labels) == pytest.approx(0.4075)
    # 2 bins: all four fall in (0.5, 1]: acc 3/4, conf (0.9 + 0.9 + 0.62 + 0.55) / 4 = 0.7425 -> 0.0075
    assert ece(probs, labels, bins=2) == pytest.approx(0.0075)


def test_brier_of_a_case_worked_out_by_hand():
    # row 1, label 0: 0.3^2 + 0.3^2 + 0 = 0.18; row 2, label 1: 0 + 0.8^2 + 0.8^2 = 1.28; mean 0.73
    probs = np.array([[0.7, 0.3, 0.0], [0.0, 0.2, 0.8]])
    assert brier(probs, np.array([0, 1])) == pytest.approx(0.73)
    assert brier(np.eye(3), np.arange(3)) == 0.0


def test_the_threshold_is_the_largest_that_reaches_the_target_sensitivity():
    rng = np.random.default_rng(0)
    p = np.concatenate([rng.uniform(0.2, 1.0, 20), rng.uniform(0.0, 0.6, 30)])
    y = np.array([True] * 20 + [False] * 30)
    t = choose_threshold(p, y, 0.95)
    op = operating_point(p, y, t)
    assert op["sensitivity"] >= 0.95 and op["positives"] == 20 and op["negatives"] == 30
    above = np.nextafter(t, 1.0)
    assert operating_point(p, y, above)["sensitivity"] < 0.95  # one step higher misses one more cancer
    assert t == pytest.approx(np.sort(p[:20])[::-1][18])  # ceil(0.95 * 20) = 19th highest malignant score
    assert choose_threshold(p, y, 1.0) == pytest.approx(p[:20].min())


def test_the_threshold_needs_malignant_cases_and_a_valid_target():
    with pytest.raises(ValueError, match="no malignant case"):
        choose_threshold(np.array([0.2, 0.3]), np.array([False, False]))
    with pytest.raises(ValueError, match=r"\(0, 1\]"):
        choose_threshold(np.array([0.2]), np.array([True]), 0.0)


def test_scores_before_and_after_agree_with_the_functions():
    z, y = _calibrated_logits(n=500, seed=2)
    s = CalibrationScores.of(3.0 * z, y, 3.0)
    assert s.num_images == 500
    assert s.ece_before == pytest.approx(ece(softmax_t(3.0 * z), y))
    assert s.ece_after == pytest.approx(ece(softmax_t(z), y))
    assert s.brier_after == pytest.approx(brier(softmax_t(z), y))
    assert math.isclose(s.nll_after, nll(z, y), rel_tol=1e-12)


def test_the_reliability_diagram_is_a_png(tmp_path):
    z, y = _calibrated_logits(n=300, seed=3)
    path = reliability_diagram(softmax_t(4 * z), softmax_t(z), y, tmp_path / "r" / "reliability.png")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 5000
