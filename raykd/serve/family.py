"""The served model family: which models a Serve application loads and which one is the default.

The tune job writes a family file from its leaderboard (every trial's size, latency and validation
BMA, so a client can trade accuracy for speed, SkinDistilViT table 3); ``python -m raykd.serve
--family FILE`` serves it. ``--model PATH`` builds a family from artifact folders or ONNX files
directly. File format (JSON)::

    {"winner": "trial_0003",
     "models": [{"name": "trial_0003", "version": "0003", "artifact": "trial_0003/best",
                 "onnx": "trial_0003/best/model.onnx", "params": 5500000, "size_bytes": 22000000,
                 "val_bma": 0.81, "latency_ms": 4.2}]}

Relative paths are resolved against the folder of the family file, so an experiment folder can be
moved or mounted elsewhere (a KubeRay pod) without rewriting it.

:meth:`Family.within_budget` picks the member a client can afford: the best validation BMA among
the models within a latency and/or size budget (``/predict?max_latency_ms=...&max_size_mb=...``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from raykd.data.manifest import is_uri
from raykd.registry import did_you_mean
from raykd.storage import Mirror, default_mirror_dir, split_uri

__all__ = ["BYTES_PER_MB", "BudgetError", "Family", "FamilyEntry", "family_from_paths", "fetch_family", "load_family",
           "write_family"]

#: Size budgets are in decimal megabytes (10^6 bytes), as download sizes are quoted.
BYTES_PER_MB = 1_000_000


class BudgetError(ValueError):
    """No member of the family fits a latency/size budget (the Serve app answers 422)."""


@dataclass
class FamilyEntry:
    """One servable model: a torch artifact, an ONNX file, or both.

    Attributes:
        name: Unique name clients pass as ``?model=``.
        version: Run name / trial id.
        artifact: Artifact folder (``model.safetensors`` + ``meta.json``), or None.
        onnx: ONNX file carrying the preprocessing contract in its metadata, or None.
        params: Number of parameters (0 when unknown).
        size_bytes: Size of the served weights on disk (0 when unknown).
        val_bma: Validation balanced multi-class accuracy, or None.
        latency_ms: Measured single-image latency, or None.
    """

    name: str
    version: str = ""
    artifact: str | None = None
    onnx: str | None = None
    params: int = 0
    size_bytes: int = 0
    val_bma: float | None = None
    latency_ms: float | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("family entry: 'name' must be a non-empty string")
        if not self.artifact and not self.onnx:
            raise ValueError(f"family entry {self.name!r}: give 'artifact' or 'onnx' (both are null)")

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "family") -> FamilyEntry:
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise ValueError(f"{source}: unknown keys {unknown} in a model entry; allowed: {sorted(names)}")
        if "name" not in data:
            raise ValueError(f"{source}: a model entry has no 'name'")
        return cls(**data)


@dataclass
class Family:
    """A ranked family of models and the default one (the leaderboard's winner)."""

    winner: str
    models: list[FamilyEntry] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.models:
            raise ValueError("a model family needs at least one model")
        seen: set[str] = set()
        for m in self.models:
            if m.name in seen:
                raise ValueError(f"model name {m.name!r} appears twice in the family; names must be unique")
            seen.add(m.name)
        if self.winner not in seen:
            raise ValueError(f"winner {self.winner!r} is not one of the family's models {sorted(seen)}")

    @property
    def names(self) -> list[str]:
        return [m.name for m in self.models]

    def get(self, name: str | None) -> FamilyEntry:
        """The entry called ``name`` (the winner when None); unknown names suggest close ones."""
        name = name or self.winner
        for m in self.models:
            if m.name == name:
                return m
        hint = did_you_mean(name, self.names, cutoff=0.4)
        raise KeyError(f"unknown model {name!r}.{hint} Served: {self.names}")

    def budget_latency_ms(self, entry: FamilyEntry,
                          measured_latency_ms: Mapping[str, float] | None = None) -> float | None:
        """The latency a budget is checked against: the one recorded at export/search
        (``entry.latency_ms``, measured on the machine that ranked the family), else the serving
        replica's own measurement (``measured_latency_ms[name]``), else None (unknown)."""
        if entry.latency_ms is not None:
            return float(entry.latency_ms)
        if measured_latency_ms and entry.name in measured_latency_ms:
            return float(measured_latency_ms[entry.name])
        return None

    def within_budget(self, *, max_latency_ms: float | None = None, max_size_mb: float | None = None,
                      measured_latency_ms: Mapping[str, float] | None = None) -> FamilyEntry:
        """The member with the best validation BMA whose latency and size are within budget.

        A client trades accuracy for speed or size (SkinDistilViT table 3) without knowing the family:
        it states what it can afford and gets the most accurate model that fits.

        Args:
            max_latency_ms: Largest single-image latency in milliseconds (see
                :meth:`budget_latency_ms` for which latency); None = no latency budget.
            max_size_mb: Largest weights file in MB (10^6 bytes, ``entry.size_bytes``); None = no
                size budget.
            measured_latency_ms: The replica's measured latency per model name, used for members
                without a recorded latency.

        Returns:
            The chosen entry. Ties on BMA go to the lower latency, then the smaller size, then the
            earlier member of the family; members without a BMA rank below every member with one.
            A member whose latency (or size) is unknown never fits a latency (or size) budget.

        Raises:
            ValueError: no budget given, or a budget that is not a positive finite number.
            BudgetError: no member fits; the message names the budget and the fastest and
                smallest models on offer.
        """
        budgets = {"max_latency_ms": max_latency_ms, "max_size_mb": max_size_mb}
        given = {k: float(v) for k, v in budgets.items() if v is not None}
        if not given:
            raise ValueError("within_budget needs max_latency_ms and/or max_size_mb")
        for key, value in given.items():
            if not (math.isfinite(value) and value > 0):
                raise ValueError(f"{key} must be a positive number, got {value:g}")
        rows = []
        for index, entry in enumerate(self.models):
            latency = self.budget_latency_ms(entry, measured_latency_ms)
            size_mb = entry.size_bytes / BYTES_PER_MB if entry.size_bytes else None
            fits = _within(latency, given.get("max_latency_ms")) and _within(size_mb, given.get("max_size_mb"))
            rows.append((entry, latency, size_mb, index, fits))
        fitting = [r for r in rows if r[4]]
        if fitting:
            def rank(row: tuple) -> tuple:
                entry, latency, size_mb, index, _ = row
                return (entry.val_bma is None, -(entry.val_bma or 0.0), latency if latency is not None
                        else math.inf, size_mb if size_mb is not None else math.inf, index)

            return min(fitting, key=rank)[0]
        budget = " and ".join(f"{k}={v:g}" for k, v in given.items())
        offers = []
        timed = [(r[1], r[0].name) for r in rows if r[1] is not None]
        sized = [(r[2], r[0].name) for r in rows if r[2] is not None]
        if timed:
            ms, name = min(timed)
            offers.append(f"the fastest model on offer takes {round(ms, 3):g} ms ({name})")
        if sized:
            mb, name = min(sized)
            offers.append(f"the smallest is {round(mb, 3):g} MB ({name})")
        offer = "; ".join(offers) or "no model has a known latency or size"
        raise BudgetError(f"no model fits the budget {budget}: {offer}; raise the budget, or name a model "
                          "with ?model=")

    def to_dict(self) -> dict:
        return {"winner": self.winner, "models": [dataclasses.asdict(m) for m in self.models]}

    @classmethod
    def from_dict(cls, data: dict, *, source: str = "family") -> Family:
        if not isinstance(data, dict) or "models" not in data:
            raise ValueError(f"{source}: expected an object with 'winner' and 'models'")
        models = [FamilyEntry.from_dict(m, source=source) for m in data["models"]]
        winner = data.get("winner") or (models[0].name if models else "")
        return cls(winner=winner, models=models)


def _within(value: float | None, limit: float | None) -> bool:
    """No limit, or a known value at most the limit (an unknown figure cannot be promised)."""
    return limit is None or (value is not None and value <= limit)


def _relative_to(path: str | None, folder: Path) -> str | None:
    if path is None:
        return None
    p = Path(path).resolve()
    try:
        return str(p.relative_to(folder))
    except ValueError:
        return str(p)


def write_family(path: str | os.PathLike, entries: Iterable[FamilyEntry | dict], winner: str) -> Path:
    """Write a family file atomically; paths inside its folder are stored relative to it.

    Args:
        path: Target JSON file.
        entries: Family entries (dataclasses or dicts with the same keys).
        winner: Name of the default model.

    Returns:
        The written path.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    models = [e if isinstance(e, FamilyEntry) else FamilyEntry.from_dict(e, source=str(path))
              for e in entries]
    stored = [
        dataclasses.replace(m, artifact=_relative_to(m.artifact, folder), onnx=_relative_to(m.onnx, folder))
        for m in models
    ]
    family = Family(winner=winner, models=stored)  # validates names and winner
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(family.to_dict(), indent=2))
    os.replace(tmp, path)
    return path


def fetch_family(uri: str) -> Path:
    """A family file in a bucket (``s3://bucket/runs/family.json``) and the models it names,
    copied into this node's mirror of its folder (only what changed; :mod:`raykd.storage`);
    returns the local family file. Its paths must be relative to its folder, as the tune job
    writes them."""
    folder, name = split_uri(uri)
    mirror = Mirror.get(folder, default_mirror_dir(folder))
    local = mirror.local / name
    mirror.pull(local)
    if not local.is_file():
        raise FileNotFoundError(f"family file {uri} not found; the tune job writes it (or use --model PATH)")
    try:
        family = Family.from_dict(json.loads(local.read_text()), source=uri)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri} is not valid JSON: {exc}") from exc
    for m in family.models:
        for key in ("artifact", "onnx"):
            value = getattr(m, key)
            if value is None:
                continue
            if Path(value).is_absolute():
                raise ValueError(f"{uri}: model {m.name!r} names {key} {value!r}, an absolute path that "
                                 "is not in the bucket; a family in a bucket names paths relative to its folder")
            mirror.pull(mirror.local / value)
    return local


def load_family(path: str | os.PathLike) -> Family:
    """Read a family file, resolving relative paths against its folder and checking they exist; a
    file in a bucket is fetched first (:func:`fetch_family`)."""
    path = fetch_family(str(path)) if is_uri(path) else Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"family file {path} not found; the tune job writes it (or use --model PATH)")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not valid JSON: {exc}") from exc
    family = Family.from_dict(data, source=str(path))
    folder = path.parent.resolve()
    for m in family.models:
        for key in ("artifact", "onnx"):
            value = getattr(m, key)
            if value is None:
                continue
            resolved = (folder / value).resolve()
            if not resolved.exists():
                raise FileNotFoundError(
                    f"{path}: model {m.name!r} names {key} {value!r}, which does not exist")
            setattr(m, key, str(resolved))
    return family


def _entry_from_path(spec: str) -> FamilyEntry:
    from raykd.artifact.format import count_params, find_artifact, read_meta  # lazy: imports torch
    from raykd.artifact.onnx_meta import ONNX_NAME, meta_from_props, read_onnx_props  # lazy: imports torch

    name, sep, raw = spec.partition("=")
    if not sep or not name or "/" in name:  # a plain path (which may itself contain "=")
        name, raw = "", spec
    p = Path(raw).expanduser().resolve()
    if p.is_file() and p.suffix == ".onnx":
        props = read_onnx_props(p)
        meta = meta_from_props(props, source=str(p))
        folder = p.parent.parent if p.parent.name == "best" else p.parent
        stem = p.name[: -len(".onnx")]
        default = folder.name + stem[len("model"):] if stem.startswith("model") else stem
        return FamilyEntry(name=name or default, version=meta.version, onnx=str(p),
                           size_bytes=p.stat().st_size, params=int(props.get("params", 0)),
                           val_bma=_bma_of(meta.metrics))
    directory = find_artifact(p)
    meta = read_meta(directory)
    onnx = directory / ONNX_NAME
    default = directory.parent.name if directory.name == "best" else directory.name
    return FamilyEntry(
        name=name or default,
        version=meta.version,
        artifact=str(directory),
        onnx=str(onnx) if onnx.is_file() else None,
        params=count_params(directory),
        size_bytes=(directory / "model.safetensors").stat().st_size,
        val_bma=_bma_of(meta.metrics),
    )


def _bma_of(metrics: dict) -> float | None:
    for key in ("val_bma", "val/bma", "bma"):
        if isinstance(metrics.get(key), int | float):
            return float(metrics[key])
    return None


def family_from_paths(paths: Sequence[str], winner: str | None = None) -> Family:
    """Build a family from ``--model`` arguments: artifact/run folders or ``.onnx`` files.

    Each argument may be ``PATH`` or ``NAME=PATH``. Default names come from the folder (the run
    folder for ``RUN_DIR/best``) or the ONNX file stem; clashes get ``-2``, ``-3``... The first
    model is the default unless ``winner`` names another.
    """
    if not paths:
        raise ValueError("no models to serve: pass --family FILE or at least one --model PATH")
    entries: list[FamilyEntry] = []
    taken: set[str] = set()
    for spec in paths:
        entry = _entry_from_path(spec)
        base, k = entry.name, 2
        while entry.name in taken:
            entry.name = f"{base}-{k}"
            k += 1
        taken.add(entry.name)
        entries.append(entry)
    return Family(winner=winner or entries[0].name, models=entries)
