"""From a validated space to runs: which (method, student) pairs fit, the run configs of stage 1's
teachers, and the typed :class:`~raykd.config.RunConfig` of every trial. Stage 1 itself (training
the teachers, their teacher preps and teacher outputs) runs in :mod:`raykd.tune.teachers`.

Everything here runs on the driver before the Tuner starts (the compatibility check builds each
pair once on the CPU with :func:`raykd.train.build.build_run`, which refuses a misfit with a
``ValueError``), except :meth:`TrialPlan.run_config`, which every trial calls to rebuild its typed
config from the few values Optuna drew.
"""

from __future__ import annotations

import copy
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from raykd.config import ConfigError, DataConfig, ModelConfig, RunConfig, from_dict, set_dotted, validate
from raykd.data.manifest import is_uri
from raykd.distill import METHODS
from raykd.distill.paper import paper_params
from raykd.models.weights import HUB_TIMEOUT_S, check_weights
from raykd.storage import resolve_output
from raykd.train.build import build_network, build_run
from raykd.train.driver import ensure_dataset
from raykd.tune.space import MethodSpec, SearchSpace, trial_key

log = logging.getLogger(__name__)

__all__ = ["ResolvedTrial", "TrialPlan", "absolute_paths", "build_run_config", "check_combinations",
           "is_paper_setting", "pipeline_knobs", "prep_key", "teacher_run_config"]

TEACHERS_DIR = "teachers"
RUNS_DIR = "runs"


@dataclass(frozen=True)
class ResolvedTrial:
    """What a trial's sampled config means: label, method, student, teacher and its values."""

    label: str
    method: str
    student: str  # student id ("<teacher model>-cut" for cascade)
    teacher: str | None
    params: dict  # distill.params (fixed + sampled)
    settings: dict  # dotted RunConfig key -> value (shared + per-method, fixed + sampled)


def absolute_paths(space: SearchSpace, cwd: Path | None = None) -> SearchSpace:
    """Resolve every path of the space against ``cwd``: Tune runs trials in their own folders."""
    cwd = Path(cwd or Path.cwd())

    def fix(p: str | None) -> str | None:
        return None if p is None else str((cwd / Path(p).expanduser()).resolve())

    base = copy.deepcopy(space.base)
    data = base.setdefault("data", {})
    data_path = data.get("path", DataConfig().path)
    data["path"] = data_path if is_uri(data_path) else fix(data_path)  # s3://, gs://: as given
    students = {k: replace(s, model={**s.model, "pretrained_file": fix(s.model.get("pretrained_file"))})
                for k, s in space.students.items()}
    teachers = {}
    for k, t in space.teachers.items():
        model = t.model and {**t.model, "pretrained_file": fix(t.model.get("pretrained_file"))}
        teachers[k] = replace(t, model=model, checkpoint=fix(t.checkpoint))
    if space.mirror_uri:  # resolved before
        return replace(space, base=base, students=students, teachers=teachers)
    output_dir, mirror_uri, mirror_dir = resolve_output(
        space.output_dir if is_uri(space.output_dir) else fix(space.output_dir), fix(space.mirror_dir))
    if mirror_uri:  # every run config of the search is mirrored too
        base.update(mirror_uri=mirror_uri, mirror_dir=mirror_dir)
    return replace(space, base=base, output_dir=output_dir, mirror_uri=mirror_uri, mirror_dir=mirror_dir,
                   students=students, teachers=teachers)


def _needed_teachers(space: SearchSpace) -> list[str]:
    return [name for name in space.teachers if any(m.teacher == name for m in space.methods.values())]


def teacher_run_config(space: SearchSpace, name: str, experiment_dir: Path) -> RunConfig:
    """The training run of teacher ``name`` (stage 1): its model trained with a teacher-free method."""
    t = space.teachers[name]
    raw = copy.deepcopy(space.base)
    for key, value in t.overrides.items():
        set_dotted(raw, key, value)
    raw.update(name=name, output_dir=str(experiment_dir / TEACHERS_DIR), address=space.address,
               student=dict(t.model or {}), teacher=None)
    raw.setdefault("distill", {}).update(method=t.method, params=dict(t.params))
    raw.setdefault("train", {})["select_metric"] = space.search.metric
    cfg = from_dict(RunConfig, raw, where=f"{space.source} (teachers.{name})")
    validate(cfg, where=f"{space.source} (teachers.{name})")
    return cfg


def prep_key(cfg: RunConfig, teacher: str) -> tuple:
    """What makes a teacher prep's output: the teacher, the prep and its epochs."""
    return (teacher, METHODS.get(cfg.distill.method).teacher_prep.name, cfg.distill.prep_epochs)


class TrialPlan:
    """Turns a trial's sampled values into its typed run config (picklable; sent to every trial).

    Args:
        space: the validated space with absolute paths.
        experiment_dir: the experiment folder (absolute).
        teachers: teacher name -> trained run or artifact folder.
    """

    def __init__(self, space: SearchSpace, experiment_dir: Path, teachers: dict[str, str],
                 preps: dict[tuple, str] | None = None,
                 teacher_outputs: dict[tuple, str] | None = None) -> None:
        self.space = space
        self.experiment_dir = Path(experiment_dir)
        self.teachers = dict(teachers)
        self.preps = dict(preps or {})  # prep_key -> the prep's saved output
        self.teacher_outputs = dict(teacher_outputs or {})  # (teacher, student) -> teacher outputs folder

    @property
    def runs_dir(self) -> Path:
        return self.experiment_dir / RUNS_DIR

    def arm_student(self, label: str, chosen: str | None = None) -> str:
        """The student id of method ``label``'s trials: ``chosen`` among several, its only one, or
        ``<teacher model>-cut`` for a method that makes its student from the teacher."""
        spec = self.space.methods[label]
        if METHODS.get(spec.method).student_from_teacher:
            teacher = self.space.teachers[spec.teacher]
            return f"{(teacher.model or {}).get('name', teacher.name)}-cut"
        if len(spec.students) == 1:
            return spec.students[0]
        if chosen is None:
            raise KeyError(trial_key(label, "student"))
        return chosen

    def resolve(self, config: dict[str, Any]) -> ResolvedTrial:
        label = config["method"]
        spec: MethodSpec = self.space.methods[label]

        def value(name: str, dist) -> Any:
            return dist.args[0] if dist.fixed else config[name]

        student = self.arm_student(label, config.get(trial_key(label, "student")))
        params = {k: value(trial_key(label, k), d) for k, d in spec.params.items()}
        settings = {k: value(k, d) for k, d in self.space.shared.items()}
        settings.update(spec.overrides)
        settings.update({k: value(trial_key(label, k), d) for k, d in spec.search.items()})
        return ResolvedTrial(label=label, method=spec.method, student=student, teacher=spec.teacher,
                             params=params, settings=settings)

    def run_config(self, config: dict[str, Any], name: str, *, output_dir: Path | None = None) -> RunConfig:
        """The typed RunConfig of the trial run ``name`` (for a pipeline: its steps' template), with
        the output of its teacher prep when stage 1 ran it."""
        r = self.resolve(config)
        cfg = build_run_config(self.space, r, name=name, output_dir=output_dir or self.runs_dir,
                               teacher_path=self.teachers.get(r.teacher) if r.teacher else None)
        if METHODS.get(cfg.distill.method).teacher_prep is not None and r.teacher is not None:
            prep_file = self.preps.get(prep_key(cfg, r.teacher))
            if prep_file and not cfg.distill.teacher_prep_file:
                cfg = replace(cfg, distill=replace(cfg.distill, teacher_prep_file=prep_file))
        outputs = self.teacher_outputs.get((r.teacher, r.student))
        if outputs and not cfg.distill.teacher_outputs:  # read where the built method can (LocalSession)
            cfg = replace(cfg, distill=replace(cfg.distill, teacher_outputs=outputs))
        return cfg


def build_run_config(space: SearchSpace, r: ResolvedTrial, *, name: str, output_dir: Path,
                     teacher_path: str | None, teacher_model: dict | None = None,
                     student_model: dict | None = None) -> RunConfig:
    """Base config + student + teacher + method + settings, validated.

    The student of a method that makes it from the teacher (the cascade) gets the teacher's image
    size here; the method's pipeline sets the rest per step.
    """
    raw = copy.deepcopy(space.base)
    for key, value in r.settings.items():
        set_dotted(raw, key, value)
    if space.budget.epochs is not None:
        raw.setdefault("train", {})["epochs"] = space.budget.epochs
    raw.setdefault("train", {})["select_metric"] = space.search.metric
    if student_model is not None:
        student = student_model
    elif r.student in space.students:
        student = space.students[r.student].model
    else:  # made from the teacher (student_from_teacher), at the teacher's image size
        size = (space.teachers[r.teacher].model or {}).get("image_size") if r.teacher else None
        student = {"image_size": size} if size else {}
    if r.teacher is None:
        teacher = None
    elif teacher_path is not None:
        teacher = {"checkpoint": teacher_path}
    else:
        teacher = dict(teacher_model or space.teachers[r.teacher].model or {})
    raw.update(name=name, output_dir=str(output_dir), address=space.address, student=dict(student),
               teacher=teacher)
    raw.setdefault("distill", {}).update(method=r.method, params=dict(r.params))
    where = f"{space.source} (trial {name}: {r.label})"
    cfg = from_dict(RunConfig, raw, where=where)
    validate(cfg, where=where)
    return cfg


def _probe_trial(spec: MethodSpec, student: str) -> ResolvedTrial:
    """A trial of ``spec`` with every searched value at its lower probe (fixed values as given)."""
    params = {k: d.probes()[0] for k, d in spec.params.items()}
    return ResolvedTrial(label=spec.label, method=spec.method, student=student, teacher=spec.teacher,
                         params=params, settings=dict(spec.overrides))


def check_space_weights(space: SearchSpace, timeout: float = HUB_TIMEOUT_S) -> None:
    """:func:`check_weights` for every teacher a method of a search space uses and every student."""
    used_teachers = {m.teacher for m in space.methods.values() if m.teacher}
    used_students: set[str] = set()
    for m in space.methods.values():
        used_students.update(m.students)
    for name, t in space.teachers.items():
        if t.model is not None and name in used_teachers:
            check_weights(from_dict(ModelConfig, t.model), f"teachers.{name}.model", where=space.source,
                          timeout=timeout)
    for i, (sid, s) in enumerate(space.students.items()):
        if sid in used_students:
            check_weights(from_dict(ModelConfig, s.model), f"students[{i}]", where=space.source,
                          settable=False, timeout=timeout)


def check_combinations(space: SearchSpace) -> SearchSpace:
    """Build every (method, student) pair once on the CPU and drop those the method refuses.

    Generates the synthetic dataset first when the base config names a missing one (its class count
    sizes the heads). A method left without any student is an error naming every reason.

    Returns:
        The space with each method's students narrowed to the pairs that fit.
    """
    import torch  # lazy: torch is heavy

    check_space_weights(space)  # pretrained weights of every teacher and student: file or hub
    manifest = ensure_dataset(space.base_config.data)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one probe batch per model: more threads only contend (10x slower here)
    try:
        return _check_all(space, manifest)
    finally:
        torch.set_num_threads(threads)


def _check_all(space: SearchSpace, manifest) -> SearchSpace:
    import torch  # lazy: torch is heavy

    methods = {}
    torch.manual_seed(0)
    for name in _needed_teachers(space):
        if space.teachers[name].model is not None:
            try:
                build_run(teacher_run_config(space, name, Path(space.output_dir)), manifest)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{space.source}: teachers.{name}: {e}") from None
    for label, spec in space.methods.items():
        if METHODS.get(spec.method).multi_run:
            _check_pipeline(space, spec, manifest)
            methods[label] = spec
            continue
        ok, reasons = [], []
        for sid in spec.students:
            t = space.teachers.get(spec.teacher) if spec.teacher else None
            cfg = build_run_config(space, _probe_trial(spec, sid), name="compat-check",
                                   output_dir=Path(space.output_dir), teacher_path=t.checkpoint if t else None,
                                   teacher_model=t.model if t else None)
            try:
                build_run(cfg, manifest, probe=True)  # a teacher prep's output: untrained, of the right shapes
            except (ValueError, TypeError, FileNotFoundError) as e:
                reasons.append(f"{sid}: {e}")
                log.warning("methods.%s: skipping student %s: %s", label, sid, e)
                continue
            ok.append(sid)
        if not ok:
            raise ConfigError(f"{space.source}: methods.{label} ({spec.method}) fits none of its "
                              "students:\n  " + "\n  ".join(reasons))
        methods[label] = replace(spec, students=tuple(ok))
    return replace(space, methods=methods)


def pipeline_knobs(spec: MethodSpec) -> dict[str, Any]:
    """The knobs of a method entry that its pipeline takes (``min_blocks`` for the cascade)."""
    return {k: getattr(spec, k) for k in METHODS.get(spec.method).pipeline_knobs}


def _check_pipeline(space: SearchSpace, spec: MethodSpec, manifest) -> None:
    """A method made of several runs: its pipeline must accept the teacher (the parent) and its
    knobs, and its first step must build."""
    t = space.teachers[spec.teacher]
    where = f"{space.source}: methods.{spec.label}"
    model_cfg = ModelConfig(checkpoint=t.checkpoint) if t.checkpoint else from_dict(ModelConfig, t.model)
    cls = METHODS.get(spec.method)
    try:
        steps = cls.pipeline(build_network(model_cfg, manifest.num_classes), image_size=None, **pipeline_knobs(spec))
    except (ValueError, FileNotFoundError) as e:
        raise ConfigError(f"{where}: teacher {t.name!r}: {e}") from None
    cfg = build_run_config(space, _probe_trial(spec, ""), name="compat-check", output_dir=Path(space.output_dir),
                           teacher_path=t.checkpoint, teacher_model=t.model)
    cfg = replace(cfg, student=replace(cfg.student, **{k: v for k, v in steps[1].student.items()
                                                       if k != "image_size"}))
    try:
        build_run(cfg, manifest, probe=True)
    except ValueError as e:
        raise ConfigError(f"{where}: {e}") from None


def is_paper_setting(method: str, params: dict[str, Any], spec) -> bool:
    """Whether a trial's searched method parameters (``spec.params`` that are not fixed) are all at
    the paper's values; a method with nothing searched has no paper trial to mark."""
    paper = paper_params(method)
    searched = [k for k, d in spec.params.items() if not d.fixed]
    return bool(searched) and all(paper.get(k) == params.get(k) for k in searched)
