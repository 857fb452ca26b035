"""``ssdkd`` and ``dkd_combo``: SSD-KD's diverse knowledge distillation (Wang et al., Medical Image
Analysis 84, 2023, Eq. 9-10).

``dkd_combo`` (D-KD, Eq. 9) joins logit, inter-instance and intra-instance knowledge::

    L_D-KD = w_blkd * [(1 - alpha) WCE + alpha T^2 KL] + w_drkd * (w_rkd_d L_dist + w_rkd_a L_angle)
             + w_crkd * CRKD

``ssdkd`` (SSD-KD, Eq. 10) adds self-supervision. The paper writes ``L_D-KD + w_sskd * L_SSKD``
but notes (implementation details, Sec. 3.2) that SSKD already contains BLKD, so BLKD is not added
twice: as in the authors' ``isic_ssd_kd.py``::

    L_SSD-KD = w_sskd * L_SSKD + w_drkd * DRKD + w_crkd * CRKD

with the relational terms on all ``4B`` rotated views (``relational_views="all"``, the code) or
on the originals only. Paper weights: D-KD (1, 1, 1000), SSD-KD (drkd 1, crkd 1000, sskd 1);
BLKD alpha 0.5, T 5 and RKD 25 / 50 from the authors' code.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from raykd.distill.base import Method, MethodOutput, knob, register_method
from raykd.distill.losses import kd_kl_div
from raykd.distill.methods._shared import (
    BLKDKnobs,
    CRKDKnobs,
    RKDKnobs,
    crkd_parts,
    make_map_adapter,
    rkd_parts,
)
from raykd.distill.methods.sskd import SSKD, SSKDParams


@dataclass(frozen=True)
class DKDComboParams(BLKDKnobs, RKDKnobs, CRKDKnobs):
    weighted_ce: bool = knob(True, choices=[True, False], help="class-weighted CE (SSD-KD Eq. 3 and code)")
    w_blkd: float = knob(1.0, range=(0.0, 10.0), help="BLKD weight lambda_blkd")
    w_drkd: float = knob(1.0, range=(0.0, 10.0), help="DRKD weight lambda_drkd")


@register_method("dkd_combo")
class DKDCombo(Method):
    """D-KD = BLKD + DRKD + CRKD; CNN-like student and teacher while ``w_crkd > 0``."""

    Params = DKDComboParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.params.w_crkd:
            make_map_adapter(self, self.params.adapter)

    def saved_outputs(self):
        return None if self.params.w_crkd else frozenset({"logits", "embedding"})  # CRKD: feature maps

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        p = self.params
        fs, ft = self.student_features(images), self.teacher_features(images)
        parts = {}
        if p.w_blkd and p.alpha < 1.0:
            parts["ce"] = p.w_blkd * (1.0 - p.alpha) * self.task_loss(fs.logits, targets)
        if p.w_blkd and p.alpha > 0.0:
            parts["kd"] = p.w_blkd * p.alpha * kd_kl_div(fs.logits, ft.logits, p.temperature)
        parts.update(rkd_parts(fs.embedding, ft.embedding, p.w_rkd_d, p.w_rkd_a, scale=p.w_drkd))
        if p.w_crkd:
            parts.update(crkd_parts(self, fs.feature_map, ft.feature_map, p.w_crkd, p.crkd_form))
        return self.output(fs.logits, parts)


@dataclass(frozen=True)
class SSDKDParams(SSKDParams, RKDKnobs, CRKDKnobs):
    weighted_ce: bool = knob(True, choices=[True, False], help="class-weighted CE (SSD-KD Eq. 3 and code)")
    w_sskd: float = knob(1.0, range=(0.0, 10.0), help="SSKD weight lambda_sskd")
    w_drkd: float = knob(1.0, range=(0.0, 10.0), help="DRKD weight lambda_drkd")
    relational_views: str = knob("all", choices=["all", "original"], help="views the DRKD/CRKD terms use")


@register_method("ssdkd")
class SSDKD(SSKD):
    """SSD-KD = SSKD + DRKD + CRKD; square images, CNN-like models while ``w_crkd > 0``.

    Takes ``teacher_head=`` like ``sskd``.
    """

    Params = SSDKDParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.params.w_crkd:
            make_map_adapter(self, self.params.adapter)

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        p = self.params
        b = targets.shape[0]
        fs, ft = self.view_features(images)
        parts = self.sskd_parts(fs, ft, targets)
        n = fs.embedding.shape[0] if p.relational_views == "all" else b
        parts.update(rkd_parts(fs.embedding[:n], ft.embedding[:n], p.w_rkd_d, p.w_rkd_a, scale=p.w_drkd))
        if p.w_crkd:
            parts.update(crkd_parts(self, fs.feature_map[:n], ft.feature_map[:n], p.w_crkd, p.crkd_form))
        return self.output(fs.logits[:b], parts)
