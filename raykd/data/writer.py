"""Validate items, split them, and write sharded Parquet plus the manifest.

Every source (ingest formats and the synthetic generator) ends here, so all datasets share one
schema and one set of rules: nothing is dropped silently. Each bad item (unknown label, duplicate
image id, unreadable or truncated image, ...) goes to the manifest's quarantine list with a reason.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
from tqdm import tqdm

from raykd.data.manifest import SHARDS_DIR, Manifest
from raykd.data.schema import SCHEMA, Item
from raykd.data.splits import assign_splits, group_ids

log = logging.getLogger(__name__)

ROW_GROUP_ROWS = 256


class IngestError(RuntimeError):
    """Nothing usable, or a source that cannot be read at all (missing column or file)."""


@dataclass
class Quarantined:
    image_id: str
    origin: str
    reason: str

    def as_dict(self) -> dict:
        return {"image_id": self.image_id, "origin": self.origin, "reason": self.reason}


def image_format(data: bytes) -> str | None:
    """``"jpeg"`` or ``"png"`` from the magic bytes, else None."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpeg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    return None


def check_image(data: bytes) -> tuple[bytes, str]:
    """Fully decode ``data`` (so truncated files are caught) and return the bytes to store.

    JPEG and PNG are stored as given; any other format PIL can read (BMP, TIFF, ...) is re-encoded
    losslessly as PNG. Raises ValueError with the reason otherwise.
    """
    import io

    from PIL import Image, UnidentifiedImageError

    if not data:
        raise ValueError("empty file")
    try:
        with Image.open(io.BytesIO(data)) as im:
            im.load()  # decodes every pixel: raises on truncated data
            fmt = image_format(data)
            if fmt is None:
                buf = io.BytesIO()
                im.convert("RGB").save(buf, format="PNG")
                return buf.getvalue(), "png"
            if im.width < 8 or im.height < 8:
                raise ValueError(f"image too small ({im.width}x{im.height})")
            return data, fmt
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"unreadable image: {e}") from None


class _ShardWriter:
    """Rows buffered into ``part-NNNNN.parquet`` files of about ``shard_bytes`` of image data each."""

    def __init__(self, directory: Path, shard_bytes: int) -> None:
        self.directory = directory
        self.shard_bytes = shard_bytes
        self.shards: list[str] = []
        self._rows: list[dict] = []
        self._rows_bytes = 0

    def add(self, row: dict) -> None:
        """Buffer one row; write a shard once the buffered images reach ``shard_bytes``."""
        self._rows.append(row)
        self._rows_bytes += len(row["image"])
        if self._rows_bytes >= self.shard_bytes:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows (if any) as the next shard."""
        if not self._rows:
            return
        name = f"part-{len(self.shards):05d}.parquet"
        table = pa.Table.from_pylist(self._rows, schema=SCHEMA)
        pq.write_table(table, self.directory / name, row_group_size=ROW_GROUP_ROWS, compression="none")
        self.shards.append(name)
        self._rows, self._rows_bytes = [], 0


def _clear_output(out: Path, overwrite: bool) -> None:
    """Remove an earlier dataset in ``out`` when ``overwrite``; refuse to replace it otherwise."""
    if (out / "manifest.json").exists() or (out / SHARDS_DIR).exists():
        if not overwrite:
            raise IngestError(f"{out} already holds a dataset; pass --overwrite to replace it")
        shutil.rmtree(out / SHARDS_DIR, ignore_errors=True)
        (out / "manifest.json").unlink(missing_ok=True)


def _screen_metadata(
    items: Sequence[Item], label_names: Sequence[str], label_index: dict[str, int], bad: list[Quarantined]
) -> list[Item]:
    """Items with a known label and a first-seen image id; the others are appended to ``bad``."""
    seen: set[str] = set()
    good: list[Item] = []
    for item in items:
        if item.image_id in seen:
            bad.append(Quarantined(item.image_id, item.origin, "duplicate image id (first one kept)"))
            continue
        seen.add(item.image_id)
        if item.label_name not in label_index:
            bad.append(
                Quarantined(
                    item.image_id, item.origin,
                    f"unknown label {item.label_name!r} (valid: {', '.join(label_names)})",
                )
            )
            continue
        good.append(item)
    return good


def _read_checked(item: Item) -> tuple[bytes | None, str, str]:
    """``(bytes to store, format, "")`` for a readable image, else ``(None, "", reason)``."""
    try:
        data, fmt = check_image(item.load())
        return data, fmt, ""
    except FileNotFoundError:
        return None, "", "image file not found"
    except ValueError as e:
        return None, "", str(e)
    except OSError as e:
        return None, "", f"cannot read image: {e}"


def _write_images(
    good: list[Item],
    order: list[int],
    *,
    labels: list[int],
    splits: list[str],
    source: str,
    writer: _ShardWriter,
    counts: dict[str, Counter],
    bad: list[Quarantined],
    threads: int,
) -> None:
    """Read and check ``good[i]`` for ``i`` in ``order``, a few images in flight at a time.

    Readable images become rows of ``writer`` and are counted per split and class in ``counts``;
    unreadable ones are appended to ``bad``. A progress bar on stderr (a terminal only) counts
    the images read (for synthetic items: rendered).
    """
    done = 0
    with ThreadPoolExecutor(max_workers=threads) as pool, \
            tqdm(total=len(good), desc=f"{source} images", unit="img", disable=None) as bar:
        for i, (data, fmt, reason) in zip(order, pool.map(lambda i: _read_checked(good[i]), order)):
            it = good[i]
            done += 1
            bar.update()
            if done % 2000 == 0:
                log.info("ingest: %d/%d images checked", done, len(good))
            if data is None:
                bad.append(Quarantined(it.image_id, it.origin, reason))
                continue
            writer.add(
                {
                    "image_id": it.image_id, "image": data, "image_format": fmt,
                    "label": labels[i], "label_name": it.label_name, "source": source,
                    "lesion_id": it.lesion_id, "patient_id": it.patient_id, "split": splits[i],
                    "age": it.age, "sex": it.sex, "site": it.site,
                }
            )
            counts[splits[i]][it.label_name] += 1
    writer.flush()


def write_dataset(
    items: Sequence[Item],
    out_dir: str | Path,
    *,
    source: str,
    label_names: Sequence[str],
    malignant: Sequence[str],
    fractions: dict[str, float],
    split_seed: int,
    shard_mb: float = 64.0,
    quarantine: Sequence[Quarantined] = (),
    source_dir: str | None = None,
    label_groups: dict[str, list[str]] | None = None,
    threads: int = 4,
    overwrite: bool = False,
) -> Manifest:
    """Write ``items`` as sharded Parquet in ``out_dir``; returns the saved manifest.

    ``label_groups`` (label -> source classes merged into it) is recorded in the manifest.
    """
    out = Path(out_dir)
    _clear_output(out, overwrite)
    label_index = {name: i for i, name in enumerate(label_names)}
    bad = list(quarantine)

    # 1. Metadata checks: labels and duplicate ids.
    good = _screen_metadata(items, label_names, label_index, bad)

    # 2. Splits from metadata alone, so every image is read exactly once below.
    labels = [label_index[it.label_name] for it in good]
    groups = group_ids([it.lesion_id for it in good], [it.patient_id for it in good])
    splits = assign_splits(labels, groups, fractions, split_seed)
    order = list(range(len(good)))
    random.Random(split_seed).shuffle(order)  # mix classes and splits across shards

    # 3. Read, check and write into a temporary folder, renamed once complete.
    shard_dir = out / SHARDS_DIR
    tmp_dir = out / (SHARDS_DIR + ".tmp")
    shutil.rmtree(tmp_dir, ignore_errors=True)
    tmp_dir.mkdir(parents=True)
    writer = _ShardWriter(tmp_dir, int(shard_mb * 1024 * 1024))
    counts: dict[str, Counter] = {s: Counter() for s in fractions}
    _write_images(good, order, labels=labels, splits=splits, source=source, writer=writer, counts=counts,
                  bad=bad, threads=threads)

    if not writer.shards:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        reasons = Counter(q.reason.split(":")[0] for q in bad).most_common(3)
        raise IngestError(f"no usable images in {source_dir or source}: {len(bad)} quarantined {reasons}")
    os.replace(tmp_dir, shard_dir)
    manifest = Manifest(
        source=source,
        label_names=list(label_names),
        malignant=[m for m in malignant if m in label_index],
        split_seed=split_seed,
        split_fractions=dict(fractions),
        class_counts={s: {n: counts[s].get(n, 0) for n in label_names} for s in fractions},
        shards=writer.shards,
        quarantine=[q.as_dict() for q in bad],
        source_dir=source_dir,
        label_groups={k: list(v) for k, v in (label_groups or {}).items()},
    )
    manifest.save(out)
    return manifest


def summary(manifest: Manifest) -> str:
    """A short human-readable report of what was written and what was quarantined."""
    lines = [f"{manifest.num_images} images of {manifest.num_classes} classes from {manifest.source}"]
    width = max(len(n) for n in manifest.label_names)
    splits = list(manifest.class_counts)
    lines.append(f"{'class':<{width}}  " + "  ".join(f"{s:>7}" for s in splits))
    for name in manifest.label_names:
        lines.append(f"{name:<{width}}  " + "  ".join(f"{manifest.class_counts[s][name]:>7}" for s in splits))
    lines.append(f"{'total':<{width}}  " + "  ".join(f"{sum(manifest.class_counts[s].values()):>7}" for s in splits))
    if manifest.quarantine:
        reasons = Counter(q["reason"].split(" (")[0].split(":")[0] for q in manifest.quarantine)
        lines.append(f"quarantined {len(manifest.quarantine)} items (details in manifest.json):")
        lines.extend(f"  {n:>6}  {r}" for r, n in reasons.most_common())
    else:
        lines.append("quarantined 0 items")
    return "\n".join(lines)
