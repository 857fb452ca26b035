"""The Ray-free pieces of a training run: building the models and method, one epoch of training,
evaluation. The Ray Train worker (:mod:`raykd.train.worker`) strings them together; tests call
them directly in milliseconds.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Iterable
from contextlib import nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raykd.config import ModelConfig, RunConfig
from raykd.data.manifest import Manifest
from raykd.data.sampling import class_weights
from raykd.data.transforms import InputBridge, PreprocessSpec, normalizer, spec_from_model

log = logging.getLogger(__name__)


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN or infinite; the message names the step, the method and every part."""


def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_model(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A student or teacher: a trained raykd artifact when ``checkpoint`` is set, else timm."""
    if cfg.checkpoint:
        from raykd.artifact import load_artifact

        model, meta = load_artifact(cfg.checkpoint)
        if meta.num_classes != num_classes:
            raise ValueError(
                f"checkpoint {cfg.checkpoint} predicts {meta.num_classes} classes but the dataset has {num_classes}"
            )
        return model
    from raykd.models import create_model

    return create_model(cfg.name, num_classes=num_classes, pretrained_file=cfg.pretrained_file,
                        pretrained=cfg.pretrained and not cfg.pretrained_file, **cfg.kwargs)


def student_identity(cfg: RunConfig) -> tuple[str, dict]:
    """The timm name and kwargs that rebuild the student (for its saved artifact)."""
    from raykd.artifact import read_meta

    if cfg.student.cut_blocks:  # a cut ViT is the teacher's architecture with fewer blocks
        name, kwargs = (
            (read_meta(cfg.teacher.checkpoint).model_name, dict(read_meta(cfg.teacher.checkpoint).model_kwargs))
            if cfg.teacher.checkpoint else (cfg.teacher.name, dict(cfg.teacher.kwargs))
        )
        return name, {**kwargs, "depth": len(cfg.student.cut_blocks)}
    if cfg.student.checkpoint:
        meta = read_meta(cfg.student.checkpoint)
        return meta.model_name, dict(meta.model_kwargs)
    return cfg.student.name, dict(cfg.student.kwargs)


def model_spec(cfg: ModelConfig, model: nn.Module) -> PreprocessSpec:
    """The preprocessing contract a model was trained with: the one saved with a raykd artifact,
    else its timm ``pretrained_cfg`` (with the config's ``image_size`` when set)."""
    if cfg.checkpoint:
        from raykd.artifact import read_meta

        return PreprocessSpec.from_dict(read_meta(cfg.checkpoint).preprocess)
    return spec_from_model(model, **({"image_size": cfg.image_size} if cfg.image_size else {}))


@dataclass
class RunParts:
    method: nn.Module  # raykd.distill.base.Method
    student: nn.Module
    teacher: nn.Module | None
    preprocess: PreprocessSpec


def build_run(cfg: RunConfig, manifest: Manifest, *, probe: bool = False) -> RunParts:
    """Models and method of a run, on the CPU; builds only. Raises ValueError when the method does
    not fit.

    A method with a teacher-side stage (:attr:`raykd.distill.base.Method.teacher_stage`) gets its
    saved output from ``cfg.distill.teacher_stage_file`` (run it with
    :func:`raykd.train.stages.run_teacher_stage`); ``probe`` (the fit check before any stage ran)
    gives it an untrained output of the right shapes instead.
    """
    from raykd.distill import METHODS, build_method

    n = manifest.num_classes
    teacher = build_model(cfg.teacher, n) if cfg.teacher is not None else None
    if cfg.student.cut_blocks:
        if teacher is None:
            raise ValueError("student.cut_blocks needs a teacher ViT to cut the blocks from")
        from raykd.models import cut_vit

        student = cut_vit(teacher, keep_blocks=cfg.student.cut_blocks)
    else:
        # The student's initial weights depend on train.seed alone, not on whether (or which)
        # teacher was built before it: seed k of a baseline and of every method start alike.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            student = build_model(cfg.student, n)
    overrides = {"image_size": cfg.student.image_size} if cfg.student.image_size else {}
    spec = spec_from_model(student, crop_black_border=cfg.data.crop_black_border,
                           pipeline_004=cfg.data.pipeline_004, **overrides)
    weights = torch.as_tensor(class_weights(manifest.counts("train"), cfg.data.sampling.class_weights))
    input_size = (3, spec.image_size, spec.image_size)
    extra = {}
    cls = METHODS.get(cfg.distill.method)
    if teacher is not None and cls.needs_teacher:
        t_spec = model_spec(cfg.teacher, teacher)
        if InputBridge.needed(spec, t_spec):
            extra["teacher_input"] = InputBridge(spec, t_spec)
    if cls.teacher_stage is not None and teacher is not None:
        stage = cls.teacher_stage()
        extra[stage.kwarg] = _stage_output(cfg, stage, teacher, input_size, probe)
    method = build_method(
        cfg.distill.method, student, teacher, cfg.distill.params, num_classes=n,
        class_weights=weights, input_size=input_size, **extra,
    )
    return RunParts(method=method, student=student, teacher=teacher, preprocess=spec)


def _stage_output(cfg: RunConfig, stage, teacher: nn.Module, input_size: tuple[int, int, int], probe: bool):
    path = cfg.distill.teacher_stage_file
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"distill.teacher_stage_file {path} does not exist (the output of "
                                    f"{cfg.distill.method}'s teacher stage {stage.name!r})")
        from safetensors.torch import load_file

        return load_file(str(path))
    if probe:
        return stage.placeholder(teacher, input_size)
    raise ValueError(f"method {cfg.distill.method!r} needs its teacher stage {stage.name!r} first: "
                     "set distill.teacher_stage_file, or let `raykd train`/`raykd tune` run it")


def teacher_stage_spec(cfg: RunConfig, teacher: nn.Module) -> PreprocessSpec:
    """The input contract a teacher-side stage feeds the teacher: the teacher's own, with the
    run's dataset options (black-border crop, pipeline 004)."""
    return replace(model_spec(cfg.teacher, teacher), crop_black_border=cfg.data.crop_black_border,
                   pipeline_004=cfg.data.pipeline_004)


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
    t0 = time.perf_counter()
    for step, batch in enumerate(batches):
        images = batch["image"].to(device, non_blocking=True)
        targets = batch["label"].to(device, non_blocking=True)
        stored = batch.get("teacher")  # a teacher store's outputs on these images: no teacher pass
        with autocast(device, amp), (method.stored_teacher(stored) if stored is not None else nullcontext()):
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
                  "lr": optimizer.param_groups[0]["lr"]})
    return stats


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
