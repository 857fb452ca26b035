"""ASHA never stops the students trained alone: every distilled trial is compared with them."""

from __future__ import annotations

from types import SimpleNamespace

from ray.tune.schedulers import TrialScheduler

from raykd.tune.search import _asha_sparing


def test_asha_stops_a_weak_distilled_trial_but_never_a_baseline():
    asha = _asha_sparing(["baseline"])(time_attr="it", metric="best_bma", mode="max", max_t=10,
                                       grace_period=2, reduction_factor=2)
    strong = SimpleNamespace(trial_id="a", config={"method": "kd"})
    weak_kd = SimpleNamespace(trial_id="b", config={"method": "kd"})
    weak_base = SimpleNamespace(trial_id="c", config={"method": "baseline"})
    for t in (strong, weak_kd, weak_base):
        asha.on_trial_add(None, t)
    assert asha.on_trial_result(None, strong, {"it": 2, "best_bma": 0.6}) == TrialScheduler.CONTINUE
    assert asha.on_trial_result(None, weak_kd, {"it": 2, "best_bma": 0.1}) == TrialScheduler.STOP
    assert asha.on_trial_result(None, weak_base, {"it": 2, "best_bma": 0.1}) == TrialScheduler.CONTINUE
    assert asha._num_stopped == 1
