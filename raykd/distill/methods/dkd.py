"""``dkd``: Decoupled Knowledge Distillation, Zhao et al. (CVPR 2022), Sec. 3.

Splits the KD term into target-class (TCKD) and non-target-class (NCKD) parts and weights them
independently; a strong modern logit method beyond the seeds::

    L = w_ce * CE + warmup(e) * (dkd_alpha * TCKD + dkd_beta * NCKD)
    warmup(e) = min((e + 1) / warmup_epochs, 1)      (e: 0-based epoch from set_epoch)

Defaults (CE 1, alpha 1, beta 8, T 4, 20 warm-up epochs, plain CE) are the authors' ``mdistiller``
defaults (``engine/cfg.py``), which its CIFAR-100 ResNet50 -> MobileNetV2 config keeps; its ImageNet
configs use beta 0.5 (ResNet34 -> ResNet18) or 2 (ResNet50 -> MobileNet), T 1, warm-up 1.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from raykd.distill.base import Method, MethodOutput, MethodParams, knob, register_method
from raykd.distill.losses import dkd_loss


@dataclass(frozen=True)
class DKDParams(MethodParams):
    weighted_ce: bool = knob(
        False, choices=[True, False], help="class-weighted CE; off: mdistiller uses plain CE"
    )
    w_ce: float = knob(1.0, range=(0.0, 10.0), help="task CE weight")
    dkd_alpha: float = knob(1.0, range=(0.0, 10.0), help="TCKD weight alpha")
    dkd_beta: float = knob(8.0, range=(0.0, 20.0), help="NCKD weight beta")
    temperature: float = knob(4.0, range=(1.0, 20.0), help="softmax temperature T")
    warmup_epochs: int = knob(20, range=(0, 200), help="epochs over which the DKD weight ramps up linearly")


@register_method("dkd")
class DKD(Method):
    """Decoupled KD; works for any student/teacher pair that predicts the same classes."""

    Params = DKDParams

    loss_weights = ("w_ce", "dkd_alpha", "dkd_beta")

    def warmup_factor(self) -> float:
        w = self.params.warmup_epochs
        return 1.0 if w == 0 else min((self.epoch + 1) / w, 1.0)

    def saved_outputs(self):
        return frozenset({"logits"})

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        p = self.params
        s = self.student(images)
        t = self.teacher_logits(images)
        parts = {}
        if p.w_ce:
            parts["ce"] = p.w_ce * self.task_loss(s, targets)
        ramp = self.warmup_factor()
        tckd, nckd = dkd_loss(s, t, targets, alpha=p.dkd_alpha, beta=p.dkd_beta, temperature=p.temperature)
        if p.dkd_alpha:
            parts["tckd"] = ramp * tckd
        if p.dkd_beta:
            parts["nckd"] = ramp * nckd
        return self.output(s, parts)
