"""Ray Data datasets over the shards: read one split, resample, decode and augment in the workers.

The Parquet rows carry encoded bytes; decoding and augmentation run in ``map_batches`` tasks, so
they scale with the cluster and never write decoded images anywhere. Each output row is
``{"image": uint8 (3, H, W), "label": int64}``, ready for ``iter_torch_batches``; the consumer
normalises on its device with :func:`raykd.data.transforms.normalize_chw`. Shipping uint8 instead
of normalised float32 moves a quarter of the bytes through the object store (see ``bench/data.py``).

Resource note (measured on 2-core machines, see the shared Ray notes): read and map tasks ask for
a quarter CPU by default, so that Train workers holding the CPUs never starve the data pipeline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from raykd.data.manifest import Manifest
from raykd.data.sampling import repeat_counts
from raykd.data.transforms import (
    PreprocessSpec,
    build_eval_transform,
    build_train_transform,
    decode_image,
    to_chw_batch,
)

DATA_TASK_CPUS = 0.25
ROWS_PER_TASK_BATCHES = 4  # a decode task gets about this many batches of rows


@dataclass(frozen=True)
class PipelineSpec:
    """Everything a map task needs to rebuild its transform (hashable, so it is built once per process)."""

    preprocess: PreprocessSpec
    train: bool
    recipe: str = "light"


@lru_cache(maxsize=8)
def _transform(spec: PipelineSpec):
    import cv2  # lazy: cv2 is heavy

    cv2.setNumThreads(1)  # Ray already runs one task per (fraction of a) core; nested threads thrash
    if spec.train:
        return build_train_transform(spec.preprocess, spec.recipe, normalize=False)
    return build_eval_transform(spec.preprocess, normalize=False)


def decode_and_transform(batch: dict[str, np.ndarray], spec: PipelineSpec) -> dict[str, np.ndarray]:
    """Decode encoded images and apply the train or eval pipeline up to (not including) the
    normalisation: uint8 NCHW out (a Ray Data batch function).

    Ingest has already checked that every stored image decodes, so an error here is a real fault
    and is raised with the image id rather than skipped.
    """
    transform = _transform(spec)
    out = []
    for image_id, data in zip(batch["image_id"], batch["image"]):
        try:
            img = decode_image(bytes(data))
        except ValueError as e:
            raise ValueError(f"image {image_id}: {e}") from None
        out.append(transform(image=img)["image"])
    return {
        "image": to_chw_batch(out),
        "label": np.asarray(batch["label"], dtype=np.int64),
    }


def resample(batch: dict[str, np.ndarray], rates: Sequence[float]) -> dict[str, np.ndarray]:
    """Repeat or drop rows so each class reaches its per-epoch target in expectation.

    Uses a fresh random generator per call, so every pass over the dataset (every epoch) draws a
    new plan, as the augmentation does.
    """
    counts = repeat_counts(np.asarray(batch["label"]), np.asarray(rates), np.random.default_rng())
    idx = np.repeat(np.arange(len(counts)), counts)
    return {k: v[idx] for k, v in batch.items()}


def read_split(path: str | Path, split: str, *, num_cpus: float = DATA_TASK_CPUS):
    """The rows of one split: ``image_id``, encoded ``image`` and ``label``."""
    import ray  # lazy: ray is heavy
    from ray.data.expressions import col, lit

    manifest = Manifest.load(path)
    if split not in manifest.class_counts:
        raise ValueError(f"split {split!r} not in {path} (splits: {', '.join(manifest.class_counts)})")
    fs, shards = manifest.shard_files(path)  # a folder or a URI (s3://, gs://): pyarrow's filesystems
    ds = ray.data.read_parquet(shards, filesystem=fs, num_cpus=num_cpus)
    ds = ds.filter(expr=col("split") == lit(split), num_cpus=num_cpus)
    return ds.select_columns(["image_id", "image", "label"], num_cpus=num_cpus)


def build_dataset(
    path: str | Path,
    split: str,
    preprocess: PreprocessSpec,
    *,
    train: bool,
    recipe: str = "light",
    keep_ids: Sequence[str] | None = None,
    rates: Sequence[float] | None = None,
    batch_size: int = 32,
    num_cpus: float = DATA_TASK_CPUS,
    cache_encoded: bool = False,
):
    """A Ray Dataset yielding ``{"image", "label"}`` for ``split``.

    A sampling plan (:func:`raykd.data.hardness.sampling_plan`) enters as ``keep_ids`` (a fixed
    subset: instance-hardness undersampling) and ``rates`` (per-class repeat rates, redrawn every
    pass: over/undersampling). ``cache_encoded`` reads the split's encoded rows into the object
    store once, so that every later pass (epoch) only decodes and augments: a streaming pass
    starts with listing and reading the Parquet files, seconds that a small epoch cannot hide.
    """
    from ray.data.expressions import col  # lazy: ray is heavy

    ds = read_split(path, split, num_cpus=num_cpus)
    if keep_ids is not None:
        ds = ds.filter(expr=col("image_id").is_in(list(keep_ids)), num_cpus=num_cpus)
    # Ray's Parquet reader bin-packs small shards into blocks of up to 128 MB: a 30 MB split became
    # one block, hence one decode task on one core (237 img/s on 2 cores against 290 for a plain
    # loop on one). Cutting the rows into small blocks lets every core decode (bench/data.py).
    ds = ds.repartition(target_num_rows_per_block=ROWS_PER_TASK_BATCHES * batch_size)
    if cache_encoded:
        ds = ds.materialize()
    if rates is not None:
        ds = ds.map_batches(resample, fn_kwargs={"rates": list(rates)}, batch_format="numpy", num_cpus=num_cpus)
    spec = PipelineSpec(preprocess=preprocess, train=train, recipe=recipe)
    return ds.map_batches(
        decode_and_transform,
        fn_kwargs={"spec": spec},
        batch_size=batch_size,
        batch_format="numpy",
        num_cpus=num_cpus,
    )
