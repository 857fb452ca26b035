"""Write the procedural ISIC-2019-like dataset (:mod:`raykd.data.synthetic`) as raykd shards."""

from __future__ import annotations

from pathlib import Path

from raykd.data.manifest import Manifest
from raykd.data.schema import ISIC2019_CLASSES, ISIC2019_MALIGNANT
from raykd.data.synthetic import synth_items
from raykd.data.writer import write_dataset


def make_synthetic(
    out: str | Path,
    *,
    num_images: int = 2000,
    image_size: int = 128,
    seed: int = 0,
    atypical: float | None = None,
    fractions: dict[str, float] | None = None,
    split_seed: int = 42,
    shard_mb: float = 64.0,
    overwrite: bool = False,
) -> Manifest:
    """Generate ``num_images`` images and write them like ``ingest`` does."""
    kw = {} if atypical is None else {"atypical": atypical}
    items = synth_items(num_images, image_size=image_size, seed=seed, **kw)
    return write_dataset(
        items,
        out,
        source="synthetic",
        label_names=ISIC2019_CLASSES,
        malignant=ISIC2019_MALIGNANT,
        fractions=fractions or {"train": 0.7, "val": 0.15, "test": 0.15},
        split_seed=split_seed,
        shard_mb=shard_mb,
        source_dir=f"synthetic(seed={seed}, size={image_size}" + ("" if atypical is None else f", atypical={atypical}") + ")",
        overwrite=overwrite,
    )
