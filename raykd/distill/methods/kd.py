"""``kd``: Hinton et al. (2015) knowledge distillation, SSD-KD's BLKD (Wang et al. 2023, Eq. 4).

``L = (1 - alpha) * WCE(s, y) + alpha * T^2 * KL(softmax(t/T) || softmax(s/T))`` with the KL
averaged over the batch. Defaults alpha 0.5, T 5 from SSD-KD's code (``kd_losses/blkd.py``).

Config example: ``{"method": "kd", "params": {"alpha": 0.5, "temperature": 5.0}}``
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from raykd.distill.base import Method, MethodOutput, knob, register_method
from raykd.distill.losses import kd_kl_div
from raykd.distill.methods._shared import BLKDKnobs


@dataclass(frozen=True)
class KDParams(BLKDKnobs):
    """``alpha`` and ``temperature`` (see :class:`BLKDKnobs`) plus the task-loss knobs."""

    weighted_ce: bool = knob(True, choices=[True, False], help="class-weighted CE (SSD-KD Eq. 3 and code)")


@register_method("kd")
class KD(Method):
    """Logit distillation; works for any student/teacher pair that predicts the same classes."""

    Params = KDParams

    def saved_outputs(self):
        return frozenset({"logits"})

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        p = self.params
        s = self.student(images)
        t = self.teacher_logits(images)
        parts = {}
        if p.alpha < 1.0:
            parts["ce"] = (1.0 - p.alpha) * self.task_loss(s, targets)
        if p.alpha > 0.0:
            parts["kd"] = p.alpha * kd_kl_div(s, t, p.temperature)
        return self.output(s, parts)
