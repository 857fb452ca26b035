"""Fusion teacher: two CNNs and a ViT fused into one classifier.

Paper: Islam et al., arXiv 2406.17051 (a ResNet152V2 + ConvNeXtBase + ViT-B fusion teacher
distilled into a 0.16 M-parameter CNN; no code published), section 3.4, Fig. 4.

- CNN stream: the last feature maps of ResNet152V2 and ConvNeXt-Base, concatenated along channels,
  batch norm, squeeze-and-excitation, global average pooling.
- ViT stream: ViT-B/16's pooled embedding, batch norm.
- Fusion: both vectors concatenated, then three dropout + dense blocks (dropout 0.5/0.5/0.2, dense
  256/128/64, SELU) and the classifier.
- Backbones are ImageNet-pretrained and frozen: only the fusion head trains. The paper reports
  "over 236 million parameters out of which 3.39 million parameters are trainable".

Reconstruction choices (the paper has no code):

- SE reduction ratio 8: with 2048 + 1024 = 3,072 CNN channels it gives 3,072·384·2 + 384 + 3,072 =
  2,362,752 SE parameters; with BN (2·3,840) and the dense head (1,024,578 at 2 classes) the trainable
  total is 3,395,010, the paper's 3.39 M. Ratio 16 would give 2.22 M.
- ResNet152V2's Keras ImageNet weights have no timm counterpart, so the default CNN is timm
  ``resnet152`` (hub weights, same 2048 channels at stride 32, so the head is unchanged);
  ``cnn_names=("resnetv2_152", "convnext_base")`` gives the pre-activation architecture. Total with
  timm's backbones: 234.9 M parameters (paper, with Keras' backbones: "over 236 million").
- One input normalisation (ImageNet mean/std, in the model's ``pretrained_cfg``) feeds all three
  backbones; the ViT stream re-normalises it internally to the ViT's own mean/std (0.5), so every
  backbone sees the statistics it was pretrained with.
- If the two CNN maps differ in size (other backbones), the larger is average-pooled to the smaller.
- Frozen backbones stay in eval mode (their batch-norm statistics do not drift) even when the
  model is put in training mode.

Feature access: ``feature_map`` is the SE-recalibrated CNN-stream map ``(B, 3072, 7, 7)``,
``embedding`` the 64-d input of the classifier.
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from raykd.models.factory import load_weights
from raykd.models.features import Features

__all__ = ["FusedTeacher", "SqueezeExcite", "backbone_weights"]


class SqueezeExcite(nn.Module):
    """Squeeze-and-excitation (Hu et al.): channel weights from GAP -> FC/ReLU -> FC/sigmoid."""

    def __init__(self, channels: int, reduction: int = 8) -> None:
        super().__init__()
        hidden = max(1, channels // reduction)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = torch.sigmoid(self.fc2(F.relu(self.fc1(x.mean(dim=(2, 3))))))
        return x * s[:, :, None, None]


def _backbone_options(
    backbone_files: Mapping[str, str | Path] | None, backbone_kwargs: Mapping[str, Mapping[str, Any]] | None
) -> tuple[dict[str, str | Path], dict[str, dict[str, Any]]]:
    """Copies of the per-backbone weight files and create arguments; keys other than
    ``cnn_a``/``cnn_b``/``vit`` (a typo would silently be ignored) raise ValueError."""
    files = dict(backbone_files or {})
    bkw = {k: dict(v) for k, v in (backbone_kwargs or {}).items()}
    unknown = (set(files) | set(bkw)) - {"cnn_a", "cnn_b", "vit"}
    if unknown:
        raise ValueError(
            f"backbone_files/backbone_kwargs keys {sorted(unknown)}: use 'cnn_a', 'cnn_b', 'vit'"
        )
    return files, bkw


def _without_pooled_head(cnn: nn.Module) -> nn.Module:
    """``cnn`` with its pooled head (if it has one) replaced by ``nn.Identity``.

    Only ``forward_features`` is used: a pooled head's norm (ConvNeXt) would be dead weight, and
    Keras' ``include_top=False`` backbones of the paper have none.
    """
    if isinstance(getattr(cnn, "head", None), nn.Module):
        cnn.head = nn.Identity()
    return cnn


class FusedTeacher(nn.Module):
    """CNN stream (two CNNs + BN + SE + GAP) and ViT stream (+ BN) fused by a SELU dense head.

    Args:
        num_classes: number of classes.
        cnn_names: timm names of the two CNN backbones.
        vit_name: timm name of the ViT backbone.
        pretrained_backbones: load the backbones' hub weights (connected clusters).
        backbone_files: local weight files per backbone, keys ``cnn_a``, ``cnn_b``, ``vit``.
        freeze_backbones: train only the fusion head, as in the paper.
        se_reduction: SE reduction ratio.
        dense: units of the SELU dense layers.
        drops: dropout before each dense layer.
        backbone_kwargs: extra ``timm.create_model`` arguments per backbone key.
        in_chans: input channels.
        img_size: input size of the ViT backbone (default: the ViT's own).
    """

    def __init__(
        self,
        num_classes: int = 2,
        cnn_names: Sequence[str] = ("resnet152", "convnext_base"),
        vit_name: str = "vit_base_patch16_224",
        pretrained_backbones: bool = False,
        backbone_files: Mapping[str, str | Path] | None = None,
        freeze_backbones: bool = True,
        se_reduction: int = 8,
        dense: Sequence[int] = (256, 128, 64),
        drops: Sequence[float] = (0.5, 0.5, 0.2),
        backbone_kwargs: Mapping[str, Mapping[str, Any]] | None = None,
        in_chans: int = 3,
        img_size: int | tuple[int, int] | None = None,
    ) -> None:
        super().__init__()
        if len(cnn_names) != 2 or len(dense) != len(drops):
            raise ValueError("FusedTeacher needs two cnn_names and one dropout rate per dense layer")
        files, bkw = _backbone_options(backbone_files, backbone_kwargs)

        def backbone(key: str, name: str, **kw: Any) -> nn.Module:
            hub = pretrained_backbones and key not in files
            kw = {"num_classes": 0, "in_chans": in_chans, **kw, **bkw.get(key, {})}
            m = timm.create_model(name, pretrained=hub, **kw)
            if key in files:
                load_weights(m, files[key])
            return m

        self.cnn_a = _without_pooled_head(backbone("cnn_a", cnn_names[0], global_pool=""))
        self.cnn_b = _without_pooled_head(backbone("cnn_b", cnn_names[1], global_pool=""))
        self.vit = backbone("vit", vit_name, **({} if img_size is None else {"img_size": img_size}))
        self._build_fusion(num_classes, se_reduction, dense, drops)
        self._register_vit_renorm(in_chans)
        self.freeze_backbones = freeze_backbones
        if freeze_backbones:
            for m in self.backbones():
                m.requires_grad_(False)
                m.eval()

    def _build_fusion(self, num_classes: int, se_reduction: int, dense: Sequence[int],
                      drops: Sequence[float]) -> None:
        """Both streams' norms and SE, then the dropout + dense SELU blocks and the classifier."""
        cnn_ch = self.cnn_a.num_features + self.cnn_b.num_features
        vit_ch = self.vit.num_features
        self.cnn_bn = nn.BatchNorm2d(cnn_ch)
        self.se = SqueezeExcite(cnn_ch, se_reduction)
        self.vit_bn = nn.BatchNorm1d(vit_ch)
        layers: list[nn.Module] = []
        c = cnn_ch + vit_ch
        for d, p in zip(dense, drops, strict=True):
            layers += [nn.Dropout(p), nn.Linear(c, d), nn.SELU()]
            c = d
        self.fusion = nn.Sequential(*layers)
        self.num_features = cnn_ch + vit_ch
        self.head_hidden_size = c
        self.num_classes = num_classes
        self.classifier = nn.Linear(c, num_classes) if num_classes > 0 else nn.Identity()

    def _register_vit_renorm(self, in_chans: int) -> None:
        """Buffers mapping the model's ImageNet-normalised input to the ViT's own mean/std.

        ``x_vit = (x * std_in + mean_in - mean_vit) / std_vit`` per channel, i.e.
        ``x * vit_scale + vit_shift``; not saved in the state dict (derived from the config).
        """
        vit_cfg = self.vit.pretrained_cfg
        mean_in, std_in = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
        mean_v = torch.tensor(vit_cfg.get("mean", IMAGENET_DEFAULT_MEAN))
        std_v = torch.tensor(vit_cfg.get("std", IMAGENET_DEFAULT_STD))
        scale, shift = (std_in / std_v).view(1, -1, 1, 1), ((mean_in - mean_v) / std_v).view(1, -1, 1, 1)
        self.register_buffer("vit_scale", scale[:, :in_chans], persistent=False)
        self.register_buffer("vit_shift", shift[:, :in_chans], persistent=False)

    def backbones(self) -> list[nn.Module]:
        return [self.cnn_a, self.cnn_b, self.vit]

    def train(self, mode: bool = True) -> FusedTeacher:
        super().train(mode)
        if self.freeze_backbones:
            for m in self.backbones():
                m.eval()
        return self

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        ref = next(self.fusion.parameters())
        self.classifier = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.classifier.to(ref.device, ref.dtype)

    def cnn_stream_map(self, x: torch.Tensor) -> torch.Tensor:
        """Concatenated, batch-normed, SE-recalibrated CNN feature map ``(B, C_a + C_b, H, W)``."""
        a, b = self.cnn_a.forward_features(x), self.cnn_b.forward_features(x)
        if a.shape[-2:] != b.shape[-2:]:
            size = min(a.shape[-2], b.shape[-2]), min(a.shape[-1], b.shape[-1])
            a, b = F.adaptive_avg_pool2d(a, size), F.adaptive_avg_pool2d(b, size)
        return self.se(self.cnn_bn(torch.cat([a, b], dim=1)))

    def _fuse(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        fmap = self.cnn_stream_map(x)
        v = self.vit.forward_features(x * self.vit_scale + self.vit_shift)
        v = self.vit.forward_head(v, pre_logits=True)
        return fmap, torch.cat([fmap.mean(dim=(2, 3)), self.vit_bn(v)], dim=1)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Fused vector of both streams ``(B, C_cnn + C_vit)``."""
        return self._fuse(x)[1]

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.fusion(x)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def raykd_features(self, x: torch.Tensor) -> Features:
        fmap, fused = self._fuse(x)
        emb = self.forward_head(fused, pre_logits=True)
        return Features(logits=self.classifier(emb), embedding=emb, feature_map=fmap)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 2,
        "input_size": (3, 224, 224),
        "pool_size": (7, 7),
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "fixed_input_size": True,
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "first_conv": "cnn_a.conv1",
        "classifier": "classifier",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "raykd_fused_teacher": _cfg(),
        "raykd_test_fused_teacher": _cfg(
            input_size=(3, 32, 32), pool_size=(1, 1), num_classes=8, first_conv="cnn_a.conv1.0"
        ),
    }
)


#: Constructor arguments of each registered variant (keyword arguments override them).
_VARIANT_ARGS: dict[str, dict[str, Any]] = {
    "raykd_fused_teacher": {},
    "raykd_test_fused_teacher": dict(
        cnn_names=("test_resnet", "test_convnext"),
        vit_name="test_vit",
        dense=(16, 8, 8),
        backbone_kwargs={"vit": {"patch_size": 8}},
    ),
}


def _create(variant: str, pretrained: bool, **kwargs: Any) -> FusedTeacher:
    # ``pretrained`` means the backbones' ImageNet weights; the fusion head has no published weights.
    kwargs.setdefault("pretrained_backbones", pretrained)
    return build_model_with_cfg(FusedTeacher, variant, False, **dict(_VARIANT_ARGS[variant], **kwargs))


def backbone_weights(name: str, kwargs: Mapping[str, Any],
                     pretrained: bool) -> dict[str, dict[str, Any]] | None:
    """Where each backbone of fused-teacher variant ``name`` takes its weights from, without building it.

    Args:
        name: a timm model name; ``None`` is returned unless it is a fused-teacher variant.
        kwargs: the ``timm.create_model`` keyword arguments (``cnn_names``, ``backbone_files`` ...).
        pretrained: ``timm.create_model``'s ``pretrained`` (the backbones' hub weights).

    Returns:
        ``{"cnn_a" | "cnn_b" | "vit": {"name": timm name, "kwargs": its extra create arguments,
        "file": local file or None, "hub": whether the hub weights are loaded}}``.
    """
    arch = name.split(".", 1)[0]
    if arch not in _VARIANT_ARGS:
        return None
    args = dict(_VARIANT_ARGS[arch], **kwargs)
    defaults = inspect.signature(FusedTeacher.__init__).parameters
    cnn = args.get("cnn_names", defaults["cnn_names"].default)
    vit = args.get("vit_name", defaults["vit_name"].default)
    files = dict(args.get("backbone_files") or {})
    bkw = dict(args.get("backbone_kwargs") or {})
    hub = bool(args.get("pretrained_backbones", pretrained))
    return {
        key: {"name": n, "kwargs": dict(bkw.get(key) or {}), "file": files.get(key),
              "hub": hub and key not in files}
        for key, n in (("cnn_a", cnn[0]), ("cnn_b", cnn[1]), ("vit", vit))
    }


@register_model
def raykd_fused_teacher(pretrained: bool = False, **kwargs: Any) -> FusedTeacher:
    """ResNet152 + ConvNeXt-Base + ViT-B/16 fusion teacher at 224 (234.9 M parameters, 3.40 M trainable)."""
    return _create("raykd_fused_teacher", pretrained, **kwargs)


@register_model
def raykd_test_fused_teacher(pretrained: bool = False, **kwargs: Any) -> FusedTeacher:
    """Tiny fusion teacher for CI: timm's test_resnet, test_convnext and test_vit at 32 px."""
    return _create("raykd_test_fused_teacher", pretrained, **kwargs)
