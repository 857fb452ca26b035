"""A method's teacher prep (:class:`raykd.distill.base.TeacherPrep`): run once per teacher, before
any run distils from it, as a Ray Train run (``TorchTrainer``, DDP over ``scaling.num_workers``
workers with the run's CPUs or GPUs), never on the driver.

Each worker streams its own disjoint share of the training split's Parquet shards batch by batch
(:class:`ShardBatches` with its rank: one record batch decoded at a time, every epoch), so no
split is ever decoded whole, and every rank steps the same number of times. Its output is written
atomically to a safetensors file and reused when it is already there, so a resumed run or search
never trains it twice. ``raykd train`` runs it into the run folder; a search's stage 1 trains the
teachers and runs each method's teacher prep once per (teacher, prep, epochs), and every trial of
every method that needs it reads the file.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from raykd.cluster import cluster_capacity, init_local_ray
from raykd.config import RunConfig, from_dict, to_dict
from raykd.console import worker_logging
from raykd.data.manifest import Manifest
from raykd.data.transforms import PreprocessSpec, build_eval_transform, decode_image, to_chw_batch
from raykd.distill import METHODS
from raykd.distributed import world_size
from raykd.storage import Mirror, mirrored, run_reads, train_storage
from raykd.train.build import build_network, set_seed, teacher_prep_spec
from raykd.train.trainer import failure_config, fit_bounded, worker_resources

log = logging.getLogger(__name__)

__all__ = ["ShardBatches", "needs_teacher_prep", "prep_file_name", "prep_record", "prep_workers",
           "run_teacher_prep"]


class ShardBatches:
    """Re-iterable batches of one split's evaluation-transformed images, read from its Parquet
    shards one record batch at a time (normalised NCHW float tensors in ``spec``'s contract).

    With ``world`` > 1 this is rank ``rank``'s share: the split's rows in scan order (deterministic:
    the manifest's shard order, pyarrow's ordered scan) dealt out round-robin, row ``i`` to rank
    ``i % world``, so the ranks' shares are disjoint and together the whole split; a rank decodes
    only its own rows. Every rank yields the same number of batches, :attr:`steps`, worked out
    from the manifest's counts, because DDP blocks a rank that steps once more than the others:
    the shares differ by at most one row, and a rank whose extra row would open one more batch puts
    it into its last batch instead (which then holds up to ``batch_size + 1`` images). That holds
    whenever the split has at least ``world`` rows; below that some ranks have nothing to read.
    """

    def __init__(self, path: str | Path, split: str, spec: PreprocessSpec, batch_size: int = 32, *,
                 rank: int = 0, world: int = 1) -> None:
        import pyarrow.dataset as pads  # lazy: pyarrow is heavy

        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"ShardBatches: rank {rank} of world {world} is not a rank (0 <= rank < world)")
        self.path, self.split, self.batch_size = str(path), split, batch_size
        self.rank, self.world = rank, world
        self.transform = build_eval_transform(spec)
        manifest = Manifest.load(path)
        self._dataset = manifest.shard_dataset(path)
        self._filter = pads.field("split") == split
        #: Rows of the whole split, and of this rank's share.
        self.total_rows = sum(manifest.counts(split))
        self.rows = len(range(rank, self.total_rows, world))
        least = self.total_rows // world  # the smallest share
        #: Batches per pass, the same on every rank (while the split has >= world rows).
        self.steps = -(-least // batch_size) if least else min(self.rows, 1)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[torch.Tensor]:
        scanner = self._dataset.scanner(columns=["image"], filter=self._filter,
                                        batch_size=self.batch_size * self.world)
        pending: list = []
        emitted, seen = 0, 0  # batches yielded; rows of the split scanned so far (all ranks')
        for record_batch in scanner.to_batches():
            column = record_batch.column("image")
            for j in range((self.rank - seen) % self.world, len(column), self.world):
                pending.append(self.transform(image=decode_image(column[j].as_py()))["image"])
                if len(pending) == self.batch_size and emitted < self.steps - 1:
                    yield torch.from_numpy(to_chw_batch(pending))
                    emitted, pending = emitted + 1, []
            seen += len(column)
        if pending:
            yield torch.from_numpy(to_chw_batch(pending))


def needs_teacher_prep(cfg: RunConfig) -> bool:
    """Whether ``cfg``'s method has a teacher prep whose output the config does not name yet."""
    cls = METHODS.get(cfg.distill.method)
    return cls.teacher_prep is not None and cfg.teacher is not None and not cfg.distill.teacher_prep_file


def prep_file_name(cfg: RunConfig) -> str:
    """The output's name: the prep and its epochs (a changed epoch count is another output)."""
    return f"{METHODS.get(cfg.distill.method).teacher_prep.name}-e{cfg.distill.prep_epochs}"


def _train_prep(cfg: RunConfig, out: Path, *, rank: int = 0, world: int = 1, device: torch.device | None = None,
                 prepare: Callable[[nn.Module], nn.Module] | None = None,
                 reduce: Callable[[float], float] | None = None,
                 gather: Callable[[Any], list[Any]] | None = None) -> dict[str, Any]:
    """One rank of the prep: build the teacher, stream this rank's share of the shards, train,
    and (rank 0) save. Returns the run's record (rows and batches per rank, world size), which
    rank 0 also writes into the file's safetensors metadata. ``gather`` collects one object from
    every rank (default: this rank's alone)."""
    set_seed(cfg.train.seed)  # the same teacher and initial head on every rank
    manifest = Manifest.load(cfg.data.path)
    teacher = build_network(cfg.teacher, manifest.num_classes)
    if device is not None:
        teacher.to(device)  # the prep trains where its teacher is
    spec = teacher_prep_spec(cfg, teacher)
    prep = METHODS.get(cfg.distill.method).teacher_prep()
    train = ShardBatches(cfg.data.path, "train", spec, cfg.train.batch_size, rank=rank, world=world)
    val = ShardBatches(cfg.data.path, "val", spec, cfg.train.eval_batch_size, rank=rank, world=world)
    # Decided from the whole split, not this rank's share, so every rank validates (and reduces) alike.
    state = prep.train(teacher, train, val if val.total_rows else None, epochs=cfg.distill.prep_epochs,
                        prepare=prepare, reduce=reduce)
    mine = {"rank": rank, "rows": train.rows, "batches": train.steps}
    shares = sorted(gather(mine) if gather is not None else [mine], key=lambda s: s["rank"])
    record = {"prep": prep.name, "epochs": cfg.distill.prep_epochs, "world_size": world,
              "rows_per_rank": [s["rows"] for s in shares], "batches_per_rank": [s["batches"] for s in shares],
              "file": str(out)}
    if rank == 0:
        _save_atomically(state, out, record)
    return record


def _save_atomically(state: dict[str, torch.Tensor], out: Path, record: dict[str, Any]) -> None:
    """``state`` as safetensors at ``out`` (a temporary file renamed over it: a reader never sees
    half a file), with ``record`` as JSON values in the file's metadata (how it was made)."""
    from safetensors.torch import save_file  # lazy: safetensors is heavy

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    save_file({k: v.detach().cpu().contiguous() for k, v in state.items()}, str(tmp),
              metadata={k: json.dumps(v) for k, v in record.items()})
    os.replace(tmp, out)


def prep_record(path: str | Path) -> dict[str, Any]:
    """How a saved prep output was made (:func:`_train_prep`'s record: world size, training rows
    and batches per rank, epochs), from the safetensors metadata; empty for a file without one."""
    from safetensors import safe_open  # lazy: safetensors is heavy

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    return {k: json.loads(v) for k, v in meta.items()}


def _prep_task(cfg_dict: dict, out_file: str) -> str:
    """The prep in this process, as one rank of one: build, stream the shards, train, save."""
    cfg = from_dict(RunConfig, cfg_dict, where="teacher prep")
    out = Path(out_file)
    _train_prep(cfg, out)
    return str(out)


def _prep_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker function: this rank's share of the training rows, the head wrapped for
    DDP by ``prepare_model`` (gloo on CPU), losses averaged over ranks with ``all_reduce``."""
    import ray.train  # lazy: ray is heavy
    import ray.train.torch

    worker_logging()
    cfg = from_dict(RunConfig, config["run"], where="teacher prep")
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    torch.set_num_threads(max(1, math.ceil(cfg.scaling.cpus_per_worker)))
    out = Path(config["out"])
    with mirrored(Mirror.of(cfg), own=out.parent if rank == 0 else None, reads=run_reads(cfg), push=rank == 0):
        return _train_prep(cfg, out, rank=rank, world=world, device=device,
                            prepare=ray.train.torch.prepare_model, reduce=_mean_over_ranks(device),
                            gather=_gather_over_ranks)


def _mean_over_ranks(device: torch.device) -> Callable[[float], float]:
    """``reduce`` for :meth:`TeacherPrep.train`: the mean of a float over the process group (the
    identity without one). The tensor lives on ``device``: NCCL reduces only CUDA tensors."""
    import torch.distributed as dist  # lazy: torch is heavy

    def reduce(value: float) -> float:
        if world_size() == 1:
            return value
        t = torch.tensor([value], dtype=torch.float64, device=device)
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        return float(t.item()) / dist.get_world_size()

    return reduce


def _gather_over_ranks(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (the identity list without a process group)."""
    import torch.distributed as dist  # lazy: torch is heavy

    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def prep_workers(cfg: RunConfig, capacity: dict[str, float]) -> int:
    """How many Ray Train workers the prep gets: ``scaling.num_workers`` (at least 1), capped at
    what ``capacity`` (the cluster's CPUs/GPUs) can host at ``scaling.cpus_per_worker`` /
    ``gpus_per_worker`` each, so that a config sized for a bigger cluster still runs here (the
    prep is short; fewer workers only make it slower). The workers read Parquet with pyarrow
    themselves, so they need no CPU left over for a Ray Data pipeline.

    Raises:
        ValueError: when not even one worker fits, naming the keys to change.
    """
    sc = cfg.scaling
    want = max(1, sc.num_workers)
    fits = want
    if sc.cpus_per_worker > 0:
        fits = min(fits, math.floor(capacity.get("CPU", 0.0) / sc.cpus_per_worker + 1e-9))
    if sc.use_gpu and sc.gpus_per_worker > 0:
        fits = min(fits, math.floor(capacity.get("GPU", 0.0) / sc.gpus_per_worker + 1e-9))
    if fits < 1:
        raise ValueError(
            f"teacher prep: one worker needs {sc.cpus_per_worker:g} CPU"
            + (f" and {sc.gpus_per_worker:g} GPU" if sc.use_gpu else "")
            + f" (scaling.cpus_per_worker / scaling.gpus_per_worker), the cluster has {capacity.get('CPU', 0.0):g}"
            f" CPU and {capacity.get('GPU', 0.0):g} GPU: lower them, or set scaling.use_gpu=false")
    if fits < want:
        log.warning("teacher prep: the cluster hosts %d of the %d workers asked for (scaling.num_workers) at "
                    "%g CPU each: running with %d", fits, want, sc.cpus_per_worker, fits)
    return fits


def run_teacher_prep(cfg: RunConfig, out_file: str | Path) -> RunConfig:
    """Run ``cfg``'s teacher prep into ``out_file`` (reused when it exists) as a Ray Train run;
    returns ``cfg`` naming the file in ``distill.teacher_prep_file``.

    The run is a ``TorchTrainer`` with ``scaling.num_workers`` workers (at least 1, capped by
    :func:`prep_workers`), each streaming its own disjoint share of the training split's Parquet
    shards (:class:`ShardBatches` with its rank), the trainable part wrapped for DDP so gradients
    are averaged, the losses averaged over ranks so early stopping decides alike everywhere; rank
    0 writes the file. Nothing is decoded on the driver. The Train run's own folder is
    ``<out_file's folder>/_train/<stem>``.

    Failures: the prep keeps no checkpoint (it is short next to the runs that read it), so a worker
    group that Ray Train restarts (``train.max_failures`` times) trains it again from the start; a
    group that cannot get its resources within ``train.resource_wait_s`` fails with an error naming
    them (never a silent wait).
    """
    import ray  # lazy: ray is heavy
    import ray.train
    from ray.train.torch import TorchTrainer

    out = Path(out_file).resolve()
    name = METHODS.get(cfg.distill.method).teacher_prep.name
    mirror = Mirror.of(cfg)
    if mirror is not None:  # outputs in a bucket: the prep may have been trained by an earlier job
        mirror.pull(out)
    if out.is_file():
        log.info("teacher prep %s: reusing %s", name, out)
        return replace(cfg, distill=replace(cfg.distill, teacher_prep_file=str(out)))
    init_local_ray(cfg.address)
    workers = prep_workers(cfg, cluster_capacity())
    rows = sum(Manifest.load(cfg.data.path).counts("train"))
    if rows < workers:
        raise ValueError(f"teacher prep {name}: the training split of {cfg.data.path} has {rows} rows, fewer "
                         f"than the {workers} workers (scaling.num_workers): every rank needs rows to step with")
    resources = worker_resources(cfg)
    log.info("teacher prep %s: training it for %d epochs on the teacher %s with %d worker(s)", name,
             cfg.distill.prep_epochs, cfg.teacher.checkpoint or cfg.teacher.name, workers)
    trainer = TorchTrainer(
        _prep_worker,
        train_loop_config={"run": to_dict(cfg), "out": str(out)},
        scaling_config=ray.train.ScalingConfig(num_workers=workers, use_gpu=cfg.scaling.use_gpu,
                                               resources_per_worker=resources),
        run_config=ray.train.RunConfig(
            name=out.stem, **train_storage(mirror, out.parent / "_train"),
            failure_config=failure_config(cfg),
        ),
    )
    result = fit_bounded(trainer, cfg)
    if mirror is not None:  # rank 0 wrote it on its node and pushed it
        mirror.pull(out)
    if not out.is_file():  # rank 0 wrote it on its node: without shared storage the driver cannot see it
        raise FileNotFoundError(f"teacher prep {name}: the run finished but {out} is not on this machine; "
                                "multi-node clusters need the output folder on storage every node shares")
    record = result.return_value or {}
    log.info("teacher prep %s: saved %s (%d worker(s), training rows per rank %s)", name, out,
             record.get("world_size", workers), record.get("rows_per_rank"))
    return replace(cfg, distill=replace(cfg.distill, teacher_prep_file=str(out)))
