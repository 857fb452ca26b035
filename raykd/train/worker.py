"""The Ray Train worker function: one DDP rank of a teacher or student run.

Every rank trains on its shard of the training split, evaluates its own slice of the validation
split and gathers predictions so that all ranks score the whole split identically; rank 0 writes
the run folder (metrics, best model, reports). The resolved config travels as a plain dict and is
rebuilt into the typed :class:`raykd.config.RunConfig` here.
"""

from __future__ import annotations

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


def train_loop_per_worker(config: dict[str, Any]) -> dict[str, Any]:
    import ray.train
    import ray.train.torch

    logging.getLogger("ray.train").setLevel(logging.WARNING)  # it logs every report's full metrics
    cfg: RunConfig = from_dict(RunConfig, config["run"], where="run config")
    run_dir = Path(config["run_dir"])
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    device = ray.train.torch.get_device()
    amp = cfg.train.amp and device.type == "cuda"
    set_seed(cfg.train.seed + rank)
    torch.set_num_threads(max(1, int(os.environ.get("RAYKD_TORCH_THREADS", "1"))))

    manifest = Manifest.load(cfg.data.path)
    parts = build_run(cfg, manifest, stage_dir=run_dir)
    method = parts.method
    head = {f"student.{n}" for n in head_parameter_names(parts.student)}
    frozen_ids = {id(p) for n, p in method.named_parameters() if n not in head}
    model = ray.train.torch.prepare_model(
        method, parallel_strategy_kwargs={"find_unused_parameters": method.ddp_find_unused_parameters}
    )

    train_rows = sum(manifest.counts("train"))
    steps_per_epoch = max(1, math.ceil(train_rows / max(world, 1) / cfg.train.batch_size))
    optimizer = build_optimizer(method.trainable_parameters(), cfg.optim)
    select = cfg.train.select_metric
    schedule = Schedule(optimizer, cfg.optim, epochs=cfg.train.epochs, steps_per_epoch=steps_per_epoch,
                        metric_mode=metric_mode(select))

    start_epoch, best, best_epoch, history, stale = 0, None, None, [], 0
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is not None:
        with checkpoint.as_directory() as d:
            state = load_state(d)
        method.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        start_epoch, best, best_epoch = state["epoch"], state["best"], state["best_epoch"]
        history, stale = state["history"], state["stale"]
        set_rng_state(state["rng"])
        if rank == 0:
            log.info("resuming %s from epoch %d (best %s=%s)", cfg.name, start_epoch, select, best)

    train_it = ray.train.get_dataset_shard("train")
    val_it = ray.train.get_dataset_shard(f"val_{rank}")
    # drop_last: a trailing batch of one breaks BatchNorm; shards are equal-sized, so all ranks agree.
    batches = dict(batch_size=cfg.train.batch_size, local_shuffle_buffer_size=cfg.train.shuffle_buffer or None,
                   drop_last=True)
    eval_batches = dict(batch_size=cfg.train.eval_batch_size)

    def stream(shard, **kwargs):  # uint8 batches from Ray Data, normalised on the device
        return device_batches(shard.iter_torch_batches(**kwargs), parts.preprocess, device)

    def maybe_crash(step: int) -> None:  # fault injection for tests: a hard worker death
        marker = run_dir / CRASH_MARKER
        if rank == 0 and step == 1 and cfg.train.crash_in_epoch == epoch + 1 and not marker.exists():
            marker.write_text("crashed once")
            os._exit(1)

    for epoch in range(start_epoch, cfg.train.epochs):
        method.set_epoch(epoch)
        stats = train_epoch(
            model, stream(train_it, **batches), optimizer, schedule, epoch=epoch,
            method_name=cfg.distill.method, device=device, amp=amp,
            frozen=frozen_ids if epoch < cfg.optim.freeze_epochs else None,
            grad_clip=cfg.optim.grad_clip, on_step=maybe_crash,
        )
        method.eval()
        t_val = time.perf_counter()
        val, cm = _score(method, stream(val_it, **eval_batches), manifest, device, amp)
        val_seconds = time.perf_counter() - t_val
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
        report = {**row, "best": best, "best_epoch": best_epoch}
        stop = cfg.optim.early_stop_patience is not None and stale >= cfg.optim.early_stop_patience
        with tempfile.TemporaryDirectory() as tmp:
            if rank == 0:
                save_state(tmp, state)
            ray.train.report(report, checkpoint=ray.train.Checkpoint.from_directory(tmp) if rank == 0 else None)
        if stop:
            if rank == 0:
                log.info("early stop: %s has not improved for %d epochs", select, stale)
            break

    # The test split, once, with the best model.
    best_state = _load_best_weights(run_dir, parts.student, device, world)
    method.eval()
    test_it = ray.train.get_dataset_shard(f"test_{rank}")
    test, cm = _score(method, stream(test_it, **eval_batches), manifest, device, amp)
    if rank == 0:
        write_report(run_dir, cm, manifest.label_names, test, prefix="test", title=f"{cfg.name} test (best epoch)")
    return {"best": best, "best_epoch": best_epoch, "epochs": len(history), "test": test,
            "best_model_loaded": best_state}


def _save_best(run_dir: Path, parts, manifest: Manifest, cfg: RunConfig, val: dict[str, float]) -> None:
    from raykd.export.artifact import ArtifactMeta, save_artifact

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
