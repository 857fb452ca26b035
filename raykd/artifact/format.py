"""The model artifact: the unit that training saves and export/serving load.

An artifact is a folder holding ``model.safetensors`` (weights only, so loading never unpickles
anything) and ``meta.json`` (:class:`ArtifactMeta`: how to rebuild the model with
``timm.create_model`` and the preprocessing contract it was trained with). A training run keeps its
best model at ``RUN_DIR/best/``; :func:`find_artifact` accepts either the run folder or the
artifact folder.

Keeping the preprocessing contract (image size, mean/std, black-border crop, label names and the
benign/malignant map of SkinDistilViT's cancer-vs-benign view, SkinDistilViT section 5.4) *with* the
weights is what lets export and serving reproduce evaluation exactly.

``meta.json`` is not trusted: its ``model_name`` must be a registered timm or raykd model and its
``model_kwargs`` keys must be in :data:`ALLOWED_MODEL_KWARGS` (architecture arguments, plain JSON
values), so a crafted file cannot make ``timm.create_model`` read a checkpoint, a file, a URL or hub
weights (:func:`check_model_kwargs`).

Example:
    >>> path = save_artifact(run_dir / "best", model, meta)
    >>> model, meta = load_artifact(run_dir)      # finds run_dir/best
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

import raykd.models  # noqa: F401 (registers the raykd_* models with timm)
from raykd.artifact.rundir import BEST_DIR, META_NAME, WEIGHTS_NAME
from raykd.models import unwrap_model

log = logging.getLogger(__name__)

__all__ = [
    "ALLOWED_MODEL_KWARGS",
    "ArtifactMeta",
    "META_NAME",
    "WEIGHTS_NAME",
    "find_artifact",
    "load_artifact",
    "save_artifact",
    "build_model",
    "check_model_kwargs",
    "count_params",
    "read_meta",
    "write_meta",
]

FORMAT_VERSION = 1
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")

#: The ``timm.create_model`` arguments that shape a model: the ones raykd writes for its own models
#: (``configs/``, ``search_spaces/``, a cut ViT's ``depth``, HierAttn's ``size``, the tiny CNN's
#: ``widths``/``dense``) and for the timm models it uses (ViT shape, dropout rates, input channels).
#: They are also the arguments a fused teacher's ``backbone_kwargs`` may give each backbone.
ARCHITECTURE_KWARGS = frozenset({
    # timm ViTs, FCViT (share_head) and a cut ViT
    "depth", "embed_dim", "patch_size", "num_heads", "mlp_ratio", "qkv_bias", "img_size", "class_token",
    "global_pool", "share_head",
    # regularisation and input (timm ViTs and CNNs, HierAttn, the tiny CNN)
    "drop_rate", "drop_path_rate", "attn_drop_rate", "proj_drop_rate", "pos_drop_rate", "patch_drop_rate",
    "in_chans",
    # HierAttn (size, shuffle_positions), the tiny CNN and the fused teacher (widths, dense)
    "size", "shuffle_positions", "widths", "dense",
})
#: The fused teacher's own arguments (:mod:`raykd.models.fused_teacher`): ``cnn_names`` and
#: ``vit_name`` must be registered model names, ``backbone_kwargs`` maps ``cnn_a``/``cnn_b``/``vit``
#: to :data:`ARCHITECTURE_KWARGS` (the one dict an artifact may carry).
FUSED_TEACHER_KWARGS = frozenset({"cnn_names", "vit_name", "freeze_backbones", "se_reduction", "drops",
                                  "backbone_kwargs"})
#: Every ``model_kwargs`` key a ``meta.json`` may carry. Anything else is refused on load: an
#: artifact's weights come from its ``model.safetensors`` only, so loader options that name files,
#: URLs or hub repositories (``checkpoint_path``, ``pretrained``, ``pretrained_cfg``,
#: ``pretrained_cfg_overlay``, ``pretrained_backbones``) and options that change what the model
#: returns (``features_only``, ``num_classes``) never reach ``timm.create_model``.
ALLOWED_MODEL_KWARGS = ARCHITECTURE_KWARGS | FUSED_TEACHER_KWARGS
#: Arguments that only say where a model's weights were first read from at training time (the fused
#: teacher's per-backbone files, a URL or file source): :func:`save_artifact` leaves them out of
#: ``meta.json``. Of these, an older artifact may carry the fused teacher's ``backbone_files``
#: (paths); loading ignores them with a warning instead of reading those files.
WEIGHT_SOURCE_KWARGS = frozenset({"backbone_files", "pretrained_cfg", "pretrained_cfg_overlay"})
_IGNORED_ON_LOAD = frozenset({"backbone_files"})
_BACKBONE_KEYS = frozenset({"cnn_a", "cnn_b", "vit"})
_SCALARS = (str, int, float, bool, type(None))


@dataclass
class ArtifactMeta:
    """Everything needed to rebuild a model and feed it exactly as at evaluation time.

    Attributes:
        model_name: timm name, e.g. ``"raykd_test_hierattn"`` or ``"vit_base_patch16_224"``.
        num_classes: Size of the classifier head.
        model_kwargs: Extra ``timm.create_model`` kwargs (``{"depth": 6}`` for a cut ViT); only
            :data:`ALLOWED_MODEL_KWARGS` are saved and loaded.
        label_names: Class names in label-index order.
        malignant: Label names counted malignant (cancer-vs-benign view).
        preprocess: ``PreprocessSpec.to_dict()`` of the evaluation transform.
        version: Run name or trial id.
        metrics: Validation metrics at save time.
        dataset: Dataset folder the model was trained on.
        temperature: Temperature the logits are divided by before the softmax (fitted on the
            validation split at export, :mod:`raykd.export.calibrate`; 1.0 = uncalibrated).
        decision: The cancer-vs-benign operating point chosen at export: ``{"threshold": t,
            "target_sensitivity": s, ...}`` on the malignant probability; empty when none.
    """

    model_name: str
    num_classes: int
    model_kwargs: dict
    label_names: list[str]
    malignant: list[str]
    preprocess: dict
    version: str = ""
    metrics: dict = field(default_factory=dict)
    dataset: str | None = None
    temperature: float = 1.0
    decision: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if len(self.label_names) != self.num_classes:
            raise ValueError(
                f"ArtifactMeta: {len(self.label_names)} label_names for num_classes={self.num_classes}; "
                "give exactly one name per class"
            )
        unknown = sorted(set(self.malignant) - set(self.label_names))
        if unknown:
            raise ValueError(
                f"ArtifactMeta: malignant names {unknown} are not in label_names {self.label_names}"
            )
        if not self.temperature > 0:
            raise ValueError(f"ArtifactMeta: temperature must be > 0, got {self.temperature}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "meta") -> ArtifactMeta:
        """Build from a dict, ignoring unknown keys (newer writers) and naming missing ones."""
        names = {f.name for f in dataclasses.fields(cls)}
        required = {f.name for f in dataclasses.fields(cls)
                    if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING}
        missing = sorted(required - set(data))
        if missing:
            raise ValueError(f"{source}: missing required keys {missing}; was it written by save_artifact?")
        extra = sorted(set(data) - names - {"format_version"})
        if extra:
            log.warning("%s: ignoring unknown keys %s", source, extra)
        return cls(**{k: v for k, v in data.items() if k in names})

    def malignant_indices(self) -> list[int]:
        """Label indices counted malignant, in label order."""
        return [i for i, name in enumerate(self.label_names) if name in self.malignant]


def _refuse_keys(given: dict, allowed: frozenset[str], where: str, source: str) -> None:
    refused = sorted(str(k) for k in given if k not in allowed)
    if refused:
        raise ValueError(
            f"{source}: {where} {refused} not allowed when rebuilding a saved model (allowed: "
            f"{', '.join(sorted(allowed))}). A saved model takes its weights from {WEIGHTS_NAME} only: "
            "arguments that name checkpoints, files, URLs or hub weights, or that change what the model "
            "returns, are refused. If this file is trusted and the key shapes the architecture, add it to "
            "ARCHITECTURE_KWARGS in raykd/artifact/format.py"
        )


def _check_value(value: Any, where: str, source: str) -> None:
    if isinstance(value, _SCALARS):
        return
    if isinstance(value, list) and all(isinstance(v, _SCALARS) for v in value):
        return
    raise ValueError(f"{source}: {where} must be a JSON scalar or a list of scalars, "
                     f"got {type(value).__name__} {value!r:.80}")


def _check_backbone_kwargs(value: Any, source: str) -> None:
    where = "model_kwargs.backbone_kwargs"
    if not isinstance(value, dict) or not all(isinstance(v, dict) for v in value.values()):
        raise ValueError(f"{source}: {where} must map {sorted(_BACKBONE_KEYS)} to objects of arguments, "
                         f"got {value!r:.80}")
    _refuse_keys(value, _BACKBONE_KEYS, f"{where} keys", source)
    for key, kw in value.items():
        _refuse_keys(kw, ARCHITECTURE_KWARGS, f"{where}.{key} keys", source)
        for k, v in kw.items():
            _check_value(v, f"{where}.{key}.{k}", source)


def _check_model_name(name: Any, where: str, source: str) -> None:
    import timm  # lazy: timm is heavy

    # is_model also refuses "hf-hub:" and "local-dir:" names, which create_model would fetch a config for
    if not isinstance(name, str) or not timm.is_model(name):
        raise ValueError(
            f"{source}: {where} {name!r} is not a timm or raykd model; "
            "check the name in meta.json or install the package that registers it"
        )


def check_model_kwargs(model_name: Any, kwargs: Any, *, source: str) -> dict[str, Any]:
    """The ``timm.create_model`` arguments of a saved model, checked against :data:`ALLOWED_MODEL_KWARGS`.

    ``model_name`` (and a fused teacher's ``cnn_names``/``vit_name``) must be registered model
    names; every value a JSON scalar or a list of scalars (``backbone_kwargs`` excepted, which is
    checked key by key). ``backbone_files`` of an older artifact are dropped with a warning.

    Args:
        model_name: The artifact's timm name.
        kwargs: Its ``model_kwargs``.
        source: What is being checked (``meta.json``'s path), named in every error.

    Returns:
        The arguments to pass (a new dict).

    Raises:
        ValueError: naming ``source``, the refused key(s) or value and the allowed keys.
    """
    _check_model_name(model_name, "model_name", source)
    if not isinstance(kwargs, dict):  # a bad meta.json is a ValueError, as every other fault in it
        raise ValueError(f"{source}: model_kwargs must be a JSON object, "  # noqa: TRY004
                         f"got {type(kwargs).__name__}")
    ignored = sorted(k for k in kwargs if k in _IGNORED_ON_LOAD)
    if ignored:
        log.warning("%s: ignoring model_kwargs %s: a saved model's weights come from %s, not from the "
                    "files its training run read them from", source, ignored, WEIGHTS_NAME)
    kwargs = {k: v for k, v in kwargs.items() if k not in _IGNORED_ON_LOAD}
    _refuse_keys(kwargs, ALLOWED_MODEL_KWARGS, "model_kwargs", source)
    for key, value in kwargs.items():
        if key == "backbone_kwargs":
            _check_backbone_kwargs(value, source)
        else:
            _check_value(value, f"model_kwargs.{key}", source)
    names = kwargs.get("cnn_names", [])
    for i, name in enumerate(names if isinstance(names, list) else [names]):
        _check_model_name(name, f"model_kwargs.cnn_names[{i}]", source)
    if "vit_name" in kwargs:
        _check_model_name(kwargs["vit_name"], "model_kwargs.vit_name", source)
    return kwargs


def build_model(meta: ArtifactMeta) -> nn.Module:
    """``timm.create_model`` for ``meta`` (random weights), after registering raykd's models.

    ``meta.model_kwargs`` pass :func:`check_model_kwargs` first (``ValueError`` otherwise), whatever
    ``meta`` was read from.
    """
    import timm  # lazy: timm is heavy

    kwargs = check_model_kwargs(meta.model_name, meta.model_kwargs, source=f"model {meta.model_name!r}")
    return timm.create_model(meta.model_name, pretrained=False, num_classes=meta.num_classes, **kwargs)


def _savable(meta: ArtifactMeta) -> ArtifactMeta:
    """``meta`` without :data:`WEIGHT_SOURCE_KWARGS`, checked as loading will check it."""
    left_out = sorted(k for k in meta.model_kwargs if k in WEIGHT_SOURCE_KWARGS)
    if left_out:
        log.info("%s: leaving model_kwargs %s out of %s (the weights are in %s)", meta.model_name, left_out,
                 META_NAME, WEIGHTS_NAME)
    kwargs = {k: v for k, v in meta.model_kwargs.items() if k not in WEIGHT_SOURCE_KWARGS}
    check_model_kwargs(meta.model_name, kwargs, source=f"saving model {meta.model_name!r}")
    return dataclasses.replace(meta, model_kwargs=kwargs)


def _write_meta_file(path: Path, meta: ArtifactMeta) -> None:
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, **_savable(meta).to_dict()}, indent=2,
                               sort_keys=True))


def write_meta(directory: str | os.PathLike, meta: ArtifactMeta) -> Path:
    """Rewrite an artifact's ``meta.json`` atomically, leaving its weights as they are (export
    writes the calibration temperature and the decision point this way)."""
    path = Path(directory) / META_NAME
    tmp = path.with_name(f".{META_NAME}.tmp-{os.getpid()}")
    _write_meta_file(tmp, meta)
    os.replace(tmp, path)
    return path


def save_artifact(directory: str | os.PathLike, model: nn.Module, meta: ArtifactMeta) -> Path:
    """Write ``model.safetensors`` + ``meta.json`` into ``directory`` atomically.

    Both files are written into a temporary sibling folder which then replaces ``directory``, so a
    reader never sees half an artifact (a crash leaves the previous one intact).

    Args:
        directory: Target folder (created, or replaced when it exists).
        model: The model; a DDP/compile wrapper is unwrapped.
        meta: Its metadata.

    Returns:
        The artifact folder.
    """
    from safetensors.torch import save_model  # lazy: safetensors is heavy

    directory = Path(directory)
    meta = _savable(meta)  # before anything is written
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{directory.name}.tmp-", dir=directory.parent))
    try:
        # save_model (not save_file) de-duplicates tied tensors, which save_file refuses.
        save_model(unwrap_model(model), str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        _write_meta_file(tmp / META_NAME, meta)
        old = None
        if directory.exists():
            old = directory.with_name(f".{directory.name}.old-{os.getpid()}")
            os.replace(directory, old)
        os.replace(tmp, directory)
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    log.debug("saved artifact %s (%s)", directory, meta.model_name)
    return directory


def find_artifact(path: str | os.PathLike) -> Path:
    """Resolve an artifact folder from an artifact folder, one of its files, or a run folder.

    Raises:
        FileNotFoundError: naming the path and the expected layout.
    """
    p = Path(path).expanduser()
    if p.is_file() and p.name in (WEIGHTS_NAME, META_NAME):
        p = p.parent
    for candidate in (p, p / BEST_DIR):
        if (candidate / WEIGHTS_NAME).is_file() and (candidate / META_NAME).is_file():
            return candidate
    raise FileNotFoundError(
        f"no model artifact at {p}: expected {p}/{WEIGHTS_NAME} + {p}/{META_NAME}, or a training run "
        f"folder with {BEST_DIR}/{WEIGHTS_NAME} + {BEST_DIR}/{META_NAME}"
    )


def read_meta(path: str | os.PathLike) -> ArtifactMeta:
    """Read only ``meta.json`` of the artifact at ``path`` (cheap; no weights loaded).

    Raises:
        ValueError: the file is not JSON, lacks a required key, or names a model or ``model_kwargs``
            :func:`check_model_kwargs` refuses.
    """
    directory = find_artifact(path)
    meta_path = directory / META_NAME
    try:
        data = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path} is not valid JSON: {exc}") from exc
    meta = ArtifactMeta.from_dict(data, source=str(meta_path))
    meta.model_kwargs = check_model_kwargs(meta.model_name, meta.model_kwargs, source=str(meta_path))
    return meta


def load_artifact(path: str | os.PathLike, *, device: str = "cpu") -> tuple[nn.Module, ArtifactMeta]:
    """Rebuild the model of the artifact at ``path`` and load its weights (safetensors only).

    Args:
        path: Artifact folder, one of its files, or a run folder holding ``best/``.
        device: Where to put the weights.

    Returns:
        ``(model, meta)`` with the model in eval mode.
    """
    from safetensors.torch import load_model  # lazy: safetensors is heavy

    directory = find_artifact(path)
    meta = read_meta(directory)
    model = build_model(meta)
    try:
        missing, unexpected = load_model(model, str(directory / WEIGHTS_NAME), strict=False, device=device)
    except RuntimeError as exc:  # shape mismatch
        raise ValueError(f"{directory / WEIGHTS_NAME} does not fit {meta.model_name}: {exc}") from exc
    if missing or unexpected:
        raise ValueError(
            f"{directory / WEIGHTS_NAME} does not match {meta.model_name}({meta.model_kwargs}): "
            f"missing keys {sorted(missing)[:5]}, unexpected keys {sorted(unexpected)[:5]}"
        )
    return model.to(device).eval(), meta


def count_params(path: str | os.PathLike) -> int:
    """Number of parameters in an artifact, read from the safetensors header (no tensors loaded).

    Normalisation statistics (``running_mean``/``running_var``/``num_batches_tracked``) are
    buffers, not parameters, and are left out.
    """
    from safetensors import safe_open  # lazy: safetensors is heavy

    total = 0
    with safe_open(str(find_artifact(path) / WEIGHTS_NAME), framework="pt") as f:
        for key in f.keys():
            if key.rsplit(".", 1)[-1] in _BUFFER_SUFFIXES:
                continue
            n = 1
            for d in f.get_slice(key).get_shape():
                n *= d
            total += n
    return total
