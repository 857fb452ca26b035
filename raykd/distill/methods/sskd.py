"""``sskd``: Knowledge Distillation Meets Self-Supervision, Xu et al. (ECCV 2020), as used by SSD-KD.

Every image ``x`` gives four views, rotated by 0/90/180/270 degrees (:func:`rotation_views`);
student and teacher see all ``4B``. A projection head ``phi`` (Linear-ReLU-Linear) on each model's
pooled embedding gives the representations whose cosine similarities between each rotated view and
every original form the ``(3B, B)`` matrix ``A``. Losses (Xu et al., Sec. 3)::

    L = w_ce * WCE(S(x), y)
      + w_kd * T^2 KL(Tc(x) || S(x))                              originals, temperature T
      + w_tf * T^2 KL(Tc(rot(x)) || S(rot(x)))  over kept views  rotated views, temperature T
      + w_ss * T_ss^2 KL(A_Tc || A_S)            over kept rows   similarity rows, temperature T_ss

(``S`` student, ``Tc`` teacher logits, ``rot`` a 90/180/270 degree rotation.)

"Kept" is the selective transfer: views whose true class (resp. true source image) the teacher
ranks first, plus the best-ranked ``ratio_tf`` (``ratio_ss``) of the rest (:func:`selective_keep`).

SSKD's teacher prep (:func:`pretrain_sskd_teacher_head`) trains the teacher's head on the contrastive
task (each rotated view must pick its own original, CE over ``A``) with the teacher frozen; then this
method trains the student and its own head with the teacher's head frozen. Defaults are those of
Xu et al.'s released code, which SSD-KD says it kept (ce 0.1, kd 0.9, tf 2.7, ss 10, T 4,
T_ss 0.5, ratio_tf 1.0, ratio_ss 0.75); the teacher prep uses SSD-KD's SGD lr 1e-3, momentum 0.9,
wd 1e-3, 60 epochs with steps at 30 and 45.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from raykd.distill.base import (
    Method,
    MethodOutput,
    MethodParams,
    TeacherPrep,
    knob,
    probe_shapes,
    register_method,
)
from raykd.distill.losses import (
    kd_kl_div,
    rotation_views,
    selective_keep,
    sskd_contrastive_loss,
    sskd_similarity,
)
from raykd.distill.methods._shared import ProjectionHead
from raykd.models import Features, features

__all__ = ["SSKD", "SSKDHeadPrep", "SSKDParams", "pretrain_sskd_teacher_head", "sskd_head_loss"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class SSKDParams(MethodParams):
    weighted_ce: bool = knob(True, choices=[True, False], help="class-weighted CE (SSD-KD Eq. 3 and code)")
    w_ce: float = knob(0.1, range=(0.0, 10.0), help="task CE weight on the originals")
    w_kd: float = knob(0.9, range=(0.0, 10.0), help="KD weight on the originals")
    w_tf: float = knob(2.7, range=(0.0, 10.0), help="KD weight on the kept rotated views")
    w_ss: float = knob(10.0, range=(0.0, 50.0), help="similarity-distribution KD weight")
    temperature: float = knob(4.0, range=(1.0, 20.0), help="temperature T of the logit terms")
    ss_temperature: float = knob(0.5, range=(0.05, 5.0), help="temperature of the similarity rows")
    ratio_tf: float = knob(1.0, range=(0.0, 1.0), help="share of misranked rotated views kept")
    ratio_ss: float = knob(0.75, range=(0.0, 1.0), help="share of misranked similarity rows kept")


def _images(batch: Any) -> Tensor:
    if isinstance(batch, Tensor):
        return batch
    if isinstance(batch, Mapping):
        for key in ("image", "images", "x"):
            if key in batch:
                return batch[key]
        raise ValueError(f"batch dict has no 'image'/'images'/'x' key (keys: {sorted(batch)})")
    if isinstance(batch, Sequence) and batch and isinstance(batch[0], Tensor):
        return batch[0]
    raise TypeError(
        f"a batch must be an image tensor, (images, ...) or a dict with 'image'; got {type(batch).__name__}"
    )


def sskd_head_loss(teacher: nn.Module, head: nn.Module, images: Tensor) -> Tensor:
    """The teacher prep's loss of ``head`` on a batch: CE of each rotated view over the originals."""
    views = rotation_views(images)
    with torch.no_grad():
        emb = features(teacher, views).embedding
    rep = head(emb)
    b = images.shape[0]
    return sskd_contrastive_loss(sskd_similarity(rep[:b], rep[b:]))


def pretrain_sskd_teacher_head(
    teacher: nn.Module,
    batches: Iterable[Any],
    epochs: int = 60,
    lr: float = 1e-3,
    *,
    momentum: float = 0.9,
    weight_decay: float = 1e-3,
    milestones: Sequence[int] = (30, 45),
    val_batches: Iterable[Any] | None = None,
    patience: int | None = 15,
    head: nn.Module | None = None,
    device: torch.device | str | None = None,
    prepare: Callable[[nn.Module], nn.Module] | None = None,
    reduce: Callable[[float], float] | None = None,
) -> dict[str, Tensor]:
    """SSKD's teacher prep: train the teacher's projection head on the rotation-contrastive task.

    The teacher stays frozen and in eval mode (SSD-KD sets its backbone lr to 0); only the head
    learns, by SGD with a x0.1 step schedule at ``milestones``. With ``val_batches`` the state with
    the lowest validation loss is returned and training stops after ``patience`` epochs without
    improvement (SSD-KD: early stop 15, best by validation loss).

    Data-parallel use (one call per rank, :func:`raykd.train.prep.run_teacher_prep`): each rank
    passes its own share of the batches, ``prepare`` wraps the head for DDP (so each step applies the
    gradient averaged over ranks) and ``reduce`` averages a scalar over ranks. The losses are reduced
    as sums and batch counts, so the validation loss is the mean over every rank's batches, the same
    number on every rank: early stopping and the best state are then decided alike everywhere, and
    every rank runs the same number of epochs and collective calls. Validation runs on the unwrapped
    head (no DDP forward), so uneven validation shares cannot stall a collective.

    Args:
        teacher: the trained teacher.
        batches: re-iterable training batches (image tensors, ``(images, labels)`` or dicts with
            ``"image"``), square images.
        epochs: number of passes over ``batches``.
        lr: SGD learning rate.
        val_batches: optional re-iterable validation batches.
        patience: early-stopping patience in epochs (``None``: never stop early).
        head: the head to train; default a fresh ``ProjectionHead`` of the teacher's width.
        device: where to train; default the teacher's device.
        prepare: wraps the head for training (e.g. ``ray.train.torch.prepare_model``); default none.
            Every rank's ``batches`` must then yield the same number of batches (DDP syncs each step).
        reduce: averages a float over ranks (e.g. an ``all_reduce``); default the identity.

    Returns:
        The head's state dict (CPU tensors, keys without any wrapper's ``module.`` prefix), for
        ``sskd``/``ssdkd``'s ``teacher_head=``.
    """
    if epochs < 1:
        raise ValueError(f"pretrain_sskd_teacher_head: epochs={epochs} must be >= 1")
    device = torch.device(device) if device is not None else next(teacher.parameters()).device
    with _frozen_eval(teacher, device):
        wrapped, head = _prepared_head(teacher, batches, head, device, prepare)
        opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay)
        sched = torch.optim.lr_scheduler.MultiStepLR(opt, milestones=list(milestones), gamma=0.1)
        return _fit_head(teacher, wrapped, head, batches, val_batches, opt, sched, epochs=epochs,
                         patience=patience, device=device, reduce=reduce if reduce is not None else _same)


def _prepared_head(teacher: nn.Module, batches: Iterable[Any], head: nn.Module | None, device: torch.device,
                   prepare: Callable[[nn.Module], nn.Module] | None) -> tuple[nn.Module, nn.Module]:
    """The head to train (``head``, else a fresh one of the teacher's width) on ``device``, in train
    mode: ``(wrapped, head)``, ``wrapped`` being what ``prepare`` made of it (or the head itself)."""
    if head is None:
        head = _default_head(teacher, batches, device)
    head = head.to(device).train()
    wrapped = prepare(head) if prepare is not None else head
    return wrapped, getattr(wrapped, "module", wrapped)  # DDP trains the module it wraps: snapshot that one


def _fit_head(teacher: nn.Module, wrapped: nn.Module, head: nn.Module, batches: Iterable[Any],
              val_batches: Iterable[Any] | None, opt: torch.optim.Optimizer,
              sched: torch.optim.lr_scheduler.LRScheduler, *, epochs: int, patience: int | None,
              device: torch.device, reduce: Callable[[float], float]) -> dict[str, Tensor]:
    """The epochs of :func:`pretrain_sskd_teacher_head`: the head's state at its best validation
    loss (early stopping after ``patience`` stale epochs), else after the last epoch."""
    best = _BestByValLoss()
    for epoch in range(epochs):
        train_loss = _head_train_epoch(teacher, wrapped, batches, opt, device, reduce)
        sched.step()
        msg = f"sskd head epoch {epoch + 1}/{epochs}: train loss {train_loss:.4f}"
        if val_batches is not None:
            val = _head_val_loss(teacher, head, val_batches, device, reduce)
            msg += f", val loss {val:.4f}"
            best.update(val, head)
        logger.info(msg)
        if patience is not None and val_batches is not None and best.stale >= patience:
            logger.info("sskd head: early stop after %d epochs without improvement", best.stale)
            break
    return best.state if best.state is not None else _cpu_state(head)


class _BestByValLoss:
    """The head's state at its lowest validation loss so far, and the epochs since it improved."""

    def __init__(self) -> None:
        self.state: dict[str, Tensor] | None = None
        self.loss = float("inf")
        self.stale = 0

    def update(self, loss: float, head: nn.Module) -> None:
        """Keep a snapshot of ``head`` if ``loss`` is a new best, else count one more stale epoch."""
        if loss < self.loss:
            self.loss, self.stale, self.state = loss, 0, _cpu_state(head)
        else:
            self.stale += 1


@contextlib.contextmanager
def _frozen_eval(model: nn.Module, device: torch.device) -> Iterator[nn.Module]:
    """``model`` frozen, in eval mode and on ``device`` inside the block.

    Each module's training flag and each parameter's ``requires_grad`` are restored on exit (the
    caller's teacher goes on training afterwards); the device is not.
    """
    flags = [(m, m.training) for m in model.modules()]
    grads = [(p, p.requires_grad) for p in model.parameters()]
    model.requires_grad_(False).eval().to(device)
    try:
        yield model
    finally:
        for m, mode in flags:
            m.training = mode
        for p, g in grads:
            p.requires_grad_(g)


def _default_head(teacher: nn.Module, batches: Iterable[Any], device: torch.device) -> nn.Module:
    """A fresh ``ProjectionHead`` as wide as the teacher's embedding, probed on the first batch."""
    first = _images(next(iter(batches))).to(device)
    with torch.no_grad():
        return ProjectionHead(int(features(teacher, first[:2]).embedding.shape[1]))


def _same(value: float) -> float:
    """The single-process ``reduce``: one rank's number is already everyone's."""
    return value


def _head_train_epoch(teacher: nn.Module, head: nn.Module, batches: Iterable[Any],
                      opt: torch.optim.Optimizer, device: torch.device,
                      reduce: Callable[[float], float] = _same) -> float:
    """One optimiser pass of ``head`` over ``batches``; returns the mean training loss over the
    batches of every rank (``reduce`` of the sum over that of the count: ratio of the averages).

    Raises:
        ValueError: when ``batches`` yields nothing (empty, or a one-shot iterator already used).
    """
    total, n = 0.0, 0
    for batch in batches:
        loss = sskd_head_loss(teacher, head, _images(batch).to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total, n = total + float(loss.detach()), n + 1
    if n == 0:
        raise ValueError("pretrain_sskd_teacher_head: batches is empty (or a one-shot iterator)")
    total, n = reduce(total), reduce(float(n))
    return total / n


def _head_val_loss(teacher: nn.Module, head: nn.Module, val_batches: Iterable[Any],
                   device: torch.device, reduce: Callable[[float], float] = _same) -> float:
    """Mean contrastive loss of ``head`` over the ``val_batches`` of every rank (eval mode, no
    gradients; 0 if there are none anywhere). ``head`` is the unwrapped module: no DDP forward."""
    head.eval()
    with torch.no_grad():
        losses = [float(sskd_head_loss(teacher, head, _images(b).to(device))) for b in val_batches]
    head.train()
    total, n = reduce(sum(losses)), reduce(float(len(losses)))
    return total / n if n > 0 else 0.0


def _cpu_state(module: nn.Module) -> dict[str, Tensor]:
    """A detached CPU copy of ``module``'s state dict (a snapshot later steps cannot change)."""
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


class SSKDHeadPrep(TeacherPrep):
    """SSKD's teacher prep: the teacher's projection head trained on the rotation task, teacher frozen
    (:func:`pretrain_sskd_teacher_head` with SSD-KD's schedule: steps at 1/2 and 3/4 of the
    epochs, early stop after 15 epochs without a better validation loss)."""

    name = "sskd_head"
    kwarg = "teacher_head"

    def train(self, teacher, batches, val_batches, *, epochs, prepare=None, reduce=None):
        return pretrain_sskd_teacher_head(teacher, batches, epochs=epochs, val_batches=val_batches,
                                          patience=min(15, epochs), milestones=(epochs // 2, 3 * epochs // 4),
                                          prepare=prepare, reduce=reduce)

    def placeholder(self, teacher, input_size):
        dim = probe_shapes(teacher, input_size).embedding_dim
        return {k: v.contiguous() for k, v in ProjectionHead(dim).state_dict().items()}


@register_method("sskd")
class SSKD(Method):
    """Self-supervised KD; any student/teacher pair on square images.

    Extra constructor argument ``teacher_head``: the head trained by
    :func:`pretrain_sskd_teacher_head` (its state dict, or the module itself).
    """

    Params = SSKDParams
    teacher_prep = SSKDHeadPrep

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        params: Any = None,
        *,
        num_classes: int,
        class_weights: Tensor | None = None,
        input_size: int | tuple[int, ...] | None = None,
        teacher_input: nn.Module | None = None,
        teacher_head: nn.Module | Mapping[str, Tensor] | None = None,
    ) -> None:
        super().__init__(
            student,
            teacher,
            params,
            num_classes=num_classes,
            class_weights=class_weights,
            input_size=input_size,
            teacher_input=teacher_input,
        )
        if self.input_size[1] != self.input_size[2]:
            self.refuse(f"rotated views need square images, got input_size {self.input_size}")
        if self.sskd_weight and self.params.w_ss:
            self.freeze("teacher_head", self._teacher_head(teacher_head))
            self.adapters["proj"] = ProjectionHead(self.student_shapes.embedding_dim)

    @property
    def sskd_weight(self) -> float:
        """Overall weight of the SSKD terms (1 here; ``w_sskd`` in ``ssdkd``)."""
        return float(getattr(self.params, "w_sskd", 1.0))

    def _teacher_head(self, head: nn.Module | Mapping[str, Tensor] | None) -> nn.Module:
        dim = self.teacher_shapes.embedding_dim
        if head is None:
            raise ValueError(
                f"method {self.name!r} needs the teacher's projection head from SSKD's teacher prep: run "
                "raykd.distill.pretrain_sskd_teacher_head(teacher, batches) and pass its result as "
                "teacher_head=... (or set w_ss=0 to drop the similarity term)"
            )
        if isinstance(head, Mapping):
            module = ProjectionHead(dim)
            try:
                module.load_state_dict(head)
            except RuntimeError as e:
                self.refuse(f"teacher_head does not fit a projection head of the teacher's width {dim}: {e}")
            head = module
        try:
            with torch.no_grad():
                out = head.eval()(torch.zeros(2, dim, device=next(head.parameters()).device))
        except RuntimeError as e:
            self.refuse(f"teacher_head does not accept the teacher's {dim}-wide embedding: {e}")
        if out.ndim != 2:
            self.refuse(f"teacher_head must map (B, {dim}) to (B, D), got {tuple(out.shape)}")
        return head

    def view_features(self, images: Tensor) -> tuple[Features, Features]:
        """Student and teacher features of the ``4B`` rotated views (originals first)."""
        views = rotation_views(images)
        return self.student_features(views), self.teacher_features(views)

    def sskd_parts(self, fs: Features, ft: Features, targets: Tensor) -> dict[str, Tensor]:
        p, k = self.params, self.sskd_weight
        b = targets.shape[0]
        s_logits, t_logits = fs.logits, ft.logits
        parts: dict[str, Tensor] = {}
        if p.w_ce:
            parts["ce"] = k * p.w_ce * self.task_loss(s_logits[:b], targets)
        if p.w_kd:
            parts["kd"] = k * p.w_kd * kd_kl_div(s_logits[:b], t_logits[:b], p.temperature)
        if p.w_tf:
            keep = selective_keep(t_logits[b:], targets.repeat(3), p.ratio_tf)
            parts["tf"] = k * p.w_tf * kd_kl_div(s_logits[b:][keep], t_logits[b:][keep], p.temperature)
        if p.w_ss and k:
            s_rep = self.adapters["proj"](fs.embedding)
            with torch.no_grad():
                t_rep = self._eval(self.frozen("teacher_head"))(ft.embedding)
            s_sim, t_sim = sskd_similarity(s_rep[:b], s_rep[b:]), sskd_similarity(t_rep[:b], t_rep[b:])
            source = torch.arange(b, device=targets.device).repeat(3)
            keep = selective_keep(t_sim, source, p.ratio_ss)
            parts["ss"] = k * p.w_ss * kd_kl_div(s_sim[keep], t_sim[keep], p.ss_temperature)
        return parts

    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        fs, ft = self.view_features(images)
        return self.output(fs.logits[: targets.shape[0]], self.sskd_parts(fs, ft, targets))
