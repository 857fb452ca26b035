"""Stage 1 of a search, run on the driver before the Tuner starts: train every teacher a method uses
(or reuse a finished run or a checkpoint) and refuse one too close to chance, run each teacher-side
stage a method needs once per (teacher, stage, epochs), and build the teacher stores. The run
configs come from :mod:`raykd.tune.plan`; what this returns goes into its :class:`TrialPlan`.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

from raykd.artifact.rundir import RunDir
from raykd.config import ConfigError, RunConfig
from raykd.distill import METHODS
from raykd.tune.plan import (
    TEACHERS_DIR,
    _needed_teachers,
    _probe_trial,
    build_run_config,
    stage_key,
    teacher_run_config,
)
from raykd.tune.space import SearchSpace

log = logging.getLogger(__name__)

__all__ = ["TeacherTooWeakError", "build_teacher_stores", "chance_level", "check_teacher",
           "run_teacher_stages", "train_teachers"]


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
    from concurrent.futures import ThreadPoolExecutor

    from raykd.train.driver import run_train

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
    from raykd.data.manifest import Manifest

    classes = sum(1 for c in Manifest.load(space.base_config.data.path).counts("val") if c)
    for name, folder in out.items():
        summary = RunDir(folder).read_summary()
        if summary is not None:
            check_teacher(name, summary, space.search.metric, space.search.teacher_margin, classes=classes,
                          where=space.source)
    return out


def run_teacher_stages(space: SearchSpace, experiment_dir: Path, teachers: dict[str, str]) -> dict[tuple, str]:
    """Stage 1, after the teachers: every teacher-side stage a method needs (SSKD's projection
    head), run once per (teacher, stage, epochs) into ``<experiment>/teachers/<teacher>/stages``
    and shared by every trial of every method that needs it; returns key -> file
    (see :meth:`TrialPlan.stage_key`)."""
    from raykd.train.stages import needs_teacher_stage, run_teacher_stage, stage_file_name

    out: dict[tuple, str] = {}
    for label, spec in space.methods.items():
        if METHODS.get(spec.method).teacher_stage is None or spec.teacher is None:
            continue
        cfg = build_run_config(space, _probe_trial(spec, spec.students[0] if spec.students else ""),
                               name=f"stage-{label}", output_dir=experiment_dir,
                               teacher_path=teachers.get(spec.teacher))
        key = stage_key(cfg, spec.teacher)
        if key in out or not needs_teacher_stage(cfg):
            continue
        where = RunDir(experiment_dir / TEACHERS_DIR / spec.teacher).stage_file(stage_file_name(cfg))
        out[key] = run_teacher_stage(cfg, where).distill.teacher_stage_file
    return out


def build_teacher_stores(space: SearchSpace, experiment_dir: Path, teachers: dict[str, str]) -> dict[tuple, str]:
    """Stage 1, last: with ``search.teacher_store_views`` K, one teacher store per (teacher,
    student) pair that a distilling method trains (K views of every training image, one Ray Data
    job each; ``raykd.train.store``), shared by every trial of every method; returns
    (teacher, student) -> store folder. Pairs with the same student contract share a store."""
    from raykd.data.manifest import Manifest
    from raykd.train.build import build_run
    from raykd.train.store import build_store, store_key

    views = space.search.teacher_store_views
    if not views:
        return {}
    manifest = Manifest.load(space.base_config.data.path)
    out: dict[tuple, str] = {}
    for label, spec in space.methods.items():
        cls = METHODS.get(spec.method)
        if spec.teacher is None or cls.multi_run or cls.teacher_stage is not None:
            continue
        for sid in spec.students:
            if (spec.teacher, sid) in out:
                continue
            cfg = build_run_config(space, _probe_trial(spec, sid), name="store", output_dir=experiment_dir,
                                   teacher_path=teachers[spec.teacher])
            spec_view = build_run(cfg, manifest, probe=True).preprocess
            key = store_key(cfg.data.path, teachers[spec.teacher], cfg.train.recipe, spec_view, views=views,
                            seed=space.search.seed)
            out[(spec.teacher, sid)] = str(build_store(cfg.data.path, teachers[spec.teacher], key,
                                                       cpus_per_actor=cfg.scaling.cpus_per_worker,
                                                       use_gpu=cfg.scaling.use_gpu,
                                                       mirror=(cfg.mirror_uri, cfg.mirror_dir) if cfg.mirror_uri
                                                       else None))
            images = sum(manifest.counts("train"))
            log.info("stage 1: teacher store of %r for %s: %d teacher forward passes = %d views x %d training "
                     "images, for every trial and epoch (online: trials x epochs x images)", spec.teacher, sid,
                     views * images, views, images)
    return out
