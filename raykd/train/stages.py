"""Teacher-side stages (:class:`raykd.distill.base.TeacherStage`): run once per teacher, before any
run distils from it, as a Ray task with the run's CPUs (or GPU), never on the driver.

The stage streams the dataset's Parquet shards batch by batch (:class:`ShardBatches`: one record
batch decoded at a time, every epoch), so no split is ever decoded whole. Its output is written
atomically to a safetensors file and reused when it is already there, so a resumed run or search
never trains it twice. ``raykd train`` runs it into the run folder; a search runs it in its stage 1,
once per (teacher, stage, epochs), and every trial of every method that needs it reads the file.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import torch

from raykd.config import RunConfig, to_dict
from raykd.data.manifest import Manifest
from raykd.data.transforms import PreprocessSpec, build_eval_transform, decode_image, to_chw_batch

log = logging.getLogger(__name__)

__all__ = ["ShardBatches", "needs_teacher_stage", "run_teacher_stage", "stage_file_name"]


class ShardBatches:
    """Re-iterable batches of one split's evaluation-transformed images, read from its Parquet
    shards one record batch at a time (normalised NCHW float tensors in ``spec``'s contract)."""

    def __init__(self, path: str | Path, split: str, spec: PreprocessSpec, batch_size: int = 32) -> None:
        import pyarrow.dataset as pads

        self.path, self.split, self.batch_size = str(path), split, batch_size
        self.transform = build_eval_transform(spec)
        manifest = Manifest.load(path)
        self._dataset = pads.dataset(manifest.shard_paths(path), format="parquet")
        self._filter = pads.field("split") == split
        self.rows = sum(manifest.counts(split))

    def __len__(self) -> int:
        return -(-self.rows // self.batch_size)

    def __iter__(self) -> Iterator[torch.Tensor]:
        scanner = self._dataset.scanner(columns=["image"], filter=self._filter, batch_size=self.batch_size)
        pending: list = []
        for record_batch in scanner.to_batches():
            for blob in record_batch.column("image").to_pylist():
                pending.append(self.transform(image=decode_image(blob))["image"])
                if len(pending) == self.batch_size:
                    yield torch.from_numpy(to_chw_batch(pending))
                    pending = []
        if pending:
            yield torch.from_numpy(to_chw_batch(pending))


def needs_teacher_stage(cfg: RunConfig) -> bool:
    """Whether ``cfg``'s method has a teacher-side stage whose output the config does not name yet."""
    from raykd.distill import METHODS

    cls = METHODS.get(cfg.distill.method)
    return cls.teacher_stage is not None and cfg.teacher is not None and not cfg.distill.teacher_stage_file


def stage_file_name(cfg: RunConfig) -> str:
    """The output's name: the stage and its epochs (a changed epoch count is another output)."""
    from raykd.distill import METHODS

    return f"{METHODS.get(cfg.distill.method).teacher_stage.name}-e{cfg.distill.stage_epochs}"


def _stage_task(cfg_dict: dict, out_file: str) -> str:
    """The Ray task body: build the teacher, stream the shards, train the stage, save."""
    from safetensors.torch import save_file

    from raykd.config import from_dict
    from raykd.distill import METHODS
    from raykd.train.loop import build_model, set_seed, teacher_stage_spec

    cfg = from_dict(RunConfig, cfg_dict, where="teacher stage")
    set_seed(cfg.train.seed)
    manifest = Manifest.load(cfg.data.path)
    teacher = build_model(cfg.teacher, manifest.num_classes)
    spec = teacher_stage_spec(cfg, teacher)
    stage = METHODS.get(cfg.distill.method).teacher_stage()
    train = ShardBatches(cfg.data.path, "train", spec, cfg.train.batch_size)
    val = ShardBatches(cfg.data.path, "val", spec, cfg.train.eval_batch_size)
    state = stage.train(teacher, train, val if val.rows else None, epochs=cfg.distill.stage_epochs)
    out = Path(out_file)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp))
    os.replace(tmp, out)
    return str(out)


def run_teacher_stage(cfg: RunConfig, out_file: str | Path) -> RunConfig:
    """Run ``cfg``'s teacher stage into ``out_file`` (reused when it exists) on the Ray cluster;
    returns ``cfg`` naming the file in ``distill.teacher_stage_file``."""
    import ray

    from raykd.cluster import init_local_ray
    from raykd.distill import METHODS

    out = Path(out_file).resolve()
    name = METHODS.get(cfg.distill.method).teacher_stage.name
    if out.is_file():
        log.info("teacher stage %s: reusing %s", name, out)
    else:
        init_local_ray(cfg.address)
        resources = {"num_cpus": cfg.scaling.cpus_per_worker}
        if cfg.scaling.use_gpu:
            resources["num_gpus"] = cfg.scaling.gpus_per_worker
        log.info("teacher stage %s: training it for %d epochs on the teacher %s", name, cfg.distill.stage_epochs,
                 cfg.teacher.checkpoint or cfg.teacher.name)
        task = ray.remote(_stage_task).options(name=f"raykd-stage:{name}", max_retries=cfg.train.max_failures,
                                               **resources)
        ray.get(task.remote(to_dict(cfg), str(out)))
        log.info("teacher stage %s: saved %s", name, out)
    return replace(cfg, distill=replace(cfg.distill, teacher_stage_file=str(out)))
