"""Training-state checkpoints: written atomically, loaded without unpickling arbitrary objects.

A checkpoint folder holds ``state.pt`` with the model (method: student + adapters), optimiser,
schedule, epoch, best-so-far record, metric history and RNG states, and ``state.prev.pt``, the
state saved before it. It is saved with ``torch.save`` and read back with
``torch.load(weights_only=True)``, so it may contain only tensors and plain Python containers: the
RNG states are converted accordingly. When ``state.pt`` cannot be read (a torn or corrupt file),
loading falls back to ``state.prev.pt`` with a warning.
"""

from __future__ import annotations

import logging
import os
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

log = logging.getLogger(__name__)

STATE_NAME = "state.pt"
PREV_STATE_NAME = "state.prev.pt"


def rng_state() -> dict[str, Any]:
    kind, keys, pos, has_gauss, gauss = np.random.get_state()
    state = {
        "python": list(random.getstate()[1]),
        "python_version": random.getstate()[0],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "gauss": float(gauss)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate((state["python_version"], tuple(state["python"]), None))
    n = state["numpy"]
    np.random.set_state(("MT19937", n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def save_state(directory: str | Path, state: dict[str, Any]) -> Path:
    """Write ``state`` to ``directory/state.pt`` atomically; the one it replaces becomes ``state.prev.pt``.

    The new state is written to a temp file and flushed to disk before any rename, so at every
    moment at least one complete state is on disk under one of the two names.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / STATE_NAME
    tmp = path.with_suffix(".pt.tmp")
    with open(tmp, "wb") as f:
        torch.save(state, f)
        f.flush()
        os.fsync(f.fileno())
    if path.is_file():
        os.replace(path, directory / PREV_STATE_NAME)
    os.replace(tmp, path)
    return path


def has_state(directory: str | Path) -> bool:
    """Whether ``directory`` holds a checkpoint (the latest state or the one before it)."""
    directory = Path(directory)
    return (directory / STATE_NAME).is_file() or (directory / PREV_STATE_NAME).is_file()


def load_state(directory: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """The latest state in ``directory``, or the one before it when the latest cannot be read.

    Raises:
        FileNotFoundError: ``directory`` holds no checkpoint.
        RuntimeError: no state in ``directory`` can be read (both named, with their errors).
    """
    directory = Path(directory)
    errors = []
    for name in (STATE_NAME, PREV_STATE_NAME):
        path = directory / name
        if not path.is_file():
            continue
        try:
            state = torch.load(path, map_location=map_location, weights_only=True)
        except Exception as e:  # noqa: BLE001 - torch raises many types for a torn or corrupt file
            errors.append(f"{path}: {type(e).__name__}: {e}")
            continue
        if errors:
            log.warning("checkpoint %s cannot be read (%s); resuming from the previous one, %s",
                        directory / STATE_NAME, errors[0], path)
        return state
    if not errors:
        raise FileNotFoundError(f"{directory / STATE_NAME} not found: not a raykd training checkpoint")
    raise RuntimeError(f"no readable checkpoint in {directory}: " + "; ".join(errors))
