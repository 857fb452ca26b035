"""``crkd``: channel relational KD, SSD-KD (Wang et al., Medical Image Analysis 2023), Sec. 2.3.

The student's last feature map is mapped to the teacher's channels by a 1x1 conv adapter (and
resized to its grid); each sample's channel Gram matrix ``G = F F^T / (C H W)`` is compared with
the teacher's::

    L = w_ce * WCE(s, y) + w_crkd * CRKD(G_s, G_t)

``CRKD`` is the RMSE over all Gram entries of the batch (authors' ``cr_dist``, default) or the
mean per-sample Frobenius distance (paper Eq. 8, ``crkd_form="frobenius"``). ``w_crkd`` 1000 is
the paper's lambda_crkd. SSD-KD only reports CRKD combined with BLKD (see ``dkd_combo``); alone it
is paired with the task loss here.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from raykd.distill.base import Method, MethodOutput, knob, register_method
from raykd.distill.methods._shared import CRKDKnobs, crkd_parts, make_map_adapter


@dataclass(frozen=True)
class CRKDParams(CRKDKnobs):
    weighted_ce: bool = knob(True, choices=[True, False], help="class-weighted CE (SSD-KD Eq. 3 and code)")
    w_ce: float = knob(1.0, range=(0.0, 10.0), help="task CE weight")


@register_method("crkd")
class CRKD(Method):
    """Channel relational KD; CNN-like student and teacher (feature maps on both sides)."""

    Params = CRKDParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.params.w_crkd:
            make_map_adapter(self, self.params.adapter)

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        p = self.params
        if not p.w_crkd:
            s = self.student(images)
            return self.output(s, {"ce": p.w_ce * self.task_loss(s, targets)})
        fs, ft = self.student_features(images), self.teacher_features(images)
        parts = {}
        if p.w_ce:
            parts["ce"] = p.w_ce * self.task_loss(fs.logits, targets)
        parts.update(crkd_parts(self, fs.feature_map, ft.feature_map, p.w_crkd, p.crkd_form))
        return self.output(fs.logits, parts)
