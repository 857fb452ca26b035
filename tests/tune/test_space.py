"""Search spaces: every shipped file loads, bad input fails before Ray starts naming file, key and
valid names, and the define-by-run sampler draws a method's parameters only in its trials."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from raykd.config import ConfigError
from raykd.distill import METHODS
from raykd.tune.sampler import SpaceSampler
from raykd.tune.space_file import load_space

ROOT = Path(__file__).resolve().parents[2]
SPACES = sorted((ROOT / "search_spaces").glob("*.yaml"))


@pytest.mark.parametrize("path", SPACES, ids=lambda p: p.name)
def test_every_shipped_space_loads(path):
    space = load_space(path)
    assert space.methods and all(spec.method in METHODS for spec in space.methods.values())
    for spec in space.methods.values():
        assert spec.teacher is None or spec.teacher in space.teachers
        assert set(spec.students) <= set(space.students)


def test_the_shipped_spaces_cover_the_default_the_smoke_run_and_every_paper():
    names = {p.stem for p in SPACES}
    assert {"default", "smoke", "pareto", "skindistilvit", "ssdkd", "hierattn", "fusion"} <= names


def test_the_default_space_tunes_every_arm_alike_and_confirms_on_paired_seeds():
    space = load_space(ROOT / "search_spaces" / "default.yaml")
    arms = space.arms()
    assert space.budget.trials_per_arm >= 1 and space.budget.num_samples == len(arms) * space.budget.trials_per_arm
    assert space.confirm.seeds >= 5
    baselines = {sid for label, sid in arms if space.methods[label].method == "baseline"}
    assert baselines == set(space.students)  # every student architecture has its baseline arm
    assert all(not (set(m.search) | set(m.overrides)) & set(space.shared) for m in space.methods.values())


def test_every_registered_method_is_in_a_shipped_space():
    methods = {spec.method for p in SPACES for spec in load_space(p).methods.values()}
    assert methods == set(METHODS.names())


@pytest.mark.parametrize("name", ["smoke.yaml", "pareto.yaml", "default.yaml"])
def test_the_cpu_spaces_fit_every_method_to_a_student_before_ray_starts(name, tmp_path):
    import ray

    from raykd.tune.search import prepare_search

    was_up = ray.is_initialized()
    space = load_space(ROOT / "search_spaces" / name, [
        f"output_dir={tmp_path}", f"base.data.path={tmp_path / 'data'}", "base.data.synth.num_images=48"])
    space = prepare_search(space)  # generates the 48-image dataset and builds every pair on the CPU
    assert (tmp_path / "data" / "manifest.json").is_file()
    for spec in space.methods.values():
        assert spec.method == "cascade" or spec.students
    if "fitnet" in space.methods:  # a ViT student has no feature map: fitnet keeps only the CNNs
        assert "raykd_test_fcvit" not in space.methods["fitnet"].students
        if "fcvit" in space.methods:
            assert space.methods["fcvit"].students == ("raykd_test_fcvit",)
    assert ray.is_initialized() == was_up


def _write(tmp_path, doc: dict) -> Path:
    path = tmp_path / "space.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return path


BASE = {"students": ["raykd_test_tiny_cnn"], "teachers": {"t": {"model": {"name": "test_resnet"}}}}


@pytest.mark.parametrize("methods, match", [
    ({"kdd": {}},
     r"space\.yaml: methods\.kdd: unknown distillation method 'kdd'\. Did you mean 'kd'"
     r".*Registered: baseline"),
    ({"kd": {"params": {"temprature": {"uniform": [1, 2]}}}},
     r"space\.yaml: unknown key methods\.kd\.params\.'temprature'\. Did you mean .*'temperature'"
     r".*Valid keys here: alpha"),
    ({"kd": {"params": {"temperature": {"normal": [1, 2]}}}},
     r"methods\.kd\.params\.temperature: unknown distribution 'normal'"
     r".*Valid distributions: uniform, loguniform, int, choice"),
    ({"kd": {"params": {"alpha": {"uniform": [0.1, 1.5]}}}},
     r"methods\.kd\.params\.alpha=uniform\[0\.1, 1\.5\].*alpha=1\.5 is out of range \[0, 1\]"),
    ({"dkd": {"params": {"warmup_epochs": {"uniform": [1, 5]}}}},
     r"warmup_epochs is an integer parameter; use \{int"),
    ({"kd": {"params": {"temperature": {"loguniform": [0, 5]}}}}, r"loguniform needs lo > 0"),
    ({"kd": {"studnets": []}}, r"unknown key methods\.kd\.'studnets'\. Did you mean .*'students'"),
    ({"kd": {"students": ["resnet"]}},
     r"methods\.kd\.students: 'resnet'.*Valid keys here: raykd_test_tiny_cnn"),
    ({"kd": {"teacher": "vit"}}, r"methods\.kd\.teacher: 'vit'.*Valid keys here: t"),
    ({"fcvit": {"teacher": "t"}}, r"methods\.fcvit\.teacher: method 'fcvit' takes no teacher"),
    ({"kd": {"min_blocks": 2}}, r"min_blocks applies to methods trained as a pipeline of runs \(cascade\)"),
])
def test_a_bad_method_entry_names_the_file_the_key_and_the_valid_names(tmp_path, methods, match):
    with pytest.raises(ConfigError, match=match):
        load_space(_write(tmp_path, {**BASE, "methods": methods}))


@pytest.mark.parametrize("doc, match", [
    ({"shared": {"optim.lrr": {"uniform": [0.1, 0.2]}}},
     r"unknown key shared optim\.'lrr'\. Did you mean .*'lr'"),
    ({"shared": {"optim.lr": {"uniform": [0.1, 20.0]}}}, r"optim\.lr=20\.0 is out of range \[1e-08, 10\]"),
    ({"shared": {"train.epochs": {"uniform": [1, 3]}}}, r"train\.epochs is an integer"),
    ({"shared": {"distill.method": {"choice": ["kd"]}}},
     r"'distill\.method' cannot be set here: list methods under 'methods:'"),
    ({"shared": {"student.name": {"choice": ["x"]}}}, r"cannot be set here: list students under 'students:'"),
    ({"budget": {"num_sampels": 3}},
     r"unknown key 'budget\.num_sampels'\. Did you mean 'budget\.num_samples'"),
    ({"search": {"objectives": ["speed"]}}, r"unknown objective 'speed'; valid: latency_ms, params, size_mb"),
    ({"methodz": {}}, r"unknown key 'methodz'\. Did you mean 'methods'"),
    ({"students": ["resnet5O"]}, r"students\[0\]\.name: unknown model 'resnet5O'"),
    ({"teachers": {"t": {"model": {"name": "test_resnet"}, "checkpoint": "x"}}},
     r"teachers\.t needs exactly one of"),
    ({"teachers": {"t": {"model": {"name": "test_resnet"}, "method": "kd"}}},
     r"teachers\.t\.method 'kd' needs a teacher itself"),
])
def test_a_bad_top_level_entry_names_the_file_the_key_and_the_fix(tmp_path, doc, match):
    with pytest.raises(ConfigError, match=match):
        load_space(_write(tmp_path, {**BASE, "methods": {"baseline": {}}, **doc}))


def test_trials_need_ray_train_workers_while_teachers_may_train_in_process(tmp_path):
    doc = {**BASE, "teachers": {"t": {"model": {"name": "test_resnet"}, "set": {"scaling.num_workers": 0}}},
           "methods": {"kd": {}}}
    assert load_space(_write(tmp_path, doc)).teachers["t"].overrides == {"scaling.num_workers": 0}
    with pytest.raises(ConfigError, match=r"methods\.kd: scaling\.num_workers=0 .* cannot run inside a Tune"):
        load_space(_write(tmp_path, {**doc, "methods": {"kd": {"set": {"scaling.num_workers": 0}}}}))
    with pytest.raises(ConfigError, match=r"methods\.baseline: scaling\.num_workers=0"):
        load_space(_write(tmp_path, {**BASE, "base": {"scaling": {"num_workers": 0}},
                                     "methods": {"baseline": {}}}))


def test_the_command_line_refuses_a_bad_space_before_ray_starts(tmp_path, capsys):
    import ray

    from raykd.tune.__main__ import main

    was_up = ray.is_initialized()
    path = _write(tmp_path, {**BASE, "methods": {"kd": {}, "dkdd": {}}})
    assert main(["--space", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "'dkdd'" in err and "Did you mean 'dkd'" in err
    assert ray.is_initialized() == was_up


def test_overrides_address_the_space_document(tmp_path):
    path = _write(tmp_path, {**BASE, "methods": {"kd": {"params": {"alpha": {"uniform": [0.1, 0.9]}}}}})
    space = load_space(path, ["budget.num_samples=3", "methods.kd.params.alpha=0.5", "base.train.epochs=1"])
    assert space.budget.num_samples == 3
    assert space.methods["kd"].params["alpha"].fixed and space.methods["kd"].params["alpha"].args == (0.5,)
    assert space.base["train"]["epochs"] == 1


def _sampler_space(tmp_path):
    return load_space(_write(tmp_path, {
        "students": ["raykd_test_tiny_cnn", "raykd_test_fcvit"],
        "teachers": {"t": {"model": {"name": "test_resnet"}}},
        "shared": {"optim.lr": {"loguniform": [1e-4, 1e-2]}},
        "methods": {
            "baseline": {},
            "kd": {"params": {"temperature": {"uniform": [1, 10]}, "alpha": {"uniform": [0.1, 0.9]}}},
            "dkd": {"students": ["raykd_test_tiny_cnn"],
                    "params": {"temperature": {"uniform": [1, 8]}, "warmup_epochs": {"int": [1, 5]},
                               "dkd_beta": 8.0}},
        },
        "budget": {"num_samples": 16},
        "search": {"startup_trials": 6},
    }))


def test_each_trial_draws_only_its_own_methods_parameters(tmp_path):
    """Optuna define-by-run through Ray Tune's OptunaSearch (no cluster needed to ask and tell)."""
    from raykd.tune.search import _searcher

    space = _sampler_space(tmp_path)
    searcher = _searcher(space, tmp_path)
    seen = {}
    for i in range(16):
        config = searcher.suggest(f"t{i}")
        label = config["method"]
        spec = space.methods[label]
        assert set(config) <= spec.param_names(space.shared)
        assert "optim.lr" in config
        prefixes = {k.split(".")[0] for k in config if "." in k}
        others = prefixes & set(space.methods) - {label}
        assert not others, (label, config)
        if label == "kd":
            assert {"kd.temperature", "kd.alpha", "kd.student"} <= set(config)
        if label == "dkd":  # one student: not drawn; dkd_beta fixed: not drawn
            assert set(config) == {"method", "optim.lr", "dkd.temperature", "dkd.warmup_epochs"}
            assert isinstance(config["dkd.warmup_epochs"], int)
        if label == "baseline":
            assert set(config) == {"method", "optim.lr", "baseline.student"}
        seen.setdefault(label, 0)
        seen[label] += 1
        searcher.on_trial_complete(f"t{i}", {"best_bma": 0.1 + 0.01 * i, "training_iteration": 1})
    assert set(seen) == {"baseline", "kd", "dkd"}
    # the Optuna study (SQLite, in the experiment folder) holds the same conditional parameters
    import optuna

    study = optuna.load_study(study_name=space.name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    for t in study.trials:
        label = t.params["method"]
        assert set(t.params) <= space.methods[label].param_names(space.shared)


def test_the_first_trials_go_round_robin_over_the_methods(tmp_path):
    from raykd.tune.search import _searcher

    space = _sampler_space(tmp_path)
    searcher = _searcher(space, tmp_path)
    labels = [searcher.suggest(f"t{i}")["method"] for i in range(3)]
    assert labels == ["baseline", "kd", "dkd"]


def test_the_sampler_resolves_a_trial_into_a_typed_run_config(tmp_path):
    import optuna

    from raykd.tune.plan import TrialPlan

    space = _sampler_space(tmp_path)
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    sampler = SpaceSampler(space)
    plan = TrialPlan(space, tmp_path, {"t": str(tmp_path / "teacher")})
    for _ in range(10):
        trial = study.ask()
        sampler(trial)
        cfg = plan.run_config(trial.params, "abc123")
        label = trial.params["method"]
        assert cfg.name == "abc123" and cfg.output_dir == str(tmp_path / "runs")
        assert cfg.distill.method == label and cfg.optim.lr == trial.params["optim.lr"]
        if label == "dkd":
            p = cfg.distill.params
            assert (p.temperature, p.dkd_beta, p.warmup_epochs) == (
                trial.params["dkd.temperature"], 8.0, trial.params["dkd.warmup_epochs"])
            assert cfg.teacher.checkpoint == str(tmp_path / "teacher")
        if label == "baseline":
            assert cfg.teacher is None and cfg.distill.params == METHODS.get("baseline").Params()
            assert cfg.student.name == trial.params["baseline.student"]


def test_multi_objective_mode_studies_bma_against_latency(tmp_path):
    import optuna

    from raykd.tune.search import _searcher

    space = load_space(ROOT / "search_spaces" / "pareto.yaml", ["search.startup_trials=2"])
    searcher = _searcher(space, tmp_path)
    assert searcher.metric == ["best_bma", "latency_ms"] and searcher.mode == ["max", "min"]
    # (bma, ms): (0.5, 1) and (0.8, 4) trade off; (0.4, 3) is worse than (0.5, 1) on both
    for i, (bma, ms) in enumerate([(0.5, 1.0), (0.8, 4.0), (0.4, 3.0)]):
        searcher.suggest(f"t{i}")
        searcher.on_trial_complete(f"t{i}", {"best_bma": bma, "latency_ms": ms, "training_iteration": 2})
    study = optuna.load_study(study_name=space.name, storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sorted(t.values for t in study.best_trials) == [[0.5, 1.0], [0.8, 4.0]]
