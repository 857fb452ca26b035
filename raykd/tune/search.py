"""The search job: stage 1 (teachers), stage 2 (Ray Tune + Optuna + ASHA), stage 3 (leaderboard,
winner export, family file).

Stage 2 is a ``ray.tune.Tuner`` over :func:`raykd.tune.trial.trial_main`, one Ray Train run per
trial named after the trial id. ``OptunaSearch`` samples the define-by-run space of
:class:`raykd.tune.sampler.SpaceSampler` with a seeded TPE (multivariate and grouped, which is how
TPE handles parameters that exist only in some trials) and keeps the study in SQLite
(``<experiment>/optuna.db``) or the database URL of ``search.storage``. ASHA stops weak trials
early. With ``search.objectives`` the study is multi-objective (validation metric against latency
or size) and the result is a Pareto family rather than one winner.

Trial drivers hold one unit of the zero-CPU custom resource ``trial_slot`` rather than CPUs (a
CPU-holding driver starves Ray Data on small machines), and the number of trials at once follows
the cluster's CPUs and GPUs. ``--resume`` restores the Tune experiment from its folder: finished
trials are kept, unfinished ones continue from their last Ray Train checkpoint.
"""

from __future__ import annotations

import functools
import logging
import math
import os
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from raykd.cluster import (
    TRIAL_SLOT,
    check_storage_on_every_node,
    cluster_capacity,
    init_local_ray,
    refuse_relative_in_job,
)
from raykd.config import ConfigError
from raykd.console import log_to_file
from raykd.distill.paper import paper_params
from raykd.metrics.classification import metric_mode
from raykd.storage import Mirror, mirrored
from raykd.train.driver import uses_local
from raykd.tune.confirm import CONFIRM_DIR, run_confirmation
from raykd.tune.errors import summarize_error
from raykd.tune.findings import STAGE_2, STAGE_2B, collect_findings
from raykd.tune.leaderboard import build_leaderboard
from raykd.tune.plan import (  # noqa: F401 - is_paper_setting: part of this module's API
    TrialPlan,
    absolute_paths,
    check_combinations,
    is_paper_setting,
)
from raykd.tune.publish import FAMILY_FILE, publish
from raykd.tune.sampler import SpaceSampler
from raykd.tune.space import SearchSpace, trial_key
from raykd.tune.teachers import build_teacher_outputs, run_teacher_preps, train_teachers
from raykd.tune.tracking import log_published, resolve_tracking, tracking_callbacks

log = logging.getLogger(__name__)

__all__ = ["SearchOutcome", "TrialRecord", "is_paper_setting", "paper_point", "prepare_search", "run_tune",
           "trial_concurrency"]

STUDY_FILE = "optuna.db"
#: CPUs a trial's Ray Data tasks need next to its Train workers (reads and decodes at 0.25 CPU).
DATA_CPUS = 0.5


@dataclass
class TrialRecord:
    """What Tune knows about one trial after the search."""

    trial_id: str
    config: dict[str, Any]
    status: str  # TERMINATED, ERROR, ...
    error: str | None
    last_result: dict[str, Any]


@dataclass
class SearchOutcome:
    experiment_dir: Path
    records: list[TrialRecord]
    leaderboard: Any  # raykd.tune.leaderboard.Leaderboard
    published: Any  # raykd.tune.publish.Published | None
    findings: Any = None  # raykd.tune.findings.Findings


def prepare_search(space: SearchSpace) -> SearchSpace:
    """Everything that can fail before Ray starts: absolute paths, the dataset, method/student fit."""
    paths = {"base.data.path": space.base_config.data.path, "output_dir": space.output_dir}
    paths.update({f"teachers.{k}.checkpoint": t.checkpoint for k, t in space.teachers.items()})
    refuse_relative_in_job(paths, space.source)
    space = absolute_paths(space)  # a URI output_dir becomes its local mirror
    return check_combinations(space)


def _local_trials(space: SearchSpace) -> bool:
    """Whether the trials train in their own process (single worker, small data: see run_train)."""
    return uses_local(space.base_config)


def trial_concurrency(space: SearchSpace, resources: dict[str, float]) -> int:
    """Trials that fit the cluster at once: CPUs (and GPUs) per trial, capped by its trial slots."""
    if space.budget.max_concurrent is not None:
        return space.budget.max_concurrent
    sc = space.base_config.scaling
    workers = max(sc.num_workers, 0)
    if _local_trials(space):  # the trial process is the worker; no Ray Data tasks beside it
        cpu_per_trial = max(sc.cpus_per_worker, 0.01)
    else:
        cpu_per_trial = (workers * sc.cpus_per_worker if workers else 1.0) + DATA_CPUS
    n = max(1, math.floor(resources.get("CPU", 1.0) / cpu_per_trial + 1e-9))
    if sc.use_gpu and workers:
        n = min(n, max(1, math.floor(resources.get("GPU", 0.0) / (workers * sc.gpus_per_worker) + 1e-9)))

    if TRIAL_SLOT in resources:
        n = min(n, int(resources[TRIAL_SLOT]))
    return max(1, n)


def _follow_the_cluster(searcher, space: SearchSpace, start: int, *, every_s: float = 5.0):
    """``searcher`` behind a concurrency limit that is recomputed from :func:`cluster_capacity`
    while the search runs (at most every ``every_s`` seconds): a node that joins mid-search, or
    an autoscaler allowed to add nodes, gets trials; a fixed ``budget.max_concurrent`` stays fixed."""
    from ray.tune.search import ConcurrencyLimiter  # lazy: ray is heavy

    class FollowTheCluster(ConcurrencyLimiter):
        def suggest(self, trial_id: str):
            now = time.monotonic()
            if space.budget.max_concurrent is None and now - self.checked_at >= every_s:
                self.checked_at = now
                fit = trial_concurrency(space, cluster_capacity())
                if fit != self.max_concurrent:
                    log.info("stage 2: the cluster now fits %d trials at once (was %d)", fit, self.max_concurrent)
                    self.max_concurrent = fit
            return super().suggest(trial_id)

    limiter = FollowTheCluster(searcher, max_concurrent=start)
    limiter.checked_at = time.monotonic()
    return limiter


def _trial_resources(space: SearchSpace, resources: dict[str, float]):
    """A trial that trains in its own process holds its run's CPUs (and GPU); one that drives a
    TorchTrainer holds only a zero-CPU ``trial_slot``, leaving the CPUs to its workers and data."""
    from ray.tune import PlacementGroupFactory  # lazy: ray is heavy

    if _local_trials(space):
        sc = space.base_config.scaling
        bundle = {"CPU": sc.cpus_per_worker, **({"GPU": sc.gpus_per_worker} if sc.use_gpu else {})}
        return PlacementGroupFactory([bundle])
    if TRIAL_SLOT in resources:
        return PlacementGroupFactory([{TRIAL_SLOT: 1}])
    log.warning("the cluster has no %r resource: trial drivers take 0.01 CPU each; start Ray with "
                "--resources='{\"%s\": 8}' to keep every CPU for training", TRIAL_SLOT, TRIAL_SLOT)
    return PlacementGroupFactory([{"CPU": 0.01}])


def _searcher(space: SearchSpace, experiment_dir: Path):
    import optuna  # lazy: optuna is heavy
    from ray.tune.search.optuna import OptunaSearch

    from raykd.tune.trial import objective_key  # lazy: imports ray

    s = space.search
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if s.sampler == "random":
        sampler = optuna.samplers.RandomSampler(seed=s.seed)
    elif s.sampler == "nsga2":
        population = max(4, min(50, space.budget.num_samples // 2))
        sampler = optuna.samplers.NSGAIISampler(seed=s.seed, population_size=population)
    else:
        sampler = optuna.samplers.TPESampler(seed=s.seed, n_startup_trials=s.startup_trials,
                                             multivariate=True, group=True, constant_liar=True)
    url = s.storage or f"sqlite:///{experiment_dir / STUDY_FILE}"
    storage = optuna.storages.RDBStorage(url)
    metric, mode = objective_key(s.metric), metric_mode(s.metric)
    if space.multi_objective:
        metric, mode = [metric, *s.objectives], [mode] + ["min"] * len(s.objectives)
    return OptunaSearch(space=SpaceSampler(space), metric=metric, mode=mode, sampler=sampler,
                        study_name=space.name, storage=storage, points_to_evaluate=first_points(space) or None)


def first_points(space: SearchSpace) -> list[dict[str, Any]]:
    """The trials whose method (and student) the search deals rather than samples.

    With ``budget.trials_per_arm`` every trial is dealt round-robin over the arms, so each arm gets
    the same number; each arm's first trial runs its paper setting, with the shared knobs at
    :func:`shared_start` for every arm alike. Otherwise the first ``len(methods) *
    min_trials_per_method`` trials go round-robin over the method labels (paper settings first)
    and the sampler picks the method of the rest.
    """
    b = space.budget
    if b.trials_per_arm is not None:
        arms = space.arms()
        points = []
        for i in range(b.num_samples):
            label, sid = arms[i % len(arms)]
            if i < len(arms):
                point = paper_point(space, label)
            else:
                point = {"method": label}
            if len(space.methods[label].students) > 1:
                point[trial_key(label, "student")] = sid
            points.append(point)
        return points
    labels = list(space.methods)
    n_first = min(b.num_samples, len(labels) * b.min_trials_per_method)
    return [{"method": labels[i % len(labels)]} if i >= len(labels) else paper_point(space, labels[i])
            for i in range(n_first)]


def shared_start(space: SearchSpace) -> dict[str, Any]:
    """The shared knobs of every paper trial, alike for every method: the base config's value
    (a paper space's base is the paper's run: its lr) where the range holds it, else the range's
    centre."""
    out = {}
    for key, dist in space.shared.items():
        if dist.fixed:
            continue
        try:
            value = functools.reduce(getattr, key.split("."), space.base_config)
        except AttributeError:
            value = None
        out[key] = value if value is not None and dist.contains(value) else dist.centre()
    return out


def paper_point(space: SearchSpace, label: str) -> dict[str, Any]:
    """The Optuna point of method ``label``'s paper setting: every searched knob whose range holds
    the paper's value is set to it (the others are left to the sampler), and the shared knobs are
    at :func:`shared_start`."""
    spec = space.methods[label]
    paper = paper_params(spec.method)
    point: dict[str, Any] = {"method": label, **shared_start(space)}
    for name, dist in spec.params.items():
        if not dist.fixed and name in paper and dist.contains(paper[name]):
            point[trial_key(label, name)] = paper[name]
    return point


def _progress_callback(space: SearchSpace):
    from ray.tune import Callback  # lazy: ray is heavy

    from raykd.tune.trial import objective_key  # lazy: imports ray

    key = objective_key(space.search.metric)
    total = space.budget.num_samples

    class TrialProgress(Callback):
        """One log line per finished or failed trial, on top of Tune's status table."""

        def __init__(self) -> None:
            self.done = 0

        def _line(self, trial, what: str) -> None:
            self.done += 1
            r = trial.last_result or {}
            cfg = trial.config or {}
            value = r.get(key)
            shown = f"{key} {value:.4f}" if isinstance(value, (int, float)) else "no result"
            log.info("trial %s %s (%s, epoch %s): %s  [%d/%d]", trial.trial_id, what, cfg.get("method"),
                     r.get("epoch", "-"), shown, self.done, total)

        def on_trial_complete(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "finished")

        def on_trial_error(self, iteration, trials, trial, **info) -> None:
            self._line(trial, "FAILED")

    return TrialProgress()


def _experiment_exists(experiment_dir: Path) -> bool:
    return experiment_dir.is_dir() and (any(experiment_dir.glob("experiment_state-*.json"))
                                        or (experiment_dir / STUDY_FILE).exists())


def _records(grid) -> list[TrialRecord]:
    out = []
    for result in grid:
        metrics = dict(result.metrics or {})
        config = metrics.get("config") or {}
        error = None
        if result.error is not None:
            error = summarize_error(result.error)
        out.append(TrialRecord(trial_id=str(metrics.get("trial_id") or Path(result.path).name),
                               config=dict(config), status="ERROR" if error else "TERMINATED",
                               error=error, last_result=metrics))
    return out


def run_tune(space: SearchSpace, *, resume: bool = False, prepared: bool = False,
             tracking=None, verbose: bool = False) -> SearchOutcome:
    """Run the whole search job (see the module docstring) and return its records and leaderboard.

    Args:
        space: a space from :func:`raykd.tune.space_file.load_space`.
        resume: continue the experiment of the same name: finished trials are kept, unfinished ones
            continue (a new experiment starts when there is nothing to restore).
        prepared: ``space`` already went through :func:`prepare_search`.
        tracking: ``--tracking``'s value (``"mlflow[:URI]"``, ``"tensorboard"``, ``"wandb"``) or a
            :class:`raykd.tune.tracking.Tracking`; ``None``: none (see :mod:`raykd.tune.tracking`).
        verbose: Tune's status tables and trial result tables on the console (else only raykd's
            one line per trial).
    """
    if not prepared:
        space = prepare_search(space)
    mirror = Mirror.of(space)
    # outputs in a bucket: the experiment so far comes down first (a --resume on a fresh machine),
    # and what this process writes goes up every few seconds and at the end
    with mirrored(mirror, reads=[space.experiment_dir, Path(space.output_dir) / FAMILY_FILE]):
        return _run_tune(space, mirror, resume=resume, tracking=tracking, verbose=verbose)


def _run_tune(space: SearchSpace, mirror, *, resume: bool, tracking, verbose: bool) -> SearchOutcome:
    experiment_dir, tracking = _open_experiment(space, resume, tracking)
    stage_s: dict[str, float] = {}
    t0 = time.perf_counter()
    init_local_ray(space.address)
    resources = cluster_capacity()
    log.info("Ray cluster resources: %s", {k: v for k, v in resources.items() if not k.startswith("node")})
    output = mirror.uri_of(experiment_dir) if mirror is not None else str(experiment_dir)
    check_storage_on_every_node({"base.data.path": space.base_config.data.path}, {"output_dir": output},
                                space.source, local={"mirror_dir": space.mirror_dir} if mirror is not None else None)
    stage_s["Ray start"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    teachers = train_teachers(space, experiment_dir)  # stage 1: the teachers, then their teacher preps
    preps = run_teacher_preps(space, experiment_dir, teachers)
    teacher_outputs = build_teacher_outputs(space, experiment_dir, teachers)
    stage_s["stage 1 (teachers)"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    plan = TrialPlan(space, experiment_dir, teachers, preps, teacher_outputs)
    records = _stage_2(plan, resources, resume=resume, tracking=tracking, verbose=verbose)
    log.info("stage 2 done: %d trials, %d failed", len(records), sum(r.status == "ERROR" for r in records))
    stage_s[STAGE_2] = time.perf_counter() - t0
    t0 = time.perf_counter()
    confirmed = run_confirmation(plan, records, resources)  # stage 2b: each arm's best, on the same seeds
    if confirmed:
        stage_s[STAGE_2B] = time.perf_counter() - t0

    t0 = time.perf_counter()
    if mirror is not None:  # the trials' and confirmation runs' folders, written on their nodes
        mirror.pull(plan.runs_dir)
        if confirmed:
            mirror.pull(experiment_dir / CONFIRM_DIR)
    board = build_leaderboard(plan, records)  # stage 3
    board.write(experiment_dir)
    published = publish(plan, board)
    log_published(tracking, published, experiment_dir, space.name)
    stage_s["stage 3 (leaderboard, export)"] = time.perf_counter() - t0
    findings = collect_findings(plan, board, stage_s, slots=trial_concurrency(space, resources),
                                confirmed=confirmed, records=records)
    findings.write(experiment_dir)
    return SearchOutcome(experiment_dir=experiment_dir, records=records, leaderboard=board,
                         published=published, findings=findings)


def _open_experiment(space: SearchSpace, resume: bool, tracking):
    """The experiment folder (refusing to overwrite one unless ``resume``), its log file, and the
    tracking choice checked against it; returns both."""
    experiment_dir = Path(space.output_dir) / space.name
    if _experiment_exists(experiment_dir) and not resume:
        raise ConfigError(f"experiment folder {experiment_dir} exists: pass --resume to continue it, "
                          "or --set name=<new name> to start another")
    experiment_dir.mkdir(parents=True, exist_ok=True)
    log.info("experiment %s (every line of Ray, Tune and Optuna: %s)", experiment_dir, log_to_file(experiment_dir))
    tracking = resolve_tracking(tracking, experiment_dir, resume=resume)  # before Ray starts
    # Snapshot the experiment state every 2 s rather than Tune's adaptive >= 10 s: a killed driver
    # then loses at most one snapshot of trial statuses (the state of a small search is a few kB).
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "2")
    return experiment_dir, tracking


def _stage_2(plan: TrialPlan, resources: dict[str, float], *, resume: bool, tracking, verbose: bool):
    """The Tuner over every trial (restored when resuming); returns the trial records."""
    from ray import tune  # lazy: ray is heavy

    from raykd.tune.trial import trial_main  # lazy: imports ray

    space, experiment_dir = plan.space, plan.experiment_dir
    trainable = tune.with_resources(tune.with_parameters(trial_main, plan=plan), _trial_resources(space, resources))
    if resume and tune.Tuner.can_restore(str(experiment_dir)):
        log.info("stage 2: resuming the search in %s", experiment_dir)
        tuner = tune.Tuner.restore(str(experiment_dir), trainable=trainable, resume_unfinished=True,
                                   resume_errored=False, restart_errored=False)
    else:
        if resume:
            log.info("stage 2: nothing to resume in %s; starting the search", experiment_dir)
        tuner = _new_tuner(space, trainable, trial_concurrency(space, resources), experiment_dir,
                           tracking=tracking, verbose=verbose)
    return _records(tuner.fit())


def _asha_sparing(references: list[str]):
    """ASHA that never stops a trial of the ``references`` labels (the students trained alone):
    they are what every distilled trial is compared with, so each runs its whole budget, while
    their results still count at ASHA's rungs for the others."""
    from ray.tune.schedulers import ASHAScheduler, TrialScheduler  # lazy: ray is heavy

    class ReferenceSparingASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller, trial, result):
            action = super().on_trial_result(tune_controller, trial, result)
            if action == TrialScheduler.STOP and (trial.config or {}).get("method") in references:
                self._num_stopped -= 1
                return TrialScheduler.CONTINUE
            return action

    return ReferenceSparingASHA


def _new_tuner(space: SearchSpace, trainable, concurrency: int, experiment_dir: Path, *, tracking=None,
               verbose: bool = False):
    from ray import tune  # lazy: ray is heavy

    from raykd.tune.trial import objective_key  # lazy: imports ray

    b = space.budget
    scheduler = None
    epochs = b.epochs or space.base_config.train.epochs
    grace = b.grace_period or max(1, epochs // 2)
    if b.asha and not space.multi_objective and epochs > grace:
        # Rungs end one epoch before the last: a trial that reached its last epoch finishes (and
        # scores its test split) rather than being stopped with nothing left to save.
        references = [label for label, m in space.methods.items() if m.method == "baseline"]
        scheduler = _asha_sparing(references)(
            time_attr="training_iteration", metric=objective_key(space.search.metric),
            mode=metric_mode(space.search.metric), max_t=epochs - 1, grace_period=grace,
            reduction_factor=b.reduction_factor, stop_last_trials=False)
    log.info("stage 2: %d trials over %d methods (%s), %d at once for now, sampler %s (seed %d), ASHA %s, study %s",
             b.num_samples, len(space.methods), ", ".join(space.methods), concurrency, space.search.sampler,
             space.search.seed, "on" if scheduler else "off",
             space.search.storage or experiment_dir / STUDY_FILE)
    return tune.Tuner(
        trainable,
        tune_config=tune.TuneConfig(
            search_alg=_follow_the_cluster(_searcher(space, experiment_dir), space, concurrency),
            scheduler=scheduler, num_samples=b.num_samples, time_budget_s=b.time_budget_s,
            trial_dirname_creator=lambda t: t.trial_id,
        ),
        run_config=tune.RunConfig(
            name=space.name, storage_path=str(space.output_dir),
            # a failed trial restarts from its run's last checkpoint (trials train with resume=True)
            failure_config=tune.FailureConfig(max_failures=b.trial_retries),
            callbacks=[_progress_callback(space), *tracking_callbacks(tracking, space.name, experiment_dir)],
            verbose=1 if verbose else 0,  # raykd logs one line per trial (_progress_callback)
        ),
    )
