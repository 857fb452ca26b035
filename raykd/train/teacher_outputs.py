"""Teacher knowledge computed once: the teacher's outputs on K augmented views of every training
image, saved and shared by every trial and every epoch of a search.

Without them every training step runs the teacher forward again: a search of N trials x E epochs
pays N x E teacher passes over the training split. Teacher outputs pay K: a Ray Data job (an actor
pool, GPUs where the cluster has them) runs the frozen teacher over K augmented views of every
training image and writes, per view, the seed that rebuilds it and the teacher's outputs the
methods read (logits, and the pooled embedding for relational methods) as Parquet beside the
dataset.

A view is the training transform with its random generator seeded by :func:`view_seed` (the
outputs' seed, the image id, the view index): a trial rebuilds exactly the pixels the teacher saw
(:class:`ViewMaker`), and the teacher's input is derived from them as in an online step (the
student's contract, then :class:`raykd.data.transforms.InputBridge`). Each epoch a trial draws one
saved view per image.

Teacher outputs are keyed by everything that determines them (:class:`OutputsKey`: the dataset's
manifest, the teacher's weights and contract, the augmentation recipe and the student contract the
views are made in, K, the seed, the outputs); a changed input makes other teacher outputs, and
reading teacher outputs whose key differs from the run's is refused, naming what differs.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from raykd.artifact.format import META_NAME, WEIGHTS_NAME, find_artifact, load_artifact
from raykd.cluster import init_local_ray
from raykd.data.manifest import Manifest, is_uri
from raykd.data.transforms import (
    InputBridge,
    PreprocessSpec,
    build_train_transform,
    decode_image,
    normalizer,
    to_chw_batch,
)
from raykd.models import features
from raykd.storage import Mirror

log = logging.getLogger(__name__)

__all__ = ["OUTPUTS_DIR", "OutputsKey", "StaleOutputsError", "TeacherOutputs", "ViewMaker", "build_outputs",
           "outputs_key", "view_seed"]

#: Teacher outputs live in the dataset folder, one subfolder per key fingerprint.
OUTPUTS_DIR = "teacher_outputs"
OUTPUTS_FILE = "outputs.json"
OUTPUTS = ("logits", "embedding")


class StaleOutputsError(ValueError):
    """Teacher outputs were asked for with a key other than the one they were built with."""


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _file_sha(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


@dataclass(frozen=True)
class OutputsKey:
    """Everything that determines the saved teacher outputs."""

    dataset: str  # sha256 of the dataset's manifest (its shards and splits)
    teacher: str  # sha256 of the teacher artifact's weights and metadata
    recipe: str  # the augmentation recipe
    view: dict = field(hash=False)  # the student contract the views are made in (PreprocessSpec.to_dict())
    views: int = 8  # K
    seed: int = 0
    outputs: tuple[str, ...] = OUTPUTS

    def fingerprint(self) -> str:
        return _sha(json.dumps(asdict(self), sort_keys=True, default=list).encode())[:16]

    def differences(self, other: OutputsKey) -> list[str]:
        """The fields that differ, as ``name: this != other``."""
        a, b = asdict(self), asdict(other)
        return [f"{k}: {json.dumps(a[k], default=list)} != {json.dumps(b[k], default=list)}" for k in a
                if json.dumps(a[k], sort_keys=True, default=list) != json.dumps(b[k], sort_keys=True, default=list)]


def outputs_key(data_path: str | Path, teacher_artifact: str | Path, recipe: str, view: PreprocessSpec, *,
                views: int, seed: int = 0) -> OutputsKey:
    """The key of the teacher outputs for these inputs (reads the manifest and the teacher's files)."""
    art = find_artifact(teacher_artifact)
    teacher = _sha((_file_sha(art / WEIGHTS_NAME) + _file_sha(art / META_NAME)).encode())

    if is_uri(data_path):
        raise ValueError(f"teacher outputs: they are written beside the dataset, and {data_path} is a bucket URI; "
                         "use a dataset folder every node mounts, or leave search.teacher_output_views unset")
    dataset = _file_sha(Path(data_path) / "manifest.json")
    return OutputsKey(dataset=dataset, teacher=teacher, recipe=recipe, view=view.to_dict(), views=int(views),
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
        if mirror is not None:  # outputs in a bucket: this node may not have the teacher yet
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


def outputs_path(data_path: str | Path, key: OutputsKey) -> Path:
    return Path(data_path) / OUTPUTS_DIR / key.fingerprint()


def build_outputs(data_path: str | Path, teacher_artifact: str | Path, key: OutputsKey, *,
                  batch_size: int = 64, cpus_per_actor: float = 1.0, actors: int | None = None,
                  use_gpu: bool = False, mirror: tuple[str, str] | None = None) -> Path:
    """Build (or reuse) the teacher outputs of ``key``: a Ray Data job over the training split's shards
    (``mirror``: the ``(mirror_uri, mirror_dir)`` the teacher's run folder is mirrored with).

    Returns their folder; its ``outputs.json`` records the key, the number of images, views and
    teacher forward passes (images x K), the build seconds and the size on disk.
    """
    import ray  # lazy: ray is heavy
    from ray.data.expressions import col, lit

    out = outputs_path(data_path, key)
    if (out / OUTPUTS_FILE).is_file():
        TeacherOutputs.check(out, key)
        log.info("teacher outputs %s: reusing them", out)
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
        shutil.rmtree(tmp)
    outputs.write_parquet(str(tmp / "outputs"))
    rows = sum(pq_rows(p) for p in (tmp / "outputs").glob("*.parquet"))
    images = sum(manifest.counts("train"))
    size = sum(p.stat().st_size for p in (tmp / "outputs").glob("*.parquet"))
    record = {"key": asdict(key), "fingerprint": key.fingerprint(), "images": images, "views": key.views,
              "rows": rows, "teacher_forward_passes": rows, "build_s": time.perf_counter() - t0, "bytes": size,
              "dataset": str(Path(data_path).resolve()), "teacher_artifact": str(teacher_artifact)}
    (tmp / OUTPUTS_FILE).write_text(json.dumps(record, indent=2))
    os.replace(tmp, out)
    log.info("teacher outputs %s: %d teacher forward passes (%d images x %d views), %.1f s, %.1f MB", out, rows,
             images, key.views, record["build_s"], size / 1e6)
    return out


def pq_rows(path: Path) -> int:
    import pyarrow.parquet as pq  # lazy: pyarrow is heavy

    return pq.ParquetFile(path).metadata.num_rows


class TeacherOutputs:
    """Built teacher outputs, loaded for one training split (the rows of ``image_ids``, in that order).

    ``outputs(rows, views)`` gives the saved teacher outputs of image rows ``rows`` at views
    ``views`` as float32 tensors (``logits`` ``(B, C)``, ``embedding`` ``(B, D)``).
    """

    def __init__(self, path: str | Path, key: OutputsKey, image_ids: list[str]) -> None:
        import pyarrow.dataset as pads  # lazy: pyarrow is heavy

        self.path = Path(path)
        self.record = self.check(self.path, key)
        self.views = key.views
        table = pads.dataset(str(self.path / "outputs"), format="parquet").to_table()
        index = {image_id: i for i, image_id in enumerate(image_ids)}
        ids, view = table.column("image_id").to_pylist(), np.asarray(table.column("view").to_pylist())
        missing = set(image_ids) - set(ids)
        if missing:
            raise StaleOutputsError(f"teacher outputs {self.path} have none for {len(missing)} training images "
                                    f"(e.g. {sorted(missing)[:3]}): rebuild them")
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
    def check(path: Path, key: OutputsKey) -> dict:
        """The record of the teacher outputs at ``path``, after checking they were built for ``key``
        (else StaleOutputsError)."""
        record_file = Path(path) / OUTPUTS_FILE
        if not record_file.is_file():
            raise StaleOutputsError(f"{path} holds no teacher outputs (no {OUTPUTS_FILE}); build them with the "
                                    "search's stage 1 or raykd.train.teacher_outputs.build_outputs")
        record = json.loads(record_file.read_text())
        built = OutputsKey(**{**record["key"], "outputs": tuple(record["key"]["outputs"])})
        diff = key.differences(built)
        if diff:
            raise StaleOutputsError(f"teacher outputs {path} were built for other inputs; not reading them. Differs "
                                    "(this run != the teacher outputs): " + "; ".join(diff))
        return record

    def outputs(self, rows: np.ndarray, views: np.ndarray) -> dict[str, torch.Tensor]:
        return {name: torch.from_numpy(arr[rows, views].astype(np.float32)) for name, arr in self.arrays.items()}


def open_outputs(cfg, preprocess: PreprocessSpec, split) -> TeacherOutputs:
    """Load the run's teacher outputs (``distill.teacher_outputs``) for the training ``split`` (a
    :class:`raykd.data.memory.MemorySplit`), checked against the run's own inputs, and attach them."""
    path = Path(cfg.distill.teacher_outputs)
    if not (path / OUTPUTS_FILE).is_file():
        raise StaleOutputsError(f"distill.teacher_outputs {path} holds no teacher outputs (no {OUTPUTS_FILE})")
    if cfg.teacher is None or not cfg.teacher.checkpoint:
        raise ValueError("distill.teacher_outputs needs the teacher as a saved artifact (teacher.checkpoint)")
    built = json.loads((path / OUTPUTS_FILE).read_text())["key"]
    key = outputs_key(cfg.data.path, cfg.teacher.checkpoint, cfg.train.recipe, preprocess, views=built["views"],
                      seed=built["seed"])
    outputs = TeacherOutputs(path, key, split.ids)
    split.attach_outputs(outputs, ViewMaker(preprocess, key.recipe, key.seed))
    log.info("teacher outputs read from %s (%d views per image): no teacher forward pass in training",
             path, key.views)
    return outputs
