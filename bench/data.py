"""Decode + augment throughput: the Ray Data path next to the same pipeline in a plain loop.

Both sides run the very same batch function (``raykd.data.dataset.decode_and_transform``) over the
same synthetic 224x224 JPEG shards, in one run, so the ratio is what to read (absolute numbers
drift with the machine). Per-core figures divide by the cores each side may use.

    python bench/data.py [--images 512] [--size 224] [--recipe skindistilvit] [--cpus 2]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads


def plain_loop(path: Path, spec, batch_size: int) -> tuple[int, float]:
    from raykd.data.dataset import decode_and_transform
    from raykd.data.manifest import Manifest

    manifest = Manifest.load(path)
    ds = pads.dataset(manifest.shard_paths(path), format="parquet")
    n, t0 = 0, time.perf_counter()
    for batch in ds.to_batches(columns=["image_id", "image", "label"], batch_size=batch_size,
                               filter=pads.field("split") == "train"):
        cols = {c: np.asarray(batch.column(c).to_pylist(), dtype=object) for c in ("image_id", "image", "label")}
        out = decode_and_transform(cols, spec)
        n += len(out["label"])
    return n, time.perf_counter() - t0


def ray_data(path: Path, spec, batch_size: int) -> tuple[int, float]:
    from raykd.data.dataset import build_dataset

    ds = build_dataset(path, "train", spec.preprocess, train=True, recipe=spec.recipe, batch_size=batch_size)
    n, t0 = 0, time.perf_counter()
    for batch in ds.iter_batches(batch_size=batch_size, batch_format="numpy"):
        n += len(batch["label"])
    return n, time.perf_counter() - t0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--recipe", default="skindistilvit")
    p.add_argument("--cpus", type=int, default=os.cpu_count() or 2)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--shard-mb", type=float, default=1.0, help="shard size: several shards let Ray Data read in parallel")
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import ray

    from raykd.cluster import init_local_ray
    from raykd.data.dataset import PipelineSpec
    from raykd.data.synthetic import make_synthetic
    from raykd.data.transforms import PreprocessSpec

    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench"
        make_synthetic(path, num_images=args.images, image_size=args.size, shard_mb=args.shard_mb,
                       fractions={"train": 1.0, "val": 0.0, "test": 0.0})
        spec = PipelineSpec(preprocess=PreprocessSpec(image_size=args.size), train=True, recipe=args.recipe)
        init_local_ray(num_cpus=args.cpus)
        ray_data(path, spec, args.batch_size)  # warm-up: worker processes and imports
        n_ray, t_ray = ray_data(path, spec, args.batch_size)
        n_loop, t_loop = plain_loop(path, spec, args.batch_size)
        ray.shutdown()

    loop_rate, ray_rate = n_loop / t_loop, n_ray / t_ray
    print(f"decode + '{args.recipe}' augment, {args.size}x{args.size} JPEG, {n_loop} images, batch {args.batch_size}")
    print("| path | cores | images/s | images/s per core |")
    print("|---|---|---|---|")
    print(f"| plain Python loop | 1 | {loop_rate:.0f} | {loop_rate:.0f} |")
    print(f"| Ray Data map_batches | {args.cpus} | {ray_rate:.0f} | {ray_rate / args.cpus:.0f} |")
    print(f"ratio Ray Data / loop: {ray_rate / loop_rate:.2f}x total, {ray_rate / args.cpus / loop_rate:.2f}x per core")


if __name__ == "__main__":
    main()
