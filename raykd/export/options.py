"""The options of an export, typed and defined once: :func:`~raykd.export.run.run_export` takes an
:class:`ExportConfig`, ``raykd export`` makes its flags from it, and a search space's ``export:``
section is a :class:`SearchExportConfig`.

Every default of an export is written here and nowhere else; the lower-level functions that take
one of them (``export_onnx(opset=)``, ``choose_threshold(target_sensitivity=)``, ...) default to
these fields. A field's metadata holds its valid ``range`` (checked by ``raykd.config.validate``
for a search space) and its ``help`` (the ``raykd export`` flag's help; ``off_help`` for the
``--no-...`` flag of an option that is on by default).

This module imports nothing heavy (no torch, no ONNX), so ``raykd export --help`` and the search
space's loader can read it at no cost.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

__all__ = ["ExportChecks", "ExportConfig", "SearchExportConfig"]


@dataclass
class ExportChecks:
    """How an export checks and measures its model: parity, calibration and latency.

    The options that a search space's ``export:`` section (:class:`SearchExportConfig`) and
    ``raykd export`` (:class:`ExportConfig`) both set.
    """

    tolerance: float = field(default=1e-4, metadata={
        "range": (0.0, 1.0), "help": "max |p_onnx - p_torch| allowed"})
    max_images: int | None = field(default=None, metadata={
        "range": (1, None),
        "help": "use only the first N images of the split for the parity check (default: all); "
                "calibration and the model card always use whole splits"})
    latency_reps: int = field(default=20, metadata={
        "range": (1, 100_000), "help": "batch-1 forward passes timed per model for the CPU latency"})
    calibrate: bool = field(default=True, metadata={
        "help": "fit a temperature and choose the cancer-vs-benign threshold on the validation split, and "
                "write them into the model's meta before the ONNX file is written",
        "off_help": "keep the model's temperature and decision as they are (default: fit both on val)"})
    target_sensitivity: float = field(default=0.95, metadata={
        "range": (0.01, 1.0),
        "help": "validation sensitivity the cancer-vs-benign threshold must reach, in (0, 1]"})


@dataclass
class ExportConfig(ExportChecks):
    """Everything :func:`~raykd.export.run.run_export` can be told: the checks, and which files."""

    split: str = field(default="val", metadata={"help": "split for the parity check and BMA"})
    fp16: bool = field(default=False, metadata={"help": "also write and measure a float16 model"})
    int8: bool = field(default=False, metadata={
        "help": "also write and measure an int8 dynamically quantised model"})
    batch_size: int = field(default=32, metadata={"range": (1, None), "help": "images per forward pass"})
    opset: int = field(default=17, metadata={"help": "ONNX opset"})

    @classmethod
    def from_checks(cls, checks: Any, **options: Any) -> ExportConfig:
        """The config of ``checks`` (any object with :class:`ExportChecks`' fields, e.g. a search space's
        ``export:`` section), with ``options`` set and every other field at its default."""
        return cls(**{f.name: getattr(checks, f.name) for f in dataclasses.fields(ExportChecks)}, **options)


@dataclass
class SearchExportConfig(ExportChecks):
    """A search space's ``export:`` section: what stage 3 does with the winner (and the Pareto family).

    The checks of every export (:class:`ExportChecks`), with a parity check on the first 64
    validation images by default; :meth:`ExportConfig.from_checks` makes each export's config.
    """

    max_images: int | None = field(default=64, metadata={
        "range": (1, None), "help": "validation images for the parity check (None: all)"})
    #: Export the winner (and the Pareto family) to ONNX at all.
    onnx: bool = True
