"""The paper setting of each distillation method, for a search's first trial of that method.

Every method's ``Params`` defaults *are* its source paper's setting (the values its published code
ran, with the departures listed in ``METHODS.md``), so this is the defaults as a plain dict.
``baseline`` is raykd's own reference (class-weighted CE, as SSD-KD's student alone). A method two
papers share keeps one setting: ``kd`` is SSD-KD's BLKD (T 5, alpha 0.5); the fusion-teacher
paper's KD (T 1, alpha 0.5) is fixed in its own run files (``configs/fused_teacher_tiny_cnn.yaml``,
``search_spaces/fusion.yaml``).

The rest of each paper's runs (optimiser, schedule, global batch, epochs, selection metric, task)
lives in ``configs/*.yaml`` and ``search_spaces/*.yaml``; ``METHODS.md`` ("The papers' run
settings") tables them against the papers and ``tests/distill/test_paper_presets.py`` checks every
row against the files.

>>> paper_params("skindistilvit")["weighted_ce"], paper_params("kd")["temperature"]
(False, 5.0)
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

import raykd.distill.methods  # noqa: F401  (registers every method)
from raykd.distill.base import METHODS

__all__ = ["paper_params"]


def paper_params(name: str) -> dict[str, Any]:
    """The paper setting of method ``name`` as ``{knob: value}``, valid input to ``build_method``.

    Raises the registry's ``KeyError`` (with a did-you-mean) for an unknown name.
    """
    return asdict(METHODS.get(name).Params())
