"""``baseline``: the student alone, the reference every KD method is compared with.

Loss: ``WCE(student(x), y)`` -- cross-entropy, class-weighted by the manifest's class weights
(SSD-KD Eq. 3) when given and ``weighted_ce`` is on, with optional label smoothing.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from raykd.distill.base import Method, MethodOutput, MethodParams, register_method


@dataclass(frozen=True)
class BaselineParams(MethodParams):
    """Only the shared task-loss knobs (``weighted_ce``, ``label_smoothing``)."""


@register_method("baseline")
class Baseline(Method):
    """Train the student on the labels only; a teacher, if given, is ignored."""

    Params = BaselineParams
    needs_teacher = False

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        logits = self.student(images)
        return self.output(logits, {"ce": self.task_loss(logits, targets)})
