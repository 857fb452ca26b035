"""What a raykd command prints, and where everything else goes.

The console shows raykd's own progress and results (``raykd.*`` loggers at INFO) and anyone's
warnings and errors; everything else (Ray's and Optuna's INFO lines, Python warnings such as
deprecations) goes to a log file only, ``raykd.log`` in the experiment or run folder once one is
known. Ray's per-process logs stay where Ray writes them (``/tmp/ray/session_latest/logs``).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator
from pathlib import Path

__all__ = ["LOG_FILE", "configure", "log_to_file", "quieted", "worker_logging"]

LOG_FILE = "raykd.log"
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _ConsoleFilter(logging.Filter):
    """raykd's INFO lines, and WARNING and above from anyone but Python's warnings module."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "py.warnings":
            return False
        return record.levelno >= logging.WARNING or record.name == "raykd" or record.name.startswith("raykd.")


def configure(*, verbose: bool = False) -> None:
    """Console logging for a raykd command (``verbose``: every logger's INFO lines on the console)."""
    root = logging.getLogger()
    root.setLevel(logging.INFO)
    for h in list(root.handlers):
        if getattr(h, "_raykd", None) == "console":
            root.removeHandler(h)
    console = logging.StreamHandler(sys.stderr)
    console.setFormatter(logging.Formatter(FORMAT))
    if not verbose:
        console.addFilter(_ConsoleFilter())
    console._raykd = "console"  # type: ignore[attr-defined]
    root.addHandler(console)
    logging.captureWarnings(True)  # deprecation notices: to the log file, not the console
    # Ray's own progress output: its Data progress bars and the driver's copy of worker logs are
    # deduplicated; Optuna's per-trial INFO lines go to the file only (through the root logger).
    os.environ.setdefault("RAY_DATA_DISABLE_PROGRESS_BARS", "1")
    try:
        import optuna  # lazy: optuna is heavy

        optuna.logging.disable_default_handler()
        optuna.logging.enable_propagation()
    except ImportError:  # pragma: no cover - optuna is a dependency
        pass


def log_to_file(directory: str | os.PathLike) -> Path:
    """Also write every logger's INFO lines to ``directory/raykd.log`` (appended; one file per
    experiment or run). Returns its path."""
    path = Path(directory) / LOG_FILE
    path.parent.mkdir(parents=True, exist_ok=True)
    root = logging.getLogger()
    for h in list(root.handlers):
        if getattr(h, "_raykd", None) == "file":
            root.removeHandler(h)
            h.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter(FORMAT))
    handler._raykd = "file"  # type: ignore[attr-defined]
    root.addHandler(handler)
    return path


def worker_logging(*, progress: bool = False) -> None:
    """Logging inside a Ray task or Ray Train worker: Ray Train's per-report INFO lines are dropped;
    with ``progress``, raykd's INFO lines go to stderr, which Ray copies to the driver's console."""
    raykd = logging.getLogger("raykd")
    if progress and not raykd.handlers:
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        raykd.addHandler(handler)
        raykd.setLevel(logging.INFO)
    logging.getLogger("ray.train").setLevel(logging.WARNING)  # "Moving model to device", every report


@contextlib.contextmanager
def quieted(name: str, level: int = logging.WARNING) -> Iterator[None]:
    """Raise logger ``name`` to ``level`` for the block (e.g. the epoch lines of background runs)."""
    logger = logging.getLogger(name)
    before = logger.level
    logger.setLevel(level)
    try:
        yield
    finally:
        logger.setLevel(before)
