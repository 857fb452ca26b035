"""FCViT: a ViT with a classification head after every transformer block.

Paper: Lungu-Stan, Cercel, Pop, "SkinDistilViT: Lightweight Vision Transformer for Skin Lesion
Classification", ICANN 2023 (arXiv 2308.08669), section 3.2 "Full Distillation".

FCViT adds an independent prediction head at every level of the transformer. Two training
objectives use the same model (the losses live in ``raykd.distill``):

- FCViT: cross-entropy at every head, summed.
- FCViTProbs: cross-entropy at the top head only; each lower head's distribution is pulled towards
  the next head up by a KL term, heads being switched on top-down (multi-step training).

Every head reads the pooled (CLS) token of its block's output through its own LayerNorm. The top
head is the ViT's own final norm + classifier, so an ImageNet ViT checkpoint loads into FCViT
unchanged and only the lower heads start from scratch.

Reconstruction choices (documented because paper and code differ):

- The authors' code normalises head i's input with the NEXT block's ``layernorm_before`` instead of
  a LayerNorm of its own. That ties a head to the block above it, which breaks as soon as blocks
  are cut (cascading distillation drops the top block). Each head therefore owns a LayerNorm
  (2·D extra parameters per head).
- In the authors' FCViTProbs code the lower layers' logits come from the TOP classifier applied to
  each lower layer's normalised CLS token; ``share_head=True`` reproduces that (each lower head keeps
  only its LayerNorm); the default ``False`` gives the paper's independent heads.
- ``forward(x)`` returns the top head's logits (the model's prediction), so FCViT trains, evaluates,
  exports and serves like any classifier; all per-block logits come from
  :meth:`FCViT.forward_layer_logits` or ``raykd.models.features(model, x).layer_logits``.
"""

from __future__ import annotations

from typing import Any

import torch
from timm.layers import trunc_normal_
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn
from torch.utils.checkpoint import checkpoint

from raykd.models.features import Features

__all__ = ["FCViT", "LayerHead"]


class LayerHead(nn.Module):
    """LayerNorm + linear classifier on one block's pooled token."""

    def __init__(self, dim: int, num_classes: int, with_fc: bool = True) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim, eps=1e-6)
        self.fc = nn.Linear(dim, num_classes) if with_fc and num_classes > 0 else None
        if self.fc is not None:
            trunc_normal_(self.fc.weight, std=0.02)
            nn.init.zeros_(self.fc.bias)

    def forward(self, pooled: torch.Tensor, shared_fc: nn.Module | None = None) -> torch.Tensor:
        fc = self.fc if self.fc is not None else shared_fc
        x = self.norm(pooled)
        return fc(x) if fc is not None else x


class FCViT(VisionTransformer):
    """Vision Transformer whose every block feeds a classifier (FCViT / FCViTProbs).

    Args:
        share_head: lower heads reuse the top classifier's weights (the authors' FCViTProbs code)
            and keep only their own LayerNorm.
        **kwargs: :class:`timm.models.vision_transformer.VisionTransformer` arguments.
    """

    #: Modules absent from a plain ViT checkpoint (``raykd.models.load_weights`` allows them missing).
    new_module_prefixes = ("layer_heads.",)

    def __init__(self, *, share_head: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.share_head = share_head
        self.layer_heads = self._make_layer_heads(len(self.blocks) - 1)

    def _make_layer_heads(self, n: int) -> nn.ModuleList:
        ref = next(self.parameters())
        with_fc = not self.share_head
        heads = nn.ModuleList(LayerHead(self.embed_dim, self.num_classes, with_fc) for _ in range(n))
        return heads.to(device=ref.device, dtype=ref.dtype)

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        super().reset_classifier(num_classes, global_pool)
        self.layer_heads = self._make_layer_heads(len(self.blocks) - 1)

    def hidden_states(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Outputs of every block, in order, before the final norm."""
        x = self.patch_embed(x)
        x = self._pos_embed(x)
        x = self.patch_drop(x)
        x = self.norm_pre(x)
        out = []
        for blk in self.blocks:
            if self.grad_checkpointing and self.training and not torch.jit.is_scripting():
                x = checkpoint(blk, x, use_reentrant=False)
            else:
                x = blk(x)
            out.append(x)
        return out

    def _lower_logits(self, hidden: list[torch.Tensor]) -> list[torch.Tensor]:
        shared = self.head if self.share_head else None
        pairs = zip(self.layer_heads, hidden[:-1], strict=True)
        return [head(self.head_drop(self.pool(h)), shared) for head, h in pairs]

    def forward_layer_logits(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Logits of every head, bottom (block 0) to top (the model's prediction)."""
        return self.raykd_features(x).layer_logits

    def raykd_features(self, x: torch.Tensor) -> Features:
        """All features of one pass; see :func:`raykd.models.features`."""
        hidden = self.hidden_states(x)
        embedding = self.forward_head(self.norm(hidden[-1]), pre_logits=True)
        logits = self.head(embedding)
        return Features(
            logits=logits,
            embedding=embedding,
            feature_map=None,
            hidden_states=hidden,
            layer_logits=[*self._lower_logits(hidden), logits],
        )


def _create_fcvit(variant: str, pretrained: bool = False, **kwargs: Any) -> FCViT:
    # ImageNet ViT checkpoints lack the lower heads: load non-strictly (they keep their init).
    return build_model_with_cfg(
        FCViT,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        pretrained_strict=False,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **kwargs,
    )


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (3, 224, 224),
        "pool_size": None,
        "crop_pct": 0.9,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": (0.5, 0.5, 0.5),  # google/vit-base-patch16-224, the seed paper's starting point
        "std": (0.5, 0.5, 0.5),
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        # Hub path (connected clusters): the ImageNet-21k -> 1k ViT-B/16 the paper fine-tunes.
        "raykd_fcvit_base_patch16_224.orig_in21k_ft_in1k": _cfg(
            hf_hub_id="timm/vit_base_patch16_224.orig_in21k_ft_in1k"
        ),
        "raykd_fcvit_small_patch16_224.augreg_in21k_ft_in1k": _cfg(
            hf_hub_id="timm/vit_small_patch16_224.augreg_in21k_ft_in1k"
        ),
        "raykd_test_fcvit": _cfg(input_size=(3, 32, 32), crop_pct=1.0, num_classes=8),
    }
)


@register_model
def raykd_fcvit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> FCViT:
    """FCViT on ViT-B/16 at 224 (12 blocks, 12 heads): the SkinDistilViT paper's full model."""
    args = dict(patch_size=16, embed_dim=768, depth=12, num_heads=12)
    return _create_fcvit("raykd_fcvit_base_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def raykd_fcvit_small_patch16_224(pretrained: bool = False, **kwargs: Any) -> FCViT:
    """FCViT on ViT-S/16 at 224: a cheaper variant for searches."""
    args = dict(patch_size=16, embed_dim=384, depth=12, num_heads=6)
    return _create_fcvit("raykd_fcvit_small_patch16_224", pretrained, **dict(args, **kwargs))


@register_model
def raykd_test_fcvit(pretrained: bool = False, **kwargs: Any) -> FCViT:
    """Tiny FCViT for CI: 32 px, patch 8, width 32, 4 blocks."""
    args = dict(img_size=32, patch_size=8, embed_dim=32, depth=4, num_heads=2, mlp_ratio=2.0)
    return _create_fcvit("raykd_test_fcvit", pretrained, **dict(args, **kwargs))

