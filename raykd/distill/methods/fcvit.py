"""``fcvit`` and ``fcvit_probs``: SkinDistilViT's full-classification ViTs (Lungu-Stan et al.,
ICANN 2023, Sec. 3.2). Teacher-free: the student is an FCViT (``raykd.models.FCViT``) whose every
block has a classification head; ``features(...).layer_logits`` lists them bottom to top.

``fcvit``: cross-entropy at every head, combined linearly (the authors' code sums them)::

    L = c * sum_l CE(z_l, y),   c = 1 ("sum", code) or 1/L ("mean")

``fcvit_probs`` (FCViTProbs): CE on the top head only; each switched-on lower head is pulled
towards its upper neighbour, whose side is detached::

    L = CE(z_top, y) + w_kl * sum_{enabled l} T^2 KL(softmax(z_{l+1}/T).detach() || softmax(z_l/T))

Multi-step schedule: only the top head trains for ``warmup_epochs`` (M), then one more head is
switched on every ``epochs_per_head`` (N) epochs, from the top down, and the whole stack is
fine-tuned for ``finetune_epochs`` (P): ``recommended_epochs = M + N * (L - 1) + P``. Defaults from
the authors' ``train_fcvit_probs.py``: KL weight 50, T 1, M 5 and P 5; the code switches heads on
every ``max_steps / 12`` steps, i.e. every 30/12 = 2.5 epochs of its 5 + 20 + 5 (a little sooner, as
its counter also counts evaluation batches), which we round to N = 2 epochs. Both use plain CE
(``weighted_ce`` off), as the authors' models do (``CrossEntropyLoss()``).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import Tensor

from raykd.distill.base import Method, MethodOutput, MethodParams, knob, register_method
from raykd.distill.losses import fcvit_probs_kl_chain


def _require_heads(method: Method, minimum: int) -> int:
    n = method.student_shapes.num_heads
    if n is None or n < minimum:
        method.refuse(
            f"the student must be an FCViT with at least {minimum} per-block heads "
            f"(features().layer_logits), it has {n or 'none'}; build it with "
            "timm.create_model('raykd_fcvit_...')"
        )
    return n


@dataclass(frozen=True)
class FCViTParams(MethodParams):
    weighted_ce: bool = knob(
        False, choices=[True, False], help="class-weighted CE; off: the authors' FCViT uses plain CE"
    )
    head_reduction: str = knob("sum", choices=["sum", "mean"], help="sum (code) or mean of the per-head CEs")


@register_method("fcvit")
class FCViTMethod(Method):
    """CE at every head of an FCViT student."""

    Params = FCViTParams
    needs_teacher = False
    reads_layer_logits = True

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_heads = _require_heads(self, 1)

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        fs = self.student_features(images)
        c = 1.0 if self.params.head_reduction == "sum" else 1.0 / len(fs.layer_logits)
        parts = {f"ce_l{i}": c * self.task_loss(z, targets) for i, z in enumerate(fs.layer_logits)}
        return self.output(fs.logits, parts)


@dataclass(frozen=True)
class FCViTProbsParams(MethodParams):
    weighted_ce: bool = knob(
        False, choices=[True, False], help="class-weighted CE; off: the authors' FCViTProbs uses plain CE"
    )
    w_kl: float = knob(50.0, range=(0.0, 200.0), help="weight of the KL chain between heads")
    temperature: float = knob(1.0, range=(1.0, 20.0), help="temperature of the KL chain")
    warmup_epochs: int = knob(5, range=(0, 200), help="M: epochs with the top head only")
    epochs_per_head: int = knob(2, range=(1, 50), help="N: epochs between switching on successive heads")
    finetune_epochs: int = knob(5, range=(0, 200), help="P: epochs with every head on, at the end")


@register_method("fcvit_probs")
class FCViTProbs(Method):
    """FCViTProbs on an FCViT student; call ``set_epoch`` each epoch to follow the schedule."""

    Params = FCViTProbsParams
    needs_teacher = False
    reads_layer_logits = True
    ddp_find_unused_parameters = True  # lower heads get no gradient until switched on
    loss_weights = ()  # the top head's CE is always on

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.num_heads = _require_heads(self, 2)

    @property
    def enabled_heads(self) -> int:
        """How many heads below the top currently get the KL term."""
        p = self.params
        if self.epoch < p.warmup_epochs:
            return 0
        return min(self.num_heads - 1, 1 + (self.epoch - p.warmup_epochs) // p.epochs_per_head)

    @property
    def recommended_epochs(self) -> int:
        """M + N * (L - 1) + P: the length of the full multi-step schedule."""
        p = self.params
        return p.warmup_epochs + p.epochs_per_head * (self.num_heads - 1) + p.finetune_epochs

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        fs = self.student_features(images)
        parts = {"ce": self.task_loss(fs.logits, targets)}
        k = self.enabled_heads
        if k and self.params.w_kl:
            parts["kl"] = self.params.w_kl * fcvit_probs_kl_chain(fs.layer_logits, k, self.params.temperature)
        return self.output(fs.logits, parts)
