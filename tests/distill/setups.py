"""Tiny student/teacher pairs for every registered method (timm ``test_*`` and raykd test models)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import timm
import torch
from torch import nn

import raykd.distill  # noqa: F401  (registers the methods)
from raykd.distill.methods._shared import ProjectionHead
from raykd.models import cascade_cut

NUM_CLASSES = 8


def make(name: str, **kwargs: Any) -> nn.Module:
    return timm.create_model(name, num_classes=NUM_CLASSES, **kwargs)


def cnn_student() -> nn.Module:
    return make("test_efficientnet")


def cnn_teacher() -> nn.Module:
    return make("test_resnet")


def vit(**kwargs: Any) -> nn.Module:
    return make("test_vit", img_size=32, **kwargs)


def cnn_pair() -> tuple[nn.Module, nn.Module]:
    return cnn_student(), cnn_teacher()


def cascade_pair() -> tuple[nn.Module, nn.Module]:
    parent = vit(depth=3)
    return cascade_cut(parent), parent


def _sskd_head() -> dict[str, torch.Tensor]:
    return ProjectionHead(96).state_dict()  # test_resnet's embedding width


@dataclass
class Setup:
    """How to build one method for the contract tests: a (student, teacher) factory and options."""

    pair: Callable[[], tuple[nn.Module, nn.Module | None]]
    size: int = 32
    params: dict[str, Any] = field(default_factory=dict)
    kwargs: Callable[[], dict[str, Any]] = dict
    epoch: int = 0

    def build(self, name: str, class_weights: torch.Tensor | None = None):
        from raykd.distill import build_method

        torch.manual_seed(0)
        student, teacher = self.pair()
        method = build_method(
            name,
            student,
            teacher,
            self.params,
            num_classes=NUM_CLASSES,
            class_weights=class_weights,
            input_size=self.size,
            **self.kwargs(),
        )
        method.set_epoch(self.epoch)
        return method


def _head_kwargs() -> dict[str, Any]:
    return {"teacher_head": _sskd_head()}


# Every registered method must appear here (checked by a test).
SETUPS: dict[str, Setup] = {
    "baseline": Setup(lambda: (cnn_student(), None)),
    "kd": Setup(cnn_pair),
    "dkd": Setup(cnn_pair),
    "rkd": Setup(cnn_pair),
    "fitnet": Setup(cnn_pair, size=64),
    "crkd": Setup(cnn_pair, size=64),
    "dkd_combo": Setup(cnn_pair, size=64),
    "sskd": Setup(cnn_pair, size=64, kwargs=_head_kwargs),
    "ssdkd": Setup(cnn_pair, size=64, kwargs=_head_kwargs),
    "skindistilvit": Setup(lambda: (vit(depth=2), vit(depth=4)), params={"w_hidden": 1.0, "w_mse": 0.25}),
    "cascade": Setup(cascade_pair, params={"w_hidden": 1.0, "w_mse": 0.25}),
    "fcvit": Setup(lambda: (make("raykd_test_fcvit"), None)),
    "fcvit_probs": Setup(lambda: (make("raykd_test_fcvit"), None), epoch=100),
}


def make_batch(size: int, b: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    """``b`` random images of ``size`` px and distinct labels."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(b, 3, size, size, generator=g), torch.tensor([0, 3, 5, 7, 1, 2][:b])
