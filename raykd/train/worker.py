"""The two places a run's loop (:func:`raykd.train.loop.fit`) runs: one DDP rank of a Ray Train
worker group (:func:`train_loop_per_worker`, :class:`TrainSession`) or one process holding a small
dataset in memory (:class:`LocalSession`, chosen by the driver for single-worker runs on small data).

Every rank trains on its shard of the training split, evaluates its own slice of the validation
split and gathers predictions so that all ranks score the whole split identically; rank 0 writes
the run folder (metrics, best model, reports). The resolved config travels as a plain dict and is
rebuilt into the typed :class:`raykd.config.RunConfig` here.
"""

from __future__ import annotations

import itertools
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raykd.artifact.rundir import RunDir
from raykd.config import RunConfig, from_dict
from raykd.console import worker_logging
from raykd.data.hardness import sampling_plan
from raykd.data.manifest import Manifest
from raykd.data.memory import MemorySplit
from raykd.distributed import world_size
from raykd.storage import Mirror, mirrored, run_reads
from raykd.train.build import build_run, set_seed
from raykd.train.checkpoint import has_state, load_state, save_state
from raykd.train.feed import Feed
from raykd.train.loop import Session, fit
from raykd.train.teacher_outputs import open_outputs
from raykd.train.trainer import starved_data


class TrainSession(Session):
    """One rank of a Ray Train ``TorchTrainer``: shards from ``get_dataset_shard``, checkpoints
    through ``ray.train.report``."""

    def __init__(self, cfg: RunConfig) -> None:
        import ray.train  # lazy: ray is heavy
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.shuffle = cfg.train.shuffle_buffer or None
        # The driver cut val/test into num_workers slices; an elastic group running with fewer
        # workers deals them out round-robin, so every row is still scored once.
        self.eval_slices = [k for k in range(max(1, cfg.scaling.num_workers)) if k % self.world == self.rank]
        self.cpus_per_worker, self.stall_s = cfg.scaling.cpus_per_worker, cfg.train.stall_timeout_s
        self.nodes: list[str] = []  # each rank's node, known once placement() ran

    def placement(self) -> dict[str, Any] | None:
        """Every rank's node (rank 0 gets the list; the others None): logged at each group start."""
        import ray  # lazy: ray is heavy

        node = ray.get_runtime_context().get_node_id()
        nodes = [node]
        if world_size() > 1:
            nodes = [None] * self.world
            dist.all_gather_object(nodes, node)
        self.nodes = nodes
        return {"world_size": self.world, "nodes": nodes} if self.rank == 0 else None

    def prepare(self, method):
        import ray.train.torch  # lazy: ray is heavy

        return ray.train.torch.prepare_model(
            method, parallel_strategy_kwargs={"find_unused_parameters": method.ddp_find_unused_parameters})

    def restore(self):
        import ray.train  # lazy: ray is heavy

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_state(d)

    def report(self, metrics, state):
        import ray.train  # lazy: ray is heavy

        with tempfile.TemporaryDirectory() as tmp:
            if self.rank == 0:
                save_state(tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None)

    def batches(self, split, *, epoch, batch_size, train):
        import ray.train  # lazy: ray is heavy

        if train:  # drop_last: a trailing batch of one breaks BatchNorm; equal shards keep ranks in step
            shard = ray.train.get_dataset_shard(split)
            batches = shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=self.shuffle,
                                               drop_last=True)
        else:
            batches = itertools.chain.from_iterable(
                ray.train.get_dataset_shard(f"{split}_{k}").iter_torch_batches(batch_size=batch_size)
                for k in self.eval_slices)
        return Feed(batches, stall_s=self.stall_s, what=f"{split} batch on rank {self.rank} in epoch {epoch + 1}",
                    diagnose=lambda: starved_data(self.nodes, self.cpus_per_worker) if self.nodes else None)


class LocalSession(Session):
    """The whole run in this process on data held in memory (:mod:`raykd.data.memory`): no worker
    group to start, no pipeline per epoch. Checkpoints go to ``run_dir/checkpoint`` (atomic), and
    ``on_report`` (a Tune trial's ``tune.report``) gets every epoch's metrics."""

    def __init__(self, cfg: RunConfig, run_dir: Path, preprocess, *, on_report=None, method=None) -> None:
        use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.run_dir, self.on_report = Path(run_dir), on_report
        self.stall_s = cfg.train.stall_timeout_s
        s = cfg.data.sampling
        keep_ids, rates = sampling_plan(cfg.data.path, s.strategy, target=s.target_count, seed=s.seed)
        self.splits = {
            "train": MemorySplit(cfg.data.path, "train", preprocess, train=True, recipe=cfg.train.recipe,
                                 keep_ids=keep_ids, rates=rates, seed=cfg.train.seed),
            "val": MemorySplit(cfg.data.path, "val", preprocess, train=False),
            "test": MemorySplit(cfg.data.path, "test", preprocess, train=False),
        }
        self.teacher = _teacher_mode(cfg, method)
        if self.teacher == "saved":
            open_outputs(cfg, preprocess, self.splits["train"])

    def restore(self):
        path = RunDir(self.run_dir).checkpoint_dir
        return load_state(path) if has_state(path) else None

    def report(self, metrics, state):
        save_state(RunDir(self.run_dir).checkpoint_dir, state)
        if self.on_report is not None:
            self.on_report(metrics)

    def batches(self, split, *, epoch, batch_size, train):
        # decoded and augmented on a thread while the step runs (each epoch's augmentations are
        # seeded by (seed, epoch), so the batches are the same as decoded inline)
        return Feed(self.splits[split].batches(batch_size, epoch=epoch, drop_last=train), stall_s=self.stall_s,
                    what=f"{split} batch in epoch {epoch + 1}")


def _teacher_mode(cfg: RunConfig, method) -> str:
    """Where a run's teacher outputs come from: ``none`` (no teacher), ``saved`` (teacher outputs
    the method can read: ``distill.teacher_outputs`` and :meth:`Method.saved_outputs`), ``online``."""
    if method is None or method.teacher is None:
        return "none"
    if cfg.distill.teacher_outputs and method.saved_outputs() is not None:
        return "saved"
    return "online"


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker function: rebuild the typed config and run :func:`fit` on this rank."""
    worker_logging()
    cfg: RunConfig = from_dict(RunConfig, config["run"], where="run config")
    session = TrainSession(cfg)
    set_seed(cfg.train.seed + session.rank)
    torch.set_num_threads(max(1, int(os.environ.get("RAYKD_TORCH_THREADS", "1"))))
    # with outputs in a bucket: every rank reads the teacher here, rank 0 writes the run folder
    with mirrored(Mirror.of(cfg), own=config["run_dir"], reads=run_reads(cfg), push=session.rank == 0):
        manifest = Manifest.load(cfg.data.path)
        t0 = time.perf_counter()
        parts = build_run(cfg, manifest)
        set_seed(cfg.train.seed + session.rank)  # the same stream after the build, whatever the method built
        return fit(cfg, Path(config["run_dir"]), manifest, parts, session,
                   timing={"build_s": time.perf_counter() - t0})
