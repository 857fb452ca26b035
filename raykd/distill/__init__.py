"""Knowledge distillation: pure losses, the method contract and the registered methods.

>>> from raykd.distill import build_method, METHODS
>>> METHODS.names()   # baseline, cascade, crkd, dkd, dkd_combo, fcvit, fcvit_probs, fitnet, kd, ...
>>> method = build_method("kd", student, teacher, {"temperature": 4.0}, num_classes=8)
"""

from raykd.distill import methods  # noqa: F401  (registers every method)
from raykd.distill.base import (
    METHODS,
    Method,
    MethodOutput,
    MethodParams,
    PipelineStep,
    TeacherPrep,
    build_method,
    method_params,
    param_table,
)
from raykd.distill.methods.sskd import pretrain_sskd_teacher_head, sskd_head_loss

__all__ = [
    "METHODS",
    "Method",
    "MethodOutput",
    "MethodParams",
    "PipelineStep",
    "TeacherPrep",
    "build_method",
    "method_params",
    "param_table",
    "pretrain_sskd_teacher_head",
    "sskd_head_loss",
]
