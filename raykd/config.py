"""Typed configuration: the single home of every default.

Configs are nested frozen-free dataclasses. :func:`load_config` builds one from an optional YAML
file plus ``--set a.b=value`` overrides and validates everything before any Ray work starts: an
unknown key, a value of the wrong type or one outside its range raises :class:`ConfigError` naming
the key, the file and the valid choices.

Ranges and choices are declared on fields with ``metadata={"range": (lo, hi)}`` or
``metadata={"choices": (...)}`` (``Literal`` types work too).
"""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

from raykd.registry import did_you_mean

C = TypeVar("C")


class ConfigError(ValueError):
    """A user error in a config file or an override."""


def _range(lo: float | None, hi: float | None) -> dict:
    return {"range": (lo, hi)}


# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class SplitConfig:
    """Train/val/test fractions; splits are stratified by class and grouped by lesion and patient."""

    train: float = field(default=0.7, metadata=_range(0.0, 1.0))
    val: float = field(default=0.15, metadata=_range(0.0, 1.0))
    test: float = field(default=0.15, metadata=_range(0.0, 1.0))
    seed: int = 42

    def validate(self, where: str) -> None:
        total = self.train + self.val + self.test
        if abs(total - 1.0) > 1e-6:
            raise ConfigError(f"{where}: splits.train + splits.val + splits.test must be 1.0, got {total:g}")
        if self.train <= 0:
            raise ConfigError(f"{where}: splits.train must be > 0")


@dataclass
class SynthConfig:
    """The procedural dataset used when no real dataset is named."""

    num_images: int = field(default=2000, metadata=_range(8, 10_000_000))
    image_size: int = field(default=128, metadata=_range(16, 1024))
    seed: int = 0
    #: Probability that each cue group of a lesion (shape, colour, texture) is borrowed from a
    #: look-alike class: the difficulty of the set (raykd.data.synthetic).
    atypical: float = field(default=0.22, metadata=_range(0.0, 1.0))


@dataclass
class SamplingConfig:
    """Class-imbalance handling applied per epoch as index plans (never copies of images)."""

    #: ``instance_hardness`` is HierAttn's rebalancing: classes above the target keep their easiest
    #: images (instance-hardness threshold), classes below it are oversampled.
    strategy: Literal["none", "oversample", "undersample", "instance_hardness"] = "none"
    #: Per-class target count for over/undersampling; None means the largest (oversample) or the
    #: smallest (undersample) class count of the training split.
    target_count: int | None = field(default=None, metadata=_range(1, None))
    #: Class weights for the (weighted) cross-entropy: inverse frequency as in SSD-KD, or none.
    class_weights: Literal["none", "inverse_frequency"] = "inverse_frequency"
    seed: int = 0


@dataclass
class DataConfig:
    """Where the sharded Parquet dataset lives and how it is made if it is missing."""

    #: Folder holding ``manifest.json`` and ``shards/``. Generated from ``synth`` when absent and
    #: ``generate_if_missing`` is true.
    #: The dataset: a folder (local, or a mount every node shares) or a URI read through pyarrow's
    #: filesystems (``s3://bucket/prefix``, ``gs://...``); a missing folder is generated (synthetic).
    path: str = "data/synthetic"
    generate_if_missing: bool = True
    synth: SynthConfig = field(default_factory=SynthConfig)
    splits: SplitConfig = field(default_factory=SplitConfig)
    #: Target size of one Parquet shard.
    shard_mb: float = field(default=64.0, metadata=_range(0.01, 4096))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    #: Crop the dermatoscope's black vignette first (SkinDistilViT, HierAttn).
    crop_black_border: bool = False
    #: Paper 004's six-stage preprocessing (hair removal, bilateral, Otsu highlight, unsharp mask).
    pipeline_004: bool = False


# --------------------------------------------------------------------------------------------------
# Models, methods, optimisation, scaling: one training run
# --------------------------------------------------------------------------------------------------


@dataclass
class ModelConfig:
    """A model built with ``timm.create_model`` (raykd models are registered with timm)."""

    name: str = "raykd_test_tiny_cnn"
    #: Extra ``timm.create_model`` keyword arguments (e.g. ``{depth: 6}``, ``{drop_path_rate: 0.1}``).
    kwargs: dict = field(default_factory=dict)
    #: Start from the model's published (ImageNet) weights, as the papers do: ``pretrained_file``
    #: when given, else timm's hub. For ``raykd_fused_teacher`` it means its three backbones (a file
    #: per backbone: ``kwargs.backbone_files.{cnn_a,cnn_b,vit}``). Checked before Ray starts.
    pretrained: bool = False
    #: Local weights (safetensors or a torch state dict) to start from; a mismatched head is skipped.
    pretrained_file: str | None = None
    #: A trained raykd model (artifact folder or run folder with ``best/``); for teachers.
    checkpoint: str | None = None
    #: Input size override; default is the model's own ``pretrained_cfg``.
    image_size: int | None = field(default=None, metadata=_range(16, 2048))
    #: Student only: build it by copying these blocks out of the teacher ViT (SkinDistilViT cuts
    #: blocks 0, 2, 4, 7, 9, 11 of ViT-B/16); ``name`` is then ignored.
    cut_blocks: list[int] | None = None


@dataclass
class DistillConfig:
    """The distillation method (``baseline`` = plain supervised training) and its parameters."""

    method: str = "baseline"
    #: Fields of the method's ``Params`` dataclass (checked against it before Ray starts).
    params: dict = field(default_factory=dict)
    #: Epochs of a method's teacher-side stage (SSKD's projection-head pre-training; paper: 60).
    stage_epochs: int = field(default=5, metadata=_range(1, 10_000))
    #: The saved output of the method's teacher-side stage (a safetensors file). ``raykd train``
    #: runs the stage into the run folder when this is empty; a search runs it once per teacher in
    #: its stage 1 and sets this for every trial.
    teacher_stage_file: str | None = None
    #: A teacher store (``raykd.train.store``) to read the teacher's outputs from instead of running
    #: the teacher (single-process runs of methods that declare the outputs they read). The search
    #: builds one per teacher and student contract in its stage 1 (``search.teacher_store_views``).
    teacher_store: str | None = None


@dataclass
class OptimConfig:
    """Optimiser and schedule; the papers' recipes are presets of these fields.

    SkinDistilViT: adamw, lr 2e-4, weight_decay 0, schedule linear. SSD-KD: sgd, lr 1e-3,
    momentum 0.9, weight_decay 1e-3, schedule plateau (factor 0.1, patience 10) with early stopping
    (15). HierAttn: adamw, lr 2e-3, min_lr 2e-4, weight_decay 1e-2, schedule cosine_restarts
    (warmup_epochs 15, restart_epochs [30]), transferred layers frozen first. Fusion teacher to
    tiny CNN: adafactor, lr 2e-3. (``raykd/distill/METHODS.md`` tables every paper's values.)
    """

    #: ``adafactor`` is ``torch.optim.Adafactor``: ``lr`` caps its relative step size, as Keras'
    #: Adafactor does (the fusion paper's optimiser); ``momentum`` is not used.
    name: Literal["adamw", "sgd", "adafactor"] = "adamw"
    lr: float = field(default=1e-3, metadata=_range(1e-8, 10.0))
    weight_decay: float = field(default=0.0, metadata=_range(0.0, 1.0))
    momentum: float = field(default=0.9, metadata=_range(0.0, 1.0))
    #: ``cosine_restarts``: a linear warm-up from ``min_lr`` to ``lr`` over ``warmup_epochs``, then a
    #: cosine down to ``min_lr``, started again at each of ``restart_epochs`` (HierAttn, SGDR-style).
    schedule: Literal["constant", "linear", "cosine", "plateau", "cosine_restarts"] = "cosine"
    warmup_epochs: int = field(default=0, metadata=_range(0, 10_000))
    #: Epochs (increasing, > 0) at which ``cosine_restarts`` starts a new cycle; one at or past the
    #: run's last epoch is never reached.
    restart_epochs: list[int] = field(default_factory=list)
    min_lr: float = field(default=0.0, metadata=_range(0.0, 10.0))
    plateau_factor: float = field(default=0.1, metadata=_range(1e-4, 1.0))
    plateau_patience: int = field(default=10, metadata=_range(0, 10_000))
    #: Stop when the selection metric has not improved for this many epochs (None: never).
    early_stop_patience: int | None = field(default=None, metadata=_range(1, 10_000))
    #: Transfer-learning warm-up: only the classifier head trains for the first N epochs.
    freeze_epochs: int = field(default=0, metadata=_range(0, 10_000))
    grad_clip: float | None = field(default=None, metadata=_range(0.0, 1e6))


@dataclass
class ScalingConfig:
    """Ray Train workers. 0.5 CPU per worker leaves room for Ray Data on small machines."""

    num_workers: int = field(default=2, metadata=_range(0, 4096))
    cpus_per_worker: float = field(default=0.5, metadata=_range(0.0, 512))
    use_gpu: bool = False
    gpus_per_worker: float = field(default=1.0, metadata=_range(0.0, 16))
    #: Where the run trains: ``trainer`` (a Ray Train TorchTrainer: DDP workers, Ray Data shards),
    #: ``local`` (one process, the dataset held in memory: no worker group or pipeline to start) or
    #: ``auto`` (local for a single-worker run on a small dataset, see raykd.train.driver).
    executor: Literal["auto", "trainer", "local"] = "auto"
    #: Elastic Ray Train runs: when set below ``num_workers``, the worker group runs with as many
    #: workers as the cluster can host between ``min_workers`` and ``num_workers`` (a lost node
    #: shrinks it, a new one grows it back); None keeps the group at ``num_workers``.
    min_workers: int | None = field(default=None, metadata=_range(1, 4096))
    #: Where Ray Train places its workers: ``pack`` (fewest nodes) or ``spread`` (one per node
    #: where possible, so a lost node costs the fewest workers).
    placement: Literal["pack", "spread"] = "pack"

    def validate(self, where: str) -> None:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ConfigError(f"{where}: scaling.min_workers ({self.min_workers}) must be <= "
                              f"scaling.num_workers ({self.num_workers})")


@dataclass
class TrainConfig:
    epochs: int = field(default=3, metadata=_range(1, 100_000))
    #: Per-worker batch size.
    batch_size: int = field(default=32, metadata=_range(1, 65_536))
    eval_batch_size: int = field(default=64, metadata=_range(1, 65_536))
    #: Augmentation recipe of ``raykd.data.transforms`` (skindistilvit, ssdkd, hierattn, light).
    recipe: str = "light"
    #: Mixed precision on GPU (bf16 where supported, else fp16 with a grad scaler); ignored on CPU.
    amp: bool = True
    #: Metric that picks the best epoch (``loss`` is minimised, every other metric maximised).
    select_metric: str = "bma"
    #: Worker-group restarts from the last checkpoint before the run fails.
    max_failures: int = field(default=1, metadata=_range(-1, 1000))
    #: How long a Ray Train worker group may wait for its resources (at start, or after a node is
    #: lost) before the run stops with an error naming what is missing; never a silent hang.
    resource_wait_s: float = field(default=600.0, metadata=_range(1.0, 86_400.0))
    seed: int = 0
    #: Shuffle buffer (rows) of the training iterator.
    shuffle_buffer: int = field(default=256, metadata=_range(0, 1_000_000))
    #: Fault injection for tests: the worker of rank 0 exits hard once, in this epoch (1-based),
    #: halfway through it. None in real runs.
    crash_in_epoch: int | None = field(default=None, metadata=_range(1, 100_000))


@dataclass
class RunConfig:
    """One training run: a teacher (optional) and a student trained with a method."""

    name: str = "run"
    #: Runs are written to ``output_dir/name``: a folder (absolute or relative to the working
    #: directory), or a URI (``s3://bucket/runs``, ``gs://...``) mirrored through ``mirror_dir``.
    output_dir: str = "runs"
    #: Where a URI ``output_dir`` is mirrored on every node (the same path on each; default
    #: ``~/.cache/raykd/mirror/<bucket-path>``; see :mod:`raykd.storage`).
    mirror_dir: str | None = None
    #: Set when the run is resolved: the URI that ``mirror_dir`` mirrors (``output_dir`` then lies
    #: inside ``mirror_dir``); not for configs.
    mirror_uri: str | None = None
    #: Ray cluster address; None starts a local cluster (or uses ``$RAY_ADDRESS``).
    address: str | None = None
    data: DataConfig = field(default_factory=DataConfig)
    student: ModelConfig = field(default_factory=ModelConfig)
    teacher: ModelConfig | None = None
    distill: DistillConfig = field(default_factory=DistillConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    scaling: ScalingConfig = field(default_factory=ScalingConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# --------------------------------------------------------------------------------------------------
# Loading and validation
# --------------------------------------------------------------------------------------------------


def load_config(cls: type[C], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> C:
    """Build a ``cls`` from defaults, then the YAML file at ``path``, then ``key=value`` overrides."""
    where = str(path) if path else "<defaults>"
    raw: dict[str, Any] = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config file {p} does not exist")
        try:
            loaded = yaml.safe_load(p.read_text())
        except yaml.YAMLError as e:
            raise ConfigError(f"{p}: not valid YAML: {e}") from None
        if loaded is None:
            loaded = {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{p}: the top level must be a mapping of keys, got {type(loaded).__name__}")
        raw = loaded
    for item in overrides:
        key, value = parse_override(item)
        set_dotted(raw, key, value)
    cfg = from_dict(cls, raw, where=where)
    validate(cfg, where=where)
    return cfg


def parse_override(item: str) -> tuple[str, Any]:
    """``"train.lr=1e-3"`` -> ``("train.lr", 0.001)``; the value is parsed as YAML."""
    if "=" not in item:
        raise ConfigError(f"override {item!r} must look like key.sub=value")
    key, text = item.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override {item!r} has an empty key")
    try:
        value = yaml.safe_load(text) if text.strip() else ""
    except yaml.YAMLError:
        value = text
    return key, value


def set_dotted(raw: dict, key: str, value: Any) -> None:
    """Set ``raw[a][b][c] = value`` for ``key = "a.b.c"``, creating (or replacing non-dict) levels."""
    parts = key.split(".")
    node = raw
    for part in parts[:-1]:
        nxt = node.get(part)
        if not isinstance(nxt, dict):
            nxt = {}
            node[part] = nxt
        node = nxt
    node[parts[-1]] = value


def from_dict(cls: type[C], raw: dict, *, where: str = "<defaults>", prefix: str = "") -> C:
    """Build dataclass ``cls`` from a nested dict, converting and checking every value."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{where}: {prefix or 'config'} must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in raw.items():
        dotted = f"{prefix}{key}"
        if key not in fields:
            hint = did_you_mean(key, fields, n=1, prefix=prefix)
            raise ConfigError(
                f"{where}: unknown key {dotted!r}.{hint} Valid keys here: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _convert(hints[key], value, fields[key], where=where, key=dotted)
    return cls(**kwargs)


def _convert(tp: Any, value: Any, f: dataclasses.Field | None, *, where: str, key: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        non_none = [a for a in args if a is not type(None)]
        errors = []
        for a in non_none:
            try:
                return _convert(a, value, f, where=where, key=key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(errors[0] if len(errors) == 1 else f"{where}: {key}={value!r} matches none of {tp}")
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where=where, prefix=f"{key}.")
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {', '.join(map(repr, args))}")
        return value
    if tp is Any:
        return value
    if origin is dict or tp is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{where}: {key} must be a mapping, got {value!r}")
        return dict(value)
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: {key} must be a list, got {value!r}")
        inner = args[0] if args else Any
        items = [_convert(inner, v, None, where=where, key=f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(items) if (origin is tuple or tp is tuple) else items
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{where}: {key} must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"{where}: {key} must be an integer, got {value!r}")
        return value
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):  # YAML 1.1 reads "1e-3" as a string
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{where}: {key} must be a number, got {value!r}")
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: {key} must be a string, got {value!r}")
        return value
    return value


def validate(cfg: Any, *, where: str = "<defaults>", prefix: str = "") -> None:
    """Check ranges and choices declared in field metadata, recursively, then ``validate()`` hooks."""
    for f in dataclasses.fields(cfg):
        value = getattr(cfg, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            validate(value, where=where, prefix=f"{key}.")
            continue
        rng = f.metadata.get("range")
        if rng is not None and value is not None:
            lo, hi = rng
            if (lo is not None and value < lo) or (hi is not None and value > hi):
                lo_s = "-inf" if lo is None else f"{lo:g}"
                hi_s = "inf" if hi is None else f"{hi:g}"
                raise ConfigError(f"{where}: {key}={value!r} is out of range [{lo_s}, {hi_s}]")
        choices = f.metadata.get("choices")
        if choices is not None and value not in choices:
            raise ConfigError(f"{where}: {key}={value!r} is not one of {', '.join(map(repr, choices))}")
    hook = getattr(cfg, "validate", None)
    if callable(hook):
        hook(where)


def to_dict(cfg: Any) -> dict:
    """The resolved config as plain data (written next to every run)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(cfg), sort_keys=False))
