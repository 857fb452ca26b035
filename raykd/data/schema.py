"""The one on-disk format every source is ingested into.

A dataset folder holds ``shards/part-00000.parquet``, ... files with :data:`SCHEMA` and a
``manifest.json`` (see :class:`raykd.data.manifest.Manifest`). Images stay encoded (JPEG/PNG bytes
as the source gave them) and are decoded in the Ray Data workers.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import pyarrow as pa

#: ISIC 2019 diagnostic classes in the column order of its ground-truth CSV (UNK excluded: it has
#: no training images and must never become a ninth trained class).
ISIC2019_CLASSES: tuple[str, ...] = ("MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC")
#: Image counts of the ISIC 2019 training set (25,331 images).
ISIC2019_COUNTS: dict[str, int] = {
    "MEL": 4522, "NV": 12875, "BCC": 3323, "AK": 867, "BKL": 2624, "DF": 239, "VASC": 253, "SCC": 628,
}
#: SkinDistilViT's cancer-vs-benign view of ISIC 2019 (AK counted benign, as in the paper).
ISIC2019_MALIGNANT: tuple[str, ...] = ("MEL", "BCC", "SCC")

SPLITS: tuple[str, ...] = ("train", "val", "test")

SCHEMA = pa.schema(
    [
        pa.field("image_id", pa.string(), nullable=False),
        pa.field("image", pa.binary(), nullable=False),  # encoded JPEG/PNG bytes
        pa.field("image_format", pa.string(), nullable=False),  # "jpeg" | "png"
        pa.field("label", pa.int32(), nullable=False),  # index into manifest.label_names
        pa.field("label_name", pa.string(), nullable=False),
        pa.field("source", pa.string(), nullable=False),  # isic2019 | ham10000 | pad_ufes_20 | folder | synthetic
        pa.field("lesion_id", pa.string()),
        pa.field("patient_id", pa.string()),
        pa.field("split", pa.string(), nullable=False),
        pa.field("age", pa.float32()),
        pa.field("sex", pa.string()),
        pa.field("site", pa.string()),
    ]
)


@dataclass
class Item:
    """One candidate image before validation and splitting.

    ``load`` returns the encoded bytes; it is called lazily so that ingest never holds a whole
    dataset in memory. ``label_name`` is the source's raw label (mapped and checked by the writer).
    """

    image_id: str
    label_name: str
    load: Callable[[], bytes]
    lesion_id: str | None = None
    patient_id: str | None = None
    age: float | None = None
    sex: str | None = None
    site: str | None = None
    origin: str = ""  # path or description, used in quarantine reasons
    extra: dict = field(default_factory=dict)
