"""Model zoo table: parameters, FLOPs and CPU throughput of every seed-paper model, in one run.

Usage:
    python bench/models.py                 # full zoo at each model's own input size (a few minutes)
    python bench/models.py --quick         # tiny test variants only (seconds; CI smoke test)
    python bench/models.py --models raykd_hierattn_xs mobilenetv2_100 --threads 4

Parameters are counted with 8 classes. FLOPs are counted by ``torch.utils.flop_counter`` on the meta
device (nothing is allocated), one image at the model's ``pretrained_cfg`` input size; GFLOPs count a
multiply-add as 2, GMACs as 1 (papers' "FLOPs", e.g. HierAttn's 0.44 G, are usually MACs).
Throughput: random weights, eval mode, ``torch.inference_mode``, batch ``--batch``, timed for at
least ``--seconds`` after one warm-up batch, all models in the same process one after another so
the ratios (last column, relative to the ViT-B/16 teacher) compare like with like.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import timm  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

import raykd.models  # noqa: E402,F401  (registers raykd_* models)
from raykd.models import count_params  # noqa: E402

#: (timm name, what it is in the papers)
ZOO: list[tuple[str, str]] = [
    ("vit_base_patch16_224", "ViT-B/16 teacher (SkinDistilViT)"),
    ("raykd_fcvit_base_patch16_224", "FCViT-B/16, 12 heads (SkinDistilViT 3.2)"),
    ("raykd_distilvit_base_patch16_224", "SkinDistilViT 6-block student"),
    ("tf_efficientnet_b4", "EfficientNet-B4 baseline (SkinDistilViT)"),
    ("tf_efficientnet_b6", "EfficientNet-B6 baseline (SkinDistilViT)"),
    ("resnet50", "ResNet50 teacher (SSD-KD)"),
    ("convnext_base", "ConvNeXt-Base"),
    ("raykd_fused_teacher", "ResNet152+ConvNeXt-B+ViT-B fusion teacher"),
    ("mobilenetv2_100", "MobileNetV2 student (SSD-KD)"),
    ("raykd_hierattn_s", "HierAttn-s"),
    ("raykd_hierattn_xs", "HierAttn-xs"),
    ("raykd_tiny_cnn", "tiny CNN student (fusion paper)"),
    ("raykd_tiny_cnn_fp16", "tiny CNN, float16 weights"),
]
QUICK: list[tuple[str, str]] = [
    ("test_vit", "timm test ViT"),
    ("raykd_test_fcvit", "test FCViT"),
    ("raykd_test_hierattn", "test HierAttn"),
    ("raykd_test_fused_teacher", "test fusion teacher"),
    ("raykd_test_tiny_cnn", "test tiny CNN"),
]
REFERENCE = ("vit_base_patch16_224", "test_vit")


def count_flops(name: str, num_classes: int) -> tuple[int, tuple[int, int, int]]:
    """FLOPs of one forward pass at the model's input size, counted on the meta device."""
    with torch.device("meta"):
        model = timm.create_model(name, num_classes=num_classes).eval()
        size = tuple(model.pretrained_cfg["input_size"])
        x = torch.empty(1, *size, dtype=next(model.parameters()).dtype)
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        model(x)
    return counter.get_total_flops(), size


def images_per_second(
    name: str, num_classes: int, size: tuple[int, int, int], batch: int, seconds: float
) -> float:
    """CPU throughput of the model with random weights."""
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=num_classes).eval()
    x = torch.rand(batch, *size)
    with torch.inference_mode():
        model(x)  # warm-up
        n, start = 0, time.perf_counter()
        while n < 2 or time.perf_counter() - start < seconds:
            model(x)
            n += 1
        elapsed = time.perf_counter() - start
    return n * batch / elapsed


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="*", help="timm names (default: the whole zoo)")
    parser.add_argument("--quick", action="store_true", help="tiny test variants only")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads(), help="torch CPU threads")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum timed seconds per model")
    parser.add_argument("--num-classes", type=int, default=8)
    args = parser.parse_args(argv)

    torch.set_num_threads(args.threads)
    zoo = QUICK if args.quick else ZOO
    if args.models:
        known = dict(ZOO + QUICK)
        zoo = [(m, known.get(m, "")) for m in args.models]

    rows = []
    for name, what in zoo:
        with torch.device("meta"):
            model = timm.create_model(name, num_classes=args.num_classes)
        params, trainable = count_params(model), count_params(model, trainable_only=True)
        del model
        flops, size = count_flops(name, args.num_classes)
        ips = images_per_second(name, args.num_classes, size, args.batch, args.seconds)
        rows.append((name, what, params, trainable, size, flops, ips))
        print(f"measured {name}: {ips:.1f} img/s", file=sys.stderr, flush=True)

    ref = next((r[6] for r in rows if r[0] in REFERENCE), None)
    print(
        f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores visible, "
        f"torch {torch.__version__} with {args.threads} threads, batch {args.batch}, "
        f"{args.num_classes} classes, timm {timm.__version__}\n"
    )
    print("| model | role | params (M) | input | GFLOPs | GMACs | CPU img/s | speed vs ViT-B |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for name, what, params, trainable, size, flops, ips in rows:
        p = f"{params / 1e6:.2f}" + (f" ({trainable / 1e6:.2f} trainable)" if trainable != params else "")
        rel = f"{ips / ref:.2f}×" if ref else "–"
        print(
            f"| `{name}` | {what} | {p} | {size[1]}×{size[2]} | {flops / 1e9:.2f} | {flops / 2e9:.2f} "
            f"| {ips:.3g} | {rel} |"
        )


if __name__ == "__main__":
    main()
