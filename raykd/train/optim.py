"""Optimisers and learning-rate schedules of the papers, from :class:`raykd.config.OptimConfig`.

* SkinDistilViT: AdamW, linear decay to 0, no warm-up (HF Trainer defaults).
* SSD-KD: SGD with momentum, ReduceLROnPlateau on the validation metric, early stopping. (The
  published code fed the best-so-far loss to the scheduler; we feed the current value.)
* HierAttn: AdamW with a warm-up and cosine cycle that restarts (``cosine_restarts``: its code
  warms up to 2e-3 over 15 epochs, decays to 2e-4 by epoch 30, warms up again by epoch 45 and
  decays over the rest, the paper's SGDR reference); transferred layers frozen for the first
  epochs (``freeze_epochs``).
* Fusion teacher to tiny CNN: Adafactor (``torch.optim.Adafactor``: relative step sizes capped by
  ``lr`` and scaled by each parameter's RMS, as the Keras Adafactor the paper trained with).

Step-based schedules are stepped every optimiser step; the plateau schedule once per epoch.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

import torch
from torch import nn

from raykd.config import OptimConfig


def build_optimizer(params: Iterable[nn.Parameter], cfg: OptimConfig) -> torch.optim.Optimizer:
    params = [p for p in params if p.requires_grad]
    if cfg.name == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.name == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    if cfg.name == "adafactor":
        return torch.optim.Adafactor(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_factor(step: int, *, total: int, warmup: int, schedule: str, min_ratio: float,
              restarts: Sequence[int] = ()) -> float:
    """Multiplier of the base learning rate at optimiser step ``step`` (0-based).

    ``cosine_restarts`` splits the ``total`` steps at ``restarts`` (steps, increasing) into cycles;
    each cycle climbs linearly from ``min_ratio`` to 1 over ``warmup`` steps (its whole length if
    shorter) and then follows a cosine down to ``min_ratio`` at the cycle's end.
    """
    if schedule == "cosine_restarts":
        cuts = [r for r in restarts if 0 < r < total]
        start = max([0, *(r for r in cuts if r <= step)])
        end = min([max(total, 1), *(r for r in cuts if r > step)])
        k, span = step - start, end - start
        w = min(warmup, span)
        if k < w:
            return min_ratio + (1.0 - min_ratio) * (k + 1) / w
        t = min(1.0, (k - w) / max(1, span - w))
        return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * t))
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
        restarts = _restart_epochs(cfg)
        if self.per_step:
            total = max(1, epochs * steps_per_epoch)
            warmup = cfg.warmup_epochs * steps_per_epoch
            ratio = cfg.min_lr / cfg.lr if cfg.lr > 0 else 0.0
            at = [e * steps_per_epoch for e in restarts]
            self.scheduler = torch.optim.lr_scheduler.LambdaLR(
                optimizer,
                lambda s: lr_factor(s, total=total, warmup=warmup, schedule=cfg.schedule, min_ratio=ratio,
                                    restarts=at),
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


def _restart_epochs(cfg: OptimConfig) -> list[int]:
    """``cfg.restart_epochs``, checked: increasing epochs > 0, and only with ``cosine_restarts``
    (a restart at or past the run's last epoch is never reached, as a warm-up longer than the run)."""
    restarts = list(cfg.restart_epochs)
    if restarts and cfg.schedule != "cosine_restarts":
        raise ValueError(f"optim.restart_epochs={restarts} needs optim.schedule=cosine_restarts "
                         f"(got {cfg.schedule!r}); set the schedule or drop the restarts")
    if any(e <= 0 for e in restarts) or any(b <= a for a, b in zip(restarts, restarts[1:])):
        raise ValueError(f"optim.restart_epochs={restarts} must be increasing epochs greater than 0")
    return restarts


def head_parameter_names(model: nn.Module) -> set[str]:
    """Names (relative to ``model``) of the classifier parameters that train while frozen."""
    head = model.get_classifier() if hasattr(model, "get_classifier") else None
    if not isinstance(head, nn.Module):
        return set()
    ids = {id(p) for p in head.parameters()}
    return {n for n, p in model.named_parameters() if id(p) in ids}
