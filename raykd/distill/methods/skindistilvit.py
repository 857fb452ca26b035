"""``skindistilvit``: the distillation loss of SkinDistilViT (Lungu-Stan et al., ICANN 2023, Sec. 3.1).

Following DistilBERT (Sanh et al. 2019), a linear mix of the task loss, a soft-target term, a
cosine loss between student and teacher hidden states and an MSE between logits::

    L = w_task * CE(s, y) + w_soft * T^2 * KL(softmax(t/T) || softmax(s/T))
        + w_hidden * mean_tokens(1 - cos(A(h_s), h_t)) + w_mse * sum_c (s - t)^2 / B

``h`` is the output of the last block before the final norm (all tokens, CLS included), as in the
authors' ``Distiller``; ``A`` is the identity when widths match, else a learned linear adapter.
Defaults: task 1 and soft 0.5 (paper, Sec. 4.2), T 2 (authors' ``distil.py``); cosine and MSE are
off (the paper reports neither helped; the code used w_mse 0.25). The task CE is plain
(``weighted_ce`` off): the authors' student is a HuggingFace classifier whose own unweighted
``CrossEntropyLoss`` gives the task loss.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor, nn

from raykd.distill.base import Method, MethodOutput, MethodParams, knob, register_method
from raykd.distill.losses import hidden_cosine_loss, kd_kl_div, logit_mse


@dataclass(frozen=True)
class SkinDistilViTParams(MethodParams):
    weighted_ce: bool = knob(
        False, choices=[True, False], help="class-weighted CE; off: the authors' HF models use plain CE"
    )
    w_task: float = knob(1.0, range=(0.0, 5.0), help="task CE weight")
    w_soft: float = knob(0.5, range=(0.0, 5.0), help="soft-target T^2 KL weight")
    temperature: float = knob(2.0, range=(1.0, 20.0), help="softmax temperature T")
    w_hidden: float = knob(0.0, range=(0.0, 10.0), help="hidden-state cosine loss weight (ViTs only)")
    w_mse: float = knob(0.0, range=(0.0, 5.0), help="logit MSE weight (authors' code: 0.25)")
    hidden_adapter: bool = knob(True, choices=[True, False], help="linear adapter when hidden widths differ")


@register_method("skindistilvit")
class SkinDistilViT(Method):
    """SkinDistilViT loss. The hidden cosine needs ViT-like student and teacher with the same
    number of tokens; widths may differ only with ``hidden_adapter``."""

    Params = SkinDistilViTParams

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        if self.params.w_hidden:
            self._setup_hidden()

    def _setup_hidden(self) -> None:
        s, t = self.student_shapes.hidden, self.teacher_shapes.hidden
        for role, shape in (("student", s), ("teacher", t)):
            if shape is None:
                self.refuse(
                    f"w_hidden > 0 needs block hidden states, and the {role} has none (not a ViT); "
                    "set w_hidden=0 to distil logits only"
                )
        if s[1] != t[1]:
            self.refuse(
                f"the hidden cosine compares token by token, but the student has {s[1]} tokens and the "
                f"teacher {t[1]} (different patch size, image size or prefix tokens); set w_hidden=0"
            )
        if s[2] != t[2]:
            if not self.params.hidden_adapter:
                self.refuse(
                    f"hidden widths differ (student {s[2]}, teacher {t[2]}); set hidden_adapter=true "
                    "to learn a linear map, or w_hidden=0"
                )
            self.adapters["hidden"] = nn.Linear(s[2], t[2])

    def saved_outputs(self):
        return None if self.params.w_hidden else frozenset({"logits"})  # hidden states: online

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        p = self.params
        if p.w_hidden:
            fs, ft = self.student_features(images), self.teacher_features(images)
            s, t = fs.logits, ft.logits
        else:
            s, t = self.student(images), self.teacher_logits(images)
        parts = {}
        if p.w_task:
            parts["ce"] = p.w_task * self.task_loss(s, targets)
        if p.w_soft:
            parts["soft"] = p.w_soft * kd_kl_div(s, t, p.temperature)
        if p.w_hidden:
            hs = fs.hidden_states[-1]
            if "hidden" in self.adapters:
                hs = self.adapters["hidden"](hs)
            parts["hidden"] = p.w_hidden * hidden_cosine_loss(hs, ft.hidden_states[-1])
        if p.w_mse:
            parts["mse"] = p.w_mse * logit_mse(s, t)
        return self.output(s, parts)
