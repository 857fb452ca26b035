"""The Optuna define-by-run function that samples a search space (:class:`SpaceSampler`).

Sampling is define-by-run (Optuna, used through Ray Tune's ``OptunaSearch``): the method is drawn
first and only that method's parameters are suggested, under names prefixed by the method's label
(``kd.temperature``), so TPE models every method's parameters apart and a ``dkd`` trial never
carries a ``kd`` temperature.
"""

from __future__ import annotations

from typing import Any

from raykd.tune.space import SearchSpace, trial_key

__all__ = ["SpaceSampler"]


class SpaceSampler:
    """The define-by-run function handed to ``OptunaSearch(space=...)``.

    Draws the method label first, then only that method's student and parameters; shared keys are
    drawn in every trial. Fixed values are not drawn (the trial plan adds them), so a trial's
    config holds exactly what was searched.
    """

    def __init__(self, space: SearchSpace) -> None:
        self.labels = list(space.methods)
        self.methods = space.methods
        self.shared = space.shared

    def __call__(self, trial: Any) -> None:
        label = trial.suggest_categorical("method", self.labels)
        spec = self.methods[label]
        if len(spec.students) > 1:
            trial.suggest_categorical(trial_key(label, "student"), list(spec.students))
        for key, dist in self.shared.items():
            dist.suggest(trial, key)
        for name, dist in spec.params.items():
            dist.suggest(trial, trial_key(label, name))
        for key, dist in spec.search.items():
            dist.suggest(trial, trial_key(label, key))
        return None
