"""HierAttn: a lite convolution-transformer network with stage and branch attention.

Paper: W. Dai, R. Liu, T. Wu, M. Wang, J. Yin, J. Liu, "Deeply Supervised Skin Lesions Diagnosis
With Stage and Branch Attention", IEEE JBHI 28(2):719-729, 2024 (arXiv 2205.04326). Table I gives
the layers, input 256×256, and the sizes: 1.08 M (xs) and 2.14 M (s) parameters with 8 classes.

Blocks:
- SCADW: an inverted-residual depthwise-separable block (1×1 expand, 3×3 depthwise, 1×1 project)
  whose depthwise output is re-weighted by parameter-free same-channel attention,
  ``x * sigmoid(GAP(x))`` (section III-C2, Fig. 5c).
- Stage attention: one stride-2 SCADW block and a MobileViT-style convolution-transformer hybrid
  (CTH) block: 3×3 conv, 1×1 conv to width d, 2×2 patches unfolded into sequences, L pre-norm
  transformer layers, LayerNorm, fold, 1×1 conv back, concatenated with the block input, 3×3 conv.
- Branch attention: the outputs of the three stages are average-pooled to 1×1, 3×3 and 5×5,
  concatenated along channels per scale, then assembled pixel-wise ([1×1, 1×1, 3×3, 5×5] = 36
  positions -> 6×6, positions shuffled in training), a 1×1 conv to 4C, mean of |x| over space,
  dropout 0.1 and a linear classifier.

Reconstruction choices (from the authors' code, where it is more precise than
the paper; it reproduces the paper's parameter counts exactly: 1,079,928 and 2,135,224):
- Table I's "Conv3×3 ↓2" of each stage is an MBConv/SCADW block with stride 2 (expand 2 for xs, 4 for s).
- The CTH block fuses by concatenation + 3×3 conv (MobileViT v1); the residual of Eq. (2) is off in
  the released configuration. Stochastic depth acts only in residual SCADW blocks,
  p = ``drop_path_rate`` · layer / 3 (layers 1 and 2 have residual blocks).
- Transformer layers: 4 heads, GELU MLP, dropout 0.05 (xs) / 0.1 (s) after attention and MLP.
- Input pixels in [0, 1] without mean/std normalisation (the authors' transforms are ToTensor only).
- Multiply-adds at 256×256 (``bench/models.py``): xs 0.41 G (Table II: 0.44 G "FLOPs"), s 1.03 G
  (Table II: 1.32 G). Parameters match exactly, so the gap is the paper's FLOP-counting convention.
- The 36-position shuffle cannot change the output (the 1×1 conv, batch norm and the mean are all
  position-wise), only the layout of the feature map; ``shuffle_positions=False`` turns it off.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers import DropPath
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from raykd.models.features import Features

__all__ = ["HierAttn", "HierAttnCfg", "StageCfg"]


def conv_bn(
    cin: int, cout: int, k: int, stride: int = 1, groups: int = 1, act: bool = True, eps: float = 1e-5
) -> nn.Sequential:
    """Conv (no bias) + BatchNorm (+ SiLU)."""
    layers: list[nn.Module] = [
        nn.Conv2d(cin, cout, k, stride, padding=k // 2, groups=groups, bias=False),
        nn.BatchNorm2d(cout, eps=eps),
    ]
    if act:
        layers.append(nn.SiLU(inplace=True))
    return nn.Sequential(*layers)


class SameChannelAttention(nn.Module):
    """Parameter-free attention: each channel scaled by the sigmoid of its own spatial mean."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(x.mean(dim=(2, 3), keepdim=True))


class SCADW(nn.Module):
    """Depthwise-separable inverted-residual block with same-channel attention."""

    def __init__(self, cin: int, cout: int, stride: int, expand: float, drop_path: float = 0.0) -> None:
        super().__init__()
        hidden = int(round(cin * expand))
        self.expand = conv_bn(cin, hidden, 1) if expand != 1 else nn.Identity()
        self.dw = conv_bn(hidden, hidden, 3, stride, groups=hidden)
        self.attn = SameChannelAttention()
        self.project = conv_bn(hidden, cout, 1, act=False)
        self.use_res = stride == 1 and cin == cout
        self.drop_path = DropPath(drop_path) if self.use_res and drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.project(self.attn(self.dw(self.expand(x))))
        return x + self.drop_path(y) if self.use_res else y


class TransformerLayer(nn.Module):
    """Pre-norm transformer layer (multi-head self-attention + GELU MLP)."""

    def __init__(self, dim: int, ffn_dim: int, heads: int, drop: float) -> None:
        super().__init__()
        if dim % heads:
            raise ValueError(f"transformer width {dim} is not divisible by heads={heads}")
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, ffn_dim)
        self.fc2 = nn.Linear(ffn_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, n, d)
        x = x + self.drop(self.proj(a))
        return x + self.drop(self.fc2(F.gelu(self.fc1(self.norm2(x)))))


class CTHBlock(nn.Module):
    """Convolution-transformer hybrid block (MobileViT-style), 2×2 patches."""

    def __init__(
        self, channels: int, dim: int, ffn_dim: int, depth: int, heads: int, drop: float, patch: int = 2
    ) -> None:
        super().__init__()
        self.patch = patch
        self.local = conv_bn(channels, channels, 3)
        self.proj_in = nn.Conv2d(channels, dim, 1, bias=False)
        self.transformer = nn.Sequential(*[TransformerLayer(dim, ffn_dim, heads, drop) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.proj_out = conv_bn(dim, channels, 1)
        self.fusion = conv_bn(2 * channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.proj_in(self.local(x))
        b, d, h, w = y.shape
        p = self.patch
        hp, wp = math.ceil(h / p) * p, math.ceil(w / p) * p
        if (hp, wp) != (h, w):  # odd sizes: resize to a multiple of the patch, as MobileViT does
            y = F.interpolate(y, size=(hp, wp), mode="bilinear", align_corners=False)
        # (B, d, H, W) -> (B·p·p, H/p·W/p, d): one sequence per position inside the patch.
        seq = y.view(b, d, hp // p, p, wp // p, p).permute(0, 3, 5, 2, 4, 1).reshape(b * p * p, -1, d)
        seq = self.norm(self.transformer(seq))
        y = seq.view(b, p, p, hp // p, wp // p, d).permute(0, 5, 3, 1, 4, 2).reshape(b, d, hp, wp)
        if (hp, wp) != (h, w):
            y = F.interpolate(y, size=(h, w), mode="bilinear", align_corners=False)
        return self.fusion(torch.cat([x, self.proj_out(y)], dim=1))


@dataclass(frozen=True)
class StageCfg:
    """One stage-attention layer: output channels, transformer width, MLP width, layers."""

    channels: int
    dim: int
    ffn_dim: int
    depth: int


@dataclass(frozen=True)
class HierAttnCfg:
    """Widths of one HierAttn variant (Table I and the authors' config)."""

    stem: int
    layer1: int
    layer2: int
    layer2_depth: int
    stages: tuple[StageCfg, StageCfg, StageCfg]
    expand: float
    heads: int = 4
    transformer_drop: float = 0.05


CFGS: dict[str, HierAttnCfg] = {
    "xs": HierAttnCfg(
        stem=16, layer1=16, layer2=24, layer2_depth=3,
        stages=(StageCfg(48, 64, 128, 2), StageCfg(64, 80, 160, 4), StageCfg(80, 96, 192, 3)),
        expand=2.0, heads=4, transformer_drop=0.05,
    ),
    "s": HierAttnCfg(
        stem=16, layer1=32, layer2=48, layer2_depth=3,
        stages=(StageCfg(64, 96, 192, 2), StageCfg(80, 120, 240, 4), StageCfg(96, 144, 288, 3)),
        expand=4.0, heads=4, transformer_drop=0.1,
    ),
    "test": HierAttnCfg(
        8, 8, 16, 2, (StageCfg(16, 16, 32, 1), StageCfg(16, 16, 32, 1), StageCfg(24, 16, 32, 1)), 2.0, 2, 0.0
    ),
}


class HierAttn(nn.Module):
    """HierAttn classifier.

    Args:
        size: ``"xs"``, ``"s"`` or ``"test"`` (or pass ``cfg``).
        num_classes: number of classes (0 gives the pooled 4C embedding).
        in_chans: input channels.
        drop_rate: dropout before the classifier (0.1 in the paper's code).
        drop_path_rate: stochastic depth base rate (0.2 in the paper's code).
        shuffle_positions: shuffle the 36 assembled positions in training (no effect on outputs).
        cfg: explicit widths, overriding ``variant``.
    """

    def __init__(
        self,
        size: str = "xs",
        num_classes: int = 8,
        in_chans: int = 3,
        drop_rate: float = 0.1,
        drop_path_rate: float = 0.2,
        shuffle_positions: bool = True,
        cfg: HierAttnCfg | None = None,
    ) -> None:
        super().__init__()
        if cfg is None and size not in CFGS:
            raise ValueError(
                f"HierAttn size={size!r}: use one of {sorted(CFGS)} or pass cfg=HierAttnCfg(...)"
            )
        cfg = cfg or CFGS[size]
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        self.shuffle_positions = shuffle_positions
        self.stem = conv_bn(in_chans, cfg.stem, 3, 2, eps=1e-3)
        self.layer1 = SCADW(cfg.stem, cfg.layer1, 1, cfg.expand, drop_path_rate * 1 / 3)
        self.layer2 = nn.Sequential(
            *[
                SCADW(
                    cfg.layer1 if i == 0 else cfg.layer2,
                    cfg.layer2,
                    2 if i == 0 else 1,
                    cfg.expand,
                    drop_path_rate * 2 / 3,
                )
                for i in range(cfg.layer2_depth)
            ]
        )
        cin, stages = cfg.layer2, []
        for st in cfg.stages:
            stages.append(
                nn.Sequential(
                    SCADW(cin, st.channels, 2, cfg.expand),
                    CTHBlock(st.channels, st.dim, st.ffn_dim, st.depth, cfg.heads, cfg.transformer_drop),
                )
            )
            cin = st.channels
        self.stages = nn.ModuleList(stages)
        branch = sum(st.channels for st in cfg.stages)
        self.num_features = self.head_hidden_size = 4 * branch
        self.conv_1x1 = conv_bn(branch, self.num_features, 1)
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self._init_weights()

    def _init_weights(self) -> None:
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out")
            elif isinstance(m, nn.BatchNorm2d | nn.LayerNorm):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        ref = next(self.parameters())
        self.classifier = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
        self.classifier.to(ref.device, ref.dtype)

    def branch_attention(self, feats: list[torch.Tensor]) -> torch.Tensor:
        """Pool the stage outputs to 1×1/3×3/5×5 and assemble them pixel-wise into ``(B, C, 6, 6)``."""
        scales = [torch.cat([F.adaptive_avg_pool2d(f, s) for f in feats], 1).flatten(2) for s in (1, 3, 5)]
        x = torch.cat([scales[0], scales[0], scales[1], scales[2]], dim=2)  # 1 + 1 + 9 + 25 = 36
        if self.training and self.shuffle_positions:
            x = x[:, :, torch.randperm(x.shape[2], device=x.device)]
        return x.view(x.shape[0], x.shape[1], 6, 6)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map: the 1×1 conv over the assembled branches, ``(B, 4C, 6, 6)``."""
        x = self.layer2(self.layer1(self.stem(x)))
        feats = []
        for stage in self.stages:
            x = stage(x)
            feats.append(x)
        return self.conv_1x1(self.branch_attention(feats))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = x.abs().mean(dim=(2, 3))
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def raykd_features(self, x: torch.Tensor) -> Features:
        fmap = self.forward_features(x)
        emb = self.forward_head(fmap, pre_logits=True)
        return Features(logits=self.classifier(emb), embedding=emb, feature_map=fmap)


def _create(model_name: str, pretrained: bool, **kwargs: Any) -> HierAttn:
    return build_model_with_cfg(HierAttn, model_name, pretrained, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 8,
        "input_size": (3, 256, 256),
        "pool_size": (6, 6),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "stem.0",
        "classifier": "classifier",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "raykd_hierattn_xs": _cfg(),
        "raykd_hierattn_s": _cfg(),
        "raykd_test_hierattn": _cfg(input_size=(3, 64, 64)),
    }
)


@register_model
def raykd_hierattn_xs(pretrained: bool = False, **kwargs: Any) -> HierAttn:
    """HierAttn-xs, 256×256 input, 1.08 M parameters with 8 classes."""
    return _create("raykd_hierattn_xs", pretrained, **dict(dict(size="xs"), **kwargs))


@register_model
def raykd_hierattn_s(pretrained: bool = False, **kwargs: Any) -> HierAttn:
    """HierAttn-s, 256×256 input, 2.14 M parameters with 8 classes."""
    return _create("raykd_hierattn_s", pretrained, **dict(dict(size="s"), **kwargs))


@register_model
def raykd_test_hierattn(pretrained: bool = False, **kwargs: Any) -> HierAttn:
    """Tiny HierAttn for CI (64×64 input, one transformer layer per stage)."""
    return _create("raykd_test_hierattn", pretrained, **dict(dict(size="test"), **kwargs))
