"""The served model family: which models a Serve application loads and which one is the default.

The tune job writes a family file from its leaderboard (every trial's size, latency and validation
BMA, so a client can trade accuracy for speed, SkinDistilViT table 3); ``python -m raykd.serve
--family FILE`` serves it. ``--model PATH`` builds a family from artifact folders or ONNX files
directly. File format (JSON)::

    {"winner": "trial_0003",
     "models": [{"name": "trial_0003", "version": "0003", "artifact": "published/3f2a9c41d07be815",
                 "onnx": "published/3f2a9c41d07be815/model.onnx", "params": 5500000,
                 "size_bytes": 22000000, "val_bma": 0.81, "latency_ms": 4.2,
                 "files": {"published/3f2a9c41d07be815/model.onnx": {"sha256": "9b1e...", "size": 21990123},
                           "published/3f2a9c41d07be815/meta.json": {"sha256": "04c7...", "size": 1834}}}]}

Relative paths are resolved against the folder of the family file, so an experiment folder can be
moved or mounted elsewhere (a KubeRay pod) without rewriting it. ``files`` records the sha256 and
size of every file Serve may read for a model (:func:`write_family` fills it in): a family in a
bucket is fetched file by file and each one is checked (:func:`fetch_family`). A family file
without ``files`` (written before they were recorded) still loads; fetched from a bucket, its
files are not checked and a warning says so.

:meth:`Family.within_budget` picks the member a client can afford: the best validation BMA among
the models within a latency and/or size budget (``/predict?max_latency_ms=...&max_size_mb=...``).
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from raykd.data.manifest import is_uri
from raykd.registry import did_you_mean
from raykd.storage import ChecksumError, Mirror, default_mirror_dir, file_sha256, is_temporary, split_uri

__all__ = ["BYTES_PER_MB", "FETCH_ATTEMPTS", "BudgetError", "Family", "FamilyEntry", "FamilyIntegrityError",
           "family_from_paths", "fetch_family", "load_family", "served_files", "write_family"]

log = logging.getLogger(__name__)

#: Size budgets are in decimal megabytes (10^6 bytes), as download sizes are quoted.
BYTES_PER_MB = 1_000_000
#: How many times a fetch from a bucket starts over when the family file was replaced while it ran.
FETCH_ATTEMPTS = 3


class BudgetError(ValueError):
    """No member of the family fits a latency/size budget (the Serve app answers 422)."""


class FamilyIntegrityError(ValueError):
    """A file of a family in a bucket is not the one the family file records (changed or damaged
    after publishing): nothing of that family is served."""


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
        files: Every file Serve may read for this model (path as ``artifact`` and ``onnx`` are
            given) -> ``{"sha256": hex, "size": bytes}``; None in family files written before
            they were recorded, and in families built from paths.
    """

    name: str
    version: str = ""
    artifact: str | None = None
    onnx: str | None = None
    params: int = 0
    size_bytes: int = 0
    val_bma: float | None = None
    latency_ms: float | None = None
    files: dict[str, dict] | None = None

    def __post_init__(self) -> None:
        if not self.name:
            raise ValueError("family entry: 'name' must be a non-empty string")
        if not self.artifact and not self.onnx:
            raise ValueError(f"family entry {self.name!r}: give 'artifact' or 'onnx' (both are null)")
        _check_files(self.name, self.files)

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


def _check_files(name: str, files) -> None:
    if files is None:
        return
    if not isinstance(files, dict) or not files:
        raise ValueError(f"family entry {name!r}: 'files' must map each served file to its sha256 and size")
    for path, record in files.items():
        digest = record.get("sha256") if isinstance(record, dict) else None
        size = record.get("size") if isinstance(record, dict) else None
        if not (isinstance(digest, str) and len(digest) == 64 and isinstance(size, int) and size >= 0):
            raise ValueError(f"family entry {name!r}: file {path!r} needs {{'sha256': 64 hex digits, 'size': "
                             f"bytes}}, got {record!r}")


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


def served_files(entry: FamilyEntry) -> list[Path]:
    """Every file Serve may read for ``entry`` (absolute): the files of its artifact folder
    (weights, ``meta.json``, ONNX variants, model card; files being written left out) and its ONNX
    file.

    Raises:
        FileNotFoundError: the artifact or ONNX path does not exist.
    """
    found: list[Path] = []
    for key in ("artifact", "onnx"):
        value = getattr(entry, key)
        if value is None:
            continue
        path = Path(value).resolve()
        if not path.exists():
            raise FileNotFoundError(f"family entry {entry.name!r} names {key} {value!r}, which does not exist")
        if path.is_dir():
            found += sorted(f for f in path.rglob("*")
                            if f.is_file() and not is_temporary(f.relative_to(path).as_posix()))
        elif path not in found:
            found.append(path)
    return found


def _file_records(entry: FamilyEntry, folder: Path) -> dict[str, dict]:
    return {_relative_to(str(f), folder): {"sha256": file_sha256(f), "size": f.stat().st_size}
            for f in served_files(entry)}


def write_family(path: str | os.PathLike, entries: Iterable[FamilyEntry | dict], winner: str) -> Path:
    """Write a family file atomically; paths inside its folder are stored relative to it, and every
    served file's sha256 and size are recorded (``files``, :func:`served_files`).

    Args:
        path: Target JSON file.
        entries: Family entries (dataclasses or dicts with the same keys); ``files`` is recomputed.
        winner: Name of the default model.

    Returns:
        The written path.

    Raises:
        FileNotFoundError: an entry names a file that does not exist.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    folder = path.parent.resolve()
    models = [e if isinstance(e, FamilyEntry) else FamilyEntry.from_dict(e, source=str(path))
              for e in entries]
    stored = [
        dataclasses.replace(m, artifact=_relative_to(m.artifact, folder), onnx=_relative_to(m.onnx, folder),
                            files=_file_records(m, folder))
        for m in models
    ]
    family = Family(winner=winner, models=stored)  # validates names and winner
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(family.to_dict(), indent=2))
    os.replace(tmp, path)
    return path


def fetch_family(uri: str) -> Path:
    """A family file in a bucket (``s3://bucket/runs/family.json``) and the models it names,
    copied into this node's mirror of its folder; returns the local family file.

    Each file the family records (``files``) is taken from the local copy when it has that sha256,
    else downloaded and checked before it replaces anything; the local family file is written last,
    once every file checked out. A reader fetching during a publish therefore gets the old family
    or the new one, never a mix: the tune job uploads the family file after the models it names
    (:func:`raykd.storage.push_order`), and they live in content-addressed folders that a later
    publish never rewrites (:mod:`raykd.tune.publish`). Should a file be missing or differ all the
    same (a family whose files were replaced in place), the fetch starts over if the family file
    was replaced meanwhile (at most :data:`FETCH_ATTEMPTS` times); else it fails.

    Raises:
        FileNotFoundError: no family file at ``uri``, or a file it names is not in the bucket.
        FamilyIntegrityError: a file's content is not the one recorded; the message names it.
        ValueError: the family file is not valid, or names paths outside its folder.
    """
    folder, name = split_uri(uri)
    mirror = Mirror.get(folder, default_mirror_dir(folder))
    for attempt in range(1, FETCH_ATTEMPTS + 1):
        raw, mtime = _read_family_file(mirror, name, uri)
        family = _parse_family(raw, uri)
        try:
            _fetch_members(mirror, family, uri)
        except (FamilyIntegrityError, FileNotFoundError):
            if attempt < FETCH_ATTEMPTS and _replaced(mirror, name, raw):
                log.info("%s was replaced while it was fetched: fetching the new family", uri)
                continue
            raise
        return mirror.place(name, raw, mtime)
    raise AssertionError("unreachable: the last attempt returns or raises")


def _read_family_file(mirror: Mirror, name: str, uri: str) -> tuple[bytes, float]:
    try:
        return mirror.read_remote(name)
    except FileNotFoundError:
        raise FileNotFoundError(f"family file {uri} not found; the tune job writes it (or use --model PATH)") from None


def _replaced(mirror: Mirror, name: str, raw: bytes) -> bool:
    """Whether the bucket's family file is no longer ``raw`` (a publish replaced it)."""
    try:
        return mirror.read_remote(name)[0] != raw
    except FileNotFoundError:
        return True


def _parse_family(raw: bytes, uri: str) -> Family:
    try:
        family = Family.from_dict(json.loads(raw), source=uri)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{uri} is not valid JSON: {exc}") from exc
    for m in family.models:
        named = [(key, getattr(m, key)) for key in ("artifact", "onnx") if getattr(m, key) is not None]
        for key, value in [*named, *(("file", f) for f in m.files or ())]:
            if Path(value).is_absolute() or ".." in Path(value).parts:
                raise ValueError(f"{uri}: model {m.name!r} names {key} {value!r}, a path that is not in the "
                                 "bucket; a family in a bucket names paths relative to its folder")
        for key, value in named:
            if m.files is not None and not _covered(value, m.files):
                raise ValueError(f"{uri}: model {m.name!r} records no sha256 for its {key} {value!r}")
    return family


def _covered(value: str, files: dict) -> bool:
    base = value.rstrip("/")
    return any(f == base or f.startswith(base + "/") for f in files)


def _fetch_members(mirror: Mirror, family: Family, uri: str) -> None:
    """Bring every model's files into the mirror, checking those with a recorded sha256."""
    unverified = []
    for m in family.models:
        if m.files is None:  # an older family file: its folders as they are in the bucket
            unverified.append(m.name)
            for value in (m.artifact, m.onnx):
                if value is not None:
                    mirror.pull(mirror.local / value)
            continue
        for rel, record in m.files.items():
            try:
                mirror.fetch(rel, sha256=record["sha256"], size=record["size"])
            except ChecksumError as exc:
                raise FamilyIntegrityError(
                    f"{uri}: model {m.name!r}: {rel} in the bucket is not the file the family records (its "
                    f"sha256 is {exc.found_sha256}, the family records {exc.sha256}); it was changed or damaged "
                    "after publishing, so nothing of this family is served. Publish the family again (or "
                    "restore the file)") from None
            except FileNotFoundError:
                raise FileNotFoundError(
                    f"{uri}: model {m.name!r} names {rel}, which is not in the bucket; nothing of this family "
                    "is served. Publish the family again (or restore the file)") from None
    if unverified:
        log.warning("%s records no file hashes for %s (a family file written before they were recorded): "
                    "their files are fetched unchecked, and a fetch during a publish could mix two families; "
                    "publish it again to record them", uri, ", ".join(unverified))


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
