"""Building a run's parts on the CPU: the seed, a student or teacher network (a raykd artifact or a
timm model), the method around them with its teacher-side inputs (:class:`RunParts`), and the
preprocessing contract each model was trained with. Builds only: nothing here trains.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from raykd.artifact.format import load_artifact, read_meta
from raykd.config import ModelConfig, RunConfig
from raykd.data.manifest import Manifest
from raykd.data.sampling import class_weights
from raykd.data.transforms import InputBridge, PreprocessSpec, spec_from_model
from raykd.distill import METHODS, build_method
from raykd.models import create_model, cut_vit

__all__ = ["RunParts", "build_network", "build_run", "model_spec", "set_seed", "student_identity",
           "teacher_prep_spec"]


def set_seed(seed: int) -> None:
    """Seed Python's, NumPy's and torch's generators."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def build_network(cfg: ModelConfig, num_classes: int) -> nn.Module:
    """A student or teacher: a trained raykd artifact when ``checkpoint`` is set, else timm."""
    if cfg.checkpoint:
        model, meta = load_artifact(cfg.checkpoint)
        if meta.num_classes != num_classes:
            raise ValueError(
                f"checkpoint {cfg.checkpoint} predicts {meta.num_classes} classes but the dataset has {num_classes}"
            )
        return model

    return create_model(cfg.name, num_classes=num_classes, pretrained_file=cfg.pretrained_file,
                        pretrained=cfg.pretrained and not cfg.pretrained_file, **cfg.kwargs)


def student_identity(cfg: RunConfig) -> tuple[str, dict]:
    """The timm name and kwargs that rebuild the student (for its saved artifact)."""
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

    A method with a teacher prep (:attr:`raykd.distill.base.Method.teacher_prep`) gets its
    saved output from ``cfg.distill.teacher_prep_file`` (run it with
    :func:`raykd.train.prep.run_teacher_prep`); ``probe`` (the fit check before any prep ran)
    gives it an untrained output of the right shapes instead.
    """
    n = manifest.num_classes
    teacher = build_network(cfg.teacher, n) if cfg.teacher is not None else None
    if cfg.student.cut_blocks:
        if teacher is None:
            raise ValueError("student.cut_blocks needs a teacher ViT to cut the blocks from")

        student = cut_vit(teacher, keep_blocks=cfg.student.cut_blocks)
    else:
        # The student's initial weights depend on train.seed alone, not on whether (or which)
        # teacher was built before it: seed k of a baseline and of every method start alike.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(cfg.train.seed)
            student = build_network(cfg.student, n)
    overrides = {"image_size": cfg.student.image_size} if cfg.student.image_size else {}
    spec = spec_from_model(student, crop_black_border=cfg.data.crop_black_border,
                           fusion_preprocess=cfg.data.fusion_preprocess, **overrides)
    weights = torch.as_tensor(class_weights(manifest.counts("train"), cfg.data.sampling.class_weights))
    input_size = (3, spec.image_size, spec.image_size)
    extra = {}
    cls = METHODS.get(cfg.distill.method)
    if teacher is not None and cls.needs_teacher:
        t_spec = model_spec(cfg.teacher, teacher)
        if InputBridge.needed(spec, t_spec):
            extra["teacher_input"] = InputBridge(spec, t_spec)
    if cls.teacher_prep is not None and teacher is not None:
        prep = cls.teacher_prep()
        extra[prep.kwarg] = _prep_output(cfg, prep, teacher, input_size, probe)
    method = build_method(
        cfg.distill.method, student, teacher, cfg.distill.params, num_classes=n,
        class_weights=weights, input_size=input_size, **extra,
    )
    return RunParts(method=method, student=student, teacher=teacher, preprocess=spec)


def _prep_output(cfg: RunConfig, prep, teacher: nn.Module, input_size: tuple[int, int, int], probe: bool):
    path = cfg.distill.teacher_prep_file
    if path:
        if not Path(path).is_file():
            raise FileNotFoundError(f"distill.teacher_prep_file {path} does not exist (the output of "
                                    f"{cfg.distill.method}'s teacher prep {prep.name!r})")
        from safetensors.torch import load_file  # lazy: safetensors is heavy

        return load_file(str(path))
    if probe:
        return prep.placeholder(teacher, input_size)
    raise ValueError(f"method {cfg.distill.method!r} needs its teacher prep {prep.name!r} first: "
                     "set distill.teacher_prep_file, or let `raykd train`/`raykd tune` run it")


def teacher_prep_spec(cfg: RunConfig, teacher: nn.Module) -> PreprocessSpec:
    """The input contract a teacher prep feeds the teacher: the teacher's own, with the
    run's dataset options (black-border crop, the fusion paper's preprocessing)."""
    return replace(model_spec(cfg.teacher, teacher), crop_black_border=cfg.data.crop_black_border,
                   fusion_preprocess=cfg.data.fusion_preprocess)
