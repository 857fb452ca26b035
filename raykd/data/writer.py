"""Validate items, split them, and write sharded Parquet plus the manifest.

Every source (ingest formats and the synthetic generator) ends here, so all datasets share one
schema and one set of rules: nothing is dropped silently. Each bad item (unknown label, duplicate
image id, unreadable or truncated image, ...) goes to the manifest's quarantine list with a reason.
"""

from __future__ import annotations

import glob
import io
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

from raykd.data.manifest import MANIFEST_NAME, SHARDS_DIR, Manifest
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
    losslessly as PNG. Raises ValueError with the reason otherwise, for any decoder failure:
    unknown or truncated data, an image whose header claims more pixels than
    ``PIL.Image.MAX_IMAGE_PIXELS`` allows (a decompression bomb), or a decoder crash.
    """
    from PIL import Image, UnidentifiedImageError  # lazy: PIL is heavy

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
    except Image.DecompressionBombError as e:
        raise ValueError(f"decompression bomb: {e}") from None
    except (UnidentifiedImageError, OSError, SyntaxError) as e:
        raise ValueError(f"unreadable image: {e}") from None
    except ValueError:
        raise
    except Exception as e:  # noqa: BLE001 - PIL decoders raise many types on malformed input
        raise ValueError(f"unreadable image: {type(e).__name__}: {e}") from None


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


def _holds_dataset(out: Path) -> bool:
    return (out / MANIFEST_NAME).exists() or (out / SHARDS_DIR).exists()


def _dead_sibling(path: Path, out: Path, kind: str) -> bool:
    """Whether ``path`` is ``<out>.<kind>-<pid>`` of a process that no longer runs."""
    pid = path.name[len(f"{out.name}.{kind}-"):]
    return pid.isdigit() and int(pid) != os.getpid() and not _pid_alive(int(pid))


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _recover(out: Path) -> None:
    """Clean up after an earlier ingest into ``out`` that was killed before it finished.

    Its staging folder (``<out>.tmp-<pid>``) is removed. Its set-aside old dataset
    (``<out>.old-<pid>``) is put back when ``out`` is missing (killed mid-swap), else removed.
    """
    if not out.parent.is_dir():
        return
    for stale in sorted(out.parent.glob(glob.escape(out.name) + ".tmp-*")):
        if _dead_sibling(stale, out, "tmp"):
            log.info("removing %s, left by an ingest that did not finish", stale)
            shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(out.parent.glob(glob.escape(out.name) + ".old-*")):
        if not _dead_sibling(old, out, "old"):
            continue
        if not out.exists():
            log.warning("restoring the dataset %s from %s (an ingest was stopped while replacing it)",
                        out, old)
            os.replace(old, out)
        else:
            _carry_over(old, out)
            shutil.rmtree(old, ignore_errors=True)


def _carry_over(old: Path, out: Path) -> None:
    """Move the files of ``old`` that are not part of a dataset into ``out`` (unless already there)."""
    for entry in old.iterdir():
        dataset_part = entry.name in (MANIFEST_NAME, SHARDS_DIR, SHARDS_DIR + ".tmp")
        if not dataset_part and not (out / entry.name).exists():
            os.replace(entry, out / entry.name)


def _staging_dir(out: Path) -> Path:
    """A fresh ``<out>.tmp-<pid>/shards`` beside ``out`` (same filesystem: the swap is a rename)."""
    staging = out.parent / f"{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    (staging / SHARDS_DIR).mkdir(parents=True)
    return staging


def _publish(staging: Path, out: Path) -> None:
    """Make the complete dataset in ``staging`` the dataset at ``out``.

    Without an earlier dataset the shards and then the manifest are moved into ``out``. With one,
    ``out`` is renamed aside, ``staging`` renamed to ``out`` and the old folder deleted: at every
    moment either the old dataset or the new one is whole. Other files kept in ``out`` (a contact
    sheet, notes) are carried over into the new folder.
    """
    try:
        if not _holds_dataset(out):
            out.mkdir(parents=True, exist_ok=True)
            os.replace(staging / SHARDS_DIR, out / SHARDS_DIR)
            os.replace(staging / MANIFEST_NAME, out / MANIFEST_NAME)
            shutil.rmtree(staging, ignore_errors=True)
            return
        old = out.parent / f"{out.name}.old-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        os.replace(out, old)
    except OSError as e:
        raise IngestError(f"cannot move the new dataset into {out}: {e}") from None
    try:
        os.replace(staging, out)
    except OSError as e:
        os.replace(old, out)  # put the old dataset back before reporting the failure
        raise IngestError(f"cannot move the new dataset into {out} (the old one is kept): {e}") from None
    _carry_over(old, out)
    shutil.rmtree(old, ignore_errors=True)


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
    """``(bytes to store, format, "")`` for a readable image, else ``(None, "", reason)``.

    Never raises for a bad image: one file that cannot be read or decoded is quarantined, and the
    ingest goes on with the others.
    """
    try:
        data, fmt = check_image(item.load())
        return data, fmt, ""
    except FileNotFoundError:
        return None, "", "image file not found"
    except ValueError as e:
        return None, "", str(e)
    except OSError as e:
        return None, "", f"cannot read image: {e}"
    except Exception as e:  # noqa: BLE001 - a loader or decoder failure must not end the ingest
        return None, "", f"cannot read image: {type(e).__name__}: {e}"


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

    The dataset is built in ``<out_dir>.tmp-<pid>`` beside ``out_dir`` and moved in only once
    complete, so with ``overwrite`` the earlier dataset stays whole and readable until the new one
    replaces it, and an ingest that fails or is killed leaves it as it was.

    ``label_groups`` (label -> source classes merged into it) is recorded in the manifest.
    """
    out = Path(out_dir).expanduser().resolve()  # a symlinked ``out``: the swap happens at its target
    _recover(out)
    if _holds_dataset(out) and not overwrite:
        raise IngestError(f"{out_dir} already holds a dataset; pass --overwrite to replace it")
    label_index = {name: i for i, name in enumerate(label_names)}
    bad = list(quarantine)

    # 1. Metadata checks: labels and duplicate ids.
    good = _screen_metadata(items, label_names, label_index, bad)

    # 2. Splits from metadata alone, so every image is read exactly once below.
    labels, splits, order = _plan_splits(good, label_index, fractions, split_seed)

    # 3. Read, check and write into a staging folder beside ``out``; an earlier dataset in ``out``
    #    stays untouched until the new one is complete (4.), so a failed or killed ingest loses nothing.
    staging = _staging_dir(out)
    try:
        writer = _ShardWriter(staging / SHARDS_DIR, int(shard_mb * 1024 * 1024))
        counts: dict[str, Counter] = {s: Counter() for s in fractions}
        _write_images(good, order, labels=labels, splits=splits, source=source, writer=writer, counts=counts,
                      bad=bad, threads=threads)
        if not writer.shards:
            reasons = Counter(q.reason.split(":")[0] for q in bad).most_common(3)
            raise IngestError(f"no usable images in {source_dir or source}: {len(bad)} quarantined {reasons}")
        manifest = _manifest(writer, counts, bad, source=source, label_names=label_names, malignant=malignant,
                             split_seed=split_seed, fractions=fractions, source_dir=source_dir,
                             label_groups=label_groups)
        manifest.save(staging)
        # 4. Swap the complete dataset in.
        _publish(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return manifest


def _plan_splits(good: Sequence[Item], label_index: dict[str, int], fractions: dict[str, float],
                 split_seed: int) -> tuple[list[int], list[str], list[int]]:
    """Each item's label index and split (lesions and patients kept within one split), and the
    shuffled order the items are written in (classes and splits mixed across shards)."""
    labels = [label_index[it.label_name] for it in good]
    groups = group_ids([it.lesion_id for it in good], [it.patient_id for it in good])
    splits = assign_splits(labels, groups, fractions, split_seed)
    order = list(range(len(good)))
    random.Random(split_seed).shuffle(order)  # mix classes and splits across shards
    return labels, splits, order


def _manifest(writer: _ShardWriter, counts: dict[str, Counter], bad: list[Quarantined], *, source: str,
              label_names: Sequence[str], malignant: Sequence[str], split_seed: int,
              fractions: dict[str, float], source_dir: str | None,
              label_groups: dict[str, list[str]] | None) -> Manifest:
    """The manifest of the written shards: labels, splits, class counts and quarantined images."""
    return Manifest(
        source=source,
        label_names=list(label_names),
        malignant=[m for m in malignant if m in label_names],
        split_seed=split_seed,
        split_fractions=dict(fractions),
        class_counts={s: {n: counts[s].get(n, 0) for n in label_names} for s in fractions},
        shards=writer.shards,
        quarantine=[q.as_dict() for q in bad],
        source_dir=source_dir,
        label_groups={k: list(v) for k, v in (label_groups or {}).items()},
    )


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
