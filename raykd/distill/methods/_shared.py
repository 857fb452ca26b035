"""Pieces several methods share: adapters, knob groups and the relational terms of SSD-KD."""

from __future__ import annotations

from dataclasses import dataclass

import torch.nn.functional as F
from torch import Tensor, nn

from raykd.distill.base import Method, MethodParams, knob
from raykd.distill.losses import crkd_loss, rkd_angle_loss, rkd_distance_loss

__all__ = [
    "BLKDKnobs",
    "CRKDKnobs",
    "ProjectionHead",
    "RKDKnobs",
    "adapt_map",
    "conv_adapter",
    "crkd_parts",
    "make_map_adapter",
    "match_spatial",
    "rkd_parts",
]


@dataclass(frozen=True)
class BLKDKnobs(MethodParams):
    """Hinton KD / BLKD. Defaults from SSD-KD's code (``blkd.py``: lambda 0.5, T 5)."""

    alpha: float = knob(0.5, range=(0.0, 1.0), help="weight of the soft-target KL; CE gets 1 - alpha")
    temperature: float = knob(5.0, range=(1.0, 20.0), help="softmax temperature T")


@dataclass(frozen=True)
class RKDKnobs(MethodParams):
    """Park et al. (2019) distance/angle weights (their paper and code: 25 and 50)."""

    w_rkd_d: float = knob(25.0, range=(0.0, 200.0), help="distance-wise RKD weight")
    w_rkd_a: float = knob(50.0, range=(0.0, 400.0), help="angle-wise RKD weight")


@dataclass(frozen=True)
class CRKDKnobs(MethodParams):
    """SSD-KD's channel relational KD (lambda_crkd 1000 from the paper, Sec. 3.2)."""

    w_crkd: float = knob(1000.0, range=(0.0, 1.0e5), help="CRKD weight lambda_crkd")
    crkd_form: str = knob("rmse", choices=["rmse", "frobenius"], help="code's RMSE or paper's Eq. 8")
    adapter: str = knob(
        "conv_bn_relu", choices=["conv_bn_relu", "conv"], help="1x1 adapter: code's ConvReg or linear"
    )


def conv_adapter(c_in: int, c_out: int, kind: str) -> nn.Module:
    """1x1 conv mapping student channels to the teacher's (FitNets' regressor, SSD-KD Sec. 2.3).

    ``"conv"`` is the paper's linear projection; ``"conv_bn_relu"`` is the ``ConvReg`` of SSD-KD's
    code (conv, BatchNorm, ReLU), suited to post-ReLU teacher maps such as ResNet's layer4.
    """
    if kind == "conv":
        return nn.Conv2d(c_in, c_out, kernel_size=1)
    conv = nn.Conv2d(c_in, c_out, kernel_size=1, bias=False)
    return nn.Sequential(conv, nn.BatchNorm2d(c_out), nn.ReLU(inplace=True))


def match_spatial(x: Tensor, size: tuple[int, int]) -> Tensor:
    """Bring a ``(B, C, H, W)`` map to ``size``: average-pool when larger, bilinear when smaller."""
    size = (int(size[0]), int(size[1]))
    h, w = x.shape[-2:]
    if (h, w) == size:
        return x
    if h >= size[0] and w >= size[1]:
        return F.adaptive_avg_pool2d(x, size)
    return F.interpolate(x, size=size, mode="bilinear", align_corners=False)


class ProjectionHead(nn.Sequential):
    """SSKD's projection head on the pooled embedding: Linear(d, d) - ReLU - Linear(d, d)."""

    def __init__(self, dim: int) -> None:
        super().__init__(nn.Linear(dim, dim), nn.ReLU(inplace=True), nn.Linear(dim, dim))


def make_map_adapter(method: Method, kind: str) -> None:
    """Create ``method.adapters["map"]`` or refuse when a model has no conv feature map."""
    s, t = method.student_shapes.feature_map, method.teacher_shapes.feature_map
    for role, shape in (("student", s), ("teacher", t)):
        if shape is None:
            method.refuse(
                f"the {role} has no convolutional feature map (features().feature_map is None, e.g. a ViT); "
                "this method compares (B, C, H, W) maps, so use CNN-like models (ResNet, MobileNetV2, "
                "EfficientNet, ConvNeXt, HierAttn, tiny CNN)"
            )
    method.adapters["map"] = conv_adapter(s[0], t[0], kind)


def adapt_map(method: Method, student_map: Tensor, teacher_map: Tensor) -> Tensor:
    """Student map resized to the teacher's grid, then mapped to its channels."""
    return method.adapters["map"](match_spatial(student_map, teacher_map.shape[-2:]))


def rkd_parts(
    student_emb: Tensor, teacher_emb: Tensor, w_d: float, w_a: float, scale: float = 1.0
) -> dict[str, Tensor]:
    """Weighted distance and angle RKD terms (zero weights are skipped)."""
    parts: dict[str, Tensor] = {}
    if w_d * scale:
        parts["rkd_d"] = scale * w_d * rkd_distance_loss(student_emb, teacher_emb)
    if w_a * scale:
        parts["rkd_a"] = scale * w_a * rkd_angle_loss(student_emb, teacher_emb)
    return parts


def crkd_parts(
    method: Method, student_map: Tensor, teacher_map: Tensor, weight: float, form: str
) -> dict[str, Tensor]:
    """Weighted CRKD term on the adapted student map (skipped when the weight is 0)."""
    if not weight:
        return {}
    return {"crkd": weight * crkd_loss(adapt_map(method, student_map, teacher_map), teacher_map, form)}
