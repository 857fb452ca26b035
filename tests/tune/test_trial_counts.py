"""What one trial costs besides learning: its models are built once and its student's latency is
measured once, for a plain run and for a teacher run with a distilled student."""

from __future__ import annotations

import pytest

import raykd.train.driver
import raykd.train.worker
import raykd.tune.trial
from raykd.config import RunConfig, load_config
from raykd.data.synthetic import make_synthetic
from raykd.tune.trial import _train


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("trial-counts") / "data"
    make_synthetic(path, num_images=40, image_size=32, seed=0)
    return path


def count_calls(monkeypatch, modules, name: str) -> list:
    """Count the calls of ``name`` made from any of ``modules`` (patched where each looks it up)."""
    calls = []
    for module in modules:
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, real=real, **k: calls.append(1) or real(*a, **k))
    return calls


@pytest.mark.parametrize("method", ["baseline", "kd"])
def test_a_trial_builds_its_models_once_and_measures_latency_once(data, tmp_path, monkeypatch, method):
    builds = count_calls(monkeypatch, [raykd.train.driver, raykd.train.worker], "build_run")
    latencies = count_calls(monkeypatch, [raykd.tune.trial], "measure_latency")
    teacher = ["teacher.name=test_resnet", "teacher.image_size=32"] if method != "baseline" else []
    cfg = load_config(RunConfig, None, [
        f"data.path={data}", f"output_dir={tmp_path}", "name=t0", "student.name=raykd_test_tiny_cnn",
        "student.image_size=32", f"distill.method={method}", "train.epochs=2", "train.batch_size=8",
        "scaling.num_workers=1", *teacher])
    reports, extra = [], {}

    _train(cfg, extra, "bma", reps=2, report=reports.append)

    assert len(builds) == 1 and len(latencies) == 1
    assert [r["epoch"] for r in reports] == [1, 2]
    assert all(r["latency_ms"] == extra["latency_ms"] > 0 for r in reports)


def test_a_trial_resumed_after_its_last_epoch_still_reports_its_objective(data, tmp_path):
    """The driver died after the last epoch's checkpoint, before the summary: the rerun has no
    epoch left to train, and reports the last one from the run's files (Tune needs a result)."""
    from raykd.artifact.rundir import RunDir

    cfg = load_config(RunConfig, None, [
        f"data.path={data}", f"output_dir={tmp_path}", "name=t1", "student.name=raykd_test_tiny_cnn",
        "student.image_size=32", "train.epochs=2", "train.batch_size=8", "scaling.num_workers=1"])
    _train(cfg, {}, "bma", reps=1, report=[].append)
    RunDir.of(cfg).summary_file.unlink()

    reports = []
    _train(cfg, {}, "bma", reps=1, report=reports.append)

    assert [r["epoch"] for r in reports] == [2] and reports[0]["best_bma"] is not None
    assert RunDir.of(cfg).finished()
