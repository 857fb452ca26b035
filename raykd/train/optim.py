"""Optimisers and learning-rate schedules of the papers, from :class:`raykd.config.OptimConfig`.

* SkinDistilViT: AdamW, linear decay to 0, no warm-up (HF Trainer defaults).
* SSD-KD: SGD with momentum, ReduceLROnPlateau on the validation metric, early stopping. (The
  published code fed the best-so-far loss to the scheduler; we feed the current value.)
* HierAttn: AdamW with linear warm-up then cosine decay; transferred layers frozen for the first
  epochs (``freeze_epochs``).

Step-based schedules are stepped every optimiser step; the plateau schedule once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from raykd.config import OptimConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based)."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant":
        return 1.0
    span = max(1, total - warmup)
    t = min(1.0, (step - warmup) / span)
    if schedule == "linear":
        return min_ratio + (1.0 - min_ratio) * (1.0 - t)
    if schedule == "cosine":
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown step schedule {schedule!r}")


class Schedule:
    """One object for both kinds of schedule, so the loop needs no special cases."""

    def __init__(self, optimizer: torch.optim.Optimizer, cfg: OptimConfig, *, epochs: int,
                 steps_per_epoch: int, metric_mode: str = "max") -> None:
        self.cfg = cfg
        self.per_step = cfg.schedule != "plateau"
        if self.per_step:
            total = max(1, epochs * steps_per_epoch)
            warmup = cfg.warmup_epochs * steps_per_epoch
            ratio = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda s: lr_factor(s, total=total, warmup=warmup, schedule=cfg.schedule, min_ratio=ratio),
            )
        else:
            self.scheduler = torch.optim.lr_scheduler.ReduceLROnPlateau(
                optimizer, mode=metric_mode, factor=cfg.plateau_factor,
                patience=cfg.plateau_patience, min_lr=cfg.min_lr,
            )

    def after_step(self) -> None:
        if self.per_step:
            self.scheduler.step()

    def after_epoch(self, metric: float) -> None:
        if not self.per_step:
            self.scheduler.step(metric)

    def state_dict(self) -> dict:
        return self.scheduler.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.scheduler.load_state_dict(state)


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names (relative to ``model``) of the classifier parameters that train while frozen."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}
