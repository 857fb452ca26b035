"""Experiment tracking of the search job: ``--tracking mlflow[:URI]|tensorboard|wandb``.

Each form is a Ray Tune logger callback on the driver, added to the Tuner's ``RunConfig``:

- ``mlflow``: ``MLflowTrialCallback`` (Ray's ``MLflowLoggerCallback``, see
  :func:`mlflow_callback_class`): one MLflow run per trial, named after the trial id, with the
  trial's sampled config as params (``method``, ``optim.lr``, ``kd.temperature``, ...) and every
  epoch's report as metrics (step = the trial's report number). Without a URI the store is
  local, under the experiment folder: ``<experiment>/mlruns/mlflow.db`` (SQLite: MLflow 3 refuses
  its old ``./mlruns`` file store unless ``MLFLOW_ALLOW_FILE_STORE=true``) with the artifacts in
  ``<experiment>/mlruns/artifacts``.
  The experiment is named after the space. After stage 3, :func:`log_published` logs the exported
  winner (its ``best`` artifact folder with the ONNX file), the family file, ``winner.json`` and
  the leaderboard into a run named ``published``.
- ``tensorboard``: Ray's ``TBXLoggerCallback``: event files in each trial's folder
  (``<experiment>/<trial_id>/events.out.tfevents.*``); ``tensorboard --logdir <experiment>``.
  Tune adds this logger by itself whenever tensorboardX is installed (``ray[tune]`` brings it),
  unless ``TUNE_DISABLE_AUTO_CALLBACK_LOGGERS=1``; the flag asks for it explicitly.
- ``wandb``: Ray's ``WandbLoggerCallback`` (project ``$WANDB_PROJECT`` or the space's name, group
  the space's name, local files under the experiment folder). raykd does not install wandb: the
  flag stops before Ray starts when it cannot be imported.

``--resume``: ``tune.Tuner.restore`` takes no ``RunConfig``; Ray restores the one pickled into
``<experiment>/tuner.pkl`` when the search started, callbacks included. So a resumed search keeps
the tracking it started with (recorded in ``<experiment>/tracking.json``): ``--resume`` alone
keeps it, and a different ``--tracking`` is refused before Ray starts. A resumed trial continues
its MLflow run (found by its ``trial_id`` tag), its steps after the ones already logged.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.artifact.rundir import RunDir
from raykd.config import ConfigError

log = logging.getLogger(__name__)

__all__ = ["FORMS", "PUBLISHED_RUN", "Tracking", "log_published", "mlflow_callback_class", "mlflow_store",
           "parse_tracking", "resolve_tracking", "tracking_callbacks"]

#: The valid values of ``--tracking``, as the error messages list them.
FORMS = "none, mlflow, mlflow:URI, tensorboard, wandb"
KINDS = ("mlflow", "tensorboard", "wandb")
MLFLOW_DIR = "mlruns"
MLFLOW_DB = "mlflow.db"
RECORD_FILE = "tracking.json"
PUBLISHED_RUN = "published"
#: Tune's bookkeeping keys that are not metrics (the config is logged as params).
_NOT_METRICS = {"config", "trial_id", "date", "hostname", "node_ip", "pid", "timestamp", "done",
                "checkpoint_dir_name"}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*:")


@dataclass(frozen=True)
class Tracking:
    """What ``--tracking`` asked for: ``kind`` (mlflow | tensorboard | wandb) and, for mlflow, the
    tracking URI (``None``: the local store under the experiment folder)."""

    kind: str
    uri: str | None = None

    def __str__(self) -> str:  # the flag's form
        return f"{self.kind}:{self.uri}" if self.uri else self.kind


def _bad(value: str, why: str) -> ConfigError:
    return ConfigError(f"--tracking {value!r}: {why} (valid forms: {FORMS})")


def parse_tracking(value: str | Tracking | None) -> Tracking | None:
    """The ``--tracking`` value as a :class:`Tracking` (``None`` for no tracking), checked before
    Ray starts: a known form, an MLflow URI MLflow can open, the package the form needs.

    Raises:
        ConfigError: an unknown form, a bad URI, or mlflow/wandb that cannot be imported.
    """
    if value is None or isinstance(value, Tracking):
        return value
    text = str(value).strip()
    if text.lower() in ("", "none", "off"):
        return None
    kind, sep, uri = text.partition(":")
    kind = kind.strip().lower()
    if kind not in KINDS:
        raise _bad(text, "unknown tracking")
    if sep and kind != "mlflow":
        raise _bad(text, f"{kind} takes no URI")
    if kind == "mlflow":
        try:
            import mlflow  # noqa: F401  # lazy: an optional tracker, checked when it is asked for
            from mlflow.environment_variables import MLFLOW_ALLOW_FILE_STORE
        except ImportError as e:
            raise ConfigError(f"--tracking mlflow needs MLflow ({e}): pip install mlflow-skinny") from e
        uri = uri.strip()
        if sep and not uri:
            raise _bad(text, "no URI after the colon (leave the colon out for the local store)")
        if uri and uri != "databricks" and not _SCHEME.match(uri):
            raise _bad(text, "the MLflow tracking URI needs a scheme: http(s)://host:port, "
                             "sqlite:////abs/path/mlflow.db, postgresql://..., databricks "
                             "(for the local store under the experiment folder give no URI)")
        if uri.startswith("file:") and not MLFLOW_ALLOW_FILE_STORE.get():
            raise _bad(text, "MLflow 3 refuses file stores unless MLFLOW_ALLOW_FILE_STORE=true; "
                             "use sqlite:////abs/path/mlflow.db (or no URI: a local SQLite store)")
        return Tracking("mlflow", uri or None)
    if kind == "wandb":
        try:
            import wandb  # noqa: F401  # lazy: an optional tracker, checked when it is asked for
        except ImportError as e:
            raise ConfigError(f"--tracking wandb needs Weights & Biases, which raykd does not install "
                              f"({e}): pip install wandb") from e
    return Tracking(kind)


def mlflow_store(tracking: Tracking, experiment_dir: str | Path) -> tuple[str, str | None]:
    """The MLflow tracking URI and the artifact location of a new experiment (``None``: the
    server's default) for ``tracking``: without a URI, the local store under the experiment folder."""
    if tracking.uri:
        return tracking.uri, None
    root = Path(experiment_dir).resolve() / MLFLOW_DIR
    root.mkdir(parents=True, exist_ok=True)
    return f"sqlite:///{root / MLFLOW_DB}", (root / "artifacts").as_uri()


def resolve_tracking(tracking: str | Tracking | None, experiment_dir: str | Path, *,
                     resume: bool = False) -> Tracking | None:
    """The tracking of this search, checked before Ray starts and recorded in ``tracking.json``.

    A search that ``--resume`` restores from its ``tuner.pkl`` keeps the callbacks Ray pickled
    there when it started: no flag means the recorded tracking, a different flag is refused.
    """
    tracking = parse_tracking(tracking)
    experiment_dir = Path(experiment_dir)
    record = experiment_dir / RECORD_FILE
    if resume and (experiment_dir / "tuner.pkl").is_file():
        before = None
        if record.is_file():
            before = parse_tracking(json.loads(record.read_text()).get("tracking"))
        if tracking is None:
            return before
        if tracking != before:
            raise ConfigError(
                f"--tracking {tracking}: the search in {experiment_dir} started with "
                f"{'--tracking ' + str(before) if before else 'no tracking'}, and a resumed search "
                "keeps the Tune callbacks it started with (Tuner.restore takes no run config): resume "
                f"with {'--tracking ' + str(before) if before else 'no --tracking'}, or start a new "
                "search with --set name=<new name>")
        return tracking
    experiment_dir.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps({"tracking": str(tracking) if tracking else None}) + "\n")
    return tracking


def tracking_callbacks(tracking: Tracking | None, name: str, experiment_dir: str | Path) -> list:
    """The Ray Tune callbacks of ``tracking`` for the experiment ``name`` (empty for none)."""
    if tracking is None:
        return []
    experiment_dir = Path(experiment_dir)
    if tracking.kind == "mlflow":
        uri, artifacts = mlflow_store(tracking, experiment_dir)
        log.info("MLflow: experiment %r in %s (open it with: mlflow ui --backend-store-uri %s)",
                 name, uri, uri)
        return [mlflow_callback_class()(uri, experiment_name=name, artifact_location=artifacts)]
    if tracking.kind == "tensorboard":
        from ray.tune.logger import TBXLoggerCallback  # lazy: ray is heavy

        log.info("TensorBoard: event files in each trial's folder (tensorboard --logdir %s)", experiment_dir)
        return [TBXLoggerCallback()]
    from ray.air.integrations.wandb import WandbLoggerCallback  # lazy: ray is heavy

    return [WandbLoggerCallback(project=os.environ.get("WANDB_PROJECT") or name, group=name,
                                dir=str(experiment_dir))]


def _metric_key(key: str) -> str:
    """``key`` as a name MLflow accepts (alphanumerics, ``_ - . /`` and spaces; no empty parts)."""
    key = re.sub(r"[^\w.\- /]", "_", key)
    return "/".join(p for p in key.split("/") if p not in ("", ".", "..")) or "_"


def _metrics(result: dict[str, Any], step: int) -> list:
    from mlflow.entities import Metric  # lazy: mlflow is optional here
    from ray._private.dict import flatten_dict

    flat = flatten_dict({k: v for k, v in result.items() if k not in _NOT_METRICS}, delimiter="/")
    now = int(time.time() * 1000)
    return [Metric(_metric_key(k), float(v), now, step) for k, v in flat.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool)]


def _start_or_resume_run(client, experiment_id: str, tags: dict, trial, run_id: str | None) -> tuple[str, int]:
    """The MLflow run of ``trial``: its existing run (a resumed trial: params there, steps go on
    after its last one) or a new one named after the trial id with the sampled config as params;
    returns the run id and the step offset."""
    from mlflow.entities import Param  # lazy: mlflow is optional here
    from ray.air.constants import TRAINING_ITERATION

    if run_id is not None:
        history = client.get_metric_history(run_id, TRAINING_ITERATION)
        client.update_run(run_id, status="RUNNING")
        return run_id, max((m.step for m in history), default=0)
    config = dict(trial.config or {})
    tags = {**tags, "trial_id": trial.trial_id, "trial_name": str(trial), "method": str(config.get("method")),
            "role": "trial"}
    run_id = client.create_run(experiment_id, tags=tags, run_name=trial.trial_id).info.run_id
    params = [Param(_metric_key(k), str(v)[:6000]) for k, v in config.items()]
    for i in range(0, len(params), 100):
        client.log_batch(run_id, params=params[i:i + 100])
    return run_id, 0


def _log_batches(client, run_id: str, metrics: list) -> None:
    for i in range(0, len(metrics), 1000):  # MLflow takes at most 1000 metrics a call
        client.log_batch(run_id, metrics=metrics[i:i + 1000])


def _build_mlflow_callback():
    from ray.air.constants import TRAINING_ITERATION  # lazy: ray is heavy
    from ray.air.integrations.mlflow import MLflowLoggerCallback

    class MLflowTrialCallback(MLflowLoggerCallback):
        """Ray's ``MLflowLoggerCallback``: one run per trial, named and tagged with its id (a
        resumed trial continues it), one metric batch per report; failures logged, not raised."""

        def __init__(self, tracking_uri: str, *, experiment_name: str, artifact_location: str | None = None,
                     **kwargs) -> None:
            super().__init__(tracking_uri, experiment_name=experiment_name, **kwargs)
            self.artifact_location = artifact_location

        def setup(self, *args, **kwargs) -> None:
            from mlflow.tracking import MlflowClient  # lazy: mlflow is optional here

            client = MlflowClient(self.tracking_uri)
            if client.get_experiment_by_name(self.experiment_name) is None:
                client.create_experiment(self.experiment_name, artifact_location=self.artifact_location)
            super().setup(*args, **kwargs)
            self._client = client
            self._offset: dict[Any, int] = {}

        def _existing_run(self, trial_id: str) -> str | None:
            runs = self._client.search_runs([self.mlflow_util.experiment_id],
                                            filter_string=f"tags.trial_id = '{trial_id}'", max_results=1)
            return runs[0].info.run_id if runs else None

        def log_trial_start(self, trial) -> None:
            if trial in self._trial_runs:
                return
            try:
                run_id, self._offset[trial] = _start_or_resume_run(
                    self._client, self.mlflow_util.experiment_id, self.tags, trial, self._existing_run(trial.trial_id))
                self._trial_runs[trial] = run_id
            except Exception as e:  # noqa: BLE001 - tracking must not end a search
                log.warning("MLflow: could not start the run of trial %s: %s", trial.trial_id, e)

        def log_trial_result(self, iteration: int, trial, result: dict) -> None:
            run_id = self._trial_runs.get(trial)
            if run_id is None:
                return
            step = self._offset.get(trial, 0) + int(result.get(TRAINING_ITERATION) or iteration)
            try:
                _log_batches(self._client, run_id, _metrics(result, step))
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow: could not log step %d of trial %s: %s", step, trial.trial_id, e)

        def log_trial_end(self, trial, failed: bool = False) -> None:
            if trial not in self._trial_runs:
                return
            try:
                super().log_trial_end(trial, failed=failed)
            except Exception as e:  # noqa: BLE001
                log.warning("MLflow: could not end the run of trial %s: %s", trial.trial_id, e)

    MLflowTrialCallback.__module__ = __name__
    MLflowTrialCallback.__qualname__ = "MLflowTrialCallback"
    return MLflowTrialCallback


def mlflow_callback_class() -> type:
    """``MLflowTrialCallback``: it subclasses Ray's ``MLflowLoggerCallback``, whose module imports
    mlflow (about a second), so it is built on first use and then kept as a module attribute, which
    lets ``tuner.pkl`` refer to it by name (and ``--resume`` unpickle it through ``__getattr__``)."""
    cls = globals().get("MLflowTrialCallback")
    if cls is None:
        cls = globals()["MLflowTrialCallback"] = _build_mlflow_callback()
    return cls


def __getattr__(name: str):
    if name == "MLflowTrialCallback":
        return mlflow_callback_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _finite(values: dict[str, Any]) -> dict[str, float]:
    return {k: float(v) for k, v in (values or {}).items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)}


def log_published(tracking: Tracking | None, published, experiment_dir: str | Path, name: str) -> str | None:
    """Log stage 3's exports to MLflow (``--tracking mlflow`` only): a run named ``published`` in
    the experiment ``name`` (reused when a resumed search publishes the same winner again) with
    the winner's ``best`` artifact folder (model, metadata, ONNX file) under ``winner/best``, an
    ONNX file kept elsewhere under ``winner/``, the family file, ``winner.json`` and the
    leaderboard files; the winner's trial id, method, student and hyperparameters as params, its
    val and test metrics. Returns the run id (``None``: no MLflow tracking, or nothing was
    published). A tracking failure is logged, not raised: the exports are on disk either way."""
    if tracking is None or tracking.kind != "mlflow" or published is None:
        return None
    try:
        return _log_published(tracking, published, Path(experiment_dir), name)
    except Exception:
        log.exception("MLflow: logging the published artifacts failed")
        return None


def _log_published(tracking: Tracking, published, experiment_dir: Path, name: str) -> str:
    from mlflow.entities import Metric, Param  # lazy: mlflow is optional here
    from mlflow.tracking import MlflowClient

    uri, artifacts = mlflow_store(tracking, experiment_dir)
    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(name)
    exp_id = exp.experiment_id if exp else client.create_experiment(name, artifact_location=artifacts)
    w = published.winner
    found = client.search_runs([exp_id], max_results=1, filter_string=(
        f"tags.role = '{PUBLISHED_RUN}' and tags.winner_trial_id = '{w.trial_id}'"))
    if found:
        run_id = found[0].info.run_id
        client.update_run(run_id, status="RUNNING")
    else:
        run_id = client.create_run(exp_id, run_name=PUBLISHED_RUN, tags={
            "role": PUBLISHED_RUN, "winner_trial_id": str(w.trial_id), "winner_run": str(w.run)}).info.run_id
        params = {"winner": w.run, "trial_id": w.trial_id, "method": w.method, "student": w.student,
                  "family": ",".join(r.run for r in published.family),
                  **{f"hparams.{k}": v for k, v in (w.hparams or {}).items()}}
        client.log_batch(run_id, params=[Param(_metric_key(k), str(v)[:6000]) for k, v in params.items()])
    now = int(time.time() * 1000)
    metrics = {**{f"val/{k}": v for k, v in _finite(w.val).items()},
               **{f"test/{k}": v for k, v in _finite(w.test).items()},
               **_finite({"params": w.params, "latency_ms": w.latency_ms})}
    client.log_batch(run_id, metrics=[Metric(_metric_key(k), v, now, 0) for k, v in metrics.items()])
    winner_file = experiment_dir / "winner.json"
    best = RunDir(w.run_dir).best_dir
    if not best.is_dir() and winner_file.is_file():  # publish() names the winner's artifact folder there
        best = experiment_dir / json.loads(winner_file.read_text())["artifact"]
    client.log_artifacts(run_id, str(best), "winner/best")
    onnx = published.onnx.get(w.run)
    if onnx and Path(onnx).resolve().parent != best.resolve():
        client.log_artifact(run_id, onnx, "winner")
    files = [*published.family_files[:1], winner_file,
             *(experiment_dir / f"leaderboard.{ext}" for ext in ("md", "csv", "json"))]
    for path in files:
        if Path(path).is_file():
            client.log_artifact(run_id, str(path))
    client.set_terminated(run_id, "FINISHED")
    log.info("MLflow: published artifacts of %s logged to run %s (experiment %r, %s)",
             w.run, run_id, name, uri)
    return run_id
