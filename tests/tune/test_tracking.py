"""``--tracking``: the flag's forms and errors, and a tiny search tracked in a local MLflow store on a
real local Ray cluster (one MLflow run per trial with its params and per-epoch metrics, and the
published winner's artifacts)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import yaml

from raykd.config import ConfigError
from raykd.tune.tracking import (
    FORMS,
    Tracking,
    log_published,
    mlflow_store,
    parse_tracking,
    resolve_tracking,
    tracking_callbacks,
)

# ---------------------------------------------------------------------------------------------------
# the flag


@pytest.mark.parametrize(("value", "expected"), [
    (None, None), ("none", None), ("", None),
    ("mlflow", Tracking("mlflow")), ("MLflow", Tracking("mlflow")),
    ("mlflow:http://127.0.0.1:5000", Tracking("mlflow", "http://127.0.0.1:5000")),
    ("mlflow:sqlite:////tmp/x/mlflow.db", Tracking("mlflow", "sqlite:////tmp/x/mlflow.db")),
    ("tensorboard", Tracking("tensorboard")),
])
def test_the_valid_forms_parse_into_a_tracking(value, expected):
    assert parse_tracking(value) == expected
    if expected is not None:
        assert parse_tracking(str(expected)) == expected  # str() is the flag's form again


@pytest.mark.parametrize(("value", "why"), [
    ("foo", "unknown tracking"),
    ("tensorboard:/tmp/tb", "tensorboard takes no URI"),
    ("mlflow:", "no URI after the colon"),
    ("mlflow:/tmp/mlruns", "needs a scheme"),
])
def test_a_bad_value_is_a_config_error_listing_the_valid_forms(value, why):
    with pytest.raises(ConfigError, match=why) as err:
        parse_tracking(value)
    assert FORMS in str(err.value) and "mlflow:URI" in FORMS


def test_mlflow_3s_refused_file_store_is_caught_before_ray_starts(monkeypatch):
    monkeypatch.delenv("MLFLOW_ALLOW_FILE_STORE", raising=False)
    with pytest.raises(ConfigError, match="MLFLOW_ALLOW_FILE_STORE=true"):
        parse_tracking("mlflow:file:///tmp/mlruns")
    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")
    assert parse_tracking("mlflow:file:///tmp/mlruns") == Tracking("mlflow", "file:///tmp/mlruns")


def test_wandb_without_the_package_is_a_clear_error(monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)  # not installed (raykd does not depend on it)
    with pytest.raises(ConfigError, match="pip install wandb"):
        parse_tracking("wandb")


def test_the_command_line_refuses_a_bad_tracking_with_exit_2_before_ray_starts(tmp_path, capsys, monkeypatch):
    import ray

    from raykd.tune.__main__ import main

    was_up = ray.is_initialized()
    space = tmp_path / "missing.yaml"  # the flag is checked first
    assert main(["--space", str(space), "--tracking", "foo"]) == 2
    err = capsys.readouterr().err
    assert "--tracking 'foo'" in err and FORMS in err
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["--space", str(space), "--tracking", "wandb"]) == 2
    assert "pip install wandb" in capsys.readouterr().err
    assert ray.is_initialized() == was_up


def test_the_local_mlflow_store_is_sqlite_under_the_experiment_folder(tmp_path):
    uri, artifacts = mlflow_store(Tracking("mlflow"), tmp_path / "exp")
    assert uri == f"sqlite:///{tmp_path / 'exp' / 'mlruns' / 'mlflow.db'}"
    assert artifacts == (tmp_path / "exp" / "mlruns" / "artifacts").as_uri()
    assert mlflow_store(Tracking("mlflow", "http://host:5000"), tmp_path) == ("http://host:5000", None)


def test_each_form_is_a_ray_tune_logger_callback(tmp_path):
    from ray import cloudpickle
    from ray.air.integrations.mlflow import MLflowLoggerCallback
    from ray.tune.logger import TBXLoggerCallback

    assert tracking_callbacks(None, "x", tmp_path) == []
    (tb,) = tracking_callbacks(Tracking("tensorboard"), "x", tmp_path)
    assert isinstance(tb, TBXLoggerCallback)
    (ml,) = tracking_callbacks(Tracking("mlflow"), "x", tmp_path)
    assert isinstance(ml, MLflowLoggerCallback) and ml.experiment_name == "x"
    # Tune pickles the run config, callbacks included, into tuner.pkl; --resume unpickles it
    data = cloudpickle.dumps(ml)
    assert b"raykd.tune.tracking" in data and b"MLflowTrialCallback" in data  # by name, not by value
    assert type(cloudpickle.loads(data)) is type(ml)


def test_a_resumed_search_keeps_the_tracking_it_started_with(tmp_path):
    exp = tmp_path / "exp"
    assert resolve_tracking("mlflow", exp) == Tracking("mlflow")
    assert json.loads((exp / "tracking.json").read_text()) == {"tracking": "mlflow"}
    (exp / "tuner.pkl").write_bytes(b"")  # a search Tune can restore (with the callbacks it pickled)
    assert resolve_tracking(None, exp, resume=True) == Tracking("mlflow")
    assert resolve_tracking("mlflow", exp, resume=True) == Tracking("mlflow")
    with pytest.raises(ConfigError, match="started with --tracking mlflow"):
        resolve_tracking("tensorboard", exp, resume=True)
    (exp / "tracking.json").unlink()  # a search started before --tracking existed
    with pytest.raises(ConfigError, match="started with no tracking"):
        resolve_tracking("mlflow", exp, resume=True)


def test_no_tracking_logs_nothing(tmp_path):
    assert log_published(None, object(), tmp_path, "x") is None
    assert log_published(Tracking("tensorboard"), object(), tmp_path, "x") is None
    assert not (tmp_path / "mlruns").exists()


# ---------------------------------------------------------------------------------------------------
# a tracked search


@pytest.fixture(scope="module")
def tracked(ray_cluster, tmp_path_factory):
    """``python -m raykd.tune --tracking mlflow``: 2 trials (baseline, kd) x 2 epochs, tiny models."""
    import torch

    from raykd.tune.__main__ import main

    root = tmp_path_factory.mktemp("tracking")
    from tests.tune.test_search_ray import base

    common = base(root)
    doc = {
        "name": "tracked",
        "output_dir": common["output_dir"],
        "base": common["base"],
        "teachers": {"cnn": {"model": {"name": "raykd_test_tiny_cnn", "image_size": 32},
                             "set": {"train.epochs": 1, "scaling.num_workers": 0}}},
        "students": ["raykd_test_tiny_cnn"],
        "shared": {"optim.lr": {"loguniform": [1e-3, 1e-2]}},
        "methods": {"baseline": {}, "kd": {"params": {"temperature": {"uniform": [1.0, 8.0]},
                                                      "alpha": {"uniform": [0.2, 0.9]}}}},
        "budget": {"num_samples": 2, "max_concurrent": 2, "asha": False},
        "confirm": {"seeds": 0},
        "search": {"seed": 0, "teacher_margin": None},
        "export": {"max_images": 16, "latency_reps": 3},
    }
    path = root / "tracked.yaml"
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    torch.manual_seed(0)
    assert main(["--space", str(path), "--tracking", "mlflow"]) == 0
    exp = root / "out" / "tracked"
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{exp / 'mlruns' / 'mlflow.db'}")
    return exp, client, client.get_experiment_by_name("tracked")


def _runs(client, experiment, role: str):
    return client.search_runs([experiment.experiment_id], filter_string=f"tags.role = '{role}'")


def test_each_trial_is_an_mlflow_run_with_its_params_and_per_epoch_metrics(tracked):
    exp, client, experiment = tracked
    assert experiment is not None  # named after the space, in <experiment>/mlruns
    assert experiment.artifact_location == (exp / "mlruns" / "artifacts").as_uri()
    rows = json.loads((exp / "leaderboard.json").read_text())["rows"]
    runs = _runs(client, experiment, "trial")
    assert sorted(r.info.run_name for r in runs) == sorted(row["trial_id"] for row in rows)
    for run in runs:
        assert run.info.status == "FINISHED" and run.data.tags["trial_id"] == run.info.run_name
        config = json.loads((exp / run.info.run_name / "params.json").read_text())  # Tune's record
        assert run.data.params == {k: str(v) for k, v in config.items()}  # the sampled config
        assert run.data.params["method"] in ("baseline", "kd") and "optim.lr" in run.data.params
        if run.data.params["method"] == "kd":
            assert {"kd.temperature", "kd.alpha"} <= set(run.data.params)
        bma = client.get_metric_history(run.info.run_id, "val/bma")
        assert [m.step for m in bma] == [1, 2]  # one point per epoch that Tune reported
        assert all(0.0 <= m.value <= 1.0 for m in bma)
        epochs = client.get_metric_history(run.info.run_id, "epoch")
        assert [(m.step, m.value) for m in epochs] == [(1, 1.0), (2, 2.0)]
        assert {"train/loss", "best_bma", "latency_ms", "params"} <= set(run.data.metrics)
        assert not any(k.startswith("config") for k in run.data.metrics)  # the config is params


def test_the_published_winner_and_family_file_are_logged_to_mlflow(tracked):
    exp, client, experiment = tracked
    winner = json.loads((exp / "winner.json").read_text())
    (run,) = _runs(client, experiment, "published")
    assert run.info.run_name == "published" and run.info.status == "FINISHED"
    assert run.data.params["winner"] == winner["winner"] and run.data.params["method"] == winner["method"]
    assert run.data.tags["winner_trial_id"] == winner["trial_id"]
    assert run.data.metrics["val/bma"] == pytest.approx(winner["val"]["bma"])
    assert run.data.metrics["test/bma"] == pytest.approx(winner["test"]["bma"])
    top = {f.path for f in client.list_artifacts(run.info.run_id)}
    assert {"winner", "family.json", "winner.json", "leaderboard.md", "leaderboard.csv"} <= top
    best = {Path(f.path).name for f in client.list_artifacts(run.info.run_id, "winner/best")}
    assert {"model.onnx", "model.safetensors", "meta.json"} <= best
    stored = Path(run.info.artifact_uri.removeprefix("file://")) / "winner" / "best" / "model.onnx"
    assert stored.is_file() and stored.read_bytes() == Path(winner["onnx"]).read_bytes()
    assert stored.is_relative_to(exp / "mlruns" / "artifacts")
    (exp / "dl").mkdir()
    family = Path(client.download_artifacts(run.info.run_id, "family.json", str(exp / "dl")))
    assert json.loads(family.read_text()) == json.loads((exp / "family.json").read_text())
    assert json.loads((exp / "tracking.json").read_text()) == {"tracking": "mlflow"}
