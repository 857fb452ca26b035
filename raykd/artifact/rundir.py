"""The layout of a run folder and of a search trial's folder: every file name in one place, with
the readers and writers of the files that later steps read.

A run folder (``<output_dir>/<name>``, see :meth:`RunDir.of`)::

    config.yaml        the resolved run config
    metrics.json/.csv  one row per epoch (``epoch``, ``train/*``, ``val/*``, ``lr``)
    summary.json       written once the run finished: best value and epoch, val and test metrics
    timing.json        where the wall time went (build, data, train, eval, report, test)
    checkpoint/        the last epoch's state (single-process runs; Ray Train keeps its own)
    best/              the best epoch's student as a saved artifact (:mod:`raykd.artifact.format`)
    prep/              teacher prep outputs of this run's teacher (e.g. SSKD's projection head)
    raykd.log          everything the command logged (``raykd train``; :mod:`raykd.console`)

A search trial's folder is a run folder with ``trial.json`` (what the trial sampled),
``trial_timing.json`` and, for a method trained as several runs, ``pipeline.json``.
"""

from __future__ import annotations

import csv
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

from raykd.console import LOG_FILE

__all__ = ["BEST_DIR", "FAMILY_FILE", "META_NAME", "WEIGHTS_NAME", "RunDir", "TrialDir"]

#: A saved model's files (:mod:`raykd.artifact.format`) and a run's folder of its best epoch.
WEIGHTS_NAME = "model.safetensors"
META_NAME = "meta.json"
BEST_DIR = "best"
#: The family file a search publishes (its experiment folder's and ``output_dir``'s) and Serve reads.
FAMILY_FILE = "family.json"


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _write_json(path: Path, doc: Any) -> None:
    """Write atomically (a reader never sees half a file)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2, default=float))
    os.replace(tmp, path)


@dataclass(frozen=True)
class RunDir:
    """One training run's folder."""

    path: Path

    CONFIG: ClassVar[str] = "config.yaml"
    METRICS: ClassVar[str] = "metrics.json"
    METRICS_CSV: ClassVar[str] = "metrics.csv"
    SUMMARY: ClassVar[str] = "summary.json"
    TIMING: ClassVar[str] = "timing.json"
    CHECKPOINT: ClassVar[str] = "checkpoint"
    WORKERS: ClassVar[str] = "workers.json"
    PREP: ClassVar[str] = "prep"
    CRASH_MARKER: ClassVar[str] = ".crash_injected"

    def __init__(self, path: str | os.PathLike) -> None:
        object.__setattr__(self, "path", Path(path))

    @classmethod
    def of(cls, cfg) -> RunDir:
        """The folder of the run ``cfg`` (a :class:`raykd.config.RunConfig`): ``output_dir/name``."""
        return cls(Path(cfg.output_dir) / cfg.name)

    def __truediv__(self, other: str) -> Path:
        return self.path / other

    def __fspath__(self) -> str:
        return str(self.path)

    def __str__(self) -> str:
        return str(self.path)

    # paths
    @property
    def config_file(self) -> Path:
        return self.path / self.CONFIG

    @property
    def metrics_file(self) -> Path:
        return self.path / self.METRICS

    @property
    def summary_file(self) -> Path:
        return self.path / self.SUMMARY

    @property
    def timing_file(self) -> Path:
        return self.path / self.TIMING

    @property
    def checkpoint_dir(self) -> Path:
        return self.path / self.CHECKPOINT

    @property
    def best_dir(self) -> Path:
        """The best epoch's student (a saved artifact folder)."""
        return self.path / BEST_DIR

    @property
    def best_weights(self) -> Path:
        return self.best_dir / WEIGHTS_NAME

    @property
    def crash_marker(self) -> Path:
        return self.path / self.CRASH_MARKER

    @property
    def workers_file(self) -> Path:
        """Where each (re)start of a Ray Train worker group recorded its size and nodes."""
        return self.path / self.WORKERS

    def read_workers(self) -> list[dict[str, Any]]:
        return _read_json(self.workers_file) or []

    def append_workers(self, row: dict[str, Any]) -> None:
        _write_json(self.workers_file, [*self.read_workers(), row])

    def prep_file(self, prep: str) -> Path:
        """Where a teacher prep's output for this run's teacher is kept."""
        return self.path / self.PREP / f"{prep}.safetensors"

    # state
    def finished(self) -> bool:
        """Whether the run ended (its summary is written last)."""
        return self.summary_file.is_file()

    def is_empty(self) -> bool:
        """No run has written here (the command's own log file aside)."""
        return not self.path.is_dir() or all(p.name == LOG_FILE for p in self.path.iterdir())

    # readers and writers
    def read_summary(self) -> dict[str, Any] | None:
        return _read_json(self.summary_file)

    def write_summary(self, summary: dict[str, Any]) -> None:
        _write_json(self.summary_file, summary)

    def read_metrics(self) -> list[dict[str, Any]]:
        """The per-epoch rows so far (empty before the first epoch)."""
        return _read_json(self.metrics_file) or []

    def write_metrics(self, history: list[dict[str, Any]]) -> None:
        """``metrics.json`` and the same rows as ``metrics.csv``."""
        _write_json(self.metrics_file, history)
        keys = sorted({k for row in history for k in row}, key=lambda k: (k != "epoch", k))
        with (self.path / self.METRICS_CSV).open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(history)

    def read_timing(self) -> dict[str, Any] | None:
        return _read_json(self.timing_file)

    def write_timing(self, timing: dict[str, Any]) -> None:
        _write_json(self.timing_file, timing)


class TrialDir(RunDir):
    """A search trial's folder: its (first) run's folder plus the trial's own records."""

    TRIAL: ClassVar[str] = "trial.json"
    TRIAL_TIMING: ClassVar[str] = "trial_timing.json"
    PIPELINE: ClassVar[str] = "pipeline.json"

    @property
    def trial_file(self) -> Path:
        return self.path / self.TRIAL

    def read_trial(self) -> dict[str, Any] | None:
        return _read_json(self.trial_file)

    def write_trial(self, doc: dict[str, Any]) -> None:
        _write_json(self.trial_file, doc)

    def read_trial_timing(self) -> dict[str, Any] | None:
        return _read_json(self.path / self.TRIAL_TIMING)

    def write_trial_timing(self, doc: dict[str, Any]) -> None:
        _write_json(self.path / self.TRIAL_TIMING, doc)

    def read_pipeline(self) -> dict[str, Any] | None:
        """The steps of a method trained as several runs (the cascade: one per depth), or None."""
        return _read_json(self.path / self.PIPELINE)

    def write_pipeline(self, doc: dict[str, Any]) -> None:
        _write_json(self.path / self.PIPELINE, doc)
