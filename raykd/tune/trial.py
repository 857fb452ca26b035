"""One Tune trial: a Ray Train run (or, for ``cascade``, a pipeline of runs) named after the trial id.

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

import json
import logging
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from ray.tune.integration.ray_train import TuneReportCallback

from raykd.config import ModelConfig

log = logging.getLogger(__name__)

__all__ = ["TRIAL_FILE", "TRIAL_TIMING_FILE", "CASCADE_FILE", "TrialReporter", "trial_main", "objective_key"]

TRIAL_FILE = "trial.json"
#: Where a trial's wall time went: the sum of its runs' phases next to the trial's own wall time.
TRIAL_TIMING_FILE = "trial_timing.json"
CASCADE_FILE = "cascade.json"


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

    def after_report(self, run_context, metrics: list[dict[str, Any]], checkpoint) -> None:
        metrics = [_augment(metrics[0], self.extra, self.metric), *metrics[1:]]
        super().after_report(run_context, metrics, checkpoint)


def _history(run_dir: Path) -> list[dict[str, Any]]:
    path = run_dir / "metrics.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _replay(run_dir: Path, extra: dict[str, Any], metric: str) -> None:
    """Report a finished run's last epoch (with its best value so far) to Tune from its files."""
    from ray import tune

    from raykd.metrics import is_better

    best = None
    rows = []
    for row in _history(run_dir):
        value = row.get(f"val/{metric}")
        if value is not None and is_better(metric, value, best):
            best = value
        rows.append({**row, "best": best})
    for row in rows[-1:]:
        tune.report(_augment(row, extra, metric))


def _cost(parts, reps: int) -> dict[str, float]:
    """Size and CPU latency of the run's student, measured once from the models the run built."""
    from raykd.tune.measure import measure_latency, model_cost

    return {**model_cost(parts.student), "latency_ms": measure_latency(parts.student, parts.preprocess.image_size,
                                                                       reps=reps)}


def _train(cfg, extra: dict[str, Any], metric: str, reps: int) -> None:
    """One run reporting every epoch to Tune; a run that already finished is only reported.

    A single-worker run on small data trains right here in the trial's process, which holds the
    run's CPUs (see :func:`raykd.train.driver.run_train`); a larger one is a TorchTrainer whose
    reports reach Tune through :class:`TrialReporter`.
    """
    from ray import tune

    from raykd.train.driver import run_train

    run_dir = Path(cfg.output_dir) / cfg.name
    if (run_dir / "summary.json").is_file():
        log.info("run %s finished before the interruption: reporting it, not retraining", cfg.name)
        _replay(run_dir, extra, metric)
        return
    run_train(cfg, resume=True, in_process=True, callbacks=[TrialReporter(extra, metric)],
              on_report=lambda row: tune.report(_augment(row, extra, metric)),
              on_built=lambda parts: extra.update(_cost(parts, reps)))


PHASES = ("build_s", "data_s", "train_s", "eval_s", "report_s", "test_s")


def _record_timing(trial_dir: Path, run_dirs: list[Path], wall_s: float, executor: str) -> None:
    """Write where the trial's wall time went: each run's phases (``timing.json``; for a run that
    ASHA stopped, its epochs' training and validation seconds from ``metrics.json``)."""
    from raykd.train.driver import TIMING_FILE

    record = dict.fromkeys(PHASES, 0.0)
    stopped = 0
    for run_dir in run_dirs:
        timing_file = run_dir / TIMING_FILE
        if timing_file.is_file():
            t = json.loads(timing_file.read_text())
        else:
            stopped += 1
            t = {"train_s": sum(r.get("train/seconds", 0.0) for r in _history(run_dir)),
                 "eval_s": sum(r.get("val/seconds", 0.0) for r in _history(run_dir))}
        for k in PHASES:
            record[k] += t.get(k, 0.0)
    record.update(wall_s=wall_s, runs=len(run_dirs), stopped_runs=stopped, executor=executor)
    (trial_dir / TRIAL_TIMING_FILE).write_text(json.dumps(record, indent=2))


def _wait_for_reports_to_reach_tune(timeout_s: float = 60.0) -> None:
    """Return only once Tune's trial actor has taken every epoch report off its queues.

    Works around a race in Ray 2.60's Train V2 + Tune composition (seen as a trial that stays
    RUNNING forever, its actor's main thread blocked in ``Queue.put``): ``TuneReportCallback``
    hands reports to the trial actor through an inter-actor queue, and the actor's main thread
    moves each one into a one-slot result queue. When the trial function returns, Tune's function
    wrapper puts a final marker into that same queue from the trial thread; if the last epoch's
    report is still in flight, the main thread then blocks putting it into the full queue, and it
    is the only reader of that queue. Waiting here until both queues are empty closes the window.
    """
    from ray.train._internal.session import get_session

    session = get_session()
    if session is None:
        return
    inter_actor = getattr(session, "_inter_actor_queue", None)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if (inter_actor is None or inter_actor.empty()) and session.result_queue.empty():
            time.sleep(0.5)  # the main thread may hold an item between the two queues
            if (inter_actor is None or inter_actor.empty()) and session.result_queue.empty():
                return
        time.sleep(0.1)
    log.warning("reports of trial %s still queued after %.0f s", session.trial_id, timeout_s)


def trial_main(config: dict[str, Any], plan) -> None:
    """The Tune trainable: rebuild the typed run config from ``config`` and train it."""
    try:
        _trial_main(config, plan)
    finally:
        _wait_for_reports_to_reach_tune()


def _trial_main(config: dict[str, Any], plan) -> None:
    from ray import tune

    from raykd.train.driver import uses_local
    from raykd.tune.search import is_paper_setting

    t0 = time.perf_counter()
    trial_id = tune.get_context().get_trial_id()
    resolved = plan.resolve(config)
    cfg = plan.run_config(config, trial_id)
    trial_dir = plan.runs_dir / trial_id
    trial_dir.mkdir(parents=True, exist_ok=True)
    (trial_dir / TRIAL_FILE).write_text(json.dumps({
        "trial_id": trial_id, "label": resolved.label, "method": resolved.method, "student": resolved.student,
        "teacher": resolved.teacher, "config": config, "params": resolved.params,
        "settings": resolved.settings,
        "paper": is_paper_setting(resolved.method, resolved.params, plan.space.methods[resolved.label]),
    }, indent=2, default=str))
    metric = plan.space.search.metric
    trained: list[Path] = []  # the runs this call trains (a replayed run adds no time)
    try:
        if resolved.method == "cascade":
            _cascade(plan, cfg, resolved, trial_dir, trained)
        else:
            if not (trial_dir / "summary.json").is_file():
                trained.append(trial_dir)
            _train(cfg, {}, metric, plan.space.export.latency_reps)
    finally:  # ASHA stops a trial by raising in tune.report: its epochs so far still count
        if trained:
            executor = "local" if uses_local(cfg) else "trainer"
            _record_timing(trial_dir, trained, time.perf_counter() - t0, executor)


def _cascade(plan, template, resolved, trial_dir: Path, trained: list[Path]) -> None:
    """Cascading distillation (SkinDistilViT section 3.2) as a pipeline of runs, one per depth.

    Starting from the trained ViT teacher (depth L), run ``<trial>-d<k>`` for k = L-1 down to
    ``min_blocks`` trains the first k blocks of the previous run's best model (``cut_blocks``,
    weights copied) against that model as its frozen teacher (method ``cascade``). ``cascade.json``
    in the trial folder records the validation and test BMA, size and latency per depth.
    """
    from raykd.artifact import load_artifact
    from raykd.tune.measure import model_cost

    metric = plan.space.search.metric
    spec = plan.space.methods[resolved.label]
    parent_dir = plan.teachers[resolved.teacher]
    parent, meta = load_artifact(parent_dir)
    depth = len(parent.blocks)
    size = template.student.image_size or meta.preprocess.get("image_size")
    parent_summary = Path(parent_dir) / "summary.json"  # a teacher trained by raykd has one
    test = json.loads(parent_summary.read_text()).get("test", {}) if parent_summary.is_file() else {}
    steps: list[dict[str, Any]] = [{"depth": depth, "run": None, "run_dir": str(parent_dir), "parent": True,
                                    "val": meta.metrics, "test": test, **model_cost(parent)}]
    for k in range(depth - 1, spec.min_blocks - 1, -1):
        name = f"{template.name}-d{k}"
        cfg = replace(template, name=name, student=ModelConfig(cut_blocks=list(range(k)), image_size=size),
                      teacher=ModelConfig(checkpoint=parent_dir))
        extra = {"depth": k}
        run_dir = Path(cfg.output_dir) / name
        if not (run_dir / "summary.json").is_file():
            trained.append(run_dir)
        _train(cfg, extra, metric, plan.space.export.latency_reps)
        summary = json.loads((run_dir / "summary.json").read_text())
        steps.append({"depth": k, "run": name, "run_dir": str(run_dir), "val": summary["val"],
                      "test": summary["test"], **extra})
        (trial_dir / CASCADE_FILE).write_text(json.dumps({"trial_id": template.name, "steps": steps},
                                                         indent=2, default=float))
        log.info("cascade %s: %d blocks, val %s %.4f", template.name, k, metric,
                 summary["val"].get(metric, float("nan")))
        parent_dir = str(run_dir)
