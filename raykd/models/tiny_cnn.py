"""Tiny CNN student of the fusion-teacher distillation paper.

Paper: Islam et al., arXiv 2406.17051 (a ResNet152V2 + ConvNeXtBase + ViT-B fusion teacher
distilled into a 0.16 M-parameter CNN; no code published), section 3.5 "Student Model Creation".

Three blocks of a 3×3 convolution (32, 64, 128 filters) each followed by 2×2 max pooling, global
max pooling (the paper's ablation prefers it to average pooling), three dense layers of 256, 128 and
32 units with SELU, then the classes. No dropout ("the teacher is regularised with dropout").
With 8 classes: 163,560 parameters; with the paper's 2 classes 163,362 ≈ "0.16 million".

Reconstruction choices (the paper has no code):

- Convolution activation: ReLU (Keras' usual choice; the paper names none). Padding: "same", so any
  input of at least 8 px keeps a feature map (Keras' default "valid" changes no parameter count).
- Input: 224×224, pixels scaled to [0, 1] without mean/std normalisation (a Keras ``Rescaling``
  pipeline), i.e. mean 0 and std 1 in the model's ``pretrained_cfg``.
- The paper's 16-bit quantisation (2.03 MB -> 469.77 KB) is ``raykd_tiny_cnn_fp16``: the same network
  with float16 weights; it casts its input to float16 and is meant for export and inference.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from torch import nn

from raykd.models.features import Features

__all__ = ["TinyCNN"]


class TinyCNN(nn.Module):
    """Conv 3×3 + max-pool blocks, global max pooling, SELU dense layers, classifier.

    Args:
        num_classes: number of classes (0 gives the 32-d embedding).
        in_chans: input channels.
        widths: filters of the convolution blocks.
        dense: units of the SELU dense layers.
        drop_rate: dropout before the classifier (0 as in the paper).
    """

    def __init__(
        self,
        num_classes: int = 8,
        in_chans: int = 3,
        widths: tuple[int, ...] = (32, 64, 128),
        dense: tuple[int, ...] = (256, 128, 32),
        drop_rate: float = 0.0,
        **kwargs: Any,
    ) -> None:
        super().__init__()
        if kwargs:
            raise TypeError(f"TinyCNN got unknown arguments {sorted(kwargs)}")
        self.num_classes = num_classes
        self.drop_rate = drop_rate
        convs: list[nn.Module] = []
        c = in_chans
        for w in widths:
            convs += [nn.Conv2d(c, w, 3, padding=1), nn.ReLU(inplace=True), nn.MaxPool2d(2)]
            c = w
        self.features = nn.Sequential(*convs)
        self.num_features = c
        layers: list[nn.Module] = []
        for d in dense:
            lin = nn.Linear(c, d)
            # LeCun-normal init is what SELU's self-normalisation assumes.
            nn.init.kaiming_normal_(lin.weight, nonlinearity="linear")
            nn.init.zeros_(lin.bias)
            layers += [lin, nn.SELU()]
            c = d
        self.dense = nn.Sequential(*layers)
        self.head_hidden_size = c
        self.classifier = nn.Linear(c, num_classes) if num_classes > 0 else nn.Identity()

    def get_classifier(self) -> nn.Module:
        return self.classifier

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        self.num_classes = num_classes
        ref = self.classifier.weight if isinstance(self.classifier, nn.Linear) else next(self.parameters())
        self.classifier = nn.Linear(self.head_hidden_size, num_classes) if num_classes > 0 else nn.Identity()
        self.classifier.to(ref.device, ref.dtype)

    def _cast(self, x: torch.Tensor) -> torch.Tensor:
        return x.to(self.features[0].weight.dtype)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        """Last convolutional feature map ``(B, 128, H/8, W/8)``."""
        return self.features(self._cast(x))

    def forward_head(self, x: torch.Tensor, pre_logits: bool = False) -> torch.Tensor:
        x = self.dense(torch.amax(x, dim=(2, 3)))
        x = F.dropout(x, self.drop_rate, self.training)
        return x if pre_logits else self.classifier(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))

    def raykd_features(self, x: torch.Tensor) -> Features:
        fmap = self.forward_features(x)
        emb = self.forward_head(fmap, pre_logits=True)
        return Features(logits=self.classifier(emb), embedding=emb, feature_map=fmap)


def _create(variant: str, pretrained: bool, **kwargs: Any) -> TinyCNN:
    return build_model_with_cfg(TinyCNN, variant, pretrained, **kwargs)


def _cfg(**kwargs: Any) -> dict[str, Any]:
    return {
        "url": "",
        "num_classes": 2,
        "input_size": (3, 224, 224),
        "pool_size": (28, 28),
        "crop_pct": 1.0,
        "interpolation": "bilinear",
        "mean": (0.0, 0.0, 0.0),
        "std": (1.0, 1.0, 1.0),
        "first_conv": "features.0",
        "classifier": "classifier",
        **kwargs,
    }


default_cfgs = generate_default_cfgs(
    {
        "raykd_tiny_cnn": _cfg(),
        "raykd_tiny_cnn_fp16": _cfg(),
        "raykd_test_tiny_cnn": _cfg(input_size=(3, 32, 32), pool_size=(4, 4), num_classes=8),
    }
)


@register_model
def raykd_tiny_cnn(pretrained: bool = False, **kwargs: Any) -> TinyCNN:
    """The paper's student: convs 32/64/128, dense 256/128/32 SELU (≈0.16 M parameters)."""
    return _create("raykd_tiny_cnn", pretrained, **kwargs)


@register_model
def raykd_tiny_cnn_fp16(pretrained: bool = False, **kwargs: Any) -> TinyCNN:
    """The student with float16 weights (the paper's 16-bit quantised export, 2 bytes per weight)."""
    return _create("raykd_tiny_cnn_fp16", pretrained, **kwargs).half()


@register_model
def raykd_test_tiny_cnn(pretrained: bool = False, **kwargs: Any) -> TinyCNN:
    """Tiny CNN for CI: convs 4/8/8, dense 16/8."""
    args = dict(widths=(4, 8, 8), dense=(16, 8))
    return _create("raykd_test_tiny_cnn", pretrained, **dict(args, **kwargs))
