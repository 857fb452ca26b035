"""The Ray-free training loop of a run: one epoch of training (:func:`train_epoch`), evaluation
(:func:`evaluate`), and the run's loop over its epochs (:func:`fit`: validation, the best epoch's
student, checkpoints, the test split) against a :class:`Session`, the interface to where it runs
(the Ray Train worker or one process: :mod:`raykd.train.worker`). The models and method come from
:mod:`raykd.train.build`; tests call these directly in milliseconds.
"""

from __future__ import annotations

import abc
import logging
import math
import os
import time
from collections.abc import Iterable, Iterator
from contextlib import nullcontext
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from raykd.artifact.format import ArtifactMeta, save_artifact
from raykd.artifact.rundir import RunDir
from raykd.config import RunConfig
from raykd.data.manifest import Manifest, resolve_location
from raykd.data.transforms import PreprocessSpec, normalizer
from raykd.distributed import world_size
from raykd.metrics.classification import ClassificationMetrics, is_better, metric_mode
from raykd.metrics.plots import write_report
from raykd.storage import Mirror
from raykd.train.build import student_identity
from raykd.train.checkpoint import rng_state, set_rng_state
from raykd.train.optim import Schedule, build_optimizer, head_parameter_names

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step, the method and every part."""


def autocast(device: torch.device, enabled: bool):
    """bf16 autocast on GPUs that support it (fp16 elsewhere); nothing on CPU."""
    if not enabled or device.type != "cuda":
        return nullcontext()
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.autocast("cuda", dtype=dtype)


def check_finite(loss: torch.Tensor, parts: dict[str, torch.Tensor], *, step: int, epoch: int, method: str) -> None:
    if torch.isfinite(loss).item():
        return
    detail = ", ".join(f"{k}={v.item():.4g}" for k, v in parts.items())
    raise NonFiniteLossError(
        f"non-finite loss {loss.item()} at epoch {epoch + 1}, step {step} of method {method!r} "
        f"(parts: {detail}); lower the learning rate or the loss weights, or enable grad_clip"
    )


def train_epoch(
    model: nn.Module,
    batches: Iterable[dict[str, torch.Tensor]],
    optimizer: torch.optim.Optimizer,
    schedule,
    *,
    epoch: int,
    method_name: str,
    device: torch.device,
    amp: bool = False,
    frozen: set[int] | None = None,
    grad_clip: float | None = None,
    on_step=None,
) -> dict[str, float]:
    """One pass over ``batches``; returns mean loss and parts, images seen and images/s.

    ``model`` is the method (possibly DDP-wrapped). ``frozen`` holds ids of parameters whose
    gradients are dropped (transfer-learning warm-up), which keeps DDP's bucket layout intact.
    """
    model.train()
    method = getattr(model, "module", model)
    scaler = torch.amp.GradScaler("cuda") if amp and device.type == "cuda" and not torch.cuda.is_bf16_supported() else None
    sums: dict[str, float] = {}
    seen, steps = 0, 0
    waited = [0.0]  # seconds spent waiting for the next batch
    t0 = time.perf_counter()
    for step, batch in enumerate(_timed(batches, waited)):
        images = batch["image"].to(device, non_blocking=True)
        targets = batch["label"].to(device, non_blocking=True)
        saved = batch.get("teacher")  # the saved teacher outputs on these images: no teacher pass
        with autocast(device, amp), (method.saved_teacher(saved) if saved is not None else nullcontext()):
            out = model(images, targets)
        check_finite(out.loss, out.parts, step=step, epoch=epoch, method=method_name)
        _backward_and_step(out.loss, optimizer, scaler, frozen=frozen, grad_clip=grad_clip)
        schedule.after_step()
        b = int(targets.shape[0])
        seen += b
        steps += 1
        sums["loss"] = sums.get("loss", 0.0) + out.loss.item() * b
        for k, v in out.parts.items():
            sums[k] = sums.get(k, 0.0) + v.item() * b
        if on_step is not None:
            on_step(step)
    elapsed = time.perf_counter() - t0
    stats = {f"train/{k}": v / max(seen, 1) for k, v in sums.items()}
    stats.update({"train/images": float(seen), "train/steps": float(steps),
                  "train/images_per_s": seen / elapsed if elapsed > 0 else math.nan, "train/seconds": elapsed,
                  "train/data_wait_s": waited[0], "train/data_wait_share": waited[0] / elapsed if elapsed > 0 else 0.0,
                  "lr": optimizer.param_groups[0]["lr"]})
    return stats


def _timed(batches: Iterable[Any], waited: list[float]) -> Iterator[Any]:
    """``batches``, adding the seconds each one took to arrive to ``waited[0]``."""
    it = iter(batches)
    while True:
        t = time.perf_counter()
        try:
            batch = next(it)
        except StopIteration:
            waited[0] += time.perf_counter() - t
            return
        waited[0] += time.perf_counter() - t
        yield batch


def _backward_and_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler, *,
                       frozen: set[int] | None, grad_clip: float | None) -> None:
    """Backward pass and one optimizer step of :func:`train_epoch`.

    Gradients of ``frozen`` parameters are dropped before the step; with a (fp16) ``scaler`` the
    gradients are unscaled before clipping, so ``grad_clip`` applies to the true norm.
    """
    optimizer.zero_grad(set_to_none=True)
    (scaler.scale(loss) if scaler else loss).backward()
    if frozen:
        for group in optimizer.param_groups:
            for p in group["params"]:
                if id(p) in frozen:
                    p.grad = None
    if scaler:
        scaler.unscale_(optimizer)
    if grad_clip:
        torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], grad_clip)
    if scaler:
        scaler.step(optimizer)
        scaler.update()
    else:
        optimizer.step()


def device_batches(batches: Iterable[dict[str, torch.Tensor]], spec: PreprocessSpec,
                   device: torch.device) -> Iterable[dict[str, torch.Tensor]]:
    """Ray Data's uint8 batches moved to ``device`` and normalised there (see raykd.data.dataset)."""
    normalize = normalizer(spec, device)
    for batch in batches:
        images = batch["image"].to(device, non_blocking=True)
        out = {"image": normalize(images), "label": batch["label"].to(device, non_blocking=True)}
        if "teacher" in batch:
            out["teacher"] = {k: v.to(device, non_blocking=True) for k, v in batch["teacher"].items()}
        yield out


@torch.no_grad()
def evaluate(predict_fn, batches: Iterable[dict[str, torch.Tensor]], metrics, device: torch.device,
             amp: bool = False) -> tuple[float, int]:
    """Feed every batch's logits to ``metrics`` (a ClassificationMetrics); returns this rank's
    summed cross-entropy and number of images, for the validation loss."""
    nll, n = 0.0, 0
    for batch in batches:
        with autocast(device, amp):
            logits = predict_fn(batch["image"].to(device, non_blocking=True)).float()
        targets = batch["label"].to(device).long()
        metrics.update(logits, targets)
        nll += torch.nn.functional.cross_entropy(logits, targets, reduction="sum").item()
        n += int(targets.shape[0])
    return nll, n


def _all_reduce_sum(values: list[float], device: torch.device) -> list[float]:
    if world_size() == 1:
        return values
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return t.tolist()


def _sync_buffers(module: torch.nn.Module) -> None:
    """Give every rank rank 0's buffers (BatchNorm running stats drift apart: each rank updates them
    in its own forward passes), so all ranks evaluate the very model rank 0 saves."""
    if world_size() > 1:
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
    (:class:`raykd.train.worker.TrainSession`) or one process
    (:class:`raykd.train.worker.LocalSession`). The loop itself (:func:`fit`) is the same for both."""

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
        self.timing = {"build_s": 0.0, "train_s": 0.0, "train_wait_s": 0.0, "eval_s": 0.0, "report_s": 0.0, "test_s": 0.0,
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
        self.timing["train_wait_s"] += stats["train/data_wait_s"]
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
        log.info("epoch %d/%d  loss %.4f  val %s %.4f  (best %.4f @ %d)  train %.0f img/s, %.1f s (data wait "
                 "%.0f %%)  val %.1f s", epoch + 1, self.cfg.train.epochs, row.get("train/loss", math.nan), self.select,
                 value, self.best, self.best_epoch, row["train/images_per_s"], row["train/seconds"],
                 100 * row["train/data_wait_share"], row["val/seconds"])

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
    the run folder is on shared storage, or mirrored from a bucket (rank 0 pushes the folder,
    the others pull it)."""
    from safetensors.torch import load_model  # lazy: safetensors is heavy

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
