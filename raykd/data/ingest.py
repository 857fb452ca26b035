"""Read each public dataset in the layout its publisher distributes and write raykd shards.

Formats (registered in :data:`FORMATS`):

* ``isic2019`` - ``ISIC_2019_Training_Input/`` JPEGs, ``ISIC_2019_Training_GroundTruth.csv`` with
  one-hot columns ``MEL..SCC`` and ``UNK``, optional ``ISIC_2019_Training_Metadata.csv``
  (``image, age_approx, anatom_site_general, lesion_id, sex``). Rows whose one-hot is UNK or not
  exactly one class are quarantined: UNK is never a ninth trained class.
* ``ham10000`` - ``HAM10000_metadata.csv`` (``lesion_id, image_id, dx, dx_type, age, sex,
  localization``) and the image folders (``HAM10000_images_part_1/2``).
* ``pad_ufes_20`` - ``metadata.csv`` (``patient_id, lesion_id, img_id, diagnostic, ...``) and the
  ``images/`` folder (any sub-folders).
* ``folder`` - one sub-folder per class.

Images are found anywhere under the source folder by file name, so both the zip layouts and
flattened copies work. Nothing outside the source folder is read: an image that is a symlink
resolving outside it, or a CSV row naming a path that leaves it (``../x.jpg``, ``/abs/x.jpg``), is
quarantined with the reason :data:`OUTSIDE_REASON`; symlinks that stay inside are followed.

``binary=True`` (``--binary``) ingests a benign-vs-malignant task instead: every class named
malignant (``--malignant``, default the format's own list) becomes the label ``malignant``, every
other class ``benign``, and the manifest's ``label_groups`` records which source classes went where
(the fusion-teacher paper's HAM10000 task, the fusion paper section 3.1).
"""

from __future__ import annotations

import csv
import dataclasses
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

from raykd.data.manifest import Manifest
from raykd.data.schema import ISIC2019_CLASSES, ISIC2019_MALIGNANT, Item
from raykd.data.writer import IngestError, Quarantined, write_dataset
from raykd.registry import Registry

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = {".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff"}
#: Quarantine reason of an image (or a CSV row's path) that is not inside the source folder.
OUTSIDE_REASON = "resolves outside the source folder"


@dataclass
class Source:
    """What a format reader returns: items, the label map and what it already had to quarantine."""

    items: list[Item]
    label_names: list[str]
    malignant: list[str]
    quarantine: list[Quarantined]


Reader = Callable[[Path], Source]
FORMATS: Registry[Reader] = Registry("dataset format")


def _file_loader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes


def _inside(path: Path, root: Path) -> bool:
    """Whether ``path`` lies under the resolved folder ``root`` once its symlinks and ``..`` are
    resolved (a symlink loop or an unreadable link counts as outside)."""
    try:
        return path.resolve().is_relative_to(root)
    except (OSError, RuntimeError):
        return False


def _index_images(root: Path) -> dict[str, Path]:
    """Image stem -> path for every image file under ``root`` (first one wins on duplicates)."""
    index: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in IMAGE_SUFFIXES and p.is_file():
            index.setdefault(p.stem, p)
    return index


def _find_csv(root: Path, patterns: Iterable[str], what: str, required: bool = True) -> Path | None:
    for pattern in patterns:
        hits = sorted(root.rglob(pattern))
        if hits:
            return hits[0]
    if required:
        raise IngestError(f"{what} not found under {root} (looked for {', '.join(patterns)})")
    return None


def _read_csv(path: Path, required: Iterable[str]) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8-sig") as fh:
        reader = csv.DictReader(fh)
        columns = [c.strip() for c in (reader.fieldnames or [])]
        missing = [c for c in required if c not in columns]
        if missing:
            raise IngestError(
                f"{path}: required column {missing[0]!r} is missing (columns found: {', '.join(columns) or 'none'})"
            )
        return [{(k or "").strip(): (v or "").strip() for k, v in row.items()} for row in reader]


def _age(text: str | None) -> float | None:
    try:
        return float(text) if text not in (None, "") else None
    except ValueError:
        return None


def _or_none(text: str | None) -> str | None:
    return text if text not in (None, "", "unknown", "nan", "NaN") else None


def _match_images(
    rows: list[tuple[str, str, dict]],
    images: dict[str, Path],
    make: Callable[[str, str, Path, dict], Item],
    csv_path: Path,
    src: Path,
    claimed: Iterable[str] = (),
) -> tuple[list[Item], list[Quarantined]]:
    """Join CSV rows ``(image_id, label, row)`` with image files; both kinds of orphan are quarantined.

    ``claimed`` names images whose rows were already quarantined (they are not orphans). A row naming
    a path that leaves ``src``, and an image file that resolves outside it (a symlink), are
    quarantined with :data:`OUTSIDE_REASON` and never read.
    """
    root = src.resolve()
    items, bad = [], []
    used: set[str] = {Path(c).stem for c in claimed}
    for image_id, label, row in rows:
        if not _inside(src / image_id, root):
            bad.append(Quarantined(image_id, str(csv_path), OUTSIDE_REASON))
            continue
        stem = Path(image_id).stem
        path = images.get(stem)
        if path is None:
            bad.append(Quarantined(image_id, str(csv_path), "image file not found for CSV row"))
            continue
        used.add(stem)
        if not _inside(path, root):
            bad.append(Quarantined(stem, str(path), OUTSIDE_REASON))
            continue
        items.append(make(stem, label, path, row))
    for stem, path in images.items():
        if stem not in used:
            why = f"image has no row in {csv_path.name}" if _inside(path, root) else OUTSIDE_REASON
            bad.append(Quarantined(stem, str(path), why))
    return items, bad


@FORMATS.register("isic2019")
def read_isic2019(src: Path) -> Source:
    gt_path = _find_csv(src, ["*GroundTruth*.csv"], "ISIC 2019 ground-truth CSV")
    columns = ["image", *ISIC2019_CLASSES]
    gt = _read_csv(gt_path, columns)
    meta_path = _find_csv(src, ["*Training_Metadata*.csv", "*Metadata*.csv"], "metadata", required=False)
    meta: dict[str, dict] = {}
    if meta_path is not None:
        meta = {r["image"]: r for r in _read_csv(meta_path, ["image"])}
    rows, bad = [], []
    for r in gt:
        try:
            hot = [c for c in ISIC2019_CLASSES if float(r[c] or 0) >= 0.5]
            unk = float(r.get("UNK") or 0) >= 0.5
        except ValueError:
            bad.append(Quarantined(r["image"], str(gt_path), "ground-truth columns are not numbers"))
            continue
        if unk:
            bad.append(Quarantined(r["image"], str(gt_path), "label UNK is not a trained class"))
        elif len(hot) != 1:
            bad.append(Quarantined(r["image"], str(gt_path), f"one-hot row has {len(hot)} classes set"))
        else:
            rows.append((r["image"], hot[0], r))

    def make(stem: str, label: str, path: Path, row: dict) -> Item:
        m = meta.get(stem, {})
        return Item(
            image_id=stem, label_name=label, load=_file_loader(path),
            lesion_id=_or_none(m.get("lesion_id")), age=_age(m.get("age_approx")),
            sex=_or_none(m.get("sex")), site=_or_none(m.get("anatom_site_general")), origin=str(path),
        )

    items, orphans = _match_images(rows, _index_images(src), make, gt_path, src,
                                   claimed=[q.image_id for q in bad])
    # ISIC 2019 has no patient ids; lesion ids (metadata) group the BCN/HAM duplicates.
    return Source(items, list(ISIC2019_CLASSES), list(ISIC2019_MALIGNANT), bad + orphans)


HAM10000_CLASSES = ("akiec", "bcc", "bkl", "df", "mel", "nv", "vasc")
HAM10000_MALIGNANT = ("mel", "bcc", "akiec")


@FORMATS.register("ham10000")
def read_ham10000(src: Path) -> Source:
    meta_path = _find_csv(src, ["HAM10000_metadata*.csv", "*metadata*.csv"], "HAM10000 metadata CSV")
    table = _read_csv(meta_path, ["lesion_id", "image_id", "dx"])
    rows = [(r["image_id"], r["dx"], r) for r in table]

    def make(stem: str, label: str, path: Path, row: dict) -> Item:
        return Item(
            image_id=stem, label_name=label, load=_file_loader(path),
            lesion_id=_or_none(row.get("lesion_id")), age=_age(row.get("age")),
            sex=_or_none(row.get("sex")), site=_or_none(row.get("localization")), origin=str(path),
        )

    items, bad = _match_images(rows, _index_images(src), make, meta_path, src)
    return Source(items, list(HAM10000_CLASSES), list(HAM10000_MALIGNANT), bad)


PAD_CLASSES = ("ACK", "BCC", "MEL", "NEV", "SCC", "SEK")
PAD_MALIGNANT = ("BCC", "MEL", "SCC")


@FORMATS.register("pad_ufes_20")
def read_pad_ufes_20(src: Path) -> Source:
    meta_path = _find_csv(src, ["metadata.csv", "*metadata*.csv"], "PAD-UFES-20 metadata.csv")
    table = _read_csv(meta_path, ["patient_id", "lesion_id", "img_id", "diagnostic"])
    rows = [(r["img_id"], r["diagnostic"], r) for r in table]

    def make(stem: str, label: str, path: Path, row: dict) -> Item:
        return Item(
            image_id=stem, label_name=label, load=_file_loader(path),
            # PAD lesion ids are numbers unique per dataset; prefix to keep them apart from patients.
            lesion_id=f"{row['patient_id']}/{row['lesion_id']}" if row.get("lesion_id") else None,
            patient_id=_or_none(row.get("patient_id")), age=_age(row.get("age")),
            sex=_or_none(row.get("gender")), site=_or_none(row.get("region")), origin=str(path),
        )

    items, bad = _match_images(rows, _index_images(src), make, meta_path, src)
    return Source(items, list(PAD_CLASSES), list(PAD_MALIGNANT), bad)


@FORMATS.register("folder")
def read_folder(src: Path) -> Source:
    classes = sorted(p.name for p in src.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise IngestError(f"{src} has no class sub-folders (expected {src}/<class>/<image>)")
    items, bad = [], []
    root = src.resolve()
    for cls in classes:
        for p in sorted((src / cls).rglob("*")):
            if not p.is_file() or p.name.startswith("."):
                continue
            image_id = f"{cls}/{p.relative_to(src / cls).with_suffix('')}"
            if not _inside(p, root):  # a symlinked file, or a class folder that is a symlink out
                bad.append(Quarantined(image_id, str(p), OUTSIDE_REASON))
                continue
            if p.suffix.lower() not in IMAGE_SUFFIXES:
                bad.append(Quarantined(image_id, str(p), f"not an image file type ({p.suffix or 'no suffix'})"))
                continue
            items.append(Item(image_id=image_id, label_name=cls, load=_file_loader(p), origin=str(p)))
    for p in sorted(src.iterdir()):
        if p.is_file() and not p.name.startswith("."):
            bad.append(Quarantined(p.stem, str(p), "file outside any class folder"))
    return Source(items, classes, [], bad)


#: Label names of a binary (benign-vs-malignant) dataset, in label order.
BINARY_LABELS: tuple[str, str] = ("benign", "malignant")


def binary_source(source: Source, malignant: Iterable[str]) -> tuple[Source, dict[str, list[str]]]:
    """``source`` as a benign-vs-malignant task, and the source classes behind each new label.

    Items whose label is one of ``malignant`` become ``malignant``, items of the other known
    classes ``benign``; items with an unknown label keep it (the writer quarantines them).

    Raises:
        IngestError: a ``malignant`` name is not a class of the source, or one side is empty.
    """
    malignant = list(dict.fromkeys(malignant))
    unknown = [m for m in malignant if m not in source.label_names]
    if unknown:
        raise IngestError(f"--malignant names {unknown} are not classes of this dataset "
                          f"(classes: {', '.join(source.label_names)})")
    groups = {"benign": [n for n in source.label_names if n not in malignant],
              "malignant": [n for n in source.label_names if n in malignant]}
    empty = [side for side, names in groups.items() if not names]
    if empty:
        named = ",".join(malignant) or "(none)"
        raise IngestError(f"--binary needs benign and malignant classes; --malignant {named} leaves no "
                          f"{empty[0]} class (classes: {', '.join(source.label_names)})")
    benign, mal = BINARY_LABELS
    items = [
        dataclasses.replace(it, label_name=mal if it.label_name in malignant else benign)
        if it.label_name in source.label_names else it
        for it in source.items
    ]
    return Source(items, list(BINARY_LABELS), [mal], source.quarantine), groups


def ingest(
    fmt: str,
    src: str | Path,
    out: str | Path,
    *,
    fractions: dict[str, float],
    split_seed: int = 42,
    shard_mb: float = 64.0,
    malignant: Iterable[str] | None = None,
    binary: bool = False,
    overwrite: bool = False,
) -> Manifest:
    """Read ``src`` in format ``fmt`` and write shards + manifest to ``out``.

    ``binary``: write the benign-vs-malignant task (:func:`binary_source`) with ``malignant`` (default:
    the format's list) as the malignant classes.
    """
    src = Path(src)
    if not src.is_dir():
        raise IngestError(f"source folder {src} does not exist")
    source = FORMATS.get(fmt)(src)
    log.info("%s: %d candidate images, %d already quarantined", fmt, len(source.items), len(source.quarantine))
    malignant = list(malignant) if malignant is not None else source.malignant
    groups: dict[str, list[str]] = {}
    if binary:
        source, groups = binary_source(source, malignant)
        malignant = source.malignant
        log.info("binary task: malignant = %s, benign = %s", groups["malignant"], groups["benign"])
    return write_dataset(
        source.items,
        out,
        source=fmt,
        label_names=source.label_names,
        malignant=malignant,
        fractions=fractions,
        split_seed=split_seed,
        shard_mb=shard_mb,
        quarantine=source.quarantine,
        source_dir=str(src),
        label_groups=groups,
        overwrite=overwrite,
    )
