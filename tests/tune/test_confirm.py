"""The fair comparison: every arm gets the same trials, each arm's best is retrained on the same
seeds from the same initial student weights, and the findings compare arms seed by seed with
intervals (never a best-of-N with a best-of-1). No cluster: the Ray part is in test_search_ray.py."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import yaml
from scipy import stats

from raykd.config import ConfigError, RunConfig, load_config
from raykd.data.synthetic import make_synthetic
from raykd.metrics.compare import mean_interval, paired_difference
from raykd.train.build import build_run
from raykd.tune.confirm import ConfirmedRun, seeded
from raykd.tune.findings import Findings, compare_arms
from raykd.tune.space_file import load_space


def _space(tmp_path: Path, **extra):
    doc = {
        "base": {"data": {"path": str(tmp_path / "data")}, "student": {"image_size": 32}},
        "students": ["raykd_test_tiny_cnn", "raykd_test_hierattn"],
        "teachers": {"t": {"model": {"name": "test_resnet"}}},
        "shared": {"optim.lr": {"loguniform": [1e-4, 1e-2]}},
        "methods": {
            "baseline": {},
            "kd": {"students": ["raykd_test_tiny_cnn"],
                   "params": {"temperature": {"uniform": [1, 10]}, "alpha": {"uniform": [0.1, 0.9]}}},
        },
        "budget": {"trials_per_arm": 3},
        "search": {"startup_trials": 2},
        **extra,
    }
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc))
    return load_space(path)


def test_every_arm_gets_the_same_trials_and_its_first_is_the_paper_setting_at_the_shared_centre(tmp_path):
    from raykd.distill.paper import paper_params
    from raykd.tune.plan import TrialPlan
    from raykd.tune.search import _searcher

    space = _space(tmp_path)
    assert space.arms() == [("baseline", "raykd_test_tiny_cnn"), ("baseline", "raykd_test_hierattn"),
                            ("kd", "raykd_test_tiny_cnn")]
    assert space.budget.num_samples == 9  # 3 arms x 3 trials
    searcher = _searcher(space, tmp_path)
    plan = TrialPlan(space, tmp_path, {"t": str(tmp_path / "teacher")})
    configs = []
    for i in range(9):
        configs.append(searcher.suggest(f"t{i}"))
        searcher.on_trial_complete(f"t{i}", {"best_bma": 0.1 * (i % 4), "training_iteration": 1})
    arms = [(plan.resolve(c).label, plan.resolve(c).student) for c in configs]
    assert Counter(arms) == {arm: 3 for arm in space.arms()}
    first = configs[:3]
    assert [c["optim.lr"] for c in first] == [pytest.approx(1e-3)] * 3  # the geometric centre, for every arm
    kd = next(c for c in first if c["method"] == "kd")
    assert kd["kd.temperature"] == paper_params("kd")["temperature"] and kd["kd.alpha"] == paper_params("kd")["alpha"]
    assert len({c["optim.lr"] for c in configs[3:]}) > 1  # later trials are the sampler's


def test_a_method_may_not_have_its_own_range_of_a_shared_knob(tmp_path):
    with pytest.raises(ConfigError, match=r"methods.kd sets or searches optim.lr.*same ranges"):
        _space(tmp_path, methods={"baseline": {}, "kd": {"search": {"optim.lr": {"loguniform": [1e-3, 1e-1]}}}})
    with pytest.raises(ConfigError, match="confirm.seeds must be 0.*or at least 2"):
        _space(tmp_path, confirm={"seeds": 1})


def test_seed_k_gives_the_baseline_and_a_distilled_run_the_same_initial_student(tmp_path):
    manifest = make_synthetic(tmp_path / "data", num_images=40, image_size=32, seed=0)
    base = [f"data.path={tmp_path / 'data'}", "student.name=raykd_test_hierattn", "student.image_size=32"]

    def student(seed: int, *sets: str) -> dict[str, torch.Tensor]:
        cfg = seeded(load_config(RunConfig, None, [*base, *sets]), seed)
        assert cfg.train.seed == seed and cfg.data.sampling.seed == seed
        torch.manual_seed(12345)  # whatever the global stream holds before the build
        return build_run(cfg, manifest).student.state_dict()

    alone = student(3)
    for sets in (["distill.method=kd", "teacher.name=test_resnet"],
                 ["distill.method=fitnet", "teacher.name=raykd_test_tiny_cnn"]):
        distilled = student(3, *sets)  # a teacher was built first, and a method with its own layers
        assert all(torch.equal(alone[k], distilled[k]) for k in alone)
    other = student(4)
    assert not all(torch.equal(alone[k], other[k]) for k in alone)


def _run(label, method, seed, test, student="s", teacher="t"):
    return ConfirmedRun(label=label, method=method, student=student, teacher=teacher, seed=seed, trial_id="x",
                        run_dir="/nonexistent", val=0.5, test={"bma": test})


def test_the_findings_compare_each_method_with_its_students_baseline_seed_by_seed():
    base = [0.40, 0.45, 0.42, 0.50, 0.43]
    kd = [0.47, 0.49, 0.45, 0.58, 0.44]  # +7, +4, +3, +8, +1 points
    runs = [_run("baseline", "baseline", s, v) for s, v in enumerate(base)]
    runs += [_run("kd", "kd", s, v) for s, v in enumerate(kd)]
    runs += [_run("dkd", "dkd", s, v) for s, v in enumerate(base[:4])]  # one seed failed: paired on 4
    runs += [_run("vit", "baseline", s, 0.3, student="v") for s in range(5)]
    teachers = {"t": {"val": 0.7, "test": 0.6, "flops": 1e7}}
    comparisons = compare_arms(runs, teachers, "bma", {"baseline/s": 2, "kd/s": 2, "dkd/s": 2}, 0.95)
    by_student = {c["student"]: c for c in comparisons}
    assert set(by_student) == {"s", "v"}  # every student architecture has its line
    c = by_student["s"]
    assert c["trials_per_arm"] == 2
    assert c["baseline"]["interval"]["mean"] == pytest.approx(mean_interval(base).mean)
    kd_row = next(a for a in c["arms"] if a["label"] == "kd")
    d = paired_difference(dict(enumerate(kd)), dict(enumerate(base)))
    diffs = [k - b for k, b in zip(kd, base)]
    h = stats.t.ppf(0.975, 4) * stats.tstd(diffs) / 5 ** 0.5
    assert kd_row["diff"]["mean"] == pytest.approx(sum(diffs) / 5)
    assert kd_row["diff"]["low"] == pytest.approx(sum(diffs) / 5 - h) and d.wins == kd_row["diff"]["wins"] == 5
    assert kd_row["retention"] == pytest.approx(sum(kd) / 5 / 0.6)
    dkd_row = next(a for a in c["arms"] if a["label"] == "dkd")
    assert dkd_row["diff"]["n"] == 4 and dkd_row["diff"]["wins"] == 0 and dkd_row["diff"]["mean"] == 0
    assert by_student["v"]["arms"] == [] and by_student["v"]["baseline"]["interval"]["n"] == 5

    f = Findings(metric="bma", comparisons=comparisons, seeds=list(range(5)))
    lines = f.lines()
    assert lines[0].startswith("confirmation: each arm's best trial retrained on seeds 0-4")
    head = next(line for line in lines if line.startswith("student s:"))
    assert "(5 seeds, 2 tuned trials per arm)" in head and "best method kd +4.6 [" in head
    assert head.endswith("above the baseline with an interval above 0: kd")
    assert any(line.startswith("  kd (kd): test bma 0.4860 [") and "wins 5/5" in line and "retention 0.81" in line
               for line in lines)
    assert not any("KD gain" in line for line in lines)


def test_without_a_confirmation_no_gain_is_reported():
    lines = Findings(metric="bma").lines()
    assert any(line.startswith("no confirmation stage (confirm.seeds 0): no distillation gain") for line in lines)


def test_an_arm_tuned_with_one_trial_reuses_it_as_its_own_seeds_run_only(tmp_path):
    from raykd.artifact.rundir import RunDir
    from raykd.tune.confirm import _reuse
    from raykd.tune.plan import TrialPlan, absolute_paths
    from raykd.tune.search import TrialRecord

    plan = TrialPlan(absolute_paths(_space(tmp_path)), tmp_path / "exp", {"t": str(tmp_path / "teacher")})
    rec = TrialRecord(trial_id="abc", config={"method": "baseline", "optim.lr": 1e-3,
                                              "baseline.student": "raykd_test_tiny_cnn"},
                      status="TERMINATED", error=None, last_result={"best_bma": 0.3})

    def run(seed):
        return ConfirmedRun(label="baseline", method="baseline", student="raykd_test_tiny_cnn", teacher=None,
                            seed=seed, trial_id="abc", run_dir="unset")

    first = run(0)
    assert not _reuse(plan, rec, 0, first)  # the trial never finished (stopped early): train it anew
    (plan.runs_dir / "abc").mkdir(parents=True)
    RunDir(plan.runs_dir / "abc").write_summary({"best": 0.3, "test": {"bma": 0.25}})
    assert _reuse(plan, rec, 0, first) and first.reused and first.test == {"bma": 0.25}
    assert first.run_dir == str(plan.runs_dir / "abc")
    assert not _reuse(plan, rec, 1, run(1))  # the trial trained with seed 0 (the base train.seed) only
