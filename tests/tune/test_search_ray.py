"""The search job on a real local Ray cluster: a smoke search (2 methods x 2 trials and a trial that
fails) that ends in a leaderboard and an exported ONNX winner, and a killed search resumed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from raykd.tune.space_file import load_space

ROOT = Path(__file__).resolve().parents[2]


def base(root: Path) -> dict:
    return {
        "output_dir": str(root / "out"),
        "base": {
            "data": {"path": str(root / "data"), "synth": {"num_images": 160, "image_size": 32, "seed": 0}},
            "student": {"image_size": 32},
            "optim": {"schedule": "constant"},
            "scaling": {"num_workers": 1, "cpus_per_worker": 0.5},
            "train": {"epochs": 2, "batch_size": 16, "eval_batch_size": 64},
        },
        "students": ["raykd_test_tiny_cnn"],
        "shared": {"optim.lr": {"loguniform": [1e-3, 1e-2]}},
        "export": {"max_images": 16, "latency_reps": 3},
    }


@pytest.fixture(scope="module")
def smoke(ray_cluster, tmp_path_factory):
    from raykd.tune.search import run_tune

    root = tmp_path_factory.mktemp("tune")
    doc = base(root) | {
        "name": "smoke",
        # stage 1 runs on the driver: the teacher may train in-process (Ray Train's local mode)
        "teachers": {"cnn": {"model": {"name": "raykd_test_tiny_cnn", "image_size": 32},
                             "set": {"train.epochs": 1, "scaling.num_workers": 0}}},
        "methods": {
            "baseline": {},
            "kd": {"params": {"temperature": {"uniform": [1.0, 8.0]}, "alpha": {"uniform": [0.2, 0.9]}}},
            # fault injection: the worker exits hard in epoch 1 and the run may not retry
            "broken": {"method": "baseline", "set": {"train.crash_in_epoch": 1, "train.max_failures": 0}},
        },
        "budget": {"num_samples": 5, "min_trials_per_method": 2, "max_concurrent": 2, "trial_retries": 0},
        # each arm's best trial retrained on 2 seeds ("broken" has none that finished: not confirmed)
        "confirm": {"seeds": 2},
        # a 1-epoch teacher is near chance: this search checks the machinery, not the teacher
        "search": {"seed": 0, "teacher_margin": None},
    }
    path = root / "smoke.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    torch_seed()
    outcome = run_tune(load_space(path))
    return outcome, load_space(path)


def torch_seed():
    import torch

    torch.manual_seed(0)


def test_a_smoke_search_of_two_methods_by_two_trials_ends_in_a_leaderboard_and_an_onnx_winner(smoke):
    import onnxruntime as ort

    from raykd.serve.family import load_family

    outcome, space = smoke
    board = outcome.leaderboard
    rows = board.ranked()
    assert len(outcome.records) == len(rows) == 5
    done = [r for r in rows if r.status != "failed"]
    assert sorted(r.method for r in done) == ["baseline", "baseline", "kd", "kd"]  # round-robin first
    for r in done:  # ranked by val BMA, with size and CPU latency measured
        assert 0.0 <= r.val["bma"] <= 1.0 and r.params == 1344 and r.latency_ms > 0
    assert [r.val["bma"] for r in done] == sorted((r.val["bma"] for r in done), reverse=True)
    for name in ("leaderboard.csv", "leaderboard.json", "leaderboard.md"):
        assert (outcome.experiment_dir / name).is_file()
    assert board.markdown().count("\n| ") == 5  # header + separator + 5 rows

    pub = outcome.published
    winner = board.winner()
    assert pub.winner is winner and winner.status == "ok"
    assert 0.0 <= winner.test["bma"] <= 1.0  # scored once on the test split, by its run
    onnx = Path(pub.onnx[winner.run])
    assert onnx == Path(winner.run_dir) / "best" / "model.onnx" and onnx.is_file()
    session = ort.InferenceSession(str(onnx), providers=["CPUExecutionProvider"])
    logits = session.run(None, {session.get_inputs()[0].name: np.zeros((2, 3, 32, 32), np.float32)})[0]
    assert logits.shape == (2, 8)
    report = json.loads((onnx.parent / "export_report.json").read_text())
    assert report["variants"][0]["max_abs_diff"] <= 1e-4  # parity with torch on validation images
    for family_file in (outcome.experiment_dir / "family.json", Path(space.output_dir) / "family.json"):
        family = load_family(family_file)  # what the Serve app reads
        served = Path(family.get(None).onnx)  # a content-addressed copy of the winner's ONNX file
        assert family.winner == winner.run and served.read_bytes() == onnx.read_bytes()
        assert served.parent.parent == outcome.experiment_dir / "published"


def test_conditional_parameters_appear_only_in_their_methods_trials(smoke):
    import optuna

    outcome, space = smoke
    for rec in outcome.records:
        label = rec.config["method"]
        keys = set(rec.config)
        assert keys <= space.methods[label].param_names(space.shared), (label, keys)
        if label == "kd":
            assert {"kd.temperature", "kd.alpha", "optim.lr"} <= keys
        else:
            assert not any(k.startswith("kd.") for k in keys)
    study = optuna.load_study(study_name="smoke", storage=f"sqlite:///{outcome.experiment_dir / 'optuna.db'}")
    assert len(study.trials) == 5
    for t in study.trials:
        kd_keys = {k for k in t.params if k.startswith("kd.")}
        assert kd_keys == ({"kd.temperature", "kd.alpha"} if t.params["method"] == "kd" else set())


def test_each_trial_is_a_train_run_named_after_its_trial_id(smoke):
    outcome, _ = smoke
    runs = outcome.experiment_dir / "runs"
    for rec in outcome.records:
        cfg = yaml.safe_load((runs / rec.trial_id / "config.yaml").read_text())
        method = "kd" if rec.config["method"] == "kd" else "baseline"
        assert cfg["name"] == rec.trial_id and cfg["distill"]["method"] == method
        if rec.config["method"] == "kd":  # one worker on small data: trained in the trial's process
            assert cfg["teacher"]["checkpoint"] == str(outcome.experiment_dir / "teachers" / "cnn")
            assert (runs / rec.trial_id / "checkpoint" / "state.pt").is_file()
            assert rec.last_result["best_bma"] is not None and "latency_ms" in rec.last_result
    assert (outcome.experiment_dir / "teachers" / "cnn" / "summary.json").is_file()  # stage 1


def test_every_trial_records_where_its_wall_time_went(smoke):
    outcome, _ = smoke
    runs = outcome.experiment_dir / "runs"
    for rec in outcome.records:
        if rec.config["method"] == "broken":
            continue
        timing = json.loads((runs / rec.trial_id / "trial_timing.json").read_text())
        assert timing["executor"] == "local" and timing["runs"] == 1
        assert timing["train_s"] > 0 and timing["eval_s"] > 0
        parts = sum(timing[k] for k in ("build_s", "data_s", "train_s", "eval_s", "report_s", "test_s"))
        assert parts <= timing["wall_s"]
        if timing["stopped_runs"]:  # ASHA stopped it: its epochs' seconds come from metrics.json
            assert not (runs / rec.trial_id / "timing.json").exists()
            continue
        run = json.loads((runs / rec.trial_id / "timing.json").read_text())  # the run's own record
        assert 0 < run["compute_share"] <= 1 and run["train_s"] == pytest.approx(timing["train_s"])
    f = outcome.findings
    # 4 finished trials and 4 confirmation runs (2 arms x 2 seeds), each with its timing record
    assert f.trials_timed == 8 and f.runs_timed == 4 and 0 < f.compute_share <= 1
    assert any(line.startswith("compute share:") for line in f.lines())
    assert json.loads((outcome.experiment_dir / "findings.json").read_text())["trials_timed"] == 8


def test_each_methods_first_trial_runs_its_paper_setting_and_is_marked(smoke):
    from raykd.distill.paper import paper_params

    outcome, _ = smoke
    kd = [r for r in outcome.leaderboard.rows if r.method == "kd"]
    paper = [r for r in kd if r.paper]
    assert len(paper) == 1 and len(kd) == 2
    expected = paper_params("kd")
    assert paper[0].hparams["temperature"] == expected["temperature"]
    assert paper[0].hparams["alpha"] == expected["alpha"]
    assert "kd (paper)" in outcome.leaderboard.markdown()


def test_a_failing_trial_is_recorded_with_its_error_and_the_search_continues(smoke):
    outcome, _ = smoke
    failed = [r for r in outcome.leaderboard.rows if r.status == "failed"]
    assert [r.method for r in failed] == ["broken"]
    # one worker on small data trains in the trial's own process: the hard exit kills that process
    assert failed[0].error.startswith("ActorDiedError: The actor is dead because its worker process has died")
    assert "failed:" in outcome.leaderboard.markdown()
    assert sum(r.status != "failed" for r in outcome.leaderboard.rows) == 4  # the others still ran


@pytest.fixture(scope="module")
def resumed(ray_cluster, tmp_path_factory):
    """A search with a cascade trial, its driver killed (SIGKILL) once a run finished, then resumed."""
    from raykd.tune.search import run_tune

    root = tmp_path_factory.mktemp("resume")
    doc = base(root) | {
        "name": "resume",
        "teachers": {"vit": {"model": {"name": "raykd_test_fcvit", "image_size": 32, "kwargs": {"depth": 3}},
                             "set": {"train.epochs": 1, "scaling.num_workers": 0}}},
        # the cascade's steps train long enough for the kill to land between two finished runs
        "methods": {"baseline": {"set": {"train.epochs": 1}},
                    "cascade": {"teacher": "vit", "min_blocks": 1, "set": {"train.epochs": 30},
                                "params": {"temperature": {"uniform": [1.0, 4.0]}}}},
        "budget": {"num_samples": 2, "max_concurrent": 2, "asha": False},
        "confirm": {"seeds": 0},
        "search": {"teacher_margin": None},
    }
    path = root / "resume.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    exp = root / "out" / "resume"
    env = {**os.environ, "RAY_ADDRESS": ray_cluster.get_runtime_context().gcs_address}
    log = (root / "driver.log").open("w")
    proc = subprocess.Popen([sys.executable, "-m", "raykd.tune", "--space", str(path)], cwd=ROOT, env=env,
                            stdout=log, stderr=subprocess.STDOUT)
    finished: dict[str, float] = {}
    try:
        deadline = time.monotonic() + 400
        while time.monotonic() < deadline and proc.poll() is None:
            done = {p.parent.name: p.stat().st_mtime for p in exp.glob("runs/*/summary.json")}
            states = [p.stat().st_mtime for p in exp.glob("experiment_state-*.json")]
            if done and states and max(states) > max(done.values()):
                finished = done
                break
            time.sleep(0.5)
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    assert finished, (root / "driver.log").read_text()[-3000:]
    torch_seed()
    outcome = run_tune(load_space(path), resume=True)
    return outcome, finished, exp


def test_a_killed_search_resumes_without_repeating_a_finished_run(resumed):
    outcome, finished, exp = resumed
    runs = [p.parent.name for p in exp.glob("runs/*/summary.json")]
    assert len(finished) < len(runs)  # the kill came before the end
    ids = [r.trial_id for r in outcome.records]
    assert len(ids) == 2 and {name.split("-d")[0] for name in finished} <= set(ids)
    for name, mtime in finished.items():  # never retrained
        assert (exp / "runs" / name / "summary.json").stat().st_mtime == mtime
    assert all(r.status == "ok" for r in outcome.leaderboard.rows)
    assert Path(outcome.published.onnx[outcome.published.winner.run]).is_file()


def test_the_cascade_runs_as_a_pipeline_of_runs_and_reports_bma_per_depth(resumed):
    outcome, _, exp = resumed
    (trial,) = [r for r in outcome.records if r.config["method"] == "cascade"]
    steps = json.loads((exp / "runs" / trial.trial_id / "pipeline.json").read_text())["steps"]
    assert [s["depth"] for s in steps] == [3, 2, 1] and steps[0]["parent"]
    assert steps[0]["params"] > steps[1]["params"] > steps[2]["params"]  # one block fewer each time
    parents = [str(exp / "teachers" / "vit"), steps[1]["run_dir"]]
    for step, parent in zip(steps[1:], parents, strict=True):  # each depth distils from the one above
        cfg = yaml.safe_load((Path(step["run_dir"]) / "config.yaml").read_text())
        assert cfg["name"] == f"{trial.trial_id}-d{step['depth']}" and cfg["distill"]["method"] == "cascade"
        assert cfg["student"]["cut_blocks"] == list(range(step["depth"]))
        assert cfg["teacher"]["checkpoint"] == parent
        assert 0.0 <= step["val"]["bma"] <= 1.0
    rows = [r for r in outcome.leaderboard.rows if r.method == "cascade"]
    assert sorted(r.depth for r in rows) == [1, 2]
    md = outcome.leaderboard.markdown()
    assert f"Cascade {trial.trial_id}: val bma per depth" in md
    assert (exp / f"cascade_{trial.trial_id}.png").is_file()


def test_a_trial_whose_process_dies_restarts_from_its_checkpoint(ray_cluster, tmp_path):
    """The trial trains in its own process (one worker, small data) and that process exits hard in
    epoch 2: Tune restarts the trial (budget.trial_retries), which resumes from epoch 1's checkpoint
    and finishes with every epoch recorded once."""
    from raykd.tune.search import run_tune

    doc = base(tmp_path) | {
        "name": "retry",
        "teachers": {},
        "methods": {"baseline": {"set": {"train.crash_in_epoch": 2}}},
        "budget": {"num_samples": 1, "asha": False, "trial_retries": 1},
        "confirm": {"seeds": 0},
        "search": {"seed": 0, "teacher_margin": None},
        "export": {"onnx": False},
    }
    path = tmp_path / "retry.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    outcome = run_tune(load_space(path))
    [record] = outcome.records
    run = outcome.experiment_dir / "runs" / record.trial_id
    assert record.status == "TERMINATED", record.error
    assert (run / ".crash_injected").is_file()  # the process really died once, in epoch 2
    assert [r["epoch"] for r in json.loads((run / "metrics.json").read_text())] == [1, 2]
    assert json.loads((run / "summary.json").read_text())["epochs"] == 2


def test_each_arms_best_trial_is_retrained_on_the_same_seeds_and_compared_seed_by_seed(smoke):
    from raykd.metrics.compare import paired_difference
    from raykd.tune.confirm import best_trials

    outcome, space = smoke
    findings = outcome.findings
    confirmed = findings.confirmed
    assert findings.seeds == [1, 2]
    # "broken" never finished a trial: only baseline and kd are confirmed, each on both seeds
    assert sorted((r["label"], r["seed"]) for r in confirmed) == [("baseline", 1), ("baseline", 2), ("kd", 1), ("kd", 2)]
    assert all(r["error"] is None for r in confirmed)
    best = {arm[0]: rec for arm, rec in best_trials(_plan(outcome, space), outcome.records).items()}
    for r in confirmed:
        cfg = yaml.safe_load((Path(r["run_dir"]) / "config.yaml").read_text())
        trial = yaml.safe_load((outcome.experiment_dir / "runs" / best[r["label"]].trial_id / "config.yaml").read_text())
        assert r["trial_id"] == best[r["label"]].trial_id
        assert cfg["train"]["seed"] == cfg["data"]["sampling"]["seed"] == r["seed"]  # the same seed for every arm
        assert cfg["optim"] == trial["optim"] and cfg["distill"] == trial["distill"]  # the best trial's settings
        summary = json.loads((Path(r["run_dir"]) / "summary.json").read_text())
        assert r["test"]["bma"] == summary["test"]["bma"]  # scored once on test, with its best epoch
    (c,) = findings.comparisons
    tests = {(r["label"], r["seed"]): r["test"]["bma"] for r in confirmed}
    d = paired_difference({s: tests[("kd", s)] for s in (1, 2)}, {s: tests[("baseline", s)] for s in (1, 2)})
    (kd,) = c["arms"]
    assert kd["diff"]["mean"] == pytest.approx(d.mean) and kd["diff"]["wins"] == d.wins
    lines = json.loads((outcome.experiment_dir / "findings.json").read_text())["lines"]
    assert any(line.startswith("student raykd_test_tiny_cnn: alone (baseline) test bma") for line in lines)
    assert any(line.startswith("  kd (kd): test bma") and "wins" in line for line in lines)
    assert any("stage 2b (confirmation)" in line for line in lines)
    saved = json.loads((outcome.experiment_dir / "findings.json").read_text())
    assert 0.0 <= saved["data_wait_share"] < 1.0 and saved["trial_wait_s"] > 0  # every epoch timed its waits
    assert any(line.startswith("data wait: ") and "waiting for the next batch" in line for line in lines)


def _plan(outcome, space):
    from raykd.tune.plan import TrialPlan, absolute_paths

    return TrialPlan(absolute_paths(space), outcome.experiment_dir, {})
