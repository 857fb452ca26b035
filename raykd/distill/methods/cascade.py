"""``cascade``: cascading distillation of SkinDistilViT (Lungu-Stan et al., ICANN 2023, Sec. 3.2).

Starting from a trained (k+1)-block ViT (or FCViT), the k-block student is that model without its
top block (``raykd.models.cascade_cut``: the first k blocks, embeddings, final norm and classifier,
as the authors' ``extract_model.py`` does) and is distilled from it with the SkinDistilViT loss;
the trained student becomes the next teacher, down to one block. The result is a family of models,
one per depth, each with its own validation BMA.

- :class:`CascadeStep` (registered ``cascade``) is one step: the SkinDistilViT loss, plus the check
  that the student has exactly one block fewer than its teacher.
- :meth:`CascadeStep.pipeline` lays out the runs: one per depth, from L-1 blocks down to
  ``min_blocks``, each student the first k blocks of the previous run's best model
  (``ModelConfig.cut_blocks``); whoever trains runs (the search's trials) follows it without
  knowing about cascades.

Defaults are SkinDistilViT's (task 1, soft 0.5, T 2): the paper's Sec. 3.2 asks for "both the
probability distribution matching and the correct task predictions"; the authors'
``distil_matryoshka.py`` also adds logit MSE 0.25 (``w_mse``). The task CE is plain, as there.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from torch import nn

from raykd.distill.base import PipelineStep, knob, register_method
from raykd.distill.methods.skindistilvit import SkinDistilViT, SkinDistilViTParams
from raykd.models import unwrap_model

__all__ = ["CascadeParams", "CascadeStep", "num_blocks"]

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
    student_from_teacher = True
    multi_run = True

    def saved_outputs(self):
        return None  # every step distils from another teacher (the previous step)
    pipeline_knobs = ("min_blocks",)

    @classmethod
    def pipeline(cls, parent: nn.Module, *, image_size: int | None, min_blocks: int = 1,
                 **knobs: Any) -> list[PipelineStep]:
        """The L-block ``parent``, then one run per depth k = L-1 ... ``min_blocks``; the run of
        depth k keeps the first k blocks of the depth-(k+1) model (weights copied) and distils
        from it."""
        depth = num_blocks(parent)
        if not 1 <= min_blocks < depth:
            raise ValueError(f"min_blocks={min_blocks} must be in [1, {depth - 1}] for the {depth}-block teacher")
        size = {"image_size": image_size} if image_size else {}
        return [PipelineStep(suffix=None, student={}, info={"depth": depth})] + [
            PipelineStep(suffix=f"d{k}", student={"cut_blocks": list(range(k)), **size}, info={"depth": k})
            for k in range(depth - 1, min_blocks - 1, -1)]

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


def num_blocks(model: nn.Module) -> int:
    """The transformer blocks of a ViT-like model (ValueError for any other model)."""
    blocks = getattr(unwrap_model(model), "blocks", None)
    if not isinstance(blocks, nn.Sequential | nn.ModuleList):
        raise ValueError(f"cascading distillation needs a ViT-like model with .blocks, got {type(model).__name__}")
    return len(blocks)
