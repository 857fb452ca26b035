"""SkinDistilViT students: ViTs cut out of a teacher ViT, and cascading cuts.

Paper: Lungu-Stan, Cercel, Pop, "SkinDistilViT: Lightweight Vision Transformer for Skin Lesion
Classification", ICANN 2023 (arXiv 2308.08669).

- Section 3.1: following DistilBERT, the student keeps blocks 0, 2, 4, 7, 9 and 11 of the 12-block
  teacher, with their weights, and every non-block parameter (patch and position embeddings, CLS
  token, final norm, classifier). With ViT-B/16 and 8 classes: 43,277,576 parameters.
- Section 4.2: initialisation variants of the same architecture: from scratch (``fs``), from the
  ImageNet ViT (``fi``), copied from the trained teacher without training (``nt``, also the start
  of the distilled SkinDistilViT).
- Section 3.2, cascading distillation: the k-block student is the trained (k+1)-block model without
  its top block (the authors' ``extract_model.py`` keeps the FIRST k blocks), then distilled from it.

A cut student is an ordinary timm ``VisionTransformer`` (or FCViT) of depth ``len(keep_blocks)``; its
state dict has the same keys as ``timm.create_model(<vit name>, depth=k)``, so a trained student is
rebuilt by name, e.g. ``create_model("vit_base_patch16_224", 8, depth=6, pretrained_file=...)`` or the
registered ``raykd_distilvit_base_patch16_224``.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn
from torch import nn

from raykd.models.factory import create_model
from raykd.models.features import unwrap_model

__all__ = ["SKINDISTILVIT_BLOCKS", "cut_vit", "cascade_cut", "distilvit_student"]

#: Blocks of the 12-block teacher kept by SkinDistilViT (section 3.1).
SKINDISTILVIT_BLOCKS: tuple[int, ...] = (0, 2, 4, 7, 9, 11)


def cut_vit(teacher: nn.Module, keep_blocks: Sequence[int] = SKINDISTILVIT_BLOCKS) -> VisionTransformer:
    """Build a student ViT from chosen blocks of ``teacher``, copying every weight.

    The teacher is left untouched; the student is a deep copy whose ``blocks`` hold only the chosen
    blocks (renumbered 0..k-1) and whose non-block parameters are the teacher's. For an FCViT
    teacher, the per-block heads of the kept blocks come along; the student's top block feeds the
    teacher's final norm and classifier (as the authors' cascading code does).

    Args:
        teacher: a timm ``VisionTransformer`` (ViT, DeiT, FCViT), possibly DDP-wrapped.
        keep_blocks: strictly increasing block indices of the teacher.

    Returns:
        The student, trainable (``requires_grad`` on) and in the teacher's train/eval mode.
    """
    teacher = unwrap_model(teacher)
    if not isinstance(teacher, VisionTransformer):
        raise TypeError(f"cut_vit needs a timm VisionTransformer teacher, got {type(teacher).__name__}")
    depth = len(teacher.blocks)
    keep = [int(i) for i in keep_blocks]
    increasing = all(b > a for a, b in zip(keep, keep[1:], strict=False))
    if not keep or not increasing or keep[0] < 0 or keep[-1] >= depth:
        raise ValueError(
            f"keep_blocks={tuple(keep_blocks)} must be a non-empty, strictly increasing list of block "
            f"indices in [0, {depth - 1}] (the teacher has {depth} blocks)"
        )
    student = copy.deepcopy(teacher)
    student.blocks = nn.Sequential(*[student.blocks[i] for i in keep])
    heads = getattr(student, "layer_heads", None)
    if isinstance(heads, nn.ModuleList):
        student.layer_heads = nn.ModuleList(heads[i] for i in keep[:-1])
    if isinstance(getattr(student, "feature_info", None), list) and student.feature_info:
        info = student.feature_info[0]
        student.feature_info = [dict(info, module=f"blocks.{i}") for i in range(len(keep))]
    student.requires_grad_(True)
    return student


def cascade_cut(model: nn.Module) -> VisionTransformer:
    """Cascading distillation step: a k-block student from a trained (k+1)-block ViT or FCViT.

    Drops the top block and keeps blocks 0..k-1, embeddings, final norm and classifier.
    """
    depth = len(unwrap_model(model).blocks)
    if depth < 2:
        raise ValueError(
            "cascade_cut needs a model with at least 2 blocks; a 1-block ViT is the end of the cascade"
        )
    return cut_vit(model, keep_blocks=range(depth - 1))


def distilvit_student(
    init: Literal["teacher", "scratch", "imagenet"],
    *,
    teacher: nn.Module | None = None,
    num_classes: int | None = None,
    model_name: str = "vit_base_patch16_224",
    pretrained_file: str | Path | None = None,
    keep_blocks: Sequence[int] = SKINDISTILVIT_BLOCKS,
    **kwargs: Any,
) -> VisionTransformer:
    """SkinDistilViT student with one of the paper's initialisations (section 4.2).

    Args:
        init: ``"teacher"`` copies the chosen blocks of the trained ``teacher`` (SkinDistilViT_nt,
            and the start of the distilled SkinDistilViT); ``"scratch"`` is a random ViT of the same
            shape (DistilViT_fs); ``"imagenet"`` cuts the same blocks out of the ImageNet ViT read
            from ``pretrained_file`` (SkinDistilViT_fi), with a fresh classifier.
        teacher: the trained teacher (``init="teacher"``).
        num_classes: number of classes (``"scratch"``/``"imagenet"``; default: the teacher's).
        model_name: timm name of the full-depth ViT (``"scratch"``/``"imagenet"``).
        pretrained_file: local ImageNet ViT weights (``init="imagenet"``).
        keep_blocks: blocks to keep.
        **kwargs: passed to ``timm.create_model`` (e.g. ``drop_path_rate``).
    """
    if init == "teacher":
        if teacher is None:
            raise ValueError("init='teacher' needs teacher=<trained ViT>")
        return cut_vit(teacher, keep_blocks)
    if num_classes is None:
        if teacher is None:
            raise ValueError(f"init={init!r} needs num_classes= (or a teacher to take it from)")
        num_classes = unwrap_model(teacher).num_classes
    if init == "scratch":
        return create_model(model_name, num_classes, depth=len(tuple(keep_blocks)), **kwargs)
    if init == "imagenet":
        if pretrained_file is None:
            raise ValueError(
                "init='imagenet' needs pretrained_file=<local ImageNet ViT weights> (no hub at run time)"
            )
        full = create_model(model_name, num_classes, pretrained_file=pretrained_file, **kwargs)
        return cut_vit(full, keep_blocks)
    raise ValueError(f"init={init!r}: use 'teacher', 'scratch' or 'imagenet'")


default_cfgs = generate_default_cfgs(
    {
        "raykd_distilvit_base_patch16_224": {
            "url": "",
            "num_classes": 8,
            "input_size": (3, 224, 224),
            "pool_size": None,
            "crop_pct": 0.9,
            "interpolation": "bicubic",
            "fixed_input_size": True,
            "mean": (0.5, 0.5, 0.5),
            "std": (0.5, 0.5, 0.5),
            "first_conv": "patch_embed.proj",
            "classifier": "head",
        },
    }
)


@register_model
def raykd_distilvit_base_patch16_224(pretrained: bool = False, **kwargs: Any) -> VisionTransformer:
    """SkinDistilViT student shape: ViT-B/16 at 224 with 6 blocks (43.28 M parameters at 8 classes).

    Weights come from :func:`cut_vit` of a trained teacher or from a saved student file; there are no
    hub weights for this shape.
    """
    args = dict(patch_size=16, embed_dim=768, depth=len(SKINDISTILVIT_BLOCKS), num_heads=12)
    return build_model_with_cfg(
        VisionTransformer,
        "raykd_distilvit_base_patch16_224",
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=3, feature_cls="getter"),
        **dict(args, **kwargs),
    )
