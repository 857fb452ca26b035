"""Every loss against values worked out by hand on small hand-made tensors.

The expected numbers are written as the arithmetic that produces them (plain ``math``), never as
values the code produced.
"""

from __future__ import annotations

import math

import pytest
import torch

from raykd.distill import losses as L

LN2, LN3 = math.log(2.0), math.log(3.0)


def t(x) -> torch.Tensor:
    return torch.tensor(x, dtype=torch.float32)


def test_weighted_cross_entropy_is_normalised_by_the_sum_of_sample_weights():
    # sample A: logits [0, 0], y=0 -> -log 0.5 = ln 2
    # sample B: logits [ln3, 0] -> p = [3/4, 1/4], y=1 -> -log 1/4 = ln 4
    logits = t([[0.0, 0.0], [LN3, 0.0]])
    y = torch.tensor([0, 1])
    assert L.weighted_cross_entropy(logits, y).item() == pytest.approx((LN2 + math.log(4)) / 2, abs=1e-6)
    # class weights [1, 3]: (1 * ln2 + 3 * ln4) / (1 + 3)
    w = t([1.0, 3.0])
    expected = (LN2 + 3 * math.log(4)) / 4
    assert L.weighted_cross_entropy(logits, y, w).item() == pytest.approx(expected, abs=1e-6)


def test_label_smoothing_mixes_the_uniform_target_in():
    # eps 0.2, C 2: q = 0.9 on the label, 0.1 on the other class.
    # A: -(0.9 ln .5 + 0.1 ln .5) = ln 2 ;  B: -(0.1 ln .75 + 0.9 ln .25)
    logits = t([[0.0, 0.0], [LN3, 0.0]])
    y = torch.tensor([0, 1])
    b = -(0.1 * math.log(0.75) + 0.9 * math.log(0.25))
    got = L.weighted_cross_entropy(logits, y, label_smoothing=0.2).item()
    assert got == pytest.approx((LN2 + b) / 2, abs=1e-6)


def test_kd_kl_div_is_batch_mean_kl_times_t_squared():
    # teacher [0, ln3] -> [1/4, 3/4]; student [0, 0] -> [1/2, 1/2]
    # KL = 1/4 ln(1/2) + 3/4 ln(3/2); second row identical -> 0; batchmean over 2 rows.
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    s = t([[0.0, 0.0], [1.0, 2.0]])
    te = t([[0.0, LN3], [1.0, 2.0]])
    assert L.kd_kl_div(s, te, 1.0).item() == pytest.approx(kl / 2, abs=1e-6)
    # At T=2 the teacher logits [0, 2 ln3] soften to the same [1/4, 3/4]; the T^2 factor is 4.
    assert L.kd_kl_div(t([[0.0, 0.0]]), t([[0.0, 2 * LN3]]), 2.0).item() == pytest.approx(4 * kl, abs=1e-6)


def test_hinton_kd_loss_mixes_ce_and_kl_with_alpha():
    # CE of [0,0] with y=0 is ln 2; KL as above; alpha 0.5 -> 0.5 ln2 + 0.5 KL
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    got = L.hinton_kd_loss(t([[0.0, 0.0]]), t([[0.0, LN3]]), torch.tensor([0]), alpha=0.5, temperature=1.0)
    assert got.item() == pytest.approx(0.5 * LN2 + 0.5 * kl, abs=1e-6)


def test_logit_mse_sums_over_classes_and_averages_over_the_batch():
    # (1-0)^2 + (2-0)^2 + (0-0)^2 + (0-3)^2 = 14, over B = 2 -> 7
    assert L.logit_mse(t([[1.0, 2.0], [0.0, 0.0]]), t([[0.0, 0.0], [0.0, 3.0]])).item() == pytest.approx(7.0)


def test_hidden_cosine_loss_averages_one_minus_cosine_over_every_token():
    # token 1: [1,0] vs [1,1] -> cos = 1/sqrt2 ; token 2: [0,1] vs [0,-1] -> cos = -1
    hs = t([[[1.0, 0.0], [0.0, 1.0]]])
    ht = t([[[1.0, 1.0], [0.0, -1.0]]])
    expected = ((1 - 1 / math.sqrt(2)) + (1 - (-1))) / 2
    assert L.hidden_cosine_loss(hs, ht).item() == pytest.approx(expected, abs=1e-6)
    with pytest.raises(ValueError, match="adapter"):
        L.hidden_cosine_loss(hs, torch.zeros(1, 2, 3))


def test_fitnet_hint_loss_is_the_element_mean_squared_error():
    # (1-0)^2, (2-0)^2, (3-1)^2, (4-4)^2 -> (1 + 4 + 4 + 0) / 4
    assert L.fitnet_hint_loss(t([[[[1.0, 2.0], [3.0, 4.0]]]]), t([[[[0.0, 0.0], [1.0, 4.0]]]])).item() == 2.25


# Teacher: a 3-4-5 right triangle; student: the unit right isoceles triangle.
TEACHER_PTS = [[0.0, 0.0], [3.0, 0.0], [0.0, 4.0]]
STUDENT_PTS = [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]]


def huber(x: float) -> float:
    return 0.5 * x * x if abs(x) < 1 else abs(x) - 0.5


def test_rkd_distance_normalises_by_the_mean_distance_and_applies_huber():
    # teacher distances d01=3, d02=4, d12=5, mean 4 -> 0.75, 1, 1.25
    # student d01=1, d02=1, d12=sqrt2, mean (2+sqrt2)/3
    mu = (2 + math.sqrt(2)) / 3
    diffs = [1 / mu - 0.75, 1 / mu - 1.0, math.sqrt(2) / mu - 1.25]
    # each pair appears twice in the 3x3 matrix, the diagonal contributes 0; mean over 9 entries
    expected = 2 * sum(huber(d) for d in diffs) / 9
    got = L.rkd_distance_loss(t(STUDENT_PTS), t(TEACHER_PTS))
    assert got.item() == pytest.approx(expected, abs=1e-6)
    # distances are scale-free: scaling the student by 10 changes nothing
    scaled = L.rkd_distance_loss(10 * t(STUDENT_PTS), t(TEACHER_PTS))
    assert scaled.item() == pytest.approx(expected, abs=1e-6)


def test_rkd_angle_compares_the_cosines_at_every_vertex():
    # teacher cosines at the vertices: v0 90deg -> 0; v1 <(-3,0),(-3,4)> / (3*5) = 0.6;
    # v2 <(0,-4),(3,-4)> / (4*5) = 0.8. Student: v0 0; v1 and v2 1/sqrt2.
    # Per vertex i, the pairs (j,k),(k,j) with j != k != i carry the angle; (j,j) gives 1 in both,
    # j=i or k=i gives 0 in both. Mean over 3^3 = 27 entries.
    diffs = [0.0, 1 / math.sqrt(2) - 0.6, 1 / math.sqrt(2) - 0.8]
    expected = 2 * sum(huber(d) for d in diffs) / 27
    got = L.rkd_angle_loss(t(STUDENT_PTS), t(TEACHER_PTS))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_rkd_gradients_reach_the_student_only():
    s = t(STUDENT_PTS).requires_grad_()
    te = t(TEACHER_PTS).requires_grad_()
    (L.rkd_distance_loss(s, te) + L.rkd_angle_loss(s, te)).backward()
    assert s.grad is not None and s.grad.abs().sum() > 0
    assert te.grad is None


def test_channel_gram_and_crkd_by_hand():
    # teacher F = [[1,2],[3,4]] (C=2, H=1, W=2): F F^T = [[5,11],[11,25]], / (C H W = 4)
    ft = t([[[[1.0, 2.0]], [[3.0, 4.0]]]])
    gram = L.channel_gram(ft)[0]
    assert gram.tolist() == [[1.25, 2.75], [2.75, 6.25]]
    # student F = I -> I / 4; difference [[-1, -2.75], [-2.75, -6]], squares sum 1 + 2*7.5625 + 36
    fs = t([[[[1.0, 0.0]], [[0.0, 1.0]]]])
    sq = 1 + 2 * 2.75**2 + 36
    assert L.crkd_loss(fs, ft, "rmse").item() == pytest.approx(math.sqrt(sq / 4), abs=1e-5)
    assert L.crkd_loss(fs, ft, "frobenius").item() == pytest.approx(math.sqrt(sq), abs=1e-5)
    with pytest.raises(ValueError, match="adapt"):
        L.crkd_loss(torch.zeros(1, 3, 1, 2), ft)


def test_dkd_splits_target_and_non_target_knowledge():
    # teacher [ln2, ln2, 0] -> p_t = [0.4, 0.4, 0.2]; student [0,0,0] -> 1/3 each; target 0; T 1.
    # TCKD: b_t = [0.4, 0.6], b_s = [1/3, 2/3] -> 0.4 ln(0.4*3) + 0.6 ln(0.6*1.5)
    # NCKD: non-target teacher [0.4, 0.2] / 0.6 = [2/3, 1/3], student [1/2, 1/2]
    tckd = 0.4 * math.log(1.2) + 0.6 * math.log(0.9)
    nckd = (2 / 3) * math.log(4 / 3) + (1 / 3) * math.log(2 / 3)
    s, te, y = t([[0.0, 0.0, 0.0]]), t([[LN2, LN2, 0.0]]), torch.tensor([0])
    a, b = L.dkd_loss(s, te, y, alpha=1.0, beta=8.0, temperature=1.0)
    assert a.item() == pytest.approx(tckd, abs=1e-6)
    assert b.item() == pytest.approx(8 * nckd, abs=1e-6)


def test_fcvit_probs_kl_chain_switches_heads_on_from_the_top_and_detaches_the_upper_side():
    # top (l=2) [0, ln3] -> [1/4, 3/4]; l=1 [0, 0] -> [1/2, 1/2]; l=0 [ln3, 0] -> [3/4, 1/4]
    kl_21 = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    kl_10 = 0.5 * math.log(0.5 / 0.75) + 0.5 * math.log(0.5 / 0.25)
    logits = [t(z).requires_grad_() for z in ([[LN3, 0.0]], [[0.0, 0.0]], [[0.0, LN3]])]
    assert L.fcvit_probs_kl_chain(logits, 0).item() == 0.0
    assert L.fcvit_probs_kl_chain(logits, 1).item() == pytest.approx(kl_21, abs=1e-6)
    chain = L.fcvit_probs_kl_chain(logits, 2)
    assert chain.item() == pytest.approx(kl_21 + kl_10, abs=1e-6)
    chain.backward()
    assert logits[0].grad.abs().sum() > 0 and logits[1].grad.abs().sum() > 0
    assert logits[2].grad is None or logits[2].grad.abs().sum() == 0


def test_rotation_views_put_originals_first_then_each_rotation():
    x = t([[[[1.0, 2.0], [3.0, 4.0]]]])
    v = L.rotation_views(x)
    assert v.shape == (4, 1, 2, 2)
    assert v[0, 0].tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert v[1, 0].tolist() == [[2.0, 4.0], [1.0, 3.0]]  # 90 degrees counter-clockwise
    assert v[2, 0].tolist() == [[4.0, 3.0], [2.0, 1.0]]
    with pytest.raises(ValueError, match="square"):
        L.rotation_views(torch.zeros(1, 3, 2, 3))


def test_sskd_similarity_and_contrastive_loss_by_hand():
    originals = t([[1.0, 0.0], [0.0, 1.0]])
    # rows r*B + i: (i=0) [2,0], (i=1) [0,3], (i=0) [1,1], (i=1) [1,0], (i=0) [-1,0], (i=1) [0,-1]
    rotated = t([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [1.0, 0.0], [-1.0, 0.0], [0.0, -1.0]])
    sim = L.sskd_similarity(originals, rotated)
    r = 1 / math.sqrt(2)
    assert sim.flatten().tolist() == pytest.approx([1, 0, 0, 1, r, r, 1, 0, -1, 0, 0, -1], abs=1e-6)
    # CE per row with target [0,1,0,1,0,1]: ln(1+e^-1) twice, ln 2, ln(1+e) three times
    expected = (2 * math.log(1 + math.exp(-1)) + LN2 + 3 * math.log(1 + math.e)) / 6
    assert L.sskd_contrastive_loss(sim).item() == pytest.approx(expected, abs=1e-6)


def test_selective_keep_keeps_correct_rows_and_the_best_ranked_wrong_ones():
    scores = t([[0.9, 0.1, 0.0], [0.5, 0.2, 0.1], [0.3, 0.2, 0.1], [0.1, 0.5, 0.2]])
    y = torch.tensor([0, 1, 2, 0])
    # ranks of the target: row0 0 (correct), row1 1, row2 2, row3 2 -> 3 wrong
    assert L.selective_keep(scores, y, 0.0).tolist() == [0]
    assert L.selective_keep(scores, y, 0.5).tolist() == [0, 1]  # int(3 * 0.5) = 1 wrong kept: row1
    assert L.selective_keep(scores, y, 1.0).tolist() == [0, 1, 2, 3]


def test_empty_selection_gives_a_zero_loss_not_nan():
    empty = torch.zeros(0, 3)
    assert L.kd_kl_div(empty, empty, 4.0).item() == 0.0
