"""Stage 1 of a search, run on the driver before the Tuner starts: train every teacher a method uses
(or reuse a finished run or a checkpoint) and refuse one too close to chance, run each method's
teacher prep once per (teacher, prep, epochs), and build the teacher outputs. The run
configs come from :mod:`raykd.tune.plan`; what this returns goes into its :class:`TrialPlan`.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from raykd.artifact.rundir import RunDir
from raykd.config import ConfigError, RunConfig
from raykd.data.manifest import Manifest
from raykd.distill import METHODS
from raykd.train.build import build_run
from raykd.train.driver import run_train
from raykd.train.prep import needs_teacher_prep, prep_file_name, run_teacher_prep
from raykd.train.teacher_outputs import build_outputs, outputs_key
from raykd.tune.plan import (
    TEACHERS_DIR,
    _needed_teachers,
    _probe_trial,
    build_run_config,
    prep_key,
    teacher_run_config,
)
from raykd.tune.space import SearchSpace

log = logging.getLogger(__name__)

__all__ = ["TeacherTooWeakError", "build_teacher_outputs", "chance_level", "check_teacher",
           "run_teacher_preps", "train_teachers"]


class TeacherTooWeakError(ConfigError):
    """A stage-1 teacher ended too close to chance to be worth distilling from."""


def chance_level(metric: str, num_classes: int) -> float | None:
    """What guessing scores on ``metric`` (None where raykd does not know it)."""
    return {"bma": 1.0 / max(num_classes, 1), "auroc_macro": 0.5, "mcc": 0.0}.get(metric)


def check_teacher(name: str, summary: dict[str, Any], metric: str, margin: float | None, *, classes: int,
                  where: str) -> None:
    """Refuse a teacher whose best validation ``metric`` is within ``margin`` of chance
    (``classes``: the classes present in the validation split)."""
    if margin is None:
        return
    best = summary.get("best")
    chance = chance_level(metric, classes)
    if chance is None or best is None:
        return
    if best < chance + margin:
        raise TeacherTooWeakError(
            f"stage 1: teacher {name!r} reached val {metric} {best:.4f}, not clearly above chance "
            f"({chance:.4f} + margin {margin}): distilling from it would search over noise. Give it more "
            f"epochs or data ({where}: teachers.{name}.set), a checkpoint (teachers.{name}.checkpoint), or "
            "lower search.teacher_margin")


def train_teachers(space: SearchSpace, experiment_dir: Path) -> dict[str, str]:
    """Stage 1: train every teacher a method uses (or reuse a finished run), all at once (each run
    holds its own CPUs, so teachers train side by side); returns name -> folder.

    Raises:
        TeacherTooWeakError: a trained teacher is not clearly above chance (``search.teacher_margin``).
    """
    out: dict[str, str] = {}
    todo: dict[str, RunConfig] = {}
    for name in _needed_teachers(space):
        t = space.teachers[name]
        if t.checkpoint:
            log.info("stage 1: teacher %r reuses %s", name, t.checkpoint)
            out[name] = t.checkpoint
            continue
        cfg = teacher_run_config(space, name, experiment_dir)
        run_dir = RunDir.of(cfg)
        out[name] = str(run_dir)
        if run_dir.finished():
            log.info("stage 1: teacher %r already trained in %s", name, run_dir)
        else:
            log.info("stage 1: training teacher %r (%s, up to %d epochs, patience %s)", name, cfg.student.name,
                     cfg.train.epochs, cfg.optim.early_stop_patience)
            todo[name] = cfg
    with ThreadPoolExecutor(max_workers=max(1, len(todo))) as pool:
        futures = {name: pool.submit(run_train, cfg, resume=True) for name, cfg in todo.items()}
        for name, future in futures.items():
            result = future.result()
            log.info("stage 1: teacher %r done: val %s %.4f at epoch %s of %d (%s)", name, space.search.metric,
                     result.best if result.best is not None else float("nan"), result.best_epoch, result.epochs,
                     result.run_dir)

    classes = sum(1 for c in Manifest.load(space.base_config.data.path).counts("val") if c)
    for name, folder in out.items():
        summary = RunDir(folder).read_summary()
        if summary is not None:
            check_teacher(name, summary, space.search.metric, space.search.teacher_margin, classes=classes,
                          where=space.source)
    return out


def run_teacher_preps(space: SearchSpace, experiment_dir: Path, teachers: dict[str, str]) -> dict[tuple, str]:
    """Stage 1, after the teachers: every teacher prep a method needs (SSKD's projection head), run
    once per (teacher, prep, epochs) into ``<experiment>/teachers/<teacher>/prep`` and shared by
    every trial of every method that needs it; returns key -> file (see
    :func:`raykd.tune.plan.prep_key`)."""
    out: dict[tuple, str] = {}
    for label, spec in space.methods.items():
        if METHODS.get(spec.method).teacher_prep is None or spec.teacher is None:
            continue
        cfg = build_run_config(space, _probe_trial(spec, spec.students[0] if spec.students else ""),
                               name=f"prep-{label}", output_dir=experiment_dir,
                               teacher_path=teachers.get(spec.teacher))
        key = prep_key(cfg, spec.teacher)
        if key in out or not needs_teacher_prep(cfg):
            continue
        where = RunDir(experiment_dir / TEACHERS_DIR / spec.teacher).prep_file(prep_file_name(cfg))
        out[key] = run_teacher_prep(cfg, where).distill.teacher_prep_file
    return out


def build_teacher_outputs(space: SearchSpace, experiment_dir: Path, teachers: dict[str, str]) -> dict[tuple, str]:
    """Stage 1, last: with ``search.teacher_output_views`` K, the teacher outputs of each (teacher,
    student) pair that a distilling method trains (K views of every training image, one Ray Data
    job each; ``raykd.train.teacher_outputs``), shared by every trial of every method; returns
    (teacher, student) -> teacher outputs folder. Pairs with the same student contract share them."""
    views = space.search.teacher_output_views
    if not views:
        return {}
    manifest = Manifest.load(space.base_config.data.path)
    out: dict[tuple, str] = {}
    for label, spec in space.methods.items():
        cls = METHODS.get(spec.method)
        if spec.teacher is None or cls.multi_run or cls.teacher_prep is not None:
            continue
        for sid in spec.students:
            if (spec.teacher, sid) in out:
                continue
            cfg = build_run_config(space, _probe_trial(spec, sid), name="teacher-outputs", output_dir=experiment_dir,
                                   teacher_path=teachers[spec.teacher])
            spec_view = build_run(cfg, manifest, probe=True).preprocess
            key = outputs_key(cfg.data.path, teachers[spec.teacher], cfg.train.recipe, spec_view, views=views,
                              seed=space.search.seed)
            out[(spec.teacher, sid)] = str(build_outputs(cfg.data.path, teachers[spec.teacher], key,
                                                         cpus_per_actor=cfg.scaling.cpus_per_worker,
                                                         use_gpu=cfg.scaling.use_gpu,
                                                         mirror=(cfg.mirror_uri, cfg.mirror_dir) if cfg.mirror_uri
                                                         else None))
            images = sum(manifest.counts("train"))
            log.info("stage 1: teacher outputs of %r for %s: %d teacher forward passes = %d views x %d training "
                     "images, for every trial and epoch (online: trials x epochs x images)", spec.teacher, sid,
                     views * images, views, images)
    return out
