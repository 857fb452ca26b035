"""A small dataset held in the training process: decoded once, augmented per epoch in place.

Ray Data earns its keep when a split is larger than one process can decode or hold. On a small
split (the embedded default, CI, a quick look at a new method) it is all fixed cost: on 2 cores
every epoch paid a streaming execution's start-up for well under a second of decoding, and a
single-worker trial spent about 95 % of its wall time on machinery. Here the Parquet rows of a
split are read with pyarrow and decoded once; every epoch then only applies the same
albumentations pipeline the Ray Data path applies (:func:`raykd.data.dataset.decode_and_transform`)
and yields the same ``{"image": uint8 NCHW, "label": int64}`` batches, so the training loop cannot
tell the two sources apart. Sampling plans (over/undersampling, instance hardness) enter as the
same ``keep_ids`` and per-class ``rates``.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from raykd.data.manifest import Manifest
from raykd.data.sampling import repeat_counts
from raykd.data.transforms import (
    PreprocessSpec,
    build_eval_transform,
    build_train_transform,
    decode_image,
    to_chw_batch,
)

__all__ = ["MemorySplit", "encoded_bytes", "read_rows"]


def encoded_bytes(path: str | Path) -> int:
    """Bytes of every shard of the dataset (all splits): what holding it in memory costs, encoded."""
    return Manifest.load(path).shard_bytes(path)


def read_rows(path: str | Path, split: str, keep_ids: Sequence[str] | None = None, *,
              with_ids: bool = False) -> tuple:
    """The encoded images and labels of ``split`` (and with ``with_ids`` their image ids), sorted
    by image id (a stable order)."""
    import pyarrow.dataset as pads  # lazy: pyarrow is heavy

    manifest = Manifest.load(path)
    if split not in manifest.class_counts:
        raise ValueError(f"split {split!r} not in {path} (splits: {', '.join(manifest.class_counts)})")
    table = manifest.shard_dataset(path).to_table(
        columns=["image_id", "image", "label"], filter=pads.field("split") == split).sort_by("image_id")
    ids = table.column("image_id").to_pylist()
    images, labels = table.column("image").to_pylist(), np.asarray(table.column("label").to_pylist(), np.int64)
    if keep_ids is not None:
        keep = set(keep_ids)
        rows = [i for i, image_id in enumerate(ids) if image_id in keep]
        images, labels, ids = [images[i] for i in rows], labels[rows], [ids[i] for i in rows]
    return (images, labels, ids) if with_ids else (images, labels)


class MemorySplit:
    """One split, decoded once. ``train=True`` re-augments every pass; eval passes are fixed and
    prepared once (resized with the eval pipeline, uint8 NCHW).

    Args:
        path: the dataset folder.
        split: ``train``, ``val`` or ``test``.
        spec: the student's preprocessing contract (size; normalisation happens on the device).
        train: augment with ``recipe`` every pass and shuffle.
        recipe: the augmentation recipe (:data:`raykd.data.transforms.RECIPES`).
        keep_ids, rates: a sampling plan (:func:`raykd.data.hardness.sampling_plan`).
        seed: seeds the shuffles, resampling and augmentation of pass ``epoch`` as ``(seed, epoch)``.
    """

    def __init__(self, path: str | Path, split: str, spec: PreprocessSpec, *, train: bool, recipe: str = "light",
                 keep_ids: Sequence[str] | None = None, rates: Sequence[float] | None = None, seed: int = 0) -> None:
        encoded, self.labels, self.ids = read_rows(path, split, keep_ids, with_ids=True)
        self.decoded = []
        for i, data in enumerate(encoded):
            try:
                self.decoded.append(decode_image(bytes(data)))
            except ValueError as e:
                raise ValueError(f"{path}: image {i} of split {split!r}: {e}") from None
        self.spec, self.train, self.recipe, self.seed = spec, train, recipe, seed
        self.rates = None if rates is None else np.asarray(rates, dtype=np.float64)
        self._fixed: np.ndarray | None = None
        self.teacher_outputs, self.view_maker = None, None
        if not train and self.decoded:
            tf = build_eval_transform(spec, normalize=False)
            self._fixed = to_chw_batch([tf(image=im)["image"] for im in self.decoded])

    def __len__(self) -> int:
        return len(self.labels)

    def attach_outputs(self, outputs, views) -> None:
        """Train from saved teacher outputs (``raykd.train.teacher_outputs.TeacherOutputs`` loaded for
        :attr:`ids`): each pass draws one saved view per image, rebuilds its pixels with ``views`` (a
        ``ViewMaker``) and adds the teacher's saved outputs on it to the batch (``"teacher"``)."""
        self.teacher_outputs, self.view_maker = outputs, views

    def batches(self, batch_size: int, *, epoch: int = 0, drop_last: bool = False) -> Iterator[dict[str, torch.Tensor]]:
        """The pass ``epoch`` over the split in batches of uint8 images and int64 labels."""
        if not self.train:
            for i in range(0, len(self), batch_size):
                yield {"image": torch.from_numpy(self._fixed[i:i + batch_size]),
                       "label": torch.from_numpy(self.labels[i:i + batch_size])}
            return
        rng = np.random.default_rng([self.seed, epoch])
        idx = np.arange(len(self))
        if self.rates is not None:
            idx = np.repeat(idx, repeat_counts(self.labels, self.rates, rng))
        idx = rng.permutation(idx)
        tf = build_train_transform(self.spec, self.recipe, seed=int(rng.integers(2**31)), normalize=False)
        saved = self.teacher_outputs
        view_of = rng.integers(saved.views, size=len(idx)) if saved is not None else None
        stop = len(idx) - (len(idx) % batch_size if drop_last else 0)
        for i in range(0, stop, batch_size):
            rows = idx[i:i + batch_size]
            if len(rows) == 0:
                break
            if saved is None:
                images = to_chw_batch([tf(image=self.decoded[r])["image"] for r in rows])
                yield {"image": torch.from_numpy(images), "label": torch.from_numpy(self.labels[rows])}
                continue
            v = view_of[i:i + batch_size]
            images = to_chw_batch([self.view_maker(self.decoded[r], self.ids[r], int(k)) for r, k in zip(rows, v)])
            yield {"image": torch.from_numpy(images), "label": torch.from_numpy(self.labels[rows]),
                   "teacher": saved.outputs(rows, v), "rows": torch.from_numpy(rows), "views": torch.from_numpy(v)}
