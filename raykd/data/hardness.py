"""Sampling plans for a training split, including HierAttn's instance-hardness rebalancing.

Instance-hardness scores are computed once per (target, seed) from small thumbnails of the
training images and cached in the dataset folder, so every run and every Tune trial reuses them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pyarrow.dataset as pads

from raykd.data.manifest import Manifest
from raykd.data.sampling import epoch_plan, instance_hardness, sampling_rates

log = logging.getLogger(__name__)

THUMB = 24


def sampling_plan(
    path: str | Path, strategy: str, *, target: int | None = None, seed: int = 0
) -> tuple[list[str] | None, list[float] | None]:
    """``(keep_ids, rates)`` of the training split for ``strategy`` (see ``build_dataset``).

    ``instance_hardness`` is HierAttn's rebalancing to ``target`` images per class (default: the
    median class count): larger classes keep their ``target`` easiest images, smaller ones are
    oversampled up to it.
    """
    counts = np.asarray(Manifest.load(path).counts("train"))
    if strategy == "none":
        return None, None
    if strategy in ("oversample", "undersample"):
        return None, sampling_rates(counts, strategy, target).tolist()
    if strategy != "instance_hardness":
        raise ValueError(f"unknown sampling strategy {strategy!r}")
    if target is None:
        target = int(np.median(counts[counts > 0]))
    keep, kept = hardness_keep_ids(path, target=target, seed=seed)
    rates = np.where(kept > 0, np.maximum(target / np.maximum(kept, 1), 1.0), 0.0)
    return keep, rates.tolist()


def hardness_keep_ids(path: str | Path, *, target: int, seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Ids kept by instance-hardness undersampling to ``target`` and the kept count per class."""
    import cv2  # lazy: cv2 is heavy

    from raykd.data.transforms import decode_image  # lazy: imports torch

    path = Path(path)
    manifest = Manifest.load(path)
    cache = path / f"instance_hardness_t{target}_s{seed}.json"
    if cache.is_file():
        data = json.loads(cache.read_text())
        return data["keep"], np.asarray(data["kept_counts"])
    ds = manifest.shard_dataset(path)
    table = ds.to_table(columns=["image_id", "image", "label"], filter=pads.field("split") == "train")
    ids = table.column("image_id").to_pylist()
    labels = np.asarray(table.column("label").to_pylist())
    log.info("instance hardness: scoring %d training images (random forest on %dpx thumbnails)", len(ids), THUMB)
    thumbs = np.stack([
        cv2.resize(decode_image(b), (THUMB, THUMB), interpolation=cv2.INTER_AREA).reshape(-1)
        for b in table.column("image").to_pylist()
    ]).astype(np.float32) / 255.0
    scores = instance_hardness(thumbs, labels, seed=seed)
    plan = epoch_plan(labels, "instance_hardness", target=target, hardness=scores)
    keep = sorted(ids[i] for i in plan)
    kept = np.bincount(labels[plan], minlength=manifest.num_classes)
    cache.write_text(json.dumps({"keep": keep, "kept_counts": kept.tolist()}))
    return keep, kept
