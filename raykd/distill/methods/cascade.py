"""``cascade``: cascading distillation of SkinDistilViT (Lungu-Stan et al., ICANN 2023, Sec. 3.2).

Starting from a trained (k+1)-block ViT (or FCViT), the k-block student is that model without its
top block (``raykd.models.cascade_cut``: the first k blocks, embeddings, final norm and classifier,
as the authors' ``extract_model.py`` does) and is distilled from it with the SkinDistilViT loss;
the trained student becomes the next teacher, down to one block. The result is a family of models,
one per depth, each with its own validation BMA.

- :class:`CascadeStep` (registered ``cascade``) is one step: the SkinDistilViT loss, plus the check
  that the student has exactly one block fewer than its teacher.
- :func:`run_cascade` repeats cut -> distil; the training of each step is an injected callable, so
  the Ray Train layer plugs in without this module knowing about Ray.

Defaults are SkinDistilViT's (task 1, soft 0.5, T 2): the paper's Sec. 3.2 asks for "both the
probability distribution matching and the correct task predictions"; the authors'
``distil_matryoshka.py`` also adds logit MSE 0.25 (``w_mse``). The task CE is plain, as there.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from torch import Tensor, nn

from raykd.distill.base import build_method, knob, register_method
from raykd.distill.methods.skindistilvit import SkinDistilViT, SkinDistilViTParams

__all__ = ["CascadeParams", "CascadeStep", "run_cascade"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CascadeParams(SkinDistilViTParams):
    """The SkinDistilViT knobs, applied at every step (plain CE, as ``distil_matryoshka.py``)."""

    weighted_ce: bool = knob(
        False, choices=[True, False], help="class-weighted CE; off: the authors' HF models use plain CE"
    )


@register_method("cascade")
class CascadeStep(SkinDistilViT):
    """One cascade step: a k-block student distilled from its (k+1)-block parent."""

    Params = CascadeParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        s, t = self.student_shapes.hidden, self.teacher_shapes.hidden
        if s is None or t is None:
            self.refuse("cascading distillation removes transformer blocks; both models must be ViTs")
        if s[0] != t[0] - 1:
            self.refuse(
                f"the student has {s[0]} blocks and the teacher {t[0]}; a cascade step distils a k-block "
                "student from its (k+1)-block parent: build the student with "
                "raykd.models.cascade_cut(teacher)"
            )


def _num_blocks(model: nn.Module) -> int:
    from raykd.models import unwrap_model

    blocks = getattr(unwrap_model(model), "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        raise ValueError(f"run_cascade needs a ViT-like model with .blocks, got {type(model).__name__}")
    return len(blocks)


def run_cascade(
    model: nn.Module,
    train_step_fn: Callable[[CascadeStep, int], Mapping[str, Any]],
    min_blocks: int = 1,
    *,
    num_classes: int | None = None,
    params: Mapping[str, Any] | None = None,
    class_weights: Tensor | None = None,
    input_size: int | tuple[int, ...] | None = None,
    cut_fn: Callable[[nn.Module], nn.Module] | None = None,
) -> list[tuple[int, dict[str, Any]]]:
    """Run cascading distillation from ``model`` (depth L) down to ``min_blocks`` blocks.

    For k = L-1, ..., min_blocks: cut the top block off the current model, build a ``cascade``
    method (teacher = current model, frozen), call ``train_step_fn(method, k)``, which trains
    ``method`` in place and returns its metrics (BMA first), then continue from the trained
    student. ``model`` itself becomes the first frozen teacher.

    Args:
        model: the trained full-depth ViT/FCViT.
        train_step_fn: trains one step and returns its metrics; it also saves the student if the
            caller wants to keep it (``method.student``).
        min_blocks: the smallest depth to produce (>= 1).
        num_classes: number of classes; default the model's ``num_classes`` (timm models).
        params: ``cascade`` Params as a dict (same at every step).
        class_weights: class weights for the weighted CE.
        input_size: probe input size, see :class:`raykd.distill.base.Method`.
        cut_fn: model -> model with its top block removed; default ``raykd.models.cascade_cut``.

    Returns:
        ``[(depth, metrics), ...]`` from L-1 down to ``min_blocks``.
    """
    if cut_fn is None:
        from raykd.models import cascade_cut as cut_fn
    depth = _num_blocks(model)
    if num_classes is None:
        from raykd.models import unwrap_model

        num_classes = getattr(unwrap_model(model), "num_classes", None)
        if not isinstance(num_classes, int):
            raise ValueError("run_cascade: pass num_classes= (the model has no integer num_classes attribute)")
    if not 1 <= min_blocks < depth:
        raise ValueError(
            f"run_cascade: min_blocks={min_blocks} must be in [1, {depth - 1}] for a {depth}-block model"
        )
    results: list[tuple[int, dict[str, Any]]] = []
    current = model
    while depth > min_blocks:
        student = cut_fn(current)
        student.requires_grad_(True)
        method = build_method(
            "cascade",
            student,
            current,
            params,
            num_classes=num_classes,
            class_weights=class_weights,
            input_size=input_size,
        )
        metrics = dict(train_step_fn(method, depth - 1))
        logger.info("cascade: %d-block student done: %s", depth - 1, metrics)
        results.append((depth - 1, metrics))
        current, depth = method.student, depth - 1
    return results
