"""Typed configuration: the single home of every default of a training run.

Configs are nested dataclasses. :func:`load_config` builds one from an optional YAML file plus
``--set a.b=value`` overrides and validates everything before any Ray work starts: an unknown key,
a value of the wrong type or one outside its range raises :class:`ConfigError` naming the key, the
file and the valid choices. The loading and checking is :mod:`raykd.typed`'s, shared with the
methods' ``Params``; ``distill.params`` becomes the method's typed ``Params`` as the config loads.

Ranges and choices are declared on fields with ``metadata=bounded(lo, hi)`` or
``metadata={"choices": (...)}`` (``Literal`` types work too).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from raykd.typed import (
    ConfigError,
    Knobs,
    bounded,
    dump_yaml,
    from_dict,
    load_config,
    make_knobs,
    parse_override,
    set_dotted,
    to_dict,
    validate,
)

__all__ = [
    "ConfigError", "DataConfig", "DistillConfig", "ModelConfig", "OptimConfig", "RunConfig", "SamplingConfig",
    "ScalingConfig", "SplitConfig", "SynthConfig", "TrainConfig", "dump_yaml", "from_dict", "load_config",
    "parse_override", "set_dotted", "to_dict", "validate",
]



# --------------------------------------------------------------------------------------------------
# Data
# --------------------------------------------------------------------------------------------------


@dataclass
class SplitConfig:
    """Train/val/test fractions; splits are stratified by class and grouped by lesion and patient."""

    train: float = field(default=0.7, metadata=bounded(0.0, 1.0))
    val: float = field(default=0.15, metadata=bounded(0.0, 1.0))
    test: float = field(default=0.15, metadata=bounded(0.0, 1.0))
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

    num_images: int = field(default=2000, metadata=bounded(8, 10_000_000))
    image_size: int = field(default=128, metadata=bounded(16, 1024))
    seed: int = 0
    #: Probability that each cue group of a lesion (shape, colour, texture) is borrowed from a
    #: look-alike class: the difficulty of the set (raykd.data.synthetic).
    atypical: float = field(default=0.22, metadata=bounded(0.0, 1.0))


@dataclass
class SamplingConfig:
    """Class-imbalance handling applied per epoch as index plans (never copies of images)."""

    #: ``instance_hardness`` is HierAttn's rebalancing: classes above the target keep their easiest
    #: images (instance-hardness threshold), classes below it are oversampled.
    strategy: Literal["none", "oversample", "undersample", "instance_hardness"] = "none"
    #: Per-class target count for over/undersampling; None means the largest (oversample) or the
    #: smallest (undersample) class count of the training split.
    target_count: int | None = field(default=None, metadata=bounded(1, None))
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
    shard_mb: float = field(default=64.0, metadata=bounded(0.01, 4096))
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    #: Crop the dermatoscope's black vignette first (SkinDistilViT, HierAttn).
    crop_black_border: bool = False
    #: the fusion paper's six-stage preprocessing (hair removal, bilateral, Otsu highlight, unsharp mask).
    fusion_preprocess: bool = False


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
    image_size: int | None = field(default=None, metadata=bounded(16, 2048))
    #: Student only: build it by copying these blocks out of the teacher ViT (SkinDistilViT cuts
    #: blocks 0, 2, 4, 7, 9, 11 of ViT-B/16); ``name`` is then ignored.
    cut_blocks: list[int] | None = None


@dataclass
class DistillConfig:
    """The distillation method (``baseline`` = plain supervised training) and its parameters."""

    method: str = "baseline"
    #: The method's typed ``Params`` (``raykd.distill``): given as a mapping of its fields, resolved
    #: and checked against the method when the config is built.
    params: Knobs = field(default=None, metadata={"typed_by": "method"})  # type: ignore[assignment]
    #: Epochs of a method's teacher prep (SSKD's projection-head pre-training; paper: 60).
    prep_epochs: int = field(default=5, metadata=bounded(1, 10_000))
    #: The saved output of the method's teacher prep (a safetensors file). ``raykd train`` runs the
    #: prep into the run folder when this is empty; a search runs it once per teacher in its stage 1
    #: and sets this for every trial.
    teacher_prep_file: str | None = None
    #: A folder of teacher outputs (``raykd.train.teacher_outputs``) to read instead of running the
    #: teacher (single-process runs of methods that declare the outputs they read). The search builds
    #: the teacher outputs once per teacher and student contract in its stage 1
    #: (``search.teacher_output_views``).
    teacher_outputs: str | None = None

    def __post_init__(self) -> None:
        from raykd.distill.base import method_params  # lazy: imports torch and the models

        try:
            cls = method_params(self.method)
        except KeyError as e:
            raise ConfigError(f"distill.method: {e.args[0]}") from None
        self.params = make_knobs(cls, self.params,
                                 owner=f"distill.params (method {self.method!r})")


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
    lr: float = field(default=1e-3, metadata=bounded(1e-8, 10.0))
    weight_decay: float = field(default=0.0, metadata=bounded(0.0, 1.0))
    momentum: float = field(default=0.9, metadata=bounded(0.0, 1.0))
    #: ``cosine_restarts``: a linear warm-up from ``min_lr`` to ``lr`` over ``warmup_epochs``, then a
    #: cosine down to ``min_lr``, started again at each of ``restart_epochs`` (HierAttn, SGDR-style).
    schedule: Literal["constant", "linear", "cosine", "plateau", "cosine_restarts"] = "cosine"
    warmup_epochs: int = field(default=0, metadata=bounded(0, 10_000))
    #: Epochs (increasing, > 0) at which ``cosine_restarts`` starts a new cycle; one at or past the
    #: run's last epoch is never reached.
    restart_epochs: list[int] = field(default_factory=list)
    min_lr: float = field(default=0.0, metadata=bounded(0.0, 10.0))
    plateau_factor: float = field(default=0.1, metadata=bounded(1e-4, 1.0))
    plateau_patience: int = field(default=10, metadata=bounded(0, 10_000))
    #: Stop when the selection metric has not improved for this many epochs (None: never).
    early_stop_patience: int | None = field(default=None, metadata=bounded(1, 10_000))
    #: Transfer-learning warm-up: only the classifier head trains for the first N epochs.
    freeze_epochs: int = field(default=0, metadata=bounded(0, 10_000))
    grad_clip: float | None = field(default=None, metadata=bounded(0.0, 1e6))


@dataclass
class ScalingConfig:
    """Ray Train workers. 0.5 CPU per worker leaves room for Ray Data on small machines."""

    num_workers: int = field(default=2, metadata=bounded(0, 4096))
    cpus_per_worker: float = field(default=0.5, metadata=bounded(0.0, 512))
    use_gpu: bool = False
    gpus_per_worker: float = field(default=1.0, metadata=bounded(0.0, 16))
    #: Where the run trains: ``trainer`` (a Ray Train TorchTrainer: DDP workers, Ray Data shards),
    #: ``local`` (one process, the dataset held in memory: no worker group or pipeline to start) or
    #: ``auto`` (local for a single-worker run on a small dataset, see raykd.train.driver).
    executor: Literal["auto", "trainer", "local"] = "auto"
    #: Elastic Ray Train runs: when set below ``num_workers``, the worker group runs with as many
    #: workers as the cluster can host between ``min_workers`` and ``num_workers`` (a lost node
    #: shrinks it, a new one grows it back); None keeps the group at ``num_workers``.
    min_workers: int | None = field(default=None, metadata=bounded(1, 4096))
    #: Where Ray Train places its workers: ``pack`` (fewest nodes) or ``spread`` (one per node
    #: where possible, so a lost node costs the fewest workers).
    placement: Literal["pack", "spread"] = "pack"

    def validate(self, where: str) -> None:
        if self.min_workers is not None and self.min_workers > self.num_workers:
            raise ConfigError(f"{where}: scaling.min_workers ({self.min_workers}) must be <= "
                              f"scaling.num_workers ({self.num_workers})")


@dataclass
class TrainConfig:
    epochs: int = field(default=3, metadata=bounded(1, 100_000))
    #: Per-worker batch size.
    batch_size: int = field(default=32, metadata=bounded(1, 65_536))
    eval_batch_size: int = field(default=64, metadata=bounded(1, 65_536))
    #: Augmentation recipe of ``raykd.data.transforms`` (skindistilvit, ssdkd, hierattn, light).
    recipe: str = "light"
    #: Mixed precision on GPU (bf16 where supported, else fp16 with a grad scaler); ignored on CPU.
    amp: bool = True
    #: Metric that picks the best epoch (``loss`` is minimised, every other metric maximised).
    select_metric: str = "bma"
    #: Worker-group restarts from the last checkpoint before the run fails.
    max_failures: int = field(default=1, metadata=bounded(-1, 1000))
    #: How long a Ray Train worker group may wait for its resources (at start, or after a node is
    #: lost) before the run stops with an error naming what is missing; never a silent hang.
    resource_wait_s: float = field(default=600.0, metadata=bounded(1.0, 86_400.0))
    #: A rank that gets no batch for this long stops the run's worker group with an error naming the
    #: wait (sooner, after 10 s, when no alive node has a CPU left for Ray Data); the group then
    #: restarts from its last checkpoint, sized so that its data pipeline can run.
    stall_timeout_s: float = field(default=600.0, metadata=bounded(10.0, 86_400.0))
    seed: int = 0
    #: Shuffle buffer (rows) of the training iterator.
    shuffle_buffer: int = field(default=256, metadata=bounded(0, 1_000_000))
    #: Fault injection for tests: the worker of rank 0 exits hard once, in this epoch (1-based),
    #: halfway through it. None in real runs.
    crash_in_epoch: int | None = field(default=None, metadata=bounded(1, 100_000))


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
