"""One feature interface for every model that distillation methods touch.

Distillation methods need more than logits: FitNet and CRKD read a CNN's last feature map,
SkinDistilViT's hidden-state loss reads every ViT block output (SkinDistilViT, section 3.1), FCViT reads
per-block logits, and relational methods read the pooled embedding. ``features(model, x)`` returns
all of them from ONE differentiable forward pass, for raykd models and for plain timm models
(VisionTransformer/DeiT, ResNet, EfficientNet/MobileNetV2, ConvNeXt), without editing timm.

How it works:
- A model that defines ``raykd_features(x) -> Features`` (every raykd model) answers itself.
- Any other timm model is read through its public interface: ``forward_features`` gives the last
  feature map (4-D output) or the normed token sequence (3-D output), ``forward_head(...,
  pre_logits=True)`` the embedding, ``get_classifier()`` the logits. ViT block outputs are caught
  by forward hooks on ``model.blocks`` for the duration of the call.
- A model wrapped in ``DistributedDataParallel`` is unwrapped, but the pass still goes through
  DDP's ``forward`` (by briefly shadowing the inner module's ``forward``), so DDP's gradient
  synchronisation is not skipped, as it would be by calling ``model.module`` directly.
  ``DataParallel`` and ``torch.compile`` wrappers are simply unwrapped.

Example:
    >>> f = features(model, images)
    >>> loss = F.cross_entropy(f.logits, y) + F.mse_loss(adapter(f.feature_map), t.feature_map)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, fields

import torch
from torch import nn

__all__ = ["Features", "features", "unwrap_model"]


@dataclass
class Features:
    """Everything a distillation method may read from one forward pass.

    Attributes:
        logits: ``(B, num_classes)`` the model's prediction (FCViT: the top head).
        embedding: ``(B, D)`` pooled pre-logit embedding, i.e. the classifier's input.
        feature_map: ``(B, C, H, W)`` last convolutional feature map (CNNs, HierAttn, tiny CNN,
            the fused teacher's CNN stream), else ``None``.
        hidden_states: ViTs: the output of every block in order, ``(B, N, D)``, before the final
            norm; else ``None``.
        layer_logits: FCViT: logits of each per-block head, bottom to top; else ``None``.
    """

    logits: torch.Tensor
    embedding: torch.Tensor
    feature_map: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None
    layer_logits: list[torch.Tensor] | None = None


_WRAPPERS = (nn.parallel.DistributedDataParallel, nn.DataParallel)


def unwrap_model(model: nn.Module) -> nn.Module:
    """Return the bare model inside DDP/DataParallel/``torch.compile`` wrappers."""
    while True:
        if isinstance(model, _WRAPPERS):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(model._orig_mod, nn.Module):
            model = model._orig_mod
        else:
            return model


@contextlib.contextmanager
def _capture_blocks(model: nn.Module) -> Iterator[list[torch.Tensor]]:
    """Collect the output of every transformer block of a ViT-like model while active."""
    outputs: list[torch.Tensor] = []
    blocks = getattr(model, "blocks", None)
    is_vit = hasattr(model, "patch_embed") and isinstance(blocks, nn.Sequential | nn.ModuleList)
    handles = []
    if is_vit:
        for blk in blocks:
            handles.append(blk.register_forward_hook(lambda _m, _i, out: outputs.append(out)))
    try:
        yield outputs
    finally:
        for h in handles:
            h.remove()


def _timm_features(model: nn.Module, x: torch.Tensor) -> Features:
    """Read a plain timm model through forward_features / forward_head / get_classifier."""
    for attr in ("forward_features", "forward_head"):
        if not hasattr(model, attr):
            raise TypeError(
                f"features(): {type(model).__name__} has no {attr}(); give the model a "
                "raykd_features(x) method or use a timm model"
            )
    with _capture_blocks(model) as blocks_out:
        feats = model.forward_features(x)
    embedding = model.forward_head(feats, pre_logits=True)
    classifier = model.get_classifier() if hasattr(model, "get_classifier") else None
    if isinstance(classifier, nn.Module):
        logits = classifier(embedding)
    else:  # e.g. distilled DeiT returns two heads: let the model combine them
        logits = model.forward_head(feats)
    hidden = [h for h in blocks_out if isinstance(h, torch.Tensor) and h.ndim == 3]
    return Features(
        logits=logits,
        embedding=embedding.flatten(1),
        feature_map=feats if feats.ndim == 4 else None,
        hidden_states=hidden or None,
    )


def _bare_features(model: nn.Module, x: torch.Tensor) -> Features:
    if hasattr(model, "raykd_features"):
        return model.raykd_features(x)
    return _timm_features(model, x)


def features(model: nn.Module, x: torch.Tensor) -> Features:
    """Run one differentiable forward pass and return logits, embedding and intermediate features.

    Args:
        model: a raykd or timm model, possibly wrapped in DDP/DataParallel or ``torch.compile``.
        x: input images ``(B, 3, H, W)``.

    Returns:
        A :class:`Features`; fields a model family does not have are ``None``.
    """
    if not isinstance(model, nn.parallel.DistributedDataParallel):
        # DataParallel replicas would not see the shadowed forward; it needs no sync, so unwrap.
        return _bare_features(unwrap_model(model), x)

    called, bare = model.module, unwrap_model(model)

    def as_dict(inp: torch.Tensor) -> dict:
        f = _bare_features(bare, inp)
        # A dict (not the dataclass) so DDP's output flattening sees every tensor.
        return {fl.name: getattr(f, fl.name) for fl in fields(f)}

    # DDP calls ``model.module(x)``; an instance attribute shadows the class's forward meanwhile.
    called.forward = as_dict
    try:
        out = model(x)
    finally:
        del called.forward
    return Features(**out)
