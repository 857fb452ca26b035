"""``baseline``: the student alone, the reference every KD method is compared with.

Loss: ``WCE(student(x), y)`` -- cross-entropy, class-weighted by the manifest's class weights
(SSD-KD Eq. 3) when given and ``weighted_ce`` is on, with optional label smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from raykd.distill.base import Method, MethodOutput, MethodParams, knob, register_method


@dataclass(frozen=True)
class BaselineParams(MethodParams):
    """Only the shared task-loss knobs (``weighted_ce``, ``label_smoothing``).

    ``weighted_ce`` defaults on: the baseline is raykd's own reference, set like SSD-KD's
    student-alone row (MobileNetV2 trained with WCE, Table 2, Sec. 3.2) because BMA on imbalanced
    ISIC is the metric every method is ranked by. SkinDistilViT's and HierAttn's students alone
    used plain CE: compare with those with ``weighted_ce=false`` (``search_spaces/hierattn.yaml``).
    """

    weighted_ce: bool = knob(
        True, choices=[True, False], help="class-weighted CE (raykd: as SSD-KD's student alone)"
    )


@register_method("baseline")
class Baseline(Method):
    """Train the student on the labels only; a teacher, if given, is ignored."""

    Params = BaselineParams
    needs_teacher = False

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        logits = self.student(images)
        return self.output(logits, {"ce": self.task_loss(logits, targets)})
