"""The manifest written beside the shards: label map, class counts per split, split seed, source,
and every quarantined item with its reason.

A dataset's location is a folder path (local or a mount every node shares, such as NFS) or a URI
that pyarrow's filesystems read (``s3://bucket/prefix``, ``gs://bucket/prefix``, ``file:///path``):
:meth:`Manifest.load` and :meth:`Manifest.shard_dataset` read either, so every reader of the shards
(Ray Data, the in-memory splits, the teacher preps, export) takes the same location string.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"


def is_uri(location: str | Path) -> bool:
    """Whether ``location`` is a URI (``scheme://...``) rather than a filesystem path."""
    text = str(location)
    scheme, sep, _ = text.partition("://")
    return bool(sep) and scheme.isidentifier() and len(scheme) > 1


def resolve_location(location: str | Path) -> str:
    """A URI as given; a path made absolute (runs and trials work in their own folders)."""
    return str(location) if is_uri(location) else str(Path(location).expanduser().resolve())


def filesystem(location: str | Path):
    """``(pyarrow filesystem, path inside it)`` of a dataset location (a path or a URI)."""
    import pyarrow.fs as pafs  # lazy: pyarrow is heavy

    if is_uri(location):
        try:
            return pafs.FileSystem.from_uri(str(location))
        except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a bad URI
            raise ValueError(f"cannot open dataset location {location}: {exc}") from None
    return pafs.LocalFileSystem(), str(Path(location).expanduser().resolve())


@dataclass
class Manifest:
    source: str
    label_names: list[str]
    #: Label names counted malignant in the cancer-vs-benign view.
    malignant: list[str]
    split_seed: int
    split_fractions: dict[str, float]
    #: split -> label name -> number of images.
    class_counts: dict[str, dict[str, int]]
    shards: list[str]
    #: Items left out, each ``{"image_id", "origin", "reason"}``.
    quarantine: list[dict] = field(default_factory=list)
    source_dir: str | None = None
    #: Label -> the source classes merged into it (a binary task, ``ingest --binary``); empty when
    #: the labels are the source's own classes.
    label_groups: dict[str, list[str]] = field(default_factory=dict)
    version: int = 1

    @property
    def num_classes(self) -> int:
        return len(self.label_names)

    @property
    def num_images(self) -> int:
        return sum(sum(c.values()) for c in self.class_counts.values())

    def counts(self, split: str) -> list[int]:
        """Class counts of ``split`` in label order."""
        per = self.class_counts.get(split, {})
        return [per.get(name, 0) for name in self.label_names]

    def malignant_mask(self) -> list[bool]:
        return [name in self.malignant for name in self.label_names]

    def save(self, directory: str | Path) -> Path:
        path = Path(directory) / MANIFEST_NAME
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2))
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, directory: str | Path) -> Manifest:
        """The manifest of the dataset at ``directory`` (a folder path or a URI)."""
        import pyarrow.fs as pafs  # lazy: pyarrow is heavy

        fs, root = filesystem(directory)
        path = f"{root.rstrip('/')}/{MANIFEST_NAME}"
        try:
            found = fs.get_file_info(path).type == pafs.FileType.File
        except OSError as exc:  # unreachable bucket, no credentials, ...
            raise FileNotFoundError(f"cannot read {directory}/{MANIFEST_NAME}: {exc}") from None
        if not found:
            raise FileNotFoundError(
                f"{str(directory).rstrip('/')}/{MANIFEST_NAME} not found: {directory} is not a raykd dataset folder "
                "(make one with `python -m raykd.data synth` or `python -m raykd.data ingest`)"
            )
        with fs.open_input_stream(path) as f:
            data = json.loads(f.read().decode())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def shard_paths(self, directory: str | Path) -> list[str]:
        """Every shard's location: paths for a folder, URIs for a URI (what Ray Data reads)."""
        if is_uri(directory):
            return [f"{str(directory).rstrip('/')}/{SHARDS_DIR}/{s}" for s in self.shards]
        return [str(Path(directory) / SHARDS_DIR / s) for s in self.shards]

    def shard_files(self, directory: str | Path) -> tuple:
        """``(pyarrow filesystem, shard paths inside it)``: for readers that take a filesystem."""
        fs, root = filesystem(directory)
        return fs, [f"{root.rstrip('/')}/{SHARDS_DIR}/{s}" for s in self.shards]

    def shard_dataset(self, directory: str | Path):
        """The shards as one ``pyarrow.dataset`` (read lazily, from a folder or a URI)."""
        import pyarrow.dataset as pads  # lazy: pyarrow is heavy

        fs, paths = self.shard_files(directory)
        return pads.dataset(paths, filesystem=fs, format="parquet")

    def shard_bytes(self, directory: str | Path) -> int:
        """Bytes of every shard (all splits)."""
        fs, paths = self.shard_files(directory)
        return sum(info.size for info in fs.get_file_info(paths))
