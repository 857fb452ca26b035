from collections import Counter

import numpy as np
import pytest

from raykd.data.sampling import (
    class_weights,
    epoch_plan,
    instance_hardness,
    repeat_counts,
    sampling_rates,
    target_counts,
)
from raykd.data.splits import assign_splits, group_ids


def test_groups_join_lesions_and_patients():
    # images 0,1 share a lesion; 1,2 share a patient; 3 is alone; 4 has no ids at all
    groups = group_ids(["L1", "L1", "L2", "L3", None], [None, "P1", "P1", "P2", None])
    assert groups[0] == groups[1] == groups[2]
    assert len({groups[0], groups[3], groups[4]}) == 3


def test_split_is_stratified_and_grouped_on_a_realistic_set():
    rng = np.random.default_rng(0)
    labels, lesions = [], []
    for c, n_lesions in enumerate([400, 120, 30]):  # imbalanced classes
        for k in range(n_lesions):
            for _ in range(rng.integers(1, 4)):  # 1-3 images per lesion
                labels.append(c)
                lesions.append(f"{c}-{k}")
    groups = group_ids(lesions, [None] * len(lesions))
    splits = assign_splits(labels, groups, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=5)
    for c in range(3):
        per = Counter(s for s, y in zip(splits, labels) if y == c)
        total = sum(per.values())
        assert per["train"] / total == pytest.approx(0.7, abs=0.05)
        assert per["val"] / total == pytest.approx(0.15, abs=0.05)
    by_lesion: dict[str, set] = {}
    for s, lesion in zip(splits, lesions):
        by_lesion.setdefault(lesion, set()).add(s)
    assert all(len(v) == 1 for v in by_lesion.values())
    assert splits == assign_splits(labels, groups, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=5)


def test_inverse_frequency_class_weights_by_hand():
    # counts 6, 3, 1, 0 -> N = 10: weights 10/6, 10/3, 10/1, and 0 for the empty class
    w = class_weights([6, 3, 1, 0])
    np.testing.assert_allclose(w, [10 / 6, 10 / 3, 10.0, 0.0], rtol=1e-6)
    np.testing.assert_array_equal(class_weights([6, 3], "none"), [1.0, 1.0])
    with pytest.raises(ValueError, match="inverse_frequency"):
        class_weights([1], "sqrt")


def test_ssdkd_weights_for_the_full_isic_2019_counts():
    # SSD-KD's weights are sum(n)/n_c: 25331/4522 = 5.602 for MEL, 25331/239 = 105.987 for DF
    counts = [4522, 12875, 3323, 867, 2624, 239, 253, 628]
    w = class_weights(counts)
    assert round(float(w[0]), 3) == 5.602 and round(float(w[5]), 3) == 105.987


def test_target_counts_per_strategy():
    counts = [10, 4, 1]
    assert target_counts(counts, "oversample").tolist() == [10, 10, 10]
    assert target_counts(counts, "oversample", 6).tolist() == [10, 6, 6]
    assert target_counts(counts, "undersample").tolist() == [1, 1, 1]
    assert target_counts(counts, "undersample", 5).tolist() == [5, 4, 1]
    with pytest.raises(ValueError, match="valid: none, oversample"):
        target_counts(counts, "smote")


def test_epoch_plans_keep_originals_and_change_per_epoch():
    labels = np.array([0] * 10 + [1] * 4 + [2] * 1)
    plan0 = epoch_plan(labels, "oversample", seed=1, epoch=0)
    assert Counter(labels[plan0].tolist()) == {0: 10, 1: 10, 2: 10}
    assert set(range(15)) <= set(plan0.tolist())  # every original row is used
    plan1 = epoch_plan(labels, "oversample", seed=1, epoch=1)
    assert sorted(plan0.tolist()) != sorted(plan1.tolist()) or list(plan0) != list(plan1)
    np.testing.assert_array_equal(plan0, epoch_plan(labels, "oversample", seed=1, epoch=0))
    under = epoch_plan(labels, "undersample", target=3, seed=1)
    assert Counter(labels[under].tolist()) == {0: 3, 1: 3, 2: 1} and len(set(under.tolist())) == 7


def test_instance_hardness_keeps_the_easiest_rows():
    labels = np.array([0, 0, 0, 0, 1, 1])
    hardness = np.array([0.9, 0.1, 0.8, 0.2, 0.5, 0.5])
    plan = epoch_plan(labels, "instance_hardness", target=2, hardness=hardness)
    assert sorted(plan.tolist()) == [0, 2, 4, 5]


def test_instance_hardness_scores_separable_points_as_easy():
    rng = np.random.default_rng(0)
    x = np.concatenate([rng.normal(0, 0.1, (20, 2)), rng.normal(5, 0.1, (20, 2))])
    x[0] = [5, 5]  # a class-0 point sitting inside class 1: hard
    y = np.array([0] * 20 + [1] * 20)
    h = instance_hardness(x, y, trees=20)
    assert h[0] < 0.5 and np.median(h[1:]) > 0.9


def test_streaming_repeat_counts_match_the_target_in_expectation():
    labels = np.array([0] * 1000 + [1] * 100)
    rates = sampling_rates([1000, 100], "oversample")  # class 1 x10
    np.testing.assert_allclose(rates, [1.0, 10.0])
    counts = repeat_counts(labels, rates, np.random.default_rng(0))
    assert counts[:1000].sum() == 1000 and counts[1000:].sum() == 1000
    rates = sampling_rates([1000, 100], "undersample")  # class 0 kept with p = 0.1
    kept = repeat_counts(labels, rates, np.random.default_rng(0))[:1000].sum()
    assert 70 <= kept <= 130
