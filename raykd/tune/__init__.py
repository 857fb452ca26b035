"""The search job: Ray Tune + Optuna over distillation methods, students and hyperparameters.

``python -m raykd.tune [--space search_spaces/FILE.yaml] [--set key=value] [--resume]``;
:func:`load_space` reads and validates a space, :func:`run_tune` runs stages 1-3.
"""

from raykd.tune.sampler import SpaceSampler
from raykd.tune.space import BudgetConfig, ExportConfig, SearchConfig, SearchSpace
from raykd.tune.space_file import load_space

__all__ = ["BudgetConfig", "ExportConfig", "SearchConfig", "SearchSpace", "SpaceSampler", "load_space",
           "run_tune"]


def run_tune(space, **kwargs):
    """See :func:`raykd.tune.search.run_tune` (imported lazily: Ray is heavy)."""
    from raykd.tune.search import run_tune as _run

    return _run(space, **kwargs)
