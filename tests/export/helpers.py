"""Tiny dataset folders and model artifacts for the export and serve tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raykd.artifact.format import ArtifactMeta, build_model, save_artifact
from raykd.data.manifest import Manifest
from raykd.data.schema import SCHEMA

LABELS = ["MEL", "NV", "BCC", "BKL"]
MALIGNANT = ["MEL", "BCC"]


def encoded_image(seed: int, fmt: str = ".png", size: tuple[int, int] = (48, 40)) -> bytes:
    """A smooth random colour image (blurred noise, so JPEG keeps it close) encoded as ``fmt``."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size[0] // 4, size[1] // 4, 3), dtype=np.uint8)
    img = cv2.resize(img, (size[1], size[0]), interpolation=cv2.INTER_LINEAR)
    ok, buf = cv2.imencode(fmt, img)
    assert ok
    return buf.tobytes()


def make_dataset(root: Path, per_class: int = 3, *, test_per_class: int = 0, manifest: bool = False) -> Path:
    """A raykd dataset folder: one shard with ``per_class`` val images per label plus 4 train rows.

    ``test_per_class`` adds a test split; ``manifest`` writes a ``manifest.json`` (source
    ``synthetic``) as ``python -m raykd.data synth`` does.
    """
    rows = []
    n = 0
    for split, count in (("val", per_class), ("train", 1), ("test", test_per_class)):
        for label, name in enumerate(LABELS):
            for _ in range(count):
                fmt = ".png" if n % 2 else ".jpg"
                rows.append({
                    "image_id": f"img_{n:04d}", "image": encoded_image(n, fmt),
                    "image_format": "png" if fmt == ".png" else "jpeg", "label": label,
                    "label_name": name, "source": "synthetic", "lesion_id": None, "patient_id": None,
                    "split": split, "age": None, "sex": None, "site": None,
                })
                n += 1
    (root / "shards").mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), root / "shards" / "part-00000.parquet")
    if manifest:
        counts = {split: {name: sum(r["split"] == split and r["label_name"] == name for r in rows) for name in LABELS}
                  for split in ("train", "val", "test")}
        Manifest(source="synthetic", label_names=list(LABELS), malignant=list(MALIGNANT), split_seed=42,
                 split_fractions={"train": 0.7, "val": 0.15, "test": 0.15}, class_counts=counts,
                 shards=["part-00000.parquet"], source_dir="tests.export.helpers").save(root)
    return root


def make_artifact(directory: Path, model_name: str, model_kwargs: dict, *, image_size: int,
                  dataset: Path | None = None, seed: int = 0, version: str = "v1",
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25), malignant=tuple(MALIGNANT)) -> Path:
    """Save a randomly initialised (seeded) model as an artifact with a 4-class contract."""
    meta = ArtifactMeta(
        model_name=model_name, num_classes=len(LABELS), model_kwargs=dict(model_kwargs),
        label_names=list(LABELS), malignant=list(malignant),
        preprocess={"image_size": image_size, "mean": list(mean), "std": list(std),
                    "crop_black_border": False, "fusion_preprocess": False},
        version=version, metrics={"val_bma": 0.25}, dataset=str(dataset) if dataset else None,
    )
    torch.manual_seed(seed)
    model = build_model(meta)
    return save_artifact(directory, model, meta)


#: A run's saved config, as much of it as the model card reads.
RUN_CONFIG = {
    "distill": {"method": "kd", "params": {"alpha": 0.7, "temperature": 4.0}},
    "teacher": {"name": "raykd_test_tiny_cnn", "checkpoint": "/runs/teachers/cnn"},
    "optim": {"name": "adamw", "lr": 0.003},
    "train": {"epochs": 2, "batch_size": 8, "seed": 0},
}


def make_run(run: Path, dataset: Path, *, seed: int = 0, summary: bool = True, **artifact_kwargs) -> Path:
    """A training-run folder: ``best/`` (a seeded 32-px tiny CNN), ``config.yaml`` and, with ``summary``,
    a ``summary.json`` whose val/test metrics are the model's real scores on ``dataset`` (scored as the
    training worker scores them: evaluation transform, softmax, :func:`compute_from_arrays`)."""
    import yaml

    from raykd.artifact.format import load_artifact
    from raykd.artifact.predict import TorchPredictor
    from raykd.artifact.rundir import RunDir
    from raykd.data.transforms import decode_image
    from raykd.export.run import load_split_images
    from raykd.metrics.classification import compute_from_arrays

    make_artifact(run / "best", "raykd_test_tiny_cnn", {}, image_size=32, dataset=dataset, seed=seed,
                  version=run.name, **artifact_kwargs)
    (run / "config.yaml").write_text(yaml.safe_dump(RUN_CONFIG))
    if summary:
        model, meta = load_artifact(run)
        predictor = TorchPredictor(model, meta, device="cpu")
        scores = {}
        for split in ("val", "test"):
            blobs, labels = load_split_images(dataset, split)
            probs = predictor.predict([decode_image(b) for b in blobs])
            scores[split] = compute_from_arrays(probs, labels, meta.label_names, meta.malignant)
        RunDir(run).write_summary({"best": scores["val"]["bma"], "epochs": 1, "val": scores["val"],
                                   "test": scores["test"]})
    return run
