"""CPU images/s: the ViT-B teacher in torch vs each student in torch, ONNX, fp16 and int8 ONNX.

SkinDistilViT's trade-off table (SkinDistilViT, table 3) measured its 6-block student at 21.36 it/s vs
10.79 it/s for the ViT-B/16 teacher on CPU: 1.98x, torch against torch. This bench redoes that
row side by side in one process, and adds what serving actually runs on CPU: the same student
exported to ONNX by ``raykd.export`` (fp32, fp16, dynamic int8), plus the other papers' students.
The project's goal is a 6-block student in ONNX at >= 4x the teacher in torch.

Method: random weights (speed does not depend on their values; no accuracy is claimed here), 8
classes, eval mode, one fixed batch of ``--batch`` normalised images at each model's input size,
preprocessing excluded (the paper also ignored data loading). Every variant is warmed up, then the
variants are timed round-robin for ``--rounds`` rounds (each measurement repeats the batch for at
least ``--min-seconds``) and the median is kept, so a background load shift hits all variants
alike. torch and ONNX Runtime get the same number of threads.

Usage:
    python bench/inference.py                      # teacher + 4 students (~5 min on 2 cores)
    python bench/inference.py --students vit6      # the headline row only
    python bench/inference.py --quick              # tiny test models (seconds)
    python bench/inference.py --threads 1 --clock cpu   # on a busy machine: images per CPU-second
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from raykd.artifact.format import ArtifactMeta, build_model
from raykd.data.schema import ISIC2019_CLASSES, ISIC2019_MALIGNANT  # noqa: E402
from raykd.export.onnx import convert_fp16, export_onnx, quantize_int8  # noqa: E402

#: key -> (label, timm name, extra kwargs, input size)
TEACHER = ("ViT-B/16 teacher", "vit_base_patch16_224", {}, 224)
STUDENTS = {
    "vit6": ("SkinDistilViT 6-block", "vit_base_patch16_224", {"depth": 6}, 224),
    "hierattn_s": ("HierAttn-s", "raykd_hierattn_s", {}, 256),
    "mobilenetv2": ("MobileNetV2 (SSD-KD)", "mobilenetv2_100", {}, 224),
    "tiny_cnn": ("tiny CNN (the fusion paper)", "raykd_tiny_cnn", {}, None),
}
QUICK_TEACHER = ("test ViT, 4 blocks", "test_vit", {"img_size": 64, "depth": 4}, 64)
QUICK_STUDENTS = {
    "vit6": ("test ViT, 2 blocks", "test_vit", {"img_size": 64, "depth": 2}, 64),
    "tiny_cnn": ("tiny CNN test", "raykd_test_tiny_cnn", {}, 32),
}
ONNX_VARIANTS = ("onnx", "fp16", "int8")


@dataclass
class Variant:
    model: str
    backend: str
    params: int
    size_bytes: int
    run: object  # callable(batch) -> None
    batch: np.ndarray
    times: list[float] = field(default_factory=list)
    iters: int = 1

    @property
    def images_per_s(self) -> float:
        return self.iters * len(self.batch) / statistics.median(self.times)


def _meta(name: str, kwargs: dict, size: int | None) -> ArtifactMeta:
    return ArtifactMeta(model_name=name, num_classes=len(ISIC2019_CLASSES), model_kwargs=dict(kwargs),
                        label_names=list(ISIC2019_CLASSES), malignant=list(ISIC2019_MALIGNANT),
                        preprocess={"image_size": size or 224}, version="bench-random-weights")


def build_variants(spec, *, onnx: bool, batch_size: int, threads: int, workdir: Path) -> list[Variant]:
    """The torch model of ``spec`` and, with ``onnx``, its three exported ONNX files."""
    import onnxruntime as ort

    label, name, kwargs, size = spec
    torch.manual_seed(0)
    meta = _meta(name, kwargs, size)
    model = build_model(meta).eval()
    if size is None:  # the model's own input size
        size = model.pretrained_cfg["input_size"][-1]
        meta.preprocess["image_size"] = size
    params = sum(p.numel() for p in model.parameters())
    batch = np.random.default_rng(0).standard_normal((batch_size, 3, size, size)).astype(np.float32)
    x = torch.from_numpy(batch)

    def run_torch(_b, model=model, x=x):
        with torch.inference_mode():
            model(x)

    out = [Variant(label, "torch", params, params * 4, run_torch, batch)]
    if not onnx:
        return out
    stem = workdir / name.replace("/", "_")
    paths = {"onnx": export_onnx(model, meta, stem.with_suffix(f".d{kwargs.get('depth', 0)}.onnx"))}
    paths["fp16"] = convert_fp16(paths["onnx"], paths["onnx"].with_suffix(".fp16.onnx"))
    paths["int8"] = quantize_int8(paths["onnx"], paths["onnx"].with_suffix(".int8.onnx"))
    for kind in ONNX_VARIANTS:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads
        opts.log_severity_level = 3
        # Idle ORT threads busy-wait by default, stealing the cores from the next variant timed.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sess = ort.InferenceSession(str(paths[kind]), opts, providers=["CPUExecutionProvider"])

        def run_onnx(b, sess=sess):
            sess.run(None, {"images": b})

        out.append(Variant(label, f"ONNX {kind}" if kind != "onnx" else "ONNX fp32", params,
                           paths[kind].stat().st_size, run_onnx, batch))
    return out


def measure(variants: list[Variant], rounds: int, min_seconds: float, clock=time.perf_counter) -> None:
    for v in variants:  # warm-up, and pick repeats so one measurement lasts >= min_seconds
        t0 = clock()
        v.run(v.batch)
        v.run(v.batch)
        once = (clock() - t0) / 2
        v.iters = max(1, math.ceil(min_seconds / max(once, 1e-6)))
    for r in range(rounds):
        for v in variants:
            t0 = clock()
            for _ in range(v.iters):
                v.run(v.batch)
            v.times.append(clock() - t0)
        print(f"  round {r + 1}/{rounds} done", file=sys.stderr, flush=True)


def table(variants: list[Variant]) -> str:
    teacher = variants[0].images_per_s
    fmt = "{:<24} {:<10} {:>8} {:>9} {:>9} {:>9} {:>10}"
    rows = [fmt.format("model", "backend", "params M", "size MB", "images/s", "ms/image", "x teacher")]
    for v in variants:
        ips = v.images_per_s
        rows.append(fmt.format(v.model, v.backend, f"{v.params / 1e6:.2f}", f"{v.size_bytes / 1e6:.1f}",
                               f"{ips:.2f}", f"{1e3 / ips:.1f}", f"{ips / teacher:.2f}"))
    return "\n".join(rows)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--students", nargs="+", default=list(STUDENTS), choices=list(STUDENTS))
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--min-seconds", type=float, default=0.5, help="shortest single measurement")
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch and ONNX Runtime threads")
    p.add_argument("--teacher-onnx", action="store_true", help="also export and time the teacher in ONNX")
    p.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                   help="wall: elapsed time (the paper's measure); cpu: CPU seconds of this process, "
                        "robust to other load on the machine (use with --threads 1)")
    p.add_argument("--quick", action="store_true", help="tiny test models (smoke run)")
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    teacher, students = (QUICK_TEACHER, QUICK_STUDENTS) if args.quick else (TEACHER, STUDENTS)
    chosen = [students[k] for k in args.students if k in students]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="raykd-bench-") as tmp:
        variants = build_variants(teacher, onnx=args.teacher_onnx, batch_size=args.batch,
                                  threads=args.threads, workdir=Path(tmp))
        for spec in chosen:
            print(f"exporting {spec[0]} ...", file=sys.stderr, flush=True)
            variants += build_variants(spec, onnx=True, batch_size=args.batch, threads=args.threads,
                                       workdir=Path(tmp))
        clock = time.perf_counter if args.clock == "wall" else time.process_time
        measure(variants, args.rounds, args.min_seconds, clock)
    load1 = os.getloadavg()

    print(f"# CPU inference, batch {args.batch}, {args.threads} threads, {args.clock} clock, "
          f"{args.rounds} interleaved rounds, "
          f"random weights; torch {torch.__version__}, {platform.processor() or platform.machine()}, "
          f"{os.cpu_count()} cores; load average {load0[0]:.1f} -> {load1[0]:.1f}")
    print(table(variants).replace("images/s", "images/s" if args.clock == "wall" else "img/CPU-s"))
    by = {(v.model, v.backend): v.images_per_s for v in variants}
    t = by[(teacher[0], "torch")]
    head = students["vit6"][0] if "vit6" in args.students else None
    if head:
        print(f"\n6-block student torch / teacher torch: {by[(head, 'torch')] / t:.2f}x (paper: 1.98x)")
        for kind in ("ONNX fp32", "ONNX fp16", "ONNX int8"):
            ratio = by[(head, kind)] / t
            print(f"6-block student {kind} / teacher torch: {ratio:.2f}x (goal >= 4x: "
                  f"{'met' if ratio >= 4 else 'not met'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
