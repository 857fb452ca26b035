"""The typed parts of a search space: distributions, budget, sampler, export, and the parsed
teacher / student / method entries. :mod:`raykd.tune.space_file` builds them from YAML and validates
them; :mod:`raykd.tune.sampler` samples them.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from raykd.config import ConfigError, RunConfig, from_dict
from raykd.export.options import SearchExportConfig as ExportConfig
from raykd.registry import did_you_mean

__all__ = [
    "DIST_KINDS",
    "OBJECTIVES",
    "BudgetConfig",
    "Dist",
    "ExportConfig",
    "MethodSpec",
    "SearchConfig",
    "SearchSpace",
    "StudentSpec",
    "TeacherSpec",
    "parse_dist",
    "trial_key",
    "trial_knob",
]

DIST_KINDS = ("uniform", "loguniform", "int", "choice")
#: Objectives a multi-objective search may minimise next to the selection metric.
OBJECTIVES = ("latency_ms", "params", "size_mb")


def trial_key(label: str, name: str) -> str:
    """The flat key of method ``label``'s knob ``name`` (a parameter, ``student`` or a run key) in a
    trial's point: ``kd.temperature``, ``kd.student``, ``fitnet.optim.lr``."""
    return f"{label}.{name}"


def trial_knob(key: str, label: str) -> str | None:
    """The knob of method ``label`` that flat trial key ``key`` names, or None when it names none."""
    prefix = f"{label}."
    return key[len(prefix):] if key.startswith(prefix) else None


# --------------------------------------------------------------------------------------------------
# Distributions
# --------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Dist:
    """One leaf of a space: a distribution, or a fixed value (``kind == "fixed"``)."""

    kind: str
    args: tuple

    @property
    def fixed(self) -> bool:
        return self.kind == "fixed"

    def suggest(self, trial: Any, name: str) -> Any:
        """Draw a value with an Optuna trial (``fixed`` values are not suggested: None)."""
        if self.kind == "uniform":
            return trial.suggest_float(name, float(self.args[0]), float(self.args[1]))
        if self.kind == "loguniform":
            return trial.suggest_float(name, float(self.args[0]), float(self.args[1]), log=True)
        if self.kind == "int":
            return trial.suggest_int(name, int(self.args[0]), int(self.args[1]))
        if self.kind == "choice":
            return trial.suggest_categorical(name, list(self.args))
        return None

    def contains(self, value: Any) -> bool:
        """Whether the distribution can produce ``value`` (a fixed one: only its own value)."""
        if self.kind in ("fixed", "choice"):
            return value in self.args
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return self.args[0] <= value <= self.args[1] and (self.kind != "int" or float(value).is_integer())

    def probes(self) -> list[Any]:
        """Values that stand for the whole distribution when checking it against a field."""
        if self.kind == "fixed":
            return [self.args[0]]
        if self.kind == "choice":
            return list(self.args)
        return [self.args[0], self.args[1]]

    def centre(self) -> Any:
        """The middle of the distribution (geometric for ``loguniform``; the first choice): the
        value every arm's first trial shares, so the arms start from the same shared knobs."""
        lo = self.args[0]
        if self.kind in ("fixed", "choice"):
            return lo
        hi = self.args[1]
        if self.kind == "loguniform":
            return float(math.sqrt(lo * hi))
        if self.kind == "int":
            return int(lo + (hi - lo) // 2)
        return float((lo + hi) / 2)

    def describe(self) -> str:
        if self.kind == "fixed":
            return repr(self.args[0])
        return f"{self.kind}{list(self.args)}"


def _number(v: Any) -> float | None:
    if isinstance(v, bool):
        return None
    if isinstance(v, (int, float)):
        return float(v)
    if isinstance(v, str):  # YAML 1.1 reads 1e-3 as a string
        try:
            return float(v)
        except ValueError:
            return None
    return None


def parse_dist(value: Any, *, where: str, key: str) -> Dist:
    """``{uniform: [lo, hi]}`` / ``{loguniform: ...}`` / ``{int: ...}`` / ``{choice: [...]}`` or a value."""
    if not isinstance(value, dict):
        if isinstance(value, list):
            raise ConfigError(f"{where}: {key}={value!r}: a list is not a distribution; "
                              f"write {{choice: {value!r}}}")
        return Dist("fixed", (_coerce_scalar(value),))
    if len(value) != 1:
        raise ConfigError(
            f"{where}: {key} must be one distribution like {{uniform: [lo, hi]}}, got {value!r}; "
            f"valid distributions: {', '.join(DIST_KINDS)}"
        )
    (kind, args), = value.items()
    if kind not in DIST_KINDS:
        hint = did_you_mean(kind, DIST_KINDS, n=1)
        raise ConfigError(
            f"{where}: {key}: unknown distribution {kind!r}.{hint} "
            f"Valid distributions: {', '.join(DIST_KINDS)}"
        )
    if kind == "choice":
        if not isinstance(args, list) or not args:
            raise ConfigError(f"{where}: {key}: choice needs a non-empty list, got {args!r}")
        for a in args:
            if a is not None and not isinstance(a, (bool, int, float, str)):
                raise ConfigError(f"{where}: {key}: choice values must be numbers, strings or booleans, "
                                  f"got {a!r}")
        return Dist("choice", tuple(_coerce_scalar(a) for a in args))
    if not isinstance(args, list) or len(args) != 2:
        raise ConfigError(f"{where}: {key}: {kind} needs [lo, hi], got {args!r}")
    lo, hi = (_number(a) for a in args)
    if lo is None or hi is None or not (math.isfinite(lo) and math.isfinite(hi)):
        raise ConfigError(f"{where}: {key}: {kind} bounds must be finite numbers, got {args!r}")
    if not lo < hi:
        raise ConfigError(f"{where}: {key}: {kind} needs lo < hi, got [{lo:g}, {hi:g}]")
    if kind == "loguniform" and lo <= 0:
        raise ConfigError(f"{where}: {key}: loguniform needs lo > 0, got {lo:g}")
    if kind == "int":
        if not (lo.is_integer() and hi.is_integer()):
            raise ConfigError(f"{where}: {key}: int bounds must be integers, got {args!r}")
        return Dist("int", (int(lo), int(hi)))
    return Dist(kind, (lo, hi))


def _coerce_scalar(v: Any) -> Any:
    if isinstance(v, str):
        n = _number(v)
        if n is not None and any(c in v for c in "eE.") and v.strip() not in ("", "."):
            return n
    return v


# --------------------------------------------------------------------------------------------------
# Typed parts of the space (validated with raykd.config.from_dict)
# --------------------------------------------------------------------------------------------------


@dataclass
class BudgetConfig:
    """How much searching: trials, epochs per trial, concurrency and ASHA."""

    num_samples: int = field(default=8, metadata={"range": (1, 100_000)})
    #: Trials of every arm (a method label with one of its students): the same tuning budget for
    #: the baseline and each method. Set, it replaces ``num_samples`` (= arms x trials_per_arm).
    trials_per_arm: int | None = field(default=None, metadata={"range": (1, 10_000)})
    #: Epochs of every trial run (None: the base config's train.epochs).
    epochs: int | None = field(default=None, metadata={"range": (1, 100_000)})
    #: Trials at once (None: as many as the cluster's CPUs/GPUs fit, capped by its trial slots).
    max_concurrent: int | None = field(default=None, metadata={"range": (1, 10_000)})
    #: Without ``trials_per_arm``: the first ``len(methods) * min_trials_per_method`` trials go
    #: round-robin over the methods (the rest is up to the sampler, which may favour some).
    min_trials_per_method: int = field(default=1, metadata={"range": (0, 1000)})
    #: Early stopping of weak trials (ASHA); off in multi-objective mode, where a small model with a
    #: lower BMA may still be Pareto-optimal.
    asha: bool = True
    #: Epochs every trial runs before ASHA may stop it (None: half the trial's epochs, so that no
    #: run is judged before it has had time to learn).
    grace_period: int | None = field(default=None, metadata={"range": (1, 100_000)})
    reduction_factor: int = field(default=2, metadata={"range": (2, 100)})
    #: Stop starting trials after this many seconds (None: no limit).
    time_budget_s: float | None = field(default=None, metadata={"range": (1.0, None)})
    #: Restarts of a trial that failed (its process died with a lost node or an OOM kill, or it
    #: raised): it resumes from its run's last checkpoint. 0 records the first failure.
    trial_retries: int = field(default=1, metadata={"range": (0, 100)})


@dataclass
class SearchConfig:
    """The sampler and the objective(s)."""

    seed: int = 0
    #: tpe (default; multivariate, grouped for conditional spaces), random, or nsga2 (multi-objective).
    sampler: Literal["tpe", "random", "nsga2"] = "tpe"
    #: Validation metric that ranks trials (maximised except ``loss``); also the run's select_metric.
    metric: str = "bma"
    #: Extra objectives minimised together with ``metric`` (multi-objective mode, a Pareto family):
    #: any of latency_ms, params, size_mb.
    objectives: list[str] = field(default_factory=list)
    #: Optuna storage: None = a SQLite file in the experiment folder; or a database URL
    #: (``postgresql://...``) shared by a cluster.
    storage: str | None = None
    #: Random trials before TPE models the space.
    startup_trials: int = field(default=10, metadata={"range": (1, 10_000)})
    #: Stage 1 refuses to distil from a teacher whose best validation ``metric`` is not at least
    #: this far above chance (BMA: 1 / the classes in the validation split); None turns it off.
    teacher_margin: float | None = field(default=0.1, metadata={"range": (0.0, 1.0)})
    #: Stage 1 computes the teacher outputs on this many augmented views of every training image
    #: once per teacher and student contract (``raykd.train.teacher_outputs``), and every trial that
    #: can read them takes them instead of running the teacher; None: online teachers.
    teacher_output_views: int | None = field(default=None, metadata={"range": (1, 1000)})


@dataclass
class ConfirmConfig:
    """The confirmation stage: each arm's best configuration retrained on the same seeds.

    Seed k gives every arm the same initial student weights, data order and augmentations, and
    every run scores the test split once with its best validation epoch, so each method is compared
    with the baseline of its student seed by seed (:mod:`raykd.tune.confirm`).
    """

    #: Seeds per arm (0: no confirmation stage, and then no distillation gain is reported).
    seeds: int = field(default=5, metadata={"range": (0, 1000)})
    #: The first seed; seed k of the stage is ``first_seed + k`` (the search's trials use the base
    #: ``train.seed``, so the default never repeats a search run).
    first_seed: int = field(default=1, metadata={"range": (0, 2**31 - 1)})
    #: Confidence level of the intervals.
    level: float = field(default=0.95, metadata={"range": (0.5, 0.999)})


@dataclass(frozen=True)
class TeacherSpec:
    """A teacher trained in stage 1 (``model``) or reused (``checkpoint``)."""

    name: str
    model: dict | None = None
    checkpoint: str | None = None
    #: Dotted RunConfig overrides of the teacher's training run (``train.epochs: 5``).
    overrides: dict = field(default_factory=dict)
    #: A teacher-free method to train it with (``baseline``; ``fcvit_probs`` for SkinDistilViT's
    #: cascade teacher) and its fixed parameters.
    method: str = "baseline"
    params: dict = field(default_factory=dict)


@dataclass(frozen=True)
class StudentSpec:
    id: str
    model: dict


@dataclass(frozen=True)
class MethodSpec:
    """One entry of ``methods:`` (a label, usually the registered method's name)."""

    label: str
    method: str
    students: tuple[str, ...]
    teacher: str | None
    params: dict  # field -> Dist
    search: dict  # dotted RunConfig key -> Dist
    overrides: dict  # dotted RunConfig key -> value
    min_blocks: int = 1

    def param_names(self, shared: dict) -> set[str]:
        """The Optuna parameter names a trial of this method may carry."""
        names = {"method"} | {k for k, d in shared.items() if not d.fixed}
        if len(self.students) > 1:
            names.add(f"{self.label}.student")
        names |= {f"{self.label}.{k}" for k, d in {**self.params, **self.search}.items() if not d.fixed}
        return names


@dataclass
class SearchSpace:
    """A validated search space (see :mod:`raykd.tune.space_file` for the YAML format)."""

    source: str
    name: str
    output_dir: str
    address: str | None
    base: dict
    teachers: dict[str, TeacherSpec]
    students: dict[str, StudentSpec]
    shared: dict[str, Dist]
    methods: dict[str, MethodSpec]
    budget: BudgetConfig
    search: SearchConfig
    export: ExportConfig
    confirm: ConfirmConfig = field(default_factory=ConfirmConfig)
    #: A URI ``output_dir``'s local mirror on every node (see :mod:`raykd.storage`).
    mirror_dir: str | None = None
    #: Set by :func:`raykd.tune.plan.absolute_paths` for a URI ``output_dir`` (which then names the mirror).
    mirror_uri: str | None = None

    @functools.cached_property
    def base_config(self) -> RunConfig:
        """``base`` as the typed run config (parsed once; ``base`` stays the dict every trial's
        config starts from)."""
        return from_dict(RunConfig, self.base, where=self.source)

    @property
    def experiment_dir(self) -> Path:
        return Path(self.output_dir) / self.name

    @property
    def multi_objective(self) -> bool:
        return bool(self.search.objectives)

    def arms(self) -> list[tuple[str, str]]:
        """Every (method label, student id) pair the search tunes and confirms, in the space's order."""
        return [(label, sid) for label, m in self.methods.items() for sid in (m.students or ("",))]
