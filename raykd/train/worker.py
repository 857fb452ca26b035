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
import csv
import json
import logging
import math
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from raykd.config import RunConfig, from_dict
from raykd.data.manifest import Manifest
from raykd.metrics import ClassificationMetrics, is_better, metric_mode, write_report
from raykd.train.checkpoint import load_state, rng_state, save_state, set_rng_state
from raykd.train.loop import build_run, device_batches, evaluate, set_seed, student_identity, train_epoch
from raykd.train.optim import Schedule, build_optimizer, head_parameter_names

log = logging.getLogger(__name__)

CRASH_MARKER = ".crash_injected"


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


def _write_history(run_dir: Path, history: list[dict[str, float]]) -> None:
    (run_dir / "metrics.json").write_text(json.dumps(history, indent=2))
    keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
    with (run_dir / "metrics.csv").open("w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=keys)
        w.writeheader()
        w.writerows(history)


class Session(abc.ABC):
    """Where a run's loop gets its data and sends its epochs: a Ray Train worker group
    (:class:`TrainSession`) or one process (:class:`LocalSession`). The loop itself
    (:func:`fit`) is the same for both."""

    rank: int = 0
    world: int = 1
    device: torch.device = torch.device("cpu")

    def prepare(self, method: torch.nn.Module) -> torch.nn.Module:
        return method.to(self.device)

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

        shard = ray.train.get_dataset_shard(split if train else f"{split}_{self.rank}")
        if train:  # drop_last: a trailing batch of one breaks BatchNorm; equal shards keep ranks in step
            return shard.iter_torch_batches(batch_size=batch_size, local_shuffle_buffer_size=self.shuffle,
                                            drop_last=True)
        return shard.iter_torch_batches(batch_size=batch_size)


class LocalSession(Session):
    """The whole run in this process on data held in memory (:mod:`raykd.data.memory`): no worker
    group to start, no pipeline per epoch. Checkpoints go to ``run_dir/checkpoint`` (atomic), and
    ``on_report`` (a Tune trial's ``tune.report``) gets every epoch's metrics."""

    CHECKPOINT = "checkpoint"

    def __init__(self, cfg: RunConfig, run_dir: Path, preprocess, *, on_report=None) -> None:
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

    def restore(self):
        path = self.run_dir / self.CHECKPOINT
        return load_state(path) if (path / "state.pt").is_file() else None

    def report(self, metrics, state):
        save_state(self.run_dir / self.CHECKPOINT, state)
        if self.on_report is not None:
            self.on_report(metrics)

    def batches(self, split, *, epoch, batch_size, train):
        return self.splits[split].batches(batch_size, epoch=epoch, drop_last=train)


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    """The Ray Train worker function: rebuild the typed config and run :func:`fit` on this rank."""
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # it logs every report's full metrics
    cfg: RunConfig = from_dict(RunConfig, config["run"], where="run config")
    session = TrainSession(cfg)
    set_seed(cfg.train.seed + session.rank)
    torch.set_num_threads(max(1, int(os.environ.get("RAYKD_TORCH_THREADS", "1"))))
    manifest = Manifest.load(cfg.data.path)
    t0 = time.perf_counter()
    parts = build_run(cfg, manifest, stage_dir=config["run_dir"])
    return fit(cfg, Path(config["run_dir"]), manifest, parts, session,
               timing={"build_s": time.perf_counter() - t0})


def fit(cfg: RunConfig, run_dir: Path, manifest: Manifest, parts, session: Session, *,
        timing: dict[str, float] | None = None) -> dict[str, Any]:
    """Train ``parts.method`` for ``cfg.train.epochs`` (or until early stopping), keep the best
    epoch's student in ``run_dir/best``, score the test split once with it.

    Returns rank 0's summary: best value and epoch, epochs run, test metrics and ``timing``, the
    seconds spent in each phase (training steps, evaluation, reporting and checkpoints, test).
    """
    rank, world, device = session.rank, session.world, session.device
    amp = cfg.train.amp and device.type == "cuda"
    method = parts.method
    head = {f"student.{n}" for n in head_parameter_names(parts.student)}
    frozen_ids = {id(p) for n, p in method.named_parameters() if n not in head}
    model = session.prepare(method)
    train_rows = sum(manifest.counts("train"))
    steps_per_epoch = max(1, math.ceil(train_rows / max(world, 1) / cfg.train.batch_size))
    optimizer = build_optimizer(method.trainable_parameters(), cfg.optim)
    select = cfg.train.select_metric
    schedule = Schedule(optimizer, cfg.optim, epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch,
                        metric_mode=metric_mode(select))
    timing = {"build_s": 0.0, "train_s": 0.0, "eval_s": 0.0, "report_s": 0.0, "test_s": 0.0, **(timing or {})}

    start_epoch, best, best_epoch, history, stale = 0, None, None, [], 0
    state = session.restore()
    if state is not None:
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, best, best_epoch = state["epoch"], state["best"], state["best_epoch"]
        history, stale = state["history"], state["stale"]
        set_rng_state(state["rng"])
        if rank == 0:
            log.info("resuming %s from epoch %d (best %s=%s)", cfg.name, start_epoch, select, best)

    def stream(split: str, epoch: int, train: bool):  # uint8 batches, normalised on the device
        size = cfg.train.batch_size if train else cfg.train.eval_batch_size
        return device_batches(session.batches(split, epoch=epoch, batch_size=size, train=train),
                              parts.preprocess, device)

    def maybe_crash(step: int) -> None:  # fault injection for tests: a hard worker death
        marker = run_dir / CRASH_MARKER
        if rank == 0 and step == 1 and cfg.train.crash_in_epoch == epoch + 1 and not marker.exists():
            marker.write_text("crashed once")
            os._exit(1)

    for epoch in range(start_epoch, cfg.train.epochs):
        method.set_epoch(epoch)
        stats = train_epoch(
            model, stream("train", epoch, True), optimizer, schedule, epoch=epoch,
            method_name=cfg.distill.method, device=device, amp=amp,
            frozen=frozen_ids if epoch < cfg.optim.freeze_epochs else None,
            grad_clip=cfg.optim.grad_clip, on_step=maybe_crash,
        )
        timing["train_s"] += stats["train/seconds"]
        method.eval()
        t_val = time.perf_counter()
        val, cm = _score(method, stream("val", epoch, False), manifest, device, amp)
        val_seconds = time.perf_counter() - t_val
        timing["eval_s"] += val_seconds
        t_report = time.perf_counter()
        row = {"epoch": epoch + 1, **stats, **{f"val/{k}": v for k, v in val.items()}, "val/seconds": val_seconds}
        value = row.get(f"val/{select}", row.get(select))
        if value is None:
            raise KeyError(f"train.select_metric {select!r} is not a metric; choose one of {sorted(val)}")
        improved = is_better(select, value, best)
        if improved:
            best, best_epoch, stale = value, epoch + 1, 0
        else:
            stale += 1
        schedule.after_epoch(value)
        history.append(row)
        if rank == 0:
            run_dir.mkdir(parents=True, exist_ok=True)
            _write_history(run_dir, history)
            if improved:
                _save_best(run_dir, parts, manifest, cfg, val)
                write_report(run_dir, cm, manifest.label_names, val, prefix="val",
                             title=f"{cfg.name} val, epoch {epoch + 1}")
            log.info("epoch %d/%d  loss %.4f  val %s %.4f  (best %.4f @ %d)  train %.0f img/s, %.1f s  val %.1f s",
                     epoch + 1, cfg.train.epochs, stats.get("train/loss", math.nan), select, value, best,
                     best_epoch, stats["train/images_per_s"], stats["train/seconds"], val_seconds)
        state = {
            "model": method.state_dict(), "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict(),
            "epoch": epoch + 1, "best": best, "best_epoch": best_epoch, "history": history, "stale": stale,
            "rng": rng_state(),
        }
        session.report({**row, "best": best, "best_epoch": best_epoch}, state)
        timing["report_s"] += time.perf_counter() - t_report
        if cfg.optim.early_stop_patience is not None and stale >= cfg.optim.early_stop_patience:
            if rank == 0:
                log.info("early stop: %s has not improved for %d epochs", select, stale)
            break

    # The test split, once, with the best model.
    t_test = time.perf_counter()
    best_state = _load_best_weights(run_dir, parts.student, device, world)
    method.eval()
    test, cm = _score(method, stream("test", 0, False), manifest, device, amp)
    if rank == 0:
        write_report(run_dir, cm, manifest.label_names, test, prefix="test", title=f"{cfg.name} test (best epoch)")
    timing["test_s"] = time.perf_counter() - t_test
    return {"best": best, "best_epoch": best_epoch, "epochs": len(history), "test": test,
            "best_model_loaded": best_state, "timing": timing}


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
        dataset=str(Path(cfg.data.path).resolve()),
    )
    save_artifact(run_dir / "best", parts.student, meta)


def _load_best_weights(run_dir: Path, student, device, world: int) -> bool:
    """Every rank loads the best weights rank 0 wrote to the run folder (on a multi-node cluster
    the run folder must be on shared storage, like Ray Train's own ``storage_path``)."""
    from safetensors.torch import load_model

    path = run_dir / "best" / "model.safetensors"
    ok = path.is_file()
    if world > 1:
        flag = torch.tensor([1 if ok else 0], device=device)
        dist.all_reduce(flag, op=dist.ReduceOp.MIN)
        ok = bool(flag.item())
    if not ok:
        return False
    load_model(student, str(path), device=str(device))  # handles tied weights save_model de-duplicated
    return True
