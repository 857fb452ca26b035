"""``rkd``: relational KD of Park et al. (CVPR 2019), SSD-KD's DRKD (Wang et al. 2023, Eq. 5).

On the pooled embeddings ``e`` of a batch (widths of student and teacher may differ)::

    L = w_ce * WCE(s, y) + w_rkd_d * L_dist(e_s, e_t) + w_rkd_a * L_angle(e_s, e_t)

with the distance-wise potential (pairwise distances divided by their mean) and the angle-wise
potential (cosines of every triangle's angles) compared by the Huber loss; see
:func:`raykd.distill.losses.rkd_distance_loss` and :func:`~raykd.distill.losses.rkd_angle_loss`.
Defaults: 25 / 50 (Park et al.); CE weight 3 from SSD-KD's standalone ``DRKD`` class.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from raykd.distill.base import Method, MethodOutput, knob, register_method
from raykd.distill.methods._shared import RKDKnobs, rkd_parts


@dataclass(frozen=True)
class RKDParams(RKDKnobs):
    weighted_ce: bool = knob(True, choices=[True, False], help="class-weighted CE (SSD-KD Eq. 3 and code)")
    w_ce: float = knob(3.0, range=(0.0, 10.0), help="task CE weight (SSD-KD's DRKD class: 3)")


@register_method("rkd")
class RKD(Method):
    """Relational KD on embeddings; works for any student/teacher pair (batch size >= 3 for angles)."""

    Params = RKDParams

    def saved_outputs(self):
        return frozenset({"embedding"})

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        p = self.params
        fs, ft = self.student_features(images), self.teacher_features(images)
        parts = {}
        if p.w_ce:
            parts["ce"] = p.w_ce * self.task_loss(fs.logits, targets)
        parts.update(rkd_parts(fs.embedding, ft.embedding, p.w_rkd_d, p.w_rkd_a))
        return self.output(fs.logits, parts)
