"""The search job: Ray Tune + Optuna over distillation methods, students and hyperparameters.

``python -m raykd.tune [--space search_spaces/FILE.yaml] [--set key=value] [--resume]``;
:func:`load_space` reads and validates a space, :func:`run_tune` runs stages 1-3.
"""
