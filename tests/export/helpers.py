"""Tiny dataset folders and model artifacts for the export and serve tests."""

from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from raykd.data.schema import SCHEMA
from raykd.artifact import ArtifactMeta, build_model, save_artifact

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


def make_dataset(root: Path, per_class: int = 3) -> Path:
    """A raykd dataset folder: one shard with ``per_class`` val images per label plus 4 train rows."""
    rows = []
    n = 0
    for split, count in (("val", per_class), ("train", 1)):
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
    return root


def make_artifact(directory: Path, model_name: str, model_kwargs: dict, *, image_size: int,
                  dataset: Path | None = None, seed: int = 0, version: str = "v1",
                  mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25)) -> Path:
    """Save a randomly initialised (seeded) model as an artifact with a 4-class contract."""
    meta = ArtifactMeta(
        model_name=model_name, num_classes=len(LABELS), model_kwargs=dict(model_kwargs),
        label_names=list(LABELS), malignant=list(MALIGNANT),
        preprocess={"image_size": image_size, "mean": list(mean), "std": list(std),
                    "crop_black_border": False, "pipeline_004": False},
        version=version, metrics={"val_bma": 0.25}, dataset=str(dataset) if dataset else None,
    )
    torch.manual_seed(seed)
    model = build_model(meta)
    return save_artifact(directory, model, meta)
