"""The search-space file: its YAML format and its validation before Ray starts, into the typed
:class:`~raykd.tune.space.SearchSpace` (:func:`load_space`).

A space names the runs a search may make: a base run config, the teacher(s) to train or reuse,
the student architectures, the distillation methods with their per-method parameter
distributions, parameters shared by every method (``optim.lr``), and the budget. The full format
is documented in ``search_spaces/README.md``; in short::

    name: tune-smoke                      # experiment folder under output_dir
    output_dir: runs
    base: {data: {path: data/synthetic-32}, train: {epochs: 2}}     # RunConfig overrides
    teachers:
      cnn: {model: {name: test_resnet, image_size: 32}, set: {train.epochs: 3}}
      vit: {checkpoint: runs/my-vit}      # reuse a trained model instead
    students: [raykd_test_tiny_cnn, {name: test_resnet, image_size: 32}]
    shared:
      optim.lr: {loguniform: [1.0e-4, 1.0e-2]}
    methods:
      baseline: {}
      kd: {params: {temperature: {uniform: [1, 10]}, alpha: {uniform: [0.1, 0.9]}}}
      cascade: {teacher: vit, min_blocks: 2}
    budget: {num_samples: 8, epochs: 2, grace_period: 1}
    search: {seed: 0, objectives: [latency_ms]}   # objectives: multi-objective (Pareto) mode

Distributions: ``{uniform: [lo, hi]}``, ``{loguniform: [lo, hi]}``, ``{int: [lo, hi]}``,
``{choice: [a, b, ...]}``; a plain value is fixed. Method parameters are the fields of the
method's ``Params`` dataclass (:func:`raykd.distill.method_params`); every range is checked
against the field's declared range, so a typo or an out-of-range bound fails here, naming the
file, the key and the valid names, before any Ray work.
"""

from __future__ import annotations

import copy
import dataclasses
import typing
from pathlib import Path
from typing import Any

import yaml

import raykd.models  # noqa: F401 (registers raykd_* models)
from raykd.config import ConfigError, ModelConfig, RunConfig, from_dict, parse_override, set_dotted, validate
from raykd.distill import METHODS
from raykd.distill.base import make_params, method_params
from raykd.registry import did_you_mean
from raykd.tune.space import (
    OBJECTIVES,
    BudgetConfig,
    ConfirmConfig,
    Dist,
    ExportConfig,
    MethodSpec,
    SearchConfig,
    SearchSpace,
    StudentSpec,
    TeacherSpec,
    parse_dist,
)

__all__ = ["load_space"]

#: RunConfig keys the search itself sets; a space may not search or fix them directly.
_MANAGED = {
    "name": "the run name is the trial id",
    "output_dir": "trials are written under <output_dir>/<name>/runs (set the top-level output_dir)",
    "mirror_dir": "set the top-level mirror_dir",
    "mirror_uri": "set the top-level output_dir to the URI",
    "address": "set the top-level address (or $RAY_ADDRESS)",
    "student": "list students under 'students:'",
    "teacher": "list teachers under 'teachers:'",
    "distill.method": "list methods under 'methods:'",
    "distill.params": "give method parameters under 'methods.<label>.params'",
    "train.select_metric": "set search.metric",
}

_TOP_KEYS = ("name", "output_dir", "mirror_dir", "address", "base", "teachers", "students", "shared", "methods",
             "budget", "search", "export", "confirm")
_TEACHER_KEYS = ("model", "checkpoint", "set", "method", "params")
_METHOD_KEYS = ("method", "students", "teacher", "params", "search", "set", "min_blocks")
_MODEL_KEYS = tuple(f.name for f in dataclasses.fields(ModelConfig))


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def _unknown(where: str, prefix: str, key: str, valid: tuple[str, ...] | list[str]) -> ConfigError:
    hint = did_you_mean(key, valid, n=1)
    return ConfigError(f"{where}: unknown key {prefix}{key!r}.{hint} Valid keys here: {', '.join(valid)}")


def _mapping(value: Any, where: str, key: str) -> dict:
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
    return value


def _run_field(key: str, where: str, what: str) -> tuple[dataclasses.Field, Any]:
    """The RunConfig field behind dotted ``key`` and its type; refuses keys the search manages."""
    for managed, why in _MANAGED.items():
        if key == managed or key.startswith(managed + "."):
            raise ConfigError(f"{where}: {what} {key!r} cannot be set here: {why}")
    cls: Any = RunConfig
    parts = key.split(".")
    for i, part in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        prefix = ".".join(parts[:i]) + ("." if i else "")
        if part not in fields:
            raise _unknown(where, f"{what} {prefix}" if prefix else f"{what} ", part, sorted(fields))
        tp = typing.get_type_hints(cls)[part]
        inner = [a for a in typing.get_args(tp) if dataclasses.is_dataclass(a)]
        if dataclasses.is_dataclass(tp) or inner:
            cls = tp if dataclasses.is_dataclass(tp) else inner[0]
            if i == len(parts) - 1:
                raise ConfigError(f"{where}: {what} {key!r} is a section; name one of its keys "
                                  f"({', '.join(sorted(f.name for f in dataclasses.fields(cls)))})")
            continue
        if i != len(parts) - 1:
            raise ConfigError(f"{where}: {what} {key!r}: {prefix}{part} is a value, not a section")
        return fields[part], tp
    raise AssertionError(key)


def _check_run_values(base: dict, key: str, dist: Dist, where: str, what: str) -> None:
    """Every probe value of ``dist`` must make a valid RunConfig at ``key`` (type and range)."""
    f, tp = _run_field(key, where, what)
    if dist.kind in ("uniform", "loguniform") and tp in (int, int | None):
        raise ConfigError(f"{where}: {what} {key} is an integer; use {{int: [lo, hi]}} or {{choice: [...]}}")
    for value in dist.probes():
        raw = copy.deepcopy(base)
        set_dotted(raw, key, value)
        try:
            validate(from_dict(RunConfig, raw, where=where), where=where)
        except ConfigError as e:
            raise ConfigError(f"{e} (from {what} {key}: {dist.describe()})") from None


def _check_params(method: str, params: dict[str, Dist], where: str, label: str,
                  section: str = "methods") -> None:
    """Every searched or fixed parameter must be a field of the method's Params, within range."""
    cls = method_params(method)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    prefix = f"{label}.params." if section == "teachers" else f"methods.{label}.params."
    for name, dist in params.items():
        key = f"{prefix}{name}"
        if name not in fields:
            raise _unknown(where, prefix, name, sorted(fields))
        f = fields[name]
        is_int = isinstance(f.default, int) and not isinstance(f.default, bool)
        if is_int and dist.kind in ("uniform", "loguniform"):
            raise ConfigError(f"{where}: {key} is an integer parameter; use {{int: [lo, hi]}} or "
                              "{choice: [...]}")
        if isinstance(f.default, (bool, str)) and dist.kind in ("uniform", "loguniform", "int"):
            raise ConfigError(f"{where}: {key} takes one of {f.metadata.get('choices')}; "
                              "use {choice: [...]}")
        for value in dist.probes():
            try:
                make_params(cls, {name: value}, method)
            except (ValueError, TypeError) as e:
                raise ConfigError(f"{where}: {key}={dist.describe()}: {e}") from None


def _parse_model(value: Any, where: str, key: str) -> dict:
    if isinstance(value, str):
        value = {"name": value}
    value = _mapping(value, where, key)
    for k in value:
        if k not in _MODEL_KEYS and k != "id":
            raise _unknown(where, f"{key}.", k, list(_MODEL_KEYS) + ["id"])
    return dict(value)


def _check_model_name(model: dict, where: str, key: str) -> None:
    import timm  # lazy: timm is heavy

    name = model.get("name")
    if name is not None and not model.get("cut_blocks") and not timm.is_model(name):
        hint = did_you_mean(name, timm.list_models())
        raise ConfigError(f"{where}: {key}.name: unknown model {name!r}.{hint} See timm.list_models().")


def load_space(path: str | Path, overrides: list[str] | tuple[str, ...] = (), *,
               base_config: str | Path | None = None) -> SearchSpace:
    """Read and validate a search-space YAML (with ``key=value`` overrides) before Ray starts.

    Args:
        path: the space file.
        overrides: ``--set`` items addressing the space document (``budget.num_samples=4``,
            ``base.train.epochs=1``, ``output_dir=/mnt/runs``).
        base_config: an optional run-config YAML (``--config``) under the space's ``base:``.

    Raises:
        ConfigError: naming the file, the key and the valid names or range.
    """
    p = Path(path)
    where = str(p)
    doc = _read_space(p, overrides)
    base, base_student = _parse_base(doc, base_config, where)
    budget, search, export = _parse_settings(doc, where)
    students = _parse_students(doc.get("students"), base_student, where)
    teachers = _parse_teachers(doc.get("teachers"), base, where)
    shared = {}
    for key, value in _mapping(doc.get("shared"), where, "shared").items():
        shared[key] = parse_dist(value, where=where, key=f"shared.{key}")
        _check_run_values(base, key, shared[key], where, "shared")
    methods = _parse_methods(doc.get("methods"), students, teachers, shared, base, where)
    _check_trial_workers(base, shared, methods, where)
    confirm = _parse_confirm(doc, where)
    budget = _fair_budget(budget, shared, methods, where)

    name = doc.get("name") or f"tune-{p.stem}"
    if not isinstance(name, str) or not name or "/" in name:
        raise ConfigError(f"{where}: name must be a folder name (no '/'), got {name!r}")
    output_dir = doc.get("output_dir", "runs")
    if not isinstance(output_dir, str) or not output_dir:
        raise ConfigError(f"{where}: output_dir must be a path or a URI, got {output_dir!r}")
    mirror_dir = doc.get("mirror_dir")
    if mirror_dir is not None and (not isinstance(mirror_dir, str) or not mirror_dir):
        raise ConfigError(f"{where}: mirror_dir must be a path, got {mirror_dir!r}")
    address = doc.get("address")
    return SearchSpace(source=where, name=name, output_dir=output_dir, address=address, base=base,
                       teachers=teachers, students=students, shared=shared, methods=methods,
                       budget=budget, search=search, export=export, confirm=confirm, mirror_dir=mirror_dir)


def _parse_confirm(doc: dict, where: str) -> ConfirmConfig:
    confirm = from_dict(ConfirmConfig, _mapping(doc.get("confirm"), where, "confirm"), where=where, prefix="confirm.")
    validate(confirm, where=where, prefix="confirm.")
    if confirm.seeds == 1:
        raise ConfigError(f"{where}: confirm.seeds must be 0 (no confirmation) or at least 2 (an interval "
                          "needs two seeds; 5 or more for a useful one), got 1")
    return confirm


def _fair_budget(budget: BudgetConfig, shared: dict[str, Dist], methods: dict[str, MethodSpec],
                 where: str) -> BudgetConfig:
    """With ``budget.trials_per_arm`` every arm gets that many trials (``num_samples`` follows) and
    the shared knobs the same ranges: a method may not search or fix a ``shared`` key of its own."""
    if budget.trials_per_arm is None:
        return budget
    for label, spec in methods.items():
        own = sorted(set(shared) & (set(spec.search) | set(spec.overrides)))
        if own:
            raise ConfigError(f"{where}: methods.{label} sets or searches {', '.join(own)}, which shared: "
                              "gives every arm; with budget.trials_per_arm every arm gets the same ranges "
                              "of the shared knobs (move it to shared:, or drop trials_per_arm)")
    arms = sum(max(1, len(m.students)) for m in methods.values())
    return dataclasses.replace(budget, num_samples=arms * budget.trials_per_arm)


def _read_space(p: Path, overrides) -> dict:
    """The space document with its ``--set`` overrides applied; top-level keys checked."""
    if not p.is_file():
        raise ConfigError(f"search space {p} does not exist (see search_spaces/ for examples)")
    try:
        doc = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{p}: not valid YAML: {e}") from None
    if not isinstance(doc, dict):
        raise ConfigError(f"{p}: the top level must be a mapping, got {type(doc).__name__}")
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(doc, key, value)
    for k in doc:
        if k not in _TOP_KEYS:
            raise _unknown(str(p), "", k, _TOP_KEYS)
    return doc


def _parse_base(doc: dict, base_config: str | Path | None, where: str) -> tuple[dict, dict]:
    """``base:`` over the optional ``--config`` file, checked as a run config; returns it without
    its student, and the base student's model fields."""
    base: dict = {}
    if base_config is not None:
        bp = Path(base_config)
        if not bp.is_file():
            raise ConfigError(f"config file {bp} does not exist")
        base = _mapping(yaml.safe_load(bp.read_text()), str(bp), "the config")
        for k in ("name", "output_dir", "mirror_dir", "mirror_uri", "address", "teacher"):  # the search owns these
            base.pop(k, None)
        for k in ("method", "params"):
            _mapping(base.get("distill"), str(bp), "distill").pop(k, None)
    _deep_update(base, _mapping(doc.get("base"), where, "base"))
    for k in ("name", "output_dir", "mirror_dir", "mirror_uri", "address", "teacher", "distill.method",
              "distill.params", "train.select_metric"):
        head, _, tail = k.partition(".")
        if head in base and (not tail or tail in _mapping(base[head], where, f"base.{head}")):
            raise ConfigError(f"{where}: base.{k} cannot be set: {_MANAGED[k]}")
    base_student = _parse_model(base.pop("student", {}), where, "base.student")
    base_student.pop("id", None)
    try:  # the base alone must be a valid run config
        validate(from_dict(RunConfig, base, where=where), where=where)
    except ConfigError as e:
        raise ConfigError(f"{e} (in base:)") from None
    return base, base_student


def _parse_settings(doc: dict, where: str) -> tuple[BudgetConfig, SearchConfig, ExportConfig]:
    """The ``budget:``, ``search:`` and ``export:`` sections."""
    budget = from_dict(BudgetConfig, _mapping(doc.get("budget"), where, "budget"), where=where,
                       prefix="budget.")
    validate(budget, where=where, prefix="budget.")
    search = from_dict(SearchConfig, _mapping(doc.get("search"), where, "search"), where=where,
                       prefix="search.")
    validate(search, where=where, prefix="search.")
    for o in search.objectives:
        if o not in OBJECTIVES:
            raise ConfigError(f"{where}: search.objectives: unknown objective {o!r}; "
                              f"valid: {', '.join(OBJECTIVES)}")
    if search.sampler == "nsga2" and not search.objectives:
        raise ConfigError(f"{where}: search.sampler nsga2 is multi-objective; add search.objectives "
                          f"(one of {', '.join(OBJECTIVES)}) or use tpe")
    export = from_dict(ExportConfig, _mapping(doc.get("export"), where, "export"), where=where,
                       prefix="export.")
    validate(export, where=where, prefix="export.")
    return budget, search, export


def _check_trial_workers(base: dict, shared: dict[str, Dist], methods: dict[str, MethodSpec],
                         where: str) -> None:
    """Trials need Ray Train workers: its local mode (``num_workers: 0``) refuses to run in a Tune trial."""
    default = from_dict(RunConfig, base, where=where).scaling.num_workers
    for label, spec in methods.items():
        dist = spec.search.get("scaling.num_workers") or shared.get("scaling.num_workers")
        values = dist.probes() if dist else [spec.overrides.get("scaling.num_workers", default)]
        if 0 in values:
            raise ConfigError(
                f"{where}: methods.{label}: scaling.num_workers=0 (Ray Train's local mode) cannot run "
                "inside a Tune trial; trials need >= 1 worker (a teacher may use 0: teachers.<name>.set)")


def _deep_update(dst: dict, src: dict) -> None:
    for k, v in src.items():
        if isinstance(v, dict) and isinstance(dst.get(k), dict):
            _deep_update(dst[k], v)
        else:
            dst[k] = copy.deepcopy(v)


def _parse_students(value: Any, base_student: dict, where: str) -> dict[str, StudentSpec]:
    if value is None:
        value = [base_student] if base_student.get("name") else []
    if not isinstance(value, list):
        raise ConfigError(f"{where}: students must be a list of model names or model mappings, got {value!r}")
    out: dict[str, StudentSpec] = {}
    for i, item in enumerate(value):
        key = f"students[{i}]"
        model = {**{k: v for k, v in base_student.items() if k != "name"}, **_parse_model(item, where, key)}
        if "name" not in model and not model.get("cut_blocks"):
            raise ConfigError(f"{where}: {key} names no model (give a name, or cut_blocks and an id)")
        sid = str(model.pop("id", None) or model.get("name"))
        if sid in out:
            raise ConfigError(f"{where}: {key}: student id {sid!r} appears twice; give one of them an 'id'")
        _check_model_name(model, where, key)
        validate(from_dict(ModelConfig, model, where=where, prefix=f"{key}."), where=where, prefix=f"{key}.")
        out[sid] = StudentSpec(id=sid, model=model)
    return out


def _parse_teachers(value: Any, base: dict, where: str) -> dict[str, TeacherSpec]:
    out: dict[str, TeacherSpec] = {}
    for name, spec in _mapping(value, where, "teachers").items():
        key = f"teachers.{name}"
        spec = _mapping(spec, where, key)
        for k in spec:
            if k not in _TEACHER_KEYS:
                raise _unknown(where, f"{key}.", k, _TEACHER_KEYS)
        if ("model" in spec) == ("checkpoint" in spec):
            raise ConfigError(f"{where}: {key} needs exactly one of 'model' (train it in stage 1) "
                              "or 'checkpoint' (reuse a trained run or artifact folder)")
        overrides = _mapping(spec.get("set"), where, f"{key}.set")
        for k, v in overrides.items():
            _check_run_values(base, k, Dist("fixed", (v,)), where, f"{key}.set")
        model = None
        checkpoint = spec.get("checkpoint")
        if "model" in spec:
            model = _parse_model(spec["model"], where, f"{key}.model")
            model.pop("id", None)
            _check_model_name(model, where, f"{key}.model")
        elif not isinstance(checkpoint, str):
            raise ConfigError(f"{where}: {key}.checkpoint must be a path, got {checkpoint!r}")
        method = str(spec.get("method", "baseline"))
        params = _mapping(spec.get("params"), where, f"{key}.params")
        if "method" in spec or params:
            if method not in METHODS:
                raise ConfigError(f"{where}: {key}.method: {METHODS.unknown_message(method)}")
            if METHODS.get(method).needs_teacher:
                free = [m for m in METHODS.names() if not METHODS.get(m).needs_teacher]
                raise ConfigError(f"{where}: {key}.method {method!r} needs a teacher itself; a teacher is "
                                  f"trained with one of: {', '.join(free)}")
            if model is None:
                raise ConfigError(f"{where}: {key}: method/params apply to a teacher trained here (model:)")
            fixed = {k: Dist("fixed", (v,)) for k, v in params.items()}
            _check_params(method, fixed, where, key, "teachers")
        out[str(name)] = TeacherSpec(name=str(name), model=model, checkpoint=checkpoint,
                                     overrides=dict(overrides), method=method, params=dict(params))
    return out


def _parse_methods(value: Any, students: dict[str, StudentSpec], teachers: dict[str, TeacherSpec],
                   shared: dict[str, Dist], base: dict, where: str) -> dict[str, MethodSpec]:
    if value == "all":
        value = {m: {} for m in METHODS.names()}
    if isinstance(value, list):
        value = {str(m): {} for m in value}
    value = _mapping(value, where, "methods")
    if not value:
        raise ConfigError(f"{where}: methods is empty; name at least one of: {', '.join(METHODS.names())}")
    return {str(label): _parse_method(str(label), spec, students, teachers, base, where)
            for label, spec in value.items()}


def _parse_method(label: str, spec: Any, students: dict[str, StudentSpec], teachers: dict[str, TeacherSpec],
                  base: dict, where: str) -> MethodSpec:
    """One entry of ``methods:``."""
    key = f"methods.{label}"
    spec = _mapping(spec, where, key)
    for k in spec:
        if k not in _METHOD_KEYS:
            raise _unknown(where, f"{key}.", k, _METHOD_KEYS)
    method = str(spec.get("method", label))
    if method not in METHODS:
        raise ConfigError(f"{where}: {key}: {METHODS.unknown_message(method)}")
    if "." in label or "/" in label:
        raise ConfigError(f"{where}: {key}: a method label may not contain '.' or '/'")
    cls = METHODS.get(method)
    names, teacher = _method_pair(spec, cls, method, students, teachers, where, key)
    params = {str(k): parse_dist(v, where=where, key=f"{key}.params.{k}")
              for k, v in _mapping(spec.get("params"), where, f"{key}.params").items()}
    _check_params(method, params, where, label)
    searched = {}
    for k, v in _mapping(spec.get("search"), where, f"{key}.search").items():
        searched[k] = parse_dist(v, where=where, key=f"{key}.search.{k}")
        _check_run_values(base, k, searched[k], where, f"{key}.search")
    overrides = _mapping(spec.get("set"), where, f"{key}.set")
    for k, v in overrides.items():
        _check_run_values(base, k, Dist("fixed", (v,)), where, f"{key}.set")
    min_blocks = spec.get("min_blocks", 1)
    if "min_blocks" in spec and "min_blocks" not in cls.pipeline_knobs:
        takers = [n for n in METHODS.names() if "min_blocks" in METHODS.get(n).pipeline_knobs]
        raise ConfigError(f"{where}: {key}.min_blocks applies to methods trained as a pipeline of runs "
                          f"({', '.join(takers)}), not to {method!r}")
    if isinstance(min_blocks, bool) or not isinstance(min_blocks, int) or min_blocks < 1:
        raise ConfigError(f"{where}: {key}.min_blocks must be an integer >= 1, got {min_blocks!r}")
    return MethodSpec(
        label=label, method=method, students=tuple(names) if not cls.student_from_teacher else (),
        teacher=teacher if cls.needs_teacher else None, params=params, search=searched,
        overrides=dict(overrides), min_blocks=min_blocks,
    )


def _method_pair(spec: dict, cls, method: str, students: dict[str, StudentSpec], teachers: dict[str, TeacherSpec],
                 where: str, key: str) -> tuple[list[str], str | None]:
    """A method entry's students (default: all) and teacher (default: the first), checked."""
    names = spec.get("students")
    if names is None:
        names = list(students)
    if not isinstance(names, list):
        raise ConfigError(f"{where}: {key}.students must be a list of student ids, got {names!r}")
    for s in names:
        if s not in students:
            valid = list(students) or ["(none: add 'students:')"]
            raise _unknown(where, f"{key}.students: ", s, valid)
    if not cls.student_from_teacher and not names:
        raise ConfigError(f"{where}: {key}: no students to train; add 'students:' to the space")
    teacher = spec.get("teacher")
    if cls.needs_teacher:
        if teacher is None:
            if not teachers:
                raise ConfigError(f"{where}: {key}: method {method!r} needs a teacher; "
                                  "add 'teachers:' to the space")
            teacher = next(iter(teachers))
        if teacher not in teachers:
            raise _unknown(where, f"{key}.teacher: ", teacher, list(teachers))
    elif teacher is not None:
        raise ConfigError(f"{where}: {key}.teacher: method {method!r} takes no teacher; remove it")
    return names, teacher
