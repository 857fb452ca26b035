"""Model factory: ``timm.create_model`` plus local weight files, and the seed papers' model names.

Compute nodes often have no network, so weights come from a local file: ``create_model(name,
num_classes, pretrained_file="vit.safetensors")``. timm's own route works too and is what the hub
path uses on a connected cluster: ``timm.create_model(name, pretrained=True,
pretrained_cfg_overlay={"file": path})`` (file) or ``pretrained=True`` alone (hub).

A file trained with another number of classes loads everything except the classifier(s), which
keep their fresh initialisation: fine-tuning an ImageNet checkpoint on 8 lesion classes is the
common case in every seed paper.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from torch import nn

from raykd.models.features import unwrap_model
from raykd.registry import did_you_mean

__all__ = ["PAPER_MODELS", "create_model", "load_weights", "read_state_dict", "count_params"]

_log = logging.getLogger(__name__)

#: Paper name -> timm name of every model the seed papers train (teachers and students).
#: EfficientNet-B4/B6 use timm's ``tf_`` ports: they are the only B4/B6 with ImageNet weights on the
#: hub and match the EfficientNets of the ISIC 2019 winners that SkinDistilViT compares against.
PAPER_MODELS: dict[str, str] = {
    # SkinDistilViT teacher (SkinDistilViT): google/vit-base-patch16-224 = timm's orig_in21k_ft_in1k weights
    "vit_b16": "vit_base_patch16_224.orig_in21k_ft_in1k",
    "skindistilvit": "raykd_distilvit_base_patch16_224",  # its 6-block student
    "fcvit": "raykd_fcvit_base_patch16_224",  # FCViT / FCViTProbs (SkinDistilViT, section 3.2)
    "efficientnet_b4": "tf_efficientnet_b4",  # SkinDistilViT CNN baselines
    "efficientnet_b6": "tf_efficientnet_b6",
    "resnet50": "resnet50",  # SSD-KD teacher (SSD-KD)
    "mobilenetv2": "mobilenetv2_100",  # SSD-KD student
    "convnext_base": "convnext_base",
    "hierattn_xs": "raykd_hierattn_xs",  # HierAttn (HierAttn)
    "hierattn_s": "raykd_hierattn_s",
    "fused_teacher": "raykd_fused_teacher",  # fusion teacher (the fusion paper)
    "tiny_cnn": "raykd_tiny_cnn",  # its student
}


def count_params(model: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (works on the meta device: nothing is allocated)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file or a torch checkpoint (``weights_only=True``) into a state dict.

    Checkpoints that nest the weights (``{"model": ...}``, ``{"state_dict": ...}``) and DDP or
    ``torch.compile`` key prefixes (``module.``, ``_orig_mod.``) are unwrapped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"pretrained_file {str(path)!r} does not exist; pass a local weights file")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file  # lazy: safetensors is heavy

        sd: Any = load_file(str(path))
    else:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    for key in ("state_dict", "model", "model_state_dict", "student"):
        if isinstance(sd, Mapping) and isinstance(sd.get(key), Mapping):
            sd = sd[key]
            break
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"pretrained_file {str(path)!r} holds no state dict of tensors")
    out = {}
    for k, v in sd.items():
        for prefix in ("module.", "_orig_mod."):
            while k.startswith(prefix):
                k = k[len(prefix) :]
        out[k] = v
    return out


def _classifier_prefixes(model: nn.Module) -> tuple[str, ...]:
    """Module names that produce class scores: the timm classifier(s) and every Linear to num_classes."""
    names: set[str] = set()
    cfg_cls = (getattr(model, "pretrained_cfg", None) or {}).get("classifier")
    if isinstance(cfg_cls, str):
        names.add(cfg_cls)
    elif isinstance(cfg_cls, tuple | list):
        names.update(cfg_cls)
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    num_classes = getattr(model, "num_classes", None)
    for name, mod in model.named_modules():
        if (isinstance(head, nn.Module) and mod is head and name) or (
            isinstance(mod, nn.Linear) and num_classes and mod.out_features == num_classes
        ):
            names.add(name)
    return tuple(n + "." for n in names)


def load_weights(model: nn.Module, path: str | Path, strict: bool = True) -> nn.Module:
    """Load a local weights file into ``model``, skipping a classifier whose shape differs.

    Args:
        model: the model to fill (possibly DDP-wrapped).
        path: ``.safetensors`` or a torch file readable with ``weights_only=True``.
        strict: raise on missing or unexpected non-classifier keys. Models that add modules to a
            published backbone (FCViT's per-block heads) list them in ``new_module_prefixes``;
            those may be missing from the file.

    Returns:
        The same model.
    """
    model = unwrap_model(model)
    sd = read_state_dict(path)
    own = model.state_dict()
    cls_prefixes = _classifier_prefixes(model)
    mismatched = [k for k, v in sd.items() if k in own and own[k].shape != v.shape]
    skipped = [k for k in mismatched if k.startswith(cls_prefixes)]
    for k in skipped:
        del sd[k]
    if skipped:
        _log.info("%s: classifier keys with another number of classes left untouched: %s", path, skipped)
    wrong = [f"{k}: file {tuple(sd[k].shape)} vs model {tuple(own[k].shape)}" for k in mismatched if k in sd]
    if wrong:
        raise ValueError(f"pretrained_file {str(path)!r} does not fit {type(model).__name__}: {wrong[:5]}")
    result = model.load_state_dict(sd, strict=False)
    allowed = cls_prefixes + tuple(getattr(model, "new_module_prefixes", ()))
    missing = [k for k in result.missing_keys if not k.startswith(allowed)]
    unexpected = [k for k in result.unexpected_keys if not k.startswith(cls_prefixes)]
    if strict and (missing or unexpected):
        raise ValueError(
            f"pretrained_file {str(path)!r} does not match {type(model).__name__}: missing keys "
            f"{missing[:8]}, unexpected keys {unexpected[:8]}. Check the model name/depth, or pass "
            "strict=False to load what fits."
        )
    if result.missing_keys or result.unexpected_keys:
        _log.info("%s: missing %s, unexpected %s", path, result.missing_keys, result.unexpected_keys)
    return model


def create_model(
    name: str,
    num_classes: int,
    pretrained_file: str | Path | None = None,
    strict: bool = True,
    **kwargs: Any,
) -> nn.Module:
    """Build a timm or raykd model by name, optionally filled from a local weights file.

    Args:
        name: any timm model name, ``raykd_*`` names included (importing ``raykd.models`` registers them).
        num_classes: number of output classes.
        pretrained_file: local ``.safetensors``/torch file; a classifier trained for another number
            of classes is skipped. ``None`` keeps the random (or hub, with ``pretrained=True``) init.
        strict: see :func:`load_weights`.
        **kwargs: passed to ``timm.create_model`` (e.g. ``depth=6``, ``drop_path_rate=0.1``).

    Example:
        >>> create_model("vit_base_patch16_224", 8, pretrained_file="/models/vit_b16_in21k.safetensors")
    """
    # raykd_* names are registered with timm by raykd/models/__init__.py, which Python runs before
    # this module whichever way it is imported
    if not timm.is_model(name):
        hint = did_you_mean(name, timm.list_models())
        raise ValueError(
            f"unknown model name {name!r}.{hint} See timm.list_models() or raykd.models.PAPER_MODELS."
        )
    if pretrained_file is not None and kwargs.get("pretrained"):
        raise ValueError("give either pretrained_file= (local file) or pretrained=True (hub), not both")
    model = timm.create_model(name, num_classes=num_classes, **kwargs)
    if pretrained_file is not None:
        load_weights(model, pretrained_file, strict=strict)
    return model
