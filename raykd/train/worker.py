"""The training loop of a run (:func:`fit`) and the two places it runs: one DDP rank of a Ray Train
worker group (:func:`train_loop_per_worker`, :class:`TrainSession`) or one process holding a small
dataset in memory (:class:`LocalSession`, chosen by the driver for single-worker runs on small data).

Every rank trains on its shard of the training split, evaluates its own slice of the validation
split and gathers predictions so that all ranks score the whole split identically; rank 0 writes
the run folder (metrics, best model, reports). The resolved config travels as a plain dict and is
rebuilt into the typed :class:`raykd.config.RunConfig` here.
"""

from __future__ import annotations

import abc
import itertools
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raykd.artifact.rundir import RunDir
from raykd.config import RunConfig, from_dict
from raykd.data.manifest import Manifest, resolve_location
from raykd.metrics import ClassificationMetrics, is_better, metric_mode, write_report
from raykd.storage import Mirror, mirrored, run_reads
from raykd.train.checkpoint import has_state, load_state, rng_state, save_state, set_rng_state
from raykd.train.loop import build_run, device_batches, evaluate, set_seed, student_identity, train_epoch
from raykd.train.optim import Schedule, build_optimizer, head_parameter_names

log = logging.getLogger(__name__)

def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if not (dist.is_available() and dist.is_initialized()):
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _sync_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats drift apart: each rank updates them
    in its own forward passes), so all ranks evaluate the very model rank 0 saves."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for b in module.buffers():
            dist.broadcast(b, src=0)


def _score(method, batches, manifest: Manifest, device, amp: bool) -> tuple[dict[str, float], Any]:
    _sync_buffers(method)
    metrics = ClassificationMetrics(manifest.num_classes, manifest.label_names, manifest.malignant)
    nll, n = evaluate(method.predict, batches, metrics, device, amp)
    nll, n = _all_reduce_sum([nll, float(n)], device)
    scores = metrics.compute()  # collective: gathers every rank's predictions
    scores["loss"] = nll / n if n else math.nan
    scores["images"] = n
    return scores, metrics.confusion_matrix()


class Session(abc.ABC):
    """Where a run's loop gets its data and sends its epochs: a Ray Train worker group
    (:class:`TrainSession`) or one process (:class:`LocalSession`). The loop itself
    (:func:`fit`) is the same for both."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def prepare(self, method: torch.nn.Module) -> torch.nn.Module:
        return method.to(self.device)

    def placement(self) -> dict[str, Any] | None:
        """The worker group's size and each rank's node, on rank 0 (None: one process, not recorded)."""
        return None

    @abc.abstractmethod
    def restore(self) -> dict[str, Any] | None:
        """The last checkpoint's state, or None for a fresh run."""

    @abc.abstractmethod
    def report(self, metrics: dict[str, Any], state: dict[str, Any]) -> None:
        """Checkpoint ``state`` and publish the epoch's ``metrics``."""

    @abc.abstractmethod
    def batches(self, split: str, *, epoch: int, batch_size: int, train: bool) -> Any:
        """uint8 ``{"image", "label"}`` batches of ``split`` (this rank's share)."""


class TrainSession(Session):
    """One rank of a Ray Train ``TorchTrainer``: shards from ``get_dataset_shard``, checkpoints
    through ``ray.train.report``."""

    def __init__(self, cfg: RunConfig) -> None:
        import ray.train
        import ray.train.torch

        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        self.device = ray.train.torch.get_device()
        self.shuffle = cfg.train.shuffle_buffer or None
        # The driver cut val/test into num_workers slices; an elastic group running with fewer
        # workers deals them out round-robin, so every row is still scored once.
        self.eval_slices = [k for k in range(max(1, cfg.scaling.num_workers)) if k % self.world == self.rank]

    def placement(self) -> dict[str, Any] | None:
        """Every rank's node (rank 0 gets the list; the others None): logged at each group start."""
        import ray

        node = ray.get_runtime_context().get_node_id()
        nodes = [node]
        if dist.is_available() and dist.is_initialized() and self.world > 1:
            nodes = [None] * self.world
            dist.all_gather_object(nodes, node)
        return {"world_size": self.world, "nodes": nodes} if self.rank == 0 else None

    def prepare(self, method):
        import ray.train.torch

        return ray.train.torch.prepare_model(
            method, parallel_strategy_kwargs={"find_unused_parameters": method.ddp_find_unused_parameters})

    def restore(self):
        import ray.train

        checkpoint = ray.train.get_checkpoint()
        if checkpoint is None:
            return None
        with checkpoint.as_directory() as d:
            return load_state(d)

    def report(self, metrics, state):
        import ray.train

        with tempfile.TemporaryDirectory() as tmp:
            if self.rank == 0:
                save_state(tmp, state)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp) if self.rank == 0 else None)

    def batches(self, split, *, epoch, batch_size, train):
        import ray.train

        if train:  # drop_last: a trailing batch of one breaks BatchNorm; equal shards keep ranks in step
            shard = ray.train.get_dataset_shard(split)
            return shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=self.shuffle,
                                            drop_last=True)
        return itertools.chain.from_iterable(
            ray.train.get_dataset_shard(f"{split}_{k}").iter_torch_batches(batch_size=batch_size)
            for k in self.eval_slices)


class LocalSession(Session):
    """The whole run in this process on data held in memory (:mod:`raykd.data.memory`): no worker
    group to start, no pipeline per epoch. Checkpoints go to ``run_dir/checkpoint`` (atomic), and
    ``on_report`` (a Tune trial's ``tune.report``) gets every epoch's metrics."""

    def __init__(self, cfg: RunConfig, run_dir: Path, preprocess, *, on_report=None, method=None) -> None:
        from raykd.data.hardness import sampling_plan
        from raykd.data.memory import MemorySplit

        use_gpu = cfg.scaling.use_gpu and torch.cuda.is_available()
        self.device = torch.device("cuda" if use_gpu else "cpu")
        self.run_dir, self.on_report = Path(run_dir), on_report
        s = cfg.data.sampling
        keep_ids, rates = sampling_plan(cfg.data.path, s.strategy, target=s.target_count, seed=s.seed)
        self.splits = {
            "train": MemorySplit(cfg.data.path, "train", preprocess, train=True, recipe=cfg.train.recipe,
                                 keep_ids=keep_ids, rates=rates, seed=cfg.train.seed),
            "val": MemorySplit(cfg.data.path, "val", preprocess, train=False),
            "test": MemorySplit(cfg.data.path, "test", preprocess, train=False),
        }
        self.teacher = _teacher_mode(cfg, method)
        if self.teacher == "store":
            from raykd.train.store import open_store

            open_store(cfg, preprocess, self.splits["train"])

    def restore(self):
        path = RunDir(self.run_dir).checkpoint_dir
        return load_state(path) if has_state(path) else None

    def report(self, metrics, state):
        save_state(RunDir(self.run_dir).checkpoint_dir, state)
        if self.on_report is not None:
            self.on_report(metrics)

    def batches(self, split, *, epoch, batch_size, train):
        return self.splits[split].batches(batch_size, epoch=epoch, drop_last=train)


def _teacher_mode(cfg: RunConfig, method) -> str:
    """Where a run's teacher outputs come from: ``none`` (no teacher), ``store`` (a teacher store
    the method can read: ``distill.teacher_store`` and :meth:`Method.stored_outputs`), ``online``."""
    if method is None or method.teacher is None:
        return "none"
    if cfg.distill.teacher_store and method.stored_outputs() is not None:
        return "store"
    return "online"


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker function: rebuild the typed config and run :func:`fit` on this rank."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # it logs every report's full metrics
    cfg: RunConfig = from_dict(RunConfig, config["run"], where="run config")
    session = TrainSession(cfg)
    set_seed(cfg.train.seed + session.rank)
    torch.set_num_threads(max(1, int(os.environ.get("RAYKD_TORCH_THREADS", "1"))))
    # with outputs in a store: every rank reads the teacher here, rank 0 writes the run folder
    with mirrored(Mirror.of(cfg), own=config["run_dir"], reads=run_reads(cfg), push=session.rank == 0):
        manifest = Manifest.load(cfg.data.path)
        t0 = time.perf_counter()
        parts = build_run(cfg, manifest)
        set_seed(cfg.train.seed + session.rank)  # the same stream after the build, whatever the method built
        return fit(cfg, Path(config["run_dir"]), manifest, parts, session,
                   timing={"build_s": time.perf_counter() - t0})


def fit(cfg: RunConfig, run_dir: Path, manifest: Manifest, parts, session: Session, *,
        timing: dict[str, float] | None = None) -> dict[str, Any]:
    """Train ``parts.method`` for ``cfg.train.epochs`` (or until early stopping), keep the best
    epoch's student in ``run_dir/best``, score the test split once with it.

    Returns rank 0's summary: best value and epoch, epochs run, test metrics and ``timing``, the
    seconds spent in each phase (training steps, evaluation, reporting and checkpoints, test).
    """
    loop = _Loop(cfg, RunDir(run_dir), manifest, parts, session, timing)
    for epoch in range(loop.restore(), cfg.train.epochs):
        if loop.epoch(epoch):
            break
    return {**loop.finish(), "teacher": getattr(session, "teacher", "none" if parts.teacher is None else "online")}


class _Loop:
    """The state of one run's loop (:func:`fit`): optimiser, schedule, best value, history."""

    def __init__(self, cfg: RunConfig, run_dir: RunDir, manifest: Manifest, parts, session: Session,
                 timing: dict[str, float] | None) -> None:
        self.cfg, self.run_dir, self.manifest, self.parts, self.session = cfg, run_dir, manifest, parts, session
        self.rank, self.world, self.device = session.rank, session.world, session.device
        self.amp = cfg.train.amp and self.device.type == "cuda"
        self.method = parts.method
        head = {f"student.{n}" for n in head_parameter_names(parts.student)}
        self.frozen_ids = {id(p) for n, p in self.method.named_parameters() if n not in head}
        self.model = session.prepare(self.method)
        train_rows = sum(manifest.counts("train"))
        steps_per_epoch = max(1, math.ceil(train_rows / max(self.world, 1) / cfg.train.batch_size))
        self.optimizer = build_optimizer(self.method.trainable_parameters(), cfg.optim)
        self.select = cfg.train.select_metric
        self.schedule = Schedule(self.optimizer, cfg.optim, epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch,
                                 metric_mode=metric_mode(self.select))
        self.timing = {"build_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "report_s": 0.0, "test_s": 0.0,
                       **(timing or {})}
        self.best, self.best_epoch, self.history, self.stale = None, None, [], 0

    def restore(self) -> int:
        """Continue from the session's last checkpoint; returns the first epoch to run."""
        self._record_placement()
        state = self.session.restore()
        if state is None:
            return 0
        self.method.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.schedule.load_state_dict(state["schedule"])
        self.best, self.best_epoch = state["best"], state["best_epoch"]
        self.history, self.stale = state["history"], state["stale"]
        set_rng_state(state["rng"])
        if self.rank == 0:
            log.info("resuming %s from epoch %d (best %s=%s)", self.cfg.name, state["epoch"], self.select, self.best)
        return state["epoch"]

    def _record_placement(self) -> None:
        """Log and keep (``workers.json``) where this start of the worker group runs: after a lost
        node the restarted group's size and nodes show what the run continued on."""
        placement = self.session.placement()
        if placement is None:
            return
        nodes = placement["nodes"]
        log.info("%s: %d worker(s); %s", self.cfg.name, placement["world_size"],
                 ", ".join(f"rank {r} on node {n[:8]}" for r, n in enumerate(nodes)))
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self.run_dir.append_workers({**placement, "time": time.time()})

    def stream(self, split: str, epoch: int, train: bool):
        """uint8 batches of ``split``, normalised on the device."""
        size = self.cfg.train.batch_size if train else self.cfg.train.eval_batch_size
        return device_batches(self.session.batches(split, epoch=epoch, batch_size=size, train=train),
                              self.parts.preprocess, self.device)

    def _crash_hook(self, epoch: int):
        """Fault injection for tests (``train.crash_in_epoch``): a hard worker death, once."""
        if self.rank != 0 or self.cfg.train.crash_in_epoch != epoch + 1:
            return None
        marker = self.run_dir.crash_marker

        def maybe_crash(step: int) -> None:
            if step == 1 and not marker.exists():
                marker.write_text("crashed once")
                os._exit(1)

        return maybe_crash

    def epoch(self, epoch: int) -> bool:
        """Train, validate, record and checkpoint one epoch; returns whether to stop early."""
        cfg = self.cfg
        self.method.set_epoch(epoch)
        stats = train_epoch(
            self.model, self.stream("train", epoch, True), self.optimizer, self.schedule, epoch=epoch,
            method_name=cfg.distill.method, device=self.device, amp=self.amp,
            frozen=self.frozen_ids if epoch < cfg.optim.freeze_epochs else None,
            grad_clip=cfg.optim.grad_clip, on_step=self._crash_hook(epoch),
        )
        self.timing["train_s"] += stats["train/seconds"]
        self.method.eval()
        t_val = time.perf_counter()
        val, cm = _score(self.method, self.stream("val", epoch, False), self.manifest, self.device, self.amp)
        val_seconds = time.perf_counter() - t_val
        self.timing["eval_s"] += val_seconds
        t_report = time.perf_counter()
        row = {"epoch": epoch + 1, **stats, **{f"val/{k}": v for k, v in val.items()}, "val/seconds": val_seconds,
               "world_size": self.world}
        self._record(epoch, row, val, cm)
        self.session.report({**row, "best": self.best, "best_epoch": self.best_epoch}, self._state(epoch))
        self.timing["report_s"] += time.perf_counter() - t_report
        patience = cfg.optim.early_stop_patience
        if patience is not None and self.stale >= patience:
            if self.rank == 0:
                log.info("early stop: %s has not improved for %d epochs", self.select, self.stale)
            return True
        return False

    def _record(self, epoch: int, row: dict[str, Any], val: dict[str, Any], cm) -> None:
        """Update the best value and the history; rank 0 writes metrics, best model and report."""
        value = row.get(f"val/{self.select}", row.get(self.select))
        if value is None:
            raise KeyError(f"train.select_metric {self.select!r} is not a metric; choose one of {sorted(val)}")
        improved = is_better(self.select, value, self.best)
        if improved:
            self.best, self.best_epoch, self.stale = value, epoch + 1, 0
        else:
            self.stale += 1
        self.schedule.after_epoch(value)
        self.history.append(row)
        if self.rank != 0:
            return
        self.run_dir.path.mkdir(parents=True, exist_ok=True)
        self.run_dir.write_metrics(self.history)
        if improved:
            _save_best(self.run_dir.path, self.parts, self.manifest, self.cfg, val)
            write_report(self.run_dir.path, cm, self.manifest.label_names, val, prefix="val",
                         title=f"{self.cfg.name} val, epoch {epoch + 1}")
        log.info("epoch %d/%d  loss %.4f  val %s %.4f  (best %.4f @ %d)  train %.0f img/s, %.1f s  val %.1f s",
                 epoch + 1, self.cfg.train.epochs, row.get("train/loss", math.nan), self.select, value, self.best,
                 self.best_epoch, row["train/images_per_s"], row["train/seconds"], row["val/seconds"])

    def _state(self, epoch: int) -> dict[str, Any]:
        return {
            "model": self.method.state_dict(), "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(), "epoch": epoch + 1, "best": self.best,
            "best_epoch": self.best_epoch, "history": self.history, "stale": self.stale, "rng": rng_state(),
        }

    def finish(self) -> dict[str, Any]:
        """Score the test split once, with the best epoch's weights; the run's summary."""
        t_test = time.perf_counter()
        loaded = _load_best_weights(self.run_dir.path, self.parts.student, self.device, self.world,
                                    mirror=Mirror.of(self.cfg))
        self.method.eval()
        test, cm = _score(self.method, self.stream("test", 0, False), self.manifest, self.device, self.amp)
        if self.rank == 0:
            write_report(self.run_dir.path, cm, self.manifest.label_names, test, prefix="test",
                         title=f"{self.cfg.name} test (best epoch)")
        self.timing["test_s"] = time.perf_counter() - t_test
        return {"best": self.best, "best_epoch": self.best_epoch, "epochs": len(self.history), "test": test,
                "best_model_loaded": loaded, "timing": self.timing}


def _save_best(run_dir: Path, parts, manifest: Manifest, cfg: RunConfig, val: dict[str, float]) -> None:
    from raykd.artifact import ArtifactMeta, save_artifact

    name, kwargs = student_identity(cfg)
    meta = ArtifactMeta(
        model_name=name,
        num_classes=manifest.num_classes,
        model_kwargs=kwargs,
        label_names=list(manifest.label_names),
        malignant=list(manifest.malignant),
        preprocess=parts.preprocess.to_dict(),
        version=cfg.name,
        metrics={k: float(v) for k, v in val.items() if isinstance(v, (int, float))},
        dataset=resolve_location(cfg.data.path),
    )
    save_artifact(RunDir(run_dir).best_dir, parts.student, meta)


def _load_best_weights(run_dir: Path, student, device, world: int, *, mirror=None) -> bool:
    """Every rank loads the best weights rank 0 wrote to the run folder: on a multi-node cluster
    the run folder is on shared storage, or mirrored from a store (rank 0 pushes the folder,
    the others pull it)."""
    from safetensors.torch import load_model

    best = RunDir(run_dir).best_dir
    if mirror is not None and world > 1:
        if dist.get_rank() == 0:
            mirror.push(best)
        dist.barrier()
        if dist.get_rank() != 0:
            mirror.pull(best)
    path = RunDir(run_dir).best_weights
    ok = path.is_file()
    if world > 1:
        flag = torch.tensor([1 if ok else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    if not ok:
        return False
    load_model(student, str(path), device=str(device))  # handles tied weights save_model de-duplicated
    return True
