"""Model cost: parameter count, weight size, FLOPs and single-image CPU latency.

The leaderboard records cost next to accuracy so that a user can pick the best model under a
budget (SkinDistilViT reports size and CPU/GPU time next to BMA, SkinDistilViT section 5.3); the
multi-objective search minimises one of them. Latency is the median of batch-1 forward passes on
one CPU thread: one thread keeps the number comparable between trials that run side by side.
"""

from __future__ import annotations

import statistics
import time

import torch
from torch import nn

from raykd.artifact.format import load_artifact

__all__ = ["artifact_flops", "measure_flops", "measure_latency", "model_cost"]


def model_cost(model: nn.Module) -> dict[str, float]:
    """``params`` (count) and ``size_mb`` (bytes of parameters and buffers / 1e6)."""
    params = sum(p.numel() for p in model.parameters())
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return {"params": float(params), "size_mb": size / 1e6}


@torch.no_grad()
def measure_flops(model: nn.Module, image_size: int) -> float:
    """FLOPs of one forward pass of one ``image_size`` square image, counted by torch's
    ``FlopCounterMode`` (a multiply-add counts as 2 FLOPs; matrix products and convolutions only,
    so elementwise work is left out, as the papers' FLOPs figures leave it out)."""
    from torch.utils.flop_counter import FlopCounterMode  # lazy: torch is heavy

    was_training = model.training
    model.eval()
    try:
        counter = FlopCounterMode(display=False)
        with counter:
            model(torch.zeros(1, 3, image_size, image_size))
        return float(counter.get_total_flops())
    finally:
        model.train(was_training)


def artifact_flops(folder) -> float:
    """FLOPs of one image through a saved model (a run folder's best model or an artifact folder)
    at the image size it was trained at."""
    model, meta = load_artifact(folder)
    return measure_flops(model, int(meta.preprocess["image_size"]))


@torch.no_grad()
def measure_latency(model: nn.Module, image_size: int, *, reps: int = 20, warmup: int = 3) -> float:
    """Median milliseconds of a forward pass of one ``image_size`` square image (CPU, one thread)."""
    threads = torch.get_num_threads()
    was_training = model.training
    model.eval()
    x = torch.randn(1, 3, image_size, image_size, generator=torch.Generator().manual_seed(0))
    try:
        torch.set_num_threads(1)
        for _ in range(warmup):
            model(x)
        times = []
        for _ in range(max(1, reps)):
            t0 = time.perf_counter()
            model(x)
            times.append((time.perf_counter() - t0) * 1e3)
    finally:
        torch.set_num_threads(threads)
        model.train(was_training)
    return statistics.median(times)
