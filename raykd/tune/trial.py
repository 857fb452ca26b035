"""One Tune trial: a Ray Train run (or, for a method trained as several runs, its pipeline of runs)
named after the trial id.

Ray 2.60 composes Tune and Train V2 through a *function* per trial that builds a ``TorchTrainer``
and fits it; the per-epoch metrics reach Tune through a ``TuneReportCallback`` on the trainer.
Each report carries, next to the run's metrics, the trial's cost (``params``, ``size_mb``,
``latency_ms``) and ``best_<metric>``, the best validation value so far, which is what ASHA and
Optuna compare (the last epoch is not always the best one).

A rerun of a trial (``--resume`` after the driver was killed) finds its run folder: a finished run
is reported again from its files and never retrained; an unfinished one continues from its last
Ray Train checkpoint.
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from raykd.artifact.format import load_artifact
from raykd.artifact.measure import measure_latency, model_cost
from raykd.artifact.rundir import RunDir, TrialDir
from raykd.config import ModelConfig, from_dict
from raykd.distill import METHODS
from raykd.metrics.classification import is_better
from raykd.raycompat import wait_for_trial_reports
from raykd.storage import Mirror, mirrored, run_reads
from raykd.train.driver import run_train, uses_local
from raykd.tune.plan import is_paper_setting, pipeline_knobs

log = logging.getLogger(__name__)

__all__ = ["TrialReporter", "objective_key", "trial_main"]


def objective_key(metric: str) -> str:
    """The reported key Tune optimises: the best validation ``metric`` of the run so far."""
    return f"best_{metric}"


def _augment(row: dict[str, Any], extra: dict[str, Any], metric: str) -> dict[str, Any]:
    # The objective, the metric, the epoch and the cost first: Tune's status table shows the first few.
    head = {objective_key(metric): row.get("best"), f"val/{metric}": row.get(f"val/{metric}"),
            "epoch": row.get("epoch")}
    head.update({k: extra[k] for k in ("latency_ms", "params", "depth") if k in extra})
    return {**head, **row, **extra}


class TrialReporter(TuneReportCallback):
    """``TuneReportCallback`` that adds the trial's cost and its objective to every report."""

    def __init__(self, extra: dict[str, Any], metric: str) -> None:
        super().__init__()
        self.extra = extra  # filled in by the run once its models are built (see _train)
        self.metric = metric
        self.reports = 0  # how many reports went through (a resumed run may have none left)

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        metrics = [_augment(metrics[0], self.extra, self.metric), *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)
        self.reports += 1


def _replay(run_dir: Path, extra: dict[str, Any], metric: str, report=None) -> None:
    """Report a finished run's last epoch (with its best value so far) to Tune from its files."""
    from ray import tune  # lazy: ray is heavy

    report = report or tune.report

    best = None
    rows = []
    for row in RunDir(run_dir).read_metrics():
        value = row.get(f"val/{metric}")
        if value is not None and is_better(metric, value, best):
            best = value
        rows.append({**row, "best": best})
    for row in rows[-1:]:
        report(_augment(row, extra, metric))


def _cost(parts, reps: int) -> dict[str, float]:
    """Size and CPU latency of the run's student, measured once from the models the run built."""
    return {**model_cost(parts.student), "latency_ms": measure_latency(parts.student, parts.preprocess.image_size,
                                                                       reps=reps)}


def _train(cfg, extra: dict[str, Any], metric: str, reps: int, report=None) -> None:
    """One run reporting every epoch to Tune (``report``, default ``tune.report``); a run that
    already finished is only reported. Its models are built once, and its student's size and
    latency are measured once from them.

    A single-worker run on small data trains right here in the trial's process, which holds the
    run's CPUs (see :func:`raykd.train.driver.run_train`); a larger one is a TorchTrainer whose
    reports reach Tune through :class:`TrialReporter`.
    """
    from ray import tune  # lazy: ray is heavy

    report = report or tune.report
    run_dir = RunDir.of(cfg)
    if run_dir.finished():
        log.info("run %s finished before the interruption: reporting it, not retraining", cfg.name)
        _replay(run_dir.path, extra, metric, report)
        return
    reporter = None if uses_local(cfg) else TrialReporter(extra, metric)  # Train runs report through it
    reported = []

    def on_report(row):
        reported.append(1)
        report(_augment(row, extra, metric))

    run_train(cfg, resume=True, in_process=True, callbacks=[reporter] if reporter else None, on_report=on_report,
              on_built=lambda parts: extra.update(_cost(parts, reps)))
    if not reported and not (reporter and reporter.reports):
        # Resumed from a checkpoint of its last epoch (the driver died before the summary): no epoch
        # was left to report, and Tune needs a result with the objective.
        _replay(run_dir.path, extra, metric, report)


PHASES = ("build_s", "data_s", "train_s", "train_wait_s", "eval_s", "report_s", "test_s")


def _record_timing(trial_dir: TrialDir, run_dirs: list[RunDir], wall_s: float, executor: str) -> None:
    """Write where the trial's wall time went: each run's phases (its timing record; for a run that
    ASHA stopped, its epochs' training and validation seconds from its metrics)."""
    record = dict.fromkeys(PHASES, 0.0)
    stopped = 0
    for run_dir in run_dirs:
        t = run_dir.read_timing()
        if t is None:
            stopped += 1
            history = run_dir.read_metrics()
            t = {"train_s": sum(r.get("train/seconds", 0.0) for r in history),
                 "train_wait_s": sum(r.get("train/data_wait_s", 0.0) for r in history),
                 "eval_s": sum(r.get("val/seconds", 0.0) for r in history)}
        for k in PHASES:
            record[k] += t.get(k, 0.0)
    record.update(wall_s=wall_s, runs=len(run_dirs), stopped_runs=stopped, executor=executor)
    trial_dir.write_trial_timing(record)


def trial_main(config: dict[str, Any], plan) -> None:
    """The Tune trainable: rebuild the typed run config from ``config`` and train it."""
    try:
        _trial_main(config, plan)
    finally:
        wait_for_trial_reports()


def _trial_main(config: dict[str, Any], plan) -> None:
    from ray import tune  # lazy: ray is heavy

    t0 = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    resolved = plan.resolve(config)
    cfg = plan.run_config(config, trial_id)
    trial_dir = TrialDir(plan.runs_dir / trial_id)
    # outputs in a bucket: a retried trial continues from what it pushed, on whichever node it lands
    with mirrored(Mirror.of(cfg), own=trial_dir.path, reads=run_reads(cfg)):
        _trial_in_folder(plan, config, cfg, resolved, trial_dir, t0)


def _trial_in_folder(plan, config: dict[str, Any], cfg, resolved, trial_dir: TrialDir, t0: float) -> None:
    trial_id = trial_dir.path.name
    staged = METHODS.get(resolved.method).multi_run
    import ray  # lazy: ray is heavy

    trial_dir.write_trial({
        "node": ray.get_runtime_context().get_node_id(),  # where this trial's driver (and a local run) ran
        "trial_id": trial_id, "label": resolved.label, "method": resolved.method, "student": resolved.student,
        "teacher": resolved.teacher, "config": config, "params": resolved.params,
        "settings": resolved.settings, "pipeline": bool(staged),
        "paper": is_paper_setting(resolved.method, resolved.params, plan.space.methods[resolved.label]),
    })
    metric = plan.space.search.metric
    trained: list[RunDir] = []  # the runs this call trains (a replayed run adds no time)
    try:
        if staged:
            _pipeline(plan, cfg, resolved, trial_dir, trained)
        else:
            if not trial_dir.finished():
                trained.append(trial_dir)
            _train(cfg, {}, metric, plan.space.export.latency_reps)
    finally:  # ASHA stops a trial by raising in tune.report: its epochs so far still count
        if trained:
            executor = "local" if uses_local(cfg) else "trainer"
            _record_timing(trial_dir, trained, time.perf_counter() - t0, executor)


def _pipeline(plan, template, resolved, trial_dir: TrialDir, trained: list[RunDir], report=None) -> str:
    """A method trained as several runs (:meth:`raykd.distill.base.Method.pipeline`; the cascade of
    SkinDistilViT section 3.2: one run per depth). Starting from the trial's trained teacher, step
    ``<trial>-<suffix>`` trains the step's student against the previous step's best model as its
    frozen teacher. The trial folder's pipeline record holds each step's validation and test
    metrics, size and latency, the parent first. ``report`` gets every epoch (default
    ``tune.report``). Returns the last step's run folder."""
    metric = plan.space.search.metric
    spec = plan.space.methods[resolved.label]
    parent_dir = plan.teachers[resolved.teacher]
    parent, meta = load_artifact(parent_dir)
    size = template.student.image_size or meta.preprocess.get("image_size")
    steps_planned = METHODS.get(resolved.method).pipeline(parent, image_size=size, **pipeline_knobs(spec))
    test = (RunDir(parent_dir).read_summary() or {}).get("test", {})  # a teacher trained by raykd has one
    first, *to_train = steps_planned  # the parent, then the runs
    steps: list[dict[str, Any]] = [{**first.info, "run": None, "run_dir": str(parent_dir), "parent": True,
                                    "val": meta.metrics, "test": test, **model_cost(parent)}]
    for step in to_train:
        name = f"{template.name}-{step.suffix}"
        cfg = replace(template, name=name, student=from_dict(ModelConfig, step.student),
                      teacher=ModelConfig(checkpoint=parent_dir))
        extra = dict(step.info)
        run_dir = RunDir.of(cfg)
        if not run_dir.finished():
            trained.append(run_dir)
        _train(cfg, extra, metric, plan.space.export.latency_reps, report)
        summary = run_dir.read_summary()
        steps.append({**extra, "run": name, "run_dir": str(run_dir), "val": summary["val"], "test": summary["test"]})
        trial_dir.write_pipeline({"trial_id": template.name, "steps": steps})
        log.info("%s %s: step %s, val %s %.4f", resolved.method, template.name, step.suffix, metric,
                 summary["val"].get(metric, float("nan")))
        parent_dir = str(run_dir)
    return parent_dir
