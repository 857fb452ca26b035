"""The manifest written beside the shards: label map, class counts per split, split seed, source,
and every quarantined item with its reason."""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path

MANIFEST_NAME = "manifest.json"
SHARDS_DIR = "shards"


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
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"{path} not found: {directory} is not a raykd dataset folder "
                "(make one with `python -m raykd.data synth` or `python -m raykd.data ingest`)"
            )
        data = json.loads(path.read_text())
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    def shard_paths(self, directory: str | Path) -> list[str]:
        return [str(Path(directory) / SHARDS_DIR / s) for s in self.shards]
