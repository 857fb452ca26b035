"""The model artifact: the unit that training saves and export/serving load.

An artifact is a folder holding ``model.safetensors`` (weights only, so loading never unpickles
anything) and ``meta.json`` (:class:`ArtifactMeta`: how to rebuild the model with
``timm.create_model`` and the preprocessing contract it was trained with). A training run keeps its
best model at ``RUN_DIR/best/``; :func:`find_artifact` accepts either the run folder or the
artifact folder.

Keeping the preprocessing contract (image size, mean/std, black-border crop, label names and the
benign/malignant map of SkinDistilViT's cancer-vs-benign view, SkinDistilViT section 5.4) *with* the
weights is what lets export and serving reproduce evaluation exactly.

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

from torch import nn

import raykd.models  # noqa: F401 (registers the raykd_* models with timm)
from raykd.artifact.rundir import BEST_DIR, META_NAME, WEIGHTS_NAME
from raykd.models import unwrap_model

log = logging.getLogger(__name__)

__all__ = [
    "ArtifactMeta",
    "META_NAME",
    "WEIGHTS_NAME",
    "find_artifact",
    "load_artifact",
    "save_artifact",
    "build_model",
    "count_params",
    "read_meta",
    "write_meta",
]

FORMAT_VERSION = 1
_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")


@dataclass
class ArtifactMeta:
    """Everything needed to rebuild a model and feed it exactly as at evaluation time.

    Attributes:
        model_name: timm name, e.g. ``"raykd_test_hierattn"`` or ``"vit_base_patch16_224"``.
        num_classes: Size of the classifier head.
        model_kwargs: Extra ``timm.create_model`` kwargs (``{"depth": 6}`` for a cut ViT).
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


def build_model(meta: ArtifactMeta) -> nn.Module:
    """``timm.create_model`` for ``meta`` (random weights), after registering raykd's models."""
    import timm  # lazy: timm is heavy

    try:
        return timm.create_model(meta.model_name, pretrained=False, num_classes=meta.num_classes,
                                 **meta.model_kwargs)
    except RuntimeError as exc:
        if "Unknown model" in str(exc):
            raise ValueError(
                f"artifact model_name {meta.model_name!r} is not a timm or raykd model; "
                "check the name in meta.json or install the package that registers it"
            ) from exc
        raise


def _write_meta_file(path: Path, meta: ArtifactMeta) -> None:
    path.write_text(json.dumps({"format_version": FORMAT_VERSION, **meta.to_dict()}, indent=2, sort_keys=True))


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
    """Read only ``meta.json`` of the artifact at ``path`` (cheap; no weights loaded)."""
    directory = find_artifact(path)
    meta_path = directory / META_NAME
    try:
        data = json.loads(meta_path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{meta_path} is not valid JSON: {exc}") from exc
    return ArtifactMeta.from_dict(data, source=str(meta_path))


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
