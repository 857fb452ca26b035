"""Teacher knowledge computed once: a store of teacher outputs on K augmented views of every
training image, shared by every trial and every epoch of a search.

Without it every training step runs the teacher forward again: a search of N trials x E epochs
pays N x E teacher passes over the training split. The store pays K: a Ray Data job (an actor
pool, GPUs where the cluster has them) runs the frozen teacher over K augmented views of every
training image and writes, per view, the seed that rebuilds it and the teacher's outputs the
methods read (logits, and the pooled embedding for relational methods) as Parquet beside the
dataset.

A view is the training transform with its random generator seeded by :func:`view_seed` (the
store's seed, the image id, the view index): a trial rebuilds exactly the pixels the teacher saw
(:class:`ViewMaker`), and the teacher's input is derived from them as in an online step (the
student's contract, then :class:`raykd.data.transforms.InputBridge`). Each epoch a trial draws one
stored view per image.

The store is keyed by everything that determines its contents (:class:`StoreKey`: the dataset's
manifest, the teacher's weights and contract, the augmentation recipe and the student contract the
views are made in, K, the seed, the outputs); a changed input makes another store, and reading a
store whose key differs from the run's is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raykd.data.manifest import Manifest
from raykd.data.transforms import PreprocessSpec, build_train_transform

log = logging.getLogger(__name__)

__all__ = ["STORE_DIR", "StaleStoreError", "StoreKey", "TeacherStore", "ViewMaker", "build_store", "store_key",
           "view_seed"]

#: Stores live in the dataset folder, one subfolder per key fingerprint.
STORE_DIR = "teacher_store"
STORE_FILE = "store.json"
OUTPUTS = ("logits", "embedding")


class StaleStoreError(ValueError):
    """A store was asked for with a key other than the one it was built with."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class StoreKey:
    """Everything that determines a store's contents."""

    dataset: str  # sha256 of the dataset's manifest (its shards and splits)
    teacher: str  # sha256 of the teacher artifact's weights and metadata
    recipe: str  # the augmentation recipe
    view: dict = field(hash=False)  # the student contract the views are made in (PreprocessSpec.to_dict())
    views: int = 8  # K
    seed: int = 0
    outputs: tuple[str, ...] = OUTPUTS

    def fingerprint(self) -> str:
        return _sha(json.dumps(asdict(self), sort_keys=True, default=list).encode())[:16]

    def differences(self, other: StoreKey) -> list[str]:
        """The fields that differ, as ``name: this != other``."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {json.dumps(a[k], default=list)} != {json.dumps(b[k], default=list)}" for k in a
                if json.dumps(a[k], sort_keys=True, default=list) != json.dumps(b[k], sort_keys=True, default=list)]


def store_key(data_path: str | Path, teacher_artifact: str | Path, recipe: str, view: PreprocessSpec, *,
              views: int, seed: int = 0) -> StoreKey:
    """The key of the store for these inputs (reads the manifest and the teacher's files)."""
    from raykd.artifact import META_NAME, WEIGHTS_NAME, find_artifact

    art = find_artifact(teacher_artifact)
    teacher = _sha((_file_sha(art / WEIGHTS_NAME) + _file_sha(art / META_NAME)).encode())
    from raykd.data.manifest import is_uri

    if is_uri(data_path):
        raise ValueError(f"teacher store: it is written beside the dataset, and {data_path} is an object-store URI; "
                         "use a dataset folder every node mounts, or leave search.teacher_store_views unset")
    dataset = _file_sha(Path(data_path) / "manifest.json")
    return StoreKey(dataset=dataset, teacher=teacher, recipe=recipe, view=view.to_dict(), views=int(views),
                    seed=int(seed))


def view_seed(seed: int, image_id: str, view: int) -> int:
    """The random seed of view ``view`` of image ``image_id`` (stable across processes and runs)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{image_id}:{view}".encode(), digest_size=4).digest(), "little") \
        & 0x7FFFFFFF


class ViewMaker:
    """Rebuilds view ``v`` of an image: the training transform (uint8 out) seeded by :func:`view_seed`."""

    def __init__(self, spec: PreprocessSpec, recipe: str, seed: int) -> None:
        self.transform = build_train_transform(spec, recipe, seed=0, normalize=False)
        self.seed = seed

    def __call__(self, image: np.ndarray, image_id: str, view: int) -> np.ndarray:
        self.transform.set_random_seed(view_seed(self.seed, image_id, view))
        return self.transform(image=image)["image"]


class _TeacherViews:
    """The Ray Data actor: the teacher, loaded once, over K views of each batch of images."""

    def __init__(self, teacher_artifact: str, view: dict, recipe: str, views: int, seed: int, threads: int,
                 mirror: tuple[str, str] | None = None) -> None:
        from raykd.artifact import load_artifact
        from raykd.data.transforms import InputBridge, normalizer
        from raykd.storage import Mirror

        if mirror is not None:  # outputs in a store: this node may not have the teacher yet
            Mirror.get(*mirror).pull(teacher_artifact)
        torch.set_num_threads(max(1, threads))
        self.device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.teacher, meta = load_artifact(teacher_artifact, device=str(self.device))
        self.teacher.eval()
        spec = PreprocessSpec.from_dict(view)
        t_spec = PreprocessSpec.from_dict(meta.preprocess)
        self.bridge = InputBridge(spec, t_spec).to(self.device) if InputBridge.needed(spec, t_spec) else None
        self.normalize = normalizer(spec, self.device)
        self.maker = ViewMaker(spec, recipe, seed)
        self.views = views

    @torch.no_grad()
    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        from raykd.data.transforms import decode_image, to_chw_batch
        from raykd.models import features

        ids = [str(i) for i in batch["image_id"]]
        decoded = [decode_image(bytes(b)) for b in batch["image"]]
        rows: dict[str, list] = {"image_id": [], "view": [], "logits": [], "embedding": []}
        for v in range(self.views):
            x = torch.from_numpy(to_chw_batch([self.maker(im, i, v) for im, i in zip(decoded, ids)])).to(self.device)
            x = self.normalize(x)
            f = features(self.teacher, self.bridge(x) if self.bridge is not None else x)
            rows["image_id"] += ids
            rows["view"] += [v] * len(ids)
            rows["logits"] += [r.tobytes() for r in f.logits.float().cpu().numpy().astype(np.float16)]
            rows["embedding"] += [r.tobytes() for r in f.embedding.float().cpu().numpy().astype(np.float16)]
        return {k: np.asarray(v, dtype=object if k in ("logits", "embedding", "image_id") else np.int64)
                for k, v in rows.items()}


def store_path(data_path: str | Path, key: StoreKey) -> Path:
    return Path(data_path) / STORE_DIR / key.fingerprint()


def build_store(data_path: str | Path, teacher_artifact: str | Path, key: StoreKey, *, batch_size: int = 64,
                cpus_per_actor: float = 1.0, actors: int | None = None, use_gpu: bool = False,
                mirror: tuple[str, str] | None = None) -> Path:
    """Build (or reuse) the store of ``key``: a Ray Data job over the training split's shards
    (``mirror``: the ``(mirror_uri, mirror_dir)`` the teacher's run folder is mirrored with).

    Returns the store folder; its ``store.json`` records the key, the number of images, views and
    teacher forward passes (images x K), the build seconds and the size on disk.
    """
    import ray
    from ray.data.expressions import col, lit

    from raykd.cluster import init_local_ray

    out = store_path(data_path, key)
    if (out / STORE_FILE).is_file():
        TeacherStore.check(out, key)
        log.info("teacher store %s: reusing it", out)
        return out
    init_local_ray()
    t0 = time.perf_counter()
    manifest = Manifest.load(data_path)
    fs, shards = manifest.shard_files(data_path)
    ds = ray.data.read_parquet(shards, filesystem=fs, columns=["image_id", "image", "split"], num_cpus=0.25)
    ds = ds.filter(expr=col("split") == lit("train"), num_cpus=0.25).drop_columns(["split"])
    if use_gpu:
        n_actors = actors or max(1, int(ray.cluster_resources().get("GPU", 1)))
    else:  # a CPU stays free for the file listing and reads: actors holding every CPU would starve them
        n_actors = actors or max(1, int((ray.cluster_resources().get("CPU", 1) - 1) // cpus_per_actor))
    resources = {"num_gpus": 1} if use_gpu else {"num_cpus": cpus_per_actor}
    outputs = ds.map_batches(
        _TeacherViews, batch_size=batch_size, batch_format="numpy", compute=ray.data.ActorPoolStrategy(size=n_actors),
        fn_constructor_kwargs={"teacher_artifact": str(teacher_artifact), "view": key.view, "recipe": key.recipe,
                               "views": key.views, "seed": key.seed, "threads": max(1, int(cpus_per_actor)),
                               "mirror": mirror},
        **resources)
    tmp = out.with_name(out.name + ".tmp")
    if tmp.exists():
        import shutil

        shutil.rmtree(tmp)
    outputs.write_parquet(str(tmp / "outputs"))
    rows = sum(pq_rows(p) for p in (tmp / "outputs").glob("*.parquet"))
    images = sum(manifest.counts("train"))
    size = sum(p.stat().st_size for p in (tmp / "outputs").glob("*.parquet"))
    record = {"key": asdict(key), "fingerprint": key.fingerprint(), "images": images, "views": key.views,
              "rows": rows, "teacher_forward_passes": rows, "build_s": time.perf_counter() - t0, "bytes": size,
              "dataset": str(Path(data_path).resolve()), "teacher_artifact": str(teacher_artifact)}
    (tmp / STORE_FILE).write_text(json.dumps(record, indent=2))
    os.replace(tmp, out)
    log.info("teacher store %s: %d teacher forward passes (%d images x %d views), %.1f s, %.1f MB", out, rows,
             images, key.views, record["build_s"], size / 1e6)
    return out


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq

    return pq.ParquetFile(path).metadata.num_rows


class TeacherStore:
    """A built store, loaded for one training split (the rows of ``image_ids``, in that order).

    ``outputs(rows, views)`` gives the stored teacher outputs of image rows ``rows`` at views
    ``views`` as float32 tensors (``logits`` ``(B, C)``, ``embedding`` ``(B, D)``).
    """

    def __init__(self, path: str | Path, key: StoreKey, image_ids: list[str]) -> None:
        import pyarrow.dataset as pads

        self.path = Path(path)
        self.record = self.check(self.path, key)
        self.views = key.views
        table = pads.dataset(str(self.path / "outputs"), format="parquet").to_table()
        index = {image_id: i for i, image_id in enumerate(image_ids)}
        ids, view = table.column("image_id").to_pylist(), np.asarray(table.column("view").to_pylist())
        missing = set(image_ids) - set(ids)
        if missing:
            raise StaleStoreError(f"teacher store {self.path} has no outputs for {len(missing)} training images "
                                  f"(e.g. {sorted(missing)[:3]}): rebuild it")
        self.arrays = {}
        for name in OUTPUTS:
            blobs = table.column(name).to_pylist()
            width = len(blobs[0]) // 2
            arr = np.zeros((len(image_ids), self.views, width), dtype=np.float16)
            for image_id, v, blob in zip(ids, view, blobs):
                row = index.get(image_id)
                if row is not None:
                    arr[row, v] = np.frombuffer(blob, dtype=np.float16)
            self.arrays[name] = arr

    @staticmethod
    def check(path: Path, key: StoreKey) -> dict:
        """The store's record, after checking it was built for ``key`` (else StaleStoreError)."""
        record_file = Path(path) / STORE_FILE
        if not record_file.is_file():
            raise StaleStoreError(f"{path} is not a teacher store (no {STORE_FILE}); build it with the search's "
                                  "stage 1 or raykd.train.store.build_store")
        record = json.loads(record_file.read_text())
        built = StoreKey(**{**record["key"], "outputs": tuple(record["key"]["outputs"])})
        diff = key.differences(built)
        if diff:
            raise StaleStoreError(f"teacher store {path} was built for other inputs; not reading it. Differs "
                                  "(this run != the store): " + "; ".join(diff))
        return record

    def outputs(self, rows: np.ndarray, views: np.ndarray) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(arr[rows, views].astype(np.float32)) for name, arr in self.arrays.items()}


def open_store(cfg, preprocess: PreprocessSpec, split) -> TeacherStore:
    """Load the run's teacher store (``distill.teacher_store``) for the training ``split`` (a
    :class:`raykd.data.memory.MemorySplit`), checked against the run's own inputs, and attach it."""
    path = Path(cfg.distill.teacher_store)
    if not (path / STORE_FILE).is_file():
        raise StaleStoreError(f"distill.teacher_store {path} is not a teacher store (no {STORE_FILE})")
    if cfg.teacher is None or not cfg.teacher.checkpoint:
        raise ValueError("distill.teacher_store needs the teacher as a saved artifact (teacher.checkpoint)")
    built = json.loads((path / STORE_FILE).read_text())["key"]
    key = store_key(cfg.data.path, cfg.teacher.checkpoint, cfg.train.recipe, preprocess, views=built["views"],
                    seed=built["seed"])
    store = TeacherStore(path, key, split.ids)
    split.attach_store(store, ViewMaker(preprocess, key.recipe, key.seed))
    log.info("teacher outputs from the store %s (%d views per image): no teacher forward pass in training",
             path, key.views)
    return store
