"""Stage 2b, the confirmation: each arm's best configuration retrained on the same seeds.

An *arm* is a method label with one of its students (the baseline is an arm too). The search gives
every arm the same tuning budget (``budget.trials_per_arm``) and picks each arm's best trial by its
validation metric. Picking the best of N noisy trials inflates its score, so that trial's score is
never compared with anything: its configuration is trained again with ``confirm.seeds`` new seeds,
and each run scores the test split once with its best validation epoch. Seed k is the same for
every arm (``train.seed`` and ``data.sampling.seed``): the student starts from the same initial
weights (:func:`raykd.train.build.build_run` seeds it on its own), sees the same data order and the
same augmentations. The findings then compare each method with the baseline of its student seed
by seed (:mod:`raykd.metrics.compare`).

The runs are Ray tasks holding what a trial holds (its CPUs, or a ``trial_slot``), so they spread
over the cluster as trials do; a finished run is read back, not retrained, on ``--resume``. An arm
tuned with a single trial had nothing selected, so when that trial ran with one of the stage's
seeds (``confirm.first_seed: 0`` and the base ``train.seed: 0``) and trained to its end, it is that
seed's run and is not trained twice.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from raykd.artifact.rundir import RunDir, TrialDir
from raykd.cluster import TRIAL_SLOT
from raykd.config import RunConfig
from raykd.console import quieted
from raykd.distill import METHODS
from raykd.metrics.classification import is_better
from raykd.storage import Mirror, mirrored, run_reads
from raykd.train.driver import run_train, uses_local
from raykd.tune.errors import summarize_error
from raykd.tune.findings import tuned_trials

log = logging.getLogger(__name__)

__all__ = ["CONFIRM_DIR", "ConfirmedRun", "best_trials", "run_confirmation", "seeded"]

CONFIRM_DIR = "confirm"


@dataclass
class ConfirmedRun:
    """One confirmation run: its arm, seed, the trial whose configuration it retrains, its scores."""

    label: str
    method: str
    student: str
    teacher: str | None
    seed: int
    trial_id: str
    run_dir: str
    val: float | None = None
    test: dict[str, float] | None = None
    error: str | None = None
    #: The arm's only trial ran with this seed to its end: that run is this one (nothing was selected).
    reused: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def seeded(cfg: RunConfig, seed: int) -> RunConfig:
    """``cfg`` with seed ``seed`` for everything a run draws: initial weights, data order,
    augmentations and the resampling plan."""
    return replace(cfg, train=replace(cfg.train, seed=seed),
                   data=replace(cfg.data, sampling=replace(cfg.data.sampling, seed=seed)))


def _objective(record, metric: str) -> float | None:
    from raykd.tune.trial import objective_key  # lazy: imports ray

    value = (record.last_result or {}).get(objective_key(metric))
    return float(value) if isinstance(value, (int, float)) else None


def best_trials(plan, records) -> dict[tuple[str, str], Any]:
    """``(label, student) -> record`` of each arm's best finished trial by the search's metric."""
    metric = plan.space.search.metric
    best: dict[tuple[str, str], Any] = {}
    for rec in records:
        if rec.status != "TERMINATED" or rec.config.get("method") not in plan.space.methods:
            continue
        value = _objective(rec, metric)
        if value is None:
            continue
        r = plan.resolve(rec.config)
        arm = (r.label, r.student)
        if arm not in best or is_better(metric, value, _objective(best[arm], metric)):
            best[arm] = rec
    return best


def _confirm_task(plan, config: dict[str, Any], name: str, seed: int) -> dict[str, Any]:
    """A Ray task body: train (or read back) one confirmation run; returns its summary."""
    folder = plan.experiment_dir / CONFIRM_DIR
    cfg = seeded(plan.run_config(config, name, output_dir=folder), seed)
    with quieted("raykd.train"):  # the epoch lines are in each run's metrics, not on the console
        return _confirm_run(plan, config, cfg, folder, name)


def _confirm_run(plan, config: dict[str, Any], cfg: RunConfig, folder: Path, name: str) -> dict[str, Any]:
    from raykd.tune.trial import _pipeline  # lazy: imports ray

    with mirrored(Mirror.of(cfg), own=folder / name, reads=run_reads(cfg)):
        if METHODS.get(cfg.distill.method).multi_run:  # the cascade: one run per depth
            last = _pipeline(plan, cfg, plan.resolve(config), TrialDir(folder / name), [],
                             report=lambda row: None)
            return {"run_dir": last, **(RunDir(last).read_summary() or {})}
        run_dir = RunDir.of(cfg)
        if not run_dir.finished():
            run_train(cfg, resume=True, in_process=True)
        return {"run_dir": str(run_dir), **(run_dir.read_summary() or {})}


def _task_options(plan, resources: dict[str, float]) -> dict[str, Any]:
    """What a confirmation run holds: what a trial of the search holds (see ``search._trial_resources``)."""
    sc = plan.space.base_config.scaling
    if uses_local(plan.space.base_config):
        return {"num_cpus": sc.cpus_per_worker, **({"num_gpus": sc.gpus_per_worker} if sc.use_gpu else {})}
    if TRIAL_SLOT in resources:
        return {"num_cpus": 0, "resources": {TRIAL_SLOT: 1}}
    return {"num_cpus": 0.01}


def run_confirmation(plan, records, resources: dict[str, float]) -> list[ConfirmedRun]:
    """Retrain each arm's best trial with ``confirm.seeds`` seeds (seed-major, so an interrupted
    stage leaves whole seeds); returns every run, failed ones with their error."""
    import ray  # lazy: ray is heavy

    c = plan.space.confirm
    if c.seeds == 0:
        return []
    best = best_trials(plan, records)
    missing = [f"{label}/{student}" for label, student in _all_arms(plan) if (label, student) not in best]
    if missing:
        log.warning("confirmation: no finished trial for %s: those arms are not confirmed", ", ".join(missing))
    seeds = [c.first_seed + k for k in range(c.seeds)]
    log.info("confirmation: %d arms x %d seeds (%s): each arm's best trial retrained", len(best), len(seeds),
             ", ".join(map(str, seeds)))
    task = ray.remote(_confirm_task)
    options = {"max_retries": plan.space.budget.trial_retries, "retry_exceptions": True,
               **_task_options(plan, resources)}
    tuned = tuned_trials(plan, records)
    pending, runs = {}, []
    for seed in seeds:
        for (label, student), rec in best.items():
            r = plan.resolve(rec.config)
            name = f"{label}-{_slug(student)}-s{seed}"
            run = ConfirmedRun(label=label, method=r.method, student=student, teacher=r.teacher, seed=seed,
                               trial_id=rec.trial_id, run_dir=str(plan.experiment_dir / CONFIRM_DIR / name))
            runs.append(run)
            if tuned[(label, student)] == 1 and _reuse(plan, rec, seed, run):
                continue
            pending[task.options(name=f"raykd-confirm:{name}", **options).remote(plan, rec.config, name, seed)] = run
    t0, metric = time.perf_counter(), plan.space.search.metric
    while pending:
        done, _ = ray.wait(list(pending), num_returns=1)
        run = pending.pop(done[0])
        try:
            summary = ray.get(done[0])
            run.run_dir, run.val, run.test = summary["run_dir"], summary.get("best"), summary.get("test") or {}
            log.info("confirmation: %s/%s seed %d: test %s %.4f  [%d/%d, %.0f s]", run.label, run.student, run.seed,
                     metric, run.test.get(metric, float("nan")), len(runs) - len(pending), len(runs),
                     time.perf_counter() - t0)
        except Exception as e:  # noqa: BLE001 - one failed run is recorded, the others still count
            run.error = summarize_error(e)
            log.warning("confirmation: %s/%s seed %d FAILED: %s", run.label, run.student, run.seed, run.error)
    return runs


def _reuse(plan, record, seed: int, run: ConfirmedRun) -> bool:
    """An arm tuned with one trial had nothing selected: its trial's run *is* the confirmation run
    of the trial's own seed when it trained to its end. Fills ``run`` from it and returns True."""
    if METHODS.get(run.method).multi_run:
        return False
    cfg = plan.run_config(record.config, record.trial_id)
    summary = RunDir.of(cfg).read_summary()
    if cfg.train.seed != seed or cfg.data.sampling.seed != seed or summary is None:
        return False
    run.run_dir, run.val, run.test, run.reused = str(RunDir.of(cfg)), summary.get("best"), summary.get("test") or {}, True
    log.info("confirmation: %s/%s seed %d: the arm's only trial %s trained with this seed (reused)", run.label,
             run.student, seed, record.trial_id)
    return True


def _all_arms(plan) -> list[tuple[str, str]]:
    return [(label, plan.arm_student(label, sid or None)) for label, sid in plan.space.arms()]


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in text)

