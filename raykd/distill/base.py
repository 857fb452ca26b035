"""The distillation-method contract: Params, Method, MethodOutput, the registry and build_method.

A method is an ``nn.Module`` that owns the student and its adapters (the trainable part) and
holds the teacher *outside* its module tree, so that ``method.parameters()``, ``state_dict()``
and a ``DistributedDataParallel(method)`` wrapper see only what is trained. The teacher is frozen
(``requires_grad=False``), stays in eval mode when the method is put in ``train()``, runs under
``torch.no_grad()`` and follows the method in ``.to(device)``.

Every method declares a frozen ``Params`` dataclass: each field has a default and either a
``range`` or ``choices`` in its metadata; search spaces name these fields. Construction validates
that the student and teacher expose what the method reads (by one probe forward pass on a dummy
batch) and refuses otherwise with a message naming method, student, teacher and reason.

Example:
    >>> method = build_method("kd", student, teacher, {"temperature": 4.0}, num_classes=8)
    >>> out = method(images, targets)          # MethodOutput(loss, logits, parts)
    >>> out.loss.backward()
"""

from __future__ import annotations

import abc
import contextlib
import logging
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, fields
from typing import Any, ClassVar, NamedTuple

import torch
from torch import Tensor, nn

from raykd.distill.losses import weighted_cross_entropy
from raykd.models import Features, features
from raykd.registry import Registry
from raykd.typed import Knobs, knob, make_knobs

__all__ = [
    "METHODS",
    "FeatureShapes",
    "Method",
    "MethodOutput",
    "MethodParams",
    "build_method",
    "knob",
    "make_params",
    "method_params",
    "model_name",
    "param_table",
    "register_method",
]

logger = logging.getLogger(__name__)

METHODS: Registry[type[Method]] = Registry("distillation method")


@dataclass(frozen=True)
class MethodParams(Knobs):
    """Knobs shared by every method: the supervised task loss.

    Attributes:
        weighted_ce: weight the cross-entropy by the class weights given to the method (from the
            dataset manifest; SSD-KD Eq. 3). Without class weights the CE is unweighted.
        label_smoothing: epsilon of label smoothing (Szegedy et al. 2016).
    """

    weighted_ce: bool = knob(True, choices=[True, False], help="class-weighted CE when weights are given")
    label_smoothing: float = knob(0.0, range=(0.0, 0.5), help="label smoothing epsilon")


def make_params(
    params_cls: type[MethodParams], values: MethodParams | Mapping[str, Any] | None, method: str
) -> MethodParams:
    """Build and validate a Params instance from ``None`` (defaults), a mapping or an instance."""
    return make_knobs(params_cls, values, owner=f"method {method!r}")


def register_method(name: str):
    """Class decorator: register a Method subclass in :data:`METHODS` and set its ``name``."""

    def deco(cls: type[Method]) -> type[Method]:
        cls.name = name
        METHODS.add(name, cls)
        return cls

    return deco


def method_params(name: str) -> type[MethodParams]:
    """The Params dataclass of a registered method (for search-space validation)."""
    return METHODS.get(name).Params


def build_method(
    name: str,
    student: nn.Module,
    teacher: nn.Module | None,
    params: Mapping[str, Any] | MethodParams | None = None,
    *,
    num_classes: int,
    class_weights: Tensor | None = None,
    **kwargs: Any,
) -> Method:
    """Build the registered method ``name``; extra keyword arguments go to its constructor
    (e.g. ``input_size=(3, 64, 64)``, ``teacher_head=...`` for ``sskd``/``ssdkd``)."""
    cls = METHODS.get(name)
    p = make_params(cls.Params, params, name)
    return cls(student, teacher, p, num_classes=num_classes, class_weights=class_weights, **kwargs)


class MethodOutput(NamedTuple):
    """What ``Method.forward`` returns. A NamedTuple so DDP and pytree see every tensor.

    Attributes:
        loss: the scalar to back-propagate, the sum of ``parts``.
        logits: the student's ``(B, num_classes)`` logits on the original images.
        parts: the weighted loss terms, logged separately.
    """

    loss: Tensor
    logits: Tensor
    parts: dict[str, Tensor]


@dataclass(frozen=True)
class FeatureShapes:
    """Shapes a model exposes through ``raykd.models.features`` (found by one probe pass)."""

    num_logits: int
    embedding_dim: int
    feature_map: tuple[int, int, int] | None  # (C, H, W)
    hidden: tuple[int, int, int] | None  # (num_blocks, tokens, width)
    num_heads: int | None  # FCViT per-block heads

    @classmethod
    def of(cls, f: Features) -> FeatureShapes:
        hs = f.hidden_states
        return cls(
            num_logits=int(f.logits.shape[-1]),
            embedding_dim=int(f.embedding.shape[-1]),
            feature_map=tuple(f.feature_map.shape[1:]) if f.feature_map is not None else None,
            hidden=(len(hs), int(hs[-1].shape[1]), int(hs[-1].shape[2])) if hs else None,
            num_heads=len(f.layer_logits) if f.layer_logits else None,
        )


def model_name(model: nn.Module | None) -> str:
    """A readable model name: the timm architecture if known, else the class name."""
    if model is None:
        return "None"
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def _resolve_input_size(student: nn.Module, input_size: int | tuple[int, ...] | None) -> tuple[int, int, int]:
    if input_size is None:
        cfg = getattr(student, "pretrained_cfg", None) or {}
        input_size = cfg.get("input_size", (3, 224, 224))
    if isinstance(input_size, int):
        return (3, input_size, input_size)
    size = tuple(int(v) for v in input_size)
    return size if len(size) == 3 else (3, *size)


@torch.no_grad()
def probe_shapes(model: nn.Module, input_size: tuple[int, int, int]) -> FeatureShapes:
    """Run ``features`` once on a dummy batch of 2 in eval mode and restore the training flags."""
    flags = [(m, m.training) for m in model.modules()]
    param = next(iter(model.parameters()), None)
    device = param.device if param is not None else torch.device("cpu")
    x = torch.randn(2, *input_size, generator=torch.Generator().manual_seed(0)).to(device)
    model.eval()
    try:
        return FeatureShapes.of(features(model, x))
    finally:
        for m, mode in flags:
            m.training = mode


@dataclass(frozen=True)
class PipelineStep:
    """One run of a method trained as several runs in sequence (:meth:`Method.pipeline`): its
    student (``ModelConfig`` fields) and what the step is (``info``, e.g. ``{"depth": 5}``), kept
    with each of its reports. Its teacher is the previous step's best model (the first step's is
    the run's teacher)."""

    suffix: str | None  # the step's run is named ``<run>-<suffix>``; None: the parent, trained already
    student: dict[str, Any]
    info: dict[str, Any]


class TeacherPrep(abc.ABC):
    """Work on the teacher alone that a method needs before it can distil (SSKD's projection head
    trained on the rotation task). It runs once per teacher (the search's stage 1, or ``raykd
    train`` before its run), its output is saved as a safetensors file, and the method's
    constructor gets that state as the keyword :attr:`kwarg`."""

    #: File stem of the saved output.
    name: ClassVar[str]
    #: The method constructor's keyword for the output.
    kwarg: ClassVar[str]

    @abc.abstractmethod
    def train(self, teacher: nn.Module, batches: Iterable[Tensor], val_batches: Iterable[Tensor] | None, *,
              epochs: int, prepare: Callable[[nn.Module], nn.Module] | None = None,
              reduce: Callable[[float], float] | None = None) -> dict[str, Tensor]:
        """The prep's output (a state dict) from the frozen ``teacher`` and re-iterable batches of
        normalised images in the teacher's own input contract.

        The two hooks let the same code run as one rank of a data-parallel run
        (:func:`raykd.train.prep.run_teacher_prep`) and in a single process (both ``None``):
        ``prepare`` wraps the trainable module (DDP, so gradients are averaged over ranks) and
        ``reduce`` averages a scalar over ranks, so that every rank takes the same decisions
        (early stopping, best epoch) from whole-split numbers. Every rank gets batch iterables of
        the same length; the returned state never carries a wrapper's ``module.`` prefix."""

    @abc.abstractmethod
    def placeholder(self, teacher: nn.Module, input_size: tuple[int, int, int]) -> dict[str, Tensor]:
        """An untrained output of the right shapes: checks that a method fits before any prep ran."""


class Method(nn.Module, abc.ABC):
    """Base class of every distillation method.

    Subclasses set ``Params``, ``needs_teacher`` and implement ``forward`` (usually through
    :meth:`output`, which makes the loss the sum of the named parts). Constructors validate
    compatibility and create adapters, which are trainable submodules under ``self.adapters``.

    Args:
        student: the model being trained.
        teacher: the frozen teacher (``None`` for teacher-free methods).
        params: a ``Params`` instance, a dict of its fields, or ``None`` for defaults.
        num_classes: number of classes both models must predict.
        class_weights: optional ``(num_classes,)`` weights for the weighted CE.
        input_size: ``(C, H, W)`` or ``H`` of the images the method will see (used for the probe
            pass); defaults to the student's ``pretrained_cfg["input_size"]``.
        teacher_input: a module that turns the student's input batch into the teacher's (its own
            size, mean and std: :class:`raykd.data.transforms.InputBridge`); ``None`` when both
            models share one contract. Every teacher forward pass goes through it.
    """

    Params: ClassVar[type[MethodParams]] = MethodParams
    needs_teacher: ClassVar[bool] = True
    name: ClassVar[str] = "method"
    #: True where some trainable parameter legitimately gets no gradient in some steps
    #: (e.g. ``fcvit_probs`` before every head is on): the loop must tell DDP.
    ddp_find_unused_parameters: ClassVar[bool] = False
    #: The teacher prep this method needs before it can be built (:class:`TeacherPrep`), or None.
    teacher_prep: ClassVar[type[TeacherPrep] | None] = None
    #: The student is made from the teacher (the cascade cuts blocks off it): a search gives the
    #: method no students of its own.
    student_from_teacher: ClassVar[bool] = False
    #: The method trains as several runs in sequence (:meth:`pipeline`), not as one.
    multi_run: ClassVar[bool] = False
    #: Knobs of a search's method entry besides ``params`` that :meth:`pipeline` takes (``min_blocks``).
    pipeline_knobs: ClassVar[tuple[str, ...]] = ()
    #: True for methods that train an FCViT's per-block heads (``fcvit``, ``fcvit_probs``).
    reads_layer_logits: ClassVar[bool] = False
    #: Params fields of which at least one must be non-zero (None: every ``w_*`` field; ``()``:
    #: no check, for methods with a loss term that is always on).
    loss_weights: ClassVar[tuple[str, ...] | None] = None

    def __init__(
        self,
        student: nn.Module,
        teacher: nn.Module | None,
        params: MethodParams | Mapping[str, Any] | None = None,
        *,
        num_classes: int,
        class_weights: Tensor | None = None,
        input_size: int | tuple[int, ...] | None = None,
        teacher_input: nn.Module | None = None,
    ) -> None:
        super().__init__()
        self.params = make_params(self.Params, params, self.name)
        names = self.loss_weights
        if names is None:
            names = tuple(f.name for f in fields(self.params) if f.name.startswith("w_"))
        weights = {n: getattr(self.params, n) for n in names}
        if weights and not any(weights.values()):
            raise ValueError(
                f"method {self.name!r}: every loss weight is 0 ({sorted(weights)}); set at least one > 0"
            )
        self.num_classes = int(num_classes)
        self.student = student
        self.adapters = nn.ModuleDict()
        self.epoch = 0
        self._frozen: dict[str, nn.Module] = {}
        self._saved: Mapping[str, Tensor] | None = None  # saved teacher outputs (saved_teacher)
        self._student_name, self._teacher_name = model_name(student), model_name(teacher)
        if class_weights is not None:
            class_weights = torch.as_tensor(class_weights, dtype=torch.float32).flatten()
            if class_weights.numel() != self.num_classes:
                raise ValueError(
                    f"method {self.name!r}: class_weights has {class_weights.numel()} entries but "
                    f"num_classes is {self.num_classes}; pass one weight per class"
                )
        self.register_buffer("class_weights", class_weights, persistent=False)
        self.input_size = _resolve_input_size(student, input_size)
        self.student_shapes = self._probe(student, "student")
        self.teacher_shapes: FeatureShapes | None = None
        if self.student_shapes.num_heads and not self.reads_layer_logits:
            # An FCViT student trained through its top head only: the lower heads get no gradient.
            self.ddp_find_unused_parameters = True
        if self.needs_teacher:
            if teacher is None:
                raise ValueError(
                    f"method {self.name!r} needs a teacher; got teacher=None (student {self._student_name})"
                )
            if {id(p) for p in student.parameters()} & {id(p) for p in teacher.parameters()}:
                self.refuse("student and teacher share parameters; pass a deep copy as the student")
            self.freeze("teacher", teacher)
            if teacher_input is not None:
                self.freeze("teacher_input", teacher_input)
            self.teacher_shapes = self._probe(teacher, "teacher")
        elif teacher is not None:
            logger.info("method %r does not use a teacher; ignoring %s", self.name, self._teacher_name)

    # -- teacher side -------------------------------------------------------------------------
    @property
    def teacher(self) -> nn.Module | None:
        """The frozen teacher (not a submodule: invisible to ``parameters()`` and DDP)."""
        return self._frozen.get("teacher")

    def freeze(self, key: str, module: nn.Module) -> nn.Module:
        """Keep ``module`` frozen, in eval mode and outside the module tree (teacher side)."""
        module.requires_grad_(False)
        module.eval()
        self._frozen[key] = module
        return module

    def frozen(self, key: str) -> nn.Module:
        return self._frozen[key]

    def train(self, mode: bool = True) -> Method:
        super().train(mode)
        for m in self._frozen.values():
            m.eval()
        return self

    def _apply(self, fn, recurse: bool = True):  # .to(), .cuda(), .half(): move the teacher along
        super()._apply(fn, recurse)
        for m in self._frozen.values():
            m._apply(fn, recurse)
        return self

    def teacher_inputs(self, images: Tensor) -> Tensor:
        """The student's batch in the teacher's own preprocessing contract (see ``teacher_input``)."""
        bridge = self._frozen.get("teacher_input")
        return images if bridge is None else bridge(images)

    def teacher_logits(self, images: Tensor) -> Tensor:
        saved = self._saved
        if saved is not None:
            return saved["logits"]
        with torch.no_grad():
            return self._eval(self.teacher)(self.teacher_inputs(images))

    def teacher_features(self, images: Tensor) -> Features:
        saved = self._saved
        if saved is not None:  # only what saved_outputs() declared; the rest is not there
            return Features(logits=saved.get("logits"), embedding=saved.get("embedding"))
        with torch.no_grad():
            return features(self._eval(self.teacher), self.teacher_inputs(images))

    @staticmethod
    def _eval(module: nn.Module) -> nn.Module:
        if module.training:  # someone called teacher.train() behind our back
            module.eval()
        return module

    # -- student side -------------------------------------------------------------------------
    def student_features(self, images: Tensor) -> Features:
        return features(self.student, images)

    def task_loss(self, logits: Tensor, targets: Tensor) -> Tensor:
        """(Weighted) cross-entropy with the shared knobs ``weighted_ce`` and ``label_smoothing``."""
        weight = self.class_weights if self.params.weighted_ce else None
        return weighted_cross_entropy(logits, targets, weight, self.params.label_smoothing)

    def output(self, logits: Tensor, parts: dict[str, Tensor]) -> MethodOutput:
        """Build the MethodOutput; the loss is the sum of the (already weighted) parts."""
        assert parts, "a method must return at least one loss part"
        loss = sum(parts.values(), start=torch.zeros((), device=logits.device))
        return MethodOutput(loss=loss, logits=logits, parts=parts)

    def trainable_parameters(self) -> Iterator[nn.Parameter]:
        """The student's and the adapters' parameters that require a gradient."""
        return (p for p in self.parameters() if p.requires_grad)

    def set_epoch(self, epoch: int) -> None:
        """Tell the method the (0-based) epoch about to run; schedules read ``self.epoch``."""
        self.epoch = int(epoch)

    def predict(self, images: Tensor) -> Tensor:
        """Student logits for evaluation."""
        return self.student(images)

    @classmethod
    def pipeline(cls, parent: nn.Module, *, image_size: int | None, **knobs: Any) -> list[PipelineStep] | None:
        """The runs of a method trained as several runs in sequence, starting from the trained
        ``parent`` (the run's teacher); each step distils from the previous step's best model.
        The first step describes the parent itself (``suffix`` None, nothing to train).
        ``None`` (every method but the cascade): the method is one run. Raises ValueError when
        ``parent`` or the ``knobs`` (:attr:`pipeline_knobs`) do not allow it."""
        return None

    def saved_outputs(self) -> frozenset[str] | None:
        """The teacher outputs this method reads on the batch's own images (``"logits"``,
        ``"embedding"``), which saved teacher outputs can supply instead of a teacher forward pass;
        ``None`` (the default) where it needs the online teacher (rotated views, feature maps,
        hidden states, a teacher that changes)."""
        return None

    @contextlib.contextmanager
    def saved_teacher(self, outputs: Mapping[str, Tensor] | None) -> Iterator[None]:
        """Within this block the teacher's outputs on the batch are ``outputs`` (saved teacher
        outputs), and the teacher does not run."""
        self._saved = outputs
        try:
            yield
        finally:
            self._saved = None

    @abc.abstractmethod
    def forward(self, images: Tensor, targets: Tensor) -> MethodOutput:
        """Compute the training loss on one batch."""

    # -- validation helpers -------------------------------------------------------------------
    def refuse(self, reason: str) -> None:
        """Raise the ValueError that says why this student/teacher pair cannot be used."""
        raise ValueError(
            f"method {self.name!r} cannot train student {self._student_name} "
            f"with teacher {self._teacher_name}: {reason}"
        )

    def _probe(self, model: nn.Module, role: str) -> FeatureShapes:
        size = self.input_size
        bridge = self._frozen.get("teacher_input") if role == "teacher" else None
        if bridge is not None:
            size = (size[0], bridge.size, bridge.size)
        try:
            shapes = probe_shapes(model, size)
        except Exception as e:  # noqa: BLE001 - re-raised with the context a user needs
            raise ValueError(
                f"method {self.name!r}: the {role} {model_name(model)} failed on a probe batch of "
                f"size {self.input_size} ({type(e).__name__}: {e}); pass input_size= matching the "
                "training images, which both models must accept"
            ) from e
        if shapes.num_logits != self.num_classes:
            self.refuse(
                f"the {role} predicts {shapes.num_logits} classes, not num_classes={self.num_classes}"
            )
        return shapes

    def extra_repr(self) -> str:
        return f"name={self.name!r}, params={self.params}, teacher={self._teacher_name}"


def param_table(name: str) -> list[dict[str, Any]]:
    """One row per knob of a registered method: name, default, range or choices, help."""
    rows = []
    for f in fields(method_params(name)):
        meta = dict(f.metadata)
        rows.append({"name": f.name, "default": f.default, "range": meta.get("range"),
                     "choices": meta.get("choices"), "help": meta.get("help", "")})
    return rows
