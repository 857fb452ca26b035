"""Training throughput: the training worker next to a bare torch loop, and a KD epoch (online
teacher, and the teacher's saved outputs) next to a baseline epoch, measured side
by side in one run.

Both sides train the same model on the same synthetic shards with one torch thread, through the
same epoch function (``raykd.train.loop.train_epoch``) and the same decode + augment function; the
bare loop decodes in-process, the Ray worker gets its batches from Ray Data. Images/s and the
data wait (the share of the epoch's training time spent waiting for the next batch) are taken
over the epochs after the first (warm-up) one.

The teacher is saved as an artifact first (random weights: throughput does not depend on them);
its outputs are saved on ``--output-views`` views of every training image
(``raykd.train.teacher_outputs``), and their build time and size are printed per 1,000 images.

    python bench/train.py [--images 800] [--size 64] [--model mobilenetv2_100] [--teacher resnet50]
                          [--epochs 3] [--output-views 8]
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads


def bare_loop(data: Path, model_name: str, size: int, epochs: int, batch: int) -> tuple[float, float]:
    """Images/s of train_epoch over in-process decoded batches (epochs after the first)."""
    import torch

    from raykd.config import OptimConfig
    from raykd.data.dataset import PipelineSpec, decode_and_transform
    from raykd.data.manifest import Manifest
    from raykd.data.transforms import PreprocessSpec
    from raykd.distill import build_method
    from raykd.models import create_model
    from raykd.train.loop import device_batches, train_epoch
    from raykd.train.optim import Schedule, build_optimizer

    torch.set_num_threads(1)
    manifest = Manifest.load(data)
    spec = PipelineSpec(preprocess=PreprocessSpec(image_size=size), train=True, recipe="light")
    table = pads.dataset(manifest.shard_paths(data), format="parquet").to_table(
        columns=["image_id", "image", "label"], filter=pads.field("split") == "train")
    cols = {c: np.asarray(table.column(c).to_pylist(), dtype=object) for c in ("image_id", "image", "label")}

    def batches():
        order = np.random.permutation(len(cols["label"]))
        for i in range(0, len(order) - batch + 1, batch):  # drop_last, as the Ray worker does
            idx = order[i : i + batch]
            out = decode_and_transform({k: v[idx] for k, v in cols.items()}, spec)
            yield {"image": torch.from_numpy(out["image"]), "label": torch.from_numpy(out["label"])}

    student = create_model(model_name, num_classes=manifest.num_classes)
    method = build_method("baseline", student, None, num_classes=manifest.num_classes, input_size=(3, size, size))
    cfg = OptimConfig(lr=1e-3, schedule="constant")
    opt = build_optimizer(method.trainable_parameters(), cfg)
    sched = Schedule(opt, cfg, epochs=epochs, steps_per_epoch=1)
    rates, waits = [], []
    for e in range(epochs):
        cpu = torch.device("cpu")  # normalised as in the Ray worker
        stats = train_epoch(method, device_batches(batches(), spec.preprocess, cpu), opt, sched, epoch=e,
                            method_name="baseline", device=cpu)
        rates.append(stats["train/images_per_s"])
        waits.append(stats["train/data_wait_share"])
    return float(np.mean(rates[1:])), float(np.mean(waits[1:]))


def ray_run(root: Path, name: str, model: str, size: int, epochs: int, batch: int, *extra: str) -> tuple[float, float]:
    """Images/s and data-wait share of a 1-worker run, over its epochs after the first."""
    from raykd.config import RunConfig, load_config
    from raykd.train.driver import run_train

    cfg = load_config(RunConfig, None, [
        f"name={name}", f"output_dir={root / 'runs'}", f"data.path={root / 'data'}", f"student.name={model}",
        f"student.image_size={size}", f"train.epochs={epochs}", f"train.batch_size={batch}",
        "scaling.num_workers=1", "scaling.cpus_per_worker=1", "optim.schedule=constant", *extra,
    ])
    result = run_train(cfg)
    history = json.loads((result.run_dir / "metrics.json").read_text())
    return (float(np.mean([r["train/images_per_s"] for r in history[1:]])),
            float(np.mean([r["train/data_wait_share"] for r in history[1:]])))


def save_teacher(root: Path, name: str, data: Path, size: int) -> Path:
    """A randomly initialised teacher saved as a raykd artifact (what the teacher outputs are built from)."""
    import torch

    from raykd.artifact.format import ArtifactMeta, save_artifact
    from raykd.data.manifest import Manifest
    from raykd.data.transforms import spec_from_model
    from raykd.models import create_model

    m = Manifest.load(data)
    torch.manual_seed(0)
    model = create_model(name, num_classes=m.num_classes)
    meta = ArtifactMeta(model_name=name, num_classes=m.num_classes, model_kwargs={}, label_names=list(m.label_names),
                        malignant=list(m.malignant), preprocess=spec_from_model(model, image_size=size).to_dict())
    save_artifact(root / "teacher" / "best", model, meta)
    return root / "teacher"


def build_teacher_outputs(root: Path, teacher: Path, model: str, size: int, views: int) -> tuple[Path, dict]:
    """The teacher outputs on ``views`` views in the student's contract; returns their folder and record."""
    from raykd.data.transforms import spec_from_model
    from raykd.models import create_model
    from raykd.train.teacher_outputs import build_outputs, outputs_key

    spec = spec_from_model(create_model(model, num_classes=8), image_size=size)
    key = outputs_key(root / "data", teacher, "light", spec, views=views, seed=0)
    path = build_outputs(root / "data", teacher, key, cpus_per_actor=1)
    return path, json.loads((path / "outputs.json").read_text())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--images", type=int, default=800)
    p.add_argument("--size", type=int, default=64)
    p.add_argument("--model", default="mobilenetv2_100", help="the student (default: the SSD-KD student)")
    p.add_argument("--teacher", default="resnet50", help="the teacher (default: the SSD-KD teacher)")
    p.add_argument("--output-views", type=int, default=8, help="views per image in the teacher outputs")
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch", type=int, default=32)
    args = p.parse_args()
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")

    import ray

    from raykd.cluster import init_local_ray
    from raykd.data.synthetic import make_synthetic

    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        make_synthetic(root / "data", num_images=args.images, image_size=args.size)
        t0 = time.perf_counter()
        bare = bare_loop(root / "data", args.model, args.size, args.epochs, args.batch)
        init_local_ray(num_cpus=os.cpu_count() or 2)
        teacher = save_teacher(root, args.teacher, root / "data", args.size)
        worker = ray_run(root, "baseline", args.model, args.size, args.epochs, args.batch)
        kd = ray_run(root, "kd", args.model, args.size, args.epochs, args.batch, f"teacher.checkpoint={teacher}",
                     "distill.method=kd")
        outputs, record = build_teacher_outputs(root, teacher, args.model, args.size, args.output_views)
        kd_saved = ray_run(root, "kd-outputs", args.model, args.size, args.epochs, args.batch,
                           f"teacher.checkpoint={teacher}", "distill.method=kd", f"distill.teacher_outputs={outputs}")
        ray.shutdown()
    print(f"{args.model} at {args.size}px, batch {args.batch}, {args.epochs} epochs (first one not counted), "
          f"1 torch thread, {time.perf_counter() - t0:.0f} s in all")
    print("| loop | images/s | ratio | data wait |")
    print("|---|---|---|---|")
    rows = [("bare torch loop (decode in-process)", bare), ("training worker, baseline", worker),
            (f"training worker, kd from {args.teacher}, online teacher", kd),
            (f"training worker, kd from {args.teacher}, teacher outputs", kd_saved)]
    for label, (rate, wait) in rows:
        print(f"| {label} | {rate:.1f} | {rate / bare[0]:.2f} | {100 * wait:.1f} % |")
    print(f"KD epoch time / baseline epoch time: online teacher {worker[0] / kd[0]:.2f}x, "
          f"teacher outputs {worker[0] / kd_saved[0]:.2f}x")
    per_k = 1000 / record["images"]
    print(f"teacher outputs: {record['views']} views x {record['images']} images = {record['teacher_forward_passes']} "
          f"teacher forward passes; built in {record['build_s']:.1f} s ({record['build_s'] * per_k:.1f} s and "
          f"{record['bytes'] * per_k / 1e6:.2f} MB per 1,000 images)")


if __name__ == "__main__":
    main()
