"""``fitnet``: FitNets hints, Romero et al. (ICLR 2015), Sec. 2.2, as used in SSD-KD's comparison.

The student's last feature map goes through a learned 1x1 conv regressor ``r`` to the teacher's
channels (and, if needed, its spatial size) and is pulled towards the teacher's feature map::

    L = w_hint * mean((r(f_s) - f_t)^2) + w_ce * WCE(s, y)

Romero et al. train in two phases (hints first, then KD); SSD-KD's code (``kd_losses/fitnet.py``)
trains the single combined loss above with CE weight 0.01, which gives our defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from raykd.distill.base import Method, MethodOutput, MethodParams, knob, register_method
from raykd.distill.losses import fitnet_hint_loss
from raykd.distill.methods._shared import adapt_map, make_map_adapter


@dataclass(frozen=True)
class FitNetParams(MethodParams):
    weighted_ce: bool = knob(True, choices=[True, False], help="class-weighted CE (SSD-KD Eq. 3 and code)")
    w_hint: float = knob(1.0, range=(0.0, 100.0), help="hint (feature MSE) weight")
    w_ce: float = knob(0.01, range=(0.0, 10.0), help="task CE weight (SSD-KD code: 0.01)")
    adapter: str = knob(
        "conv_bn_relu", choices=["conv_bn_relu", "conv"], help="1x1 regressor: code's ConvReg or linear"
    )


@register_method("fitnet")
class FitNet(Method):
    """Hint learning on the last conv feature maps; CNN-like student and teacher only."""

    Params = FitNetParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.params.w_hint:
            make_map_adapter(self, self.params.adapter)

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        p = self.params
        if not p.w_hint:
            s = self.student(images)
            return self.output(s, {"ce": p.w_ce * self.task_loss(s, targets)})
        fs, ft = self.student_features(images), self.teacher_features(images)
        regressed = adapt_map(self, fs.feature_map, ft.feature_map)
        parts = {"hint": p.w_hint * fitnet_hint_loss(regressed, ft.feature_map)}
        if p.w_ce:
            parts["ce"] = p.w_ce * self.task_loss(fs.logits, targets)
        return self.output(fs.logits, parts)
