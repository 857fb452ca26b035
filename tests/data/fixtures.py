"""Tiny datasets in each publisher's layout, with known bad items planted in them."""

from __future__ import annotations

import csv
from pathlib import Path

import cv2
import numpy as np


def image_bytes(seed: int, fmt: str = ".jpg", size: int = 24) -> bytes:
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 255, (size, size, 3), dtype=np.uint8)
    ok, buf = cv2.imencode(fmt, img)
    assert ok
    return buf.tobytes()


def write_image(path: Path, seed: int, fmt: str | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, fmt or path.suffix))


def truncated_jpeg(seed: int) -> bytes:
    data = image_bytes(seed, ".jpg", size=64)
    return data[: len(data) // 2]


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(header)
        w.writerows(rows)


ISIC_COLUMNS = ["image", "MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC", "UNK"]


def isic2019(root: Path) -> dict:
    """16 good images (8 classes x 2, lesion pairs), plus one of each fault ingest must quarantine."""
    img_dir = root / "ISIC_2019_Training_Input" / "ISIC_2019_Training_Input"
    gt, meta = [], []
    classes = ISIC_COLUMNS[1:9]
    n = 0
    for c, name in enumerate(classes):
        for k in range(2):
            image = f"ISIC_{n:07d}"
            write_image(img_dir / f"{image}.jpg", n)
            gt.append([image] + [1.0 if j == c else 0.0 for j in range(8)] + [0.0])
            # the two images of a class are two views of one lesion
            meta.append([image, 40 + 5 * c, "torso", f"IL_{c:07d}", "male" if k else "female"])
            n += 1
    # faults
    write_image(img_dir / "ISIC_9000001.jpg", 101)
    gt.append(["ISIC_9000001"] + [0.0] * 8 + [1.0])  # UNK
    gt.append(["ISIC_9000002", 1.0] + [0.0] * 8)  # row without image file
    write_image(img_dir / "ISIC_9000003.jpg", 103)  # image without row
    (img_dir / "ISIC_9000004.jpg").write_bytes(b"definitely not a jpeg")
    gt.append(["ISIC_9000004", 1.0] + [0.0] * 8)  # corrupt
    (img_dir / "ISIC_9000005.jpg").write_bytes(truncated_jpeg(105))
    gt.append(["ISIC_9000005", 0.0, 1.0] + [0.0] * 7)  # truncated
    gt.append(["ISIC_0000000", 1.0] + [0.0] * 8)  # duplicate row of the first image
    write_image(img_dir / "ISIC_9000006.jpg", 106)
    gt.append(["ISIC_9000006", 1.0, 1.0] + [0.0] * 7)  # two classes set
    write_csv(root / "ISIC_2019_Training_GroundTruth.csv", ISIC_COLUMNS, gt)
    write_csv(
        root / "ISIC_2019_Training_Metadata.csv",
        ["image", "age_approx", "anatom_site_general", "lesion_id", "sex"],
        meta,
    )
    return {
        "good": 16,
        "quarantined": {
            "ISIC_9000001": "UNK",
            "ISIC_9000002": "image file not found",
            "ISIC_9000003": "has no row",
            "ISIC_9000004": "unreadable image",
            "ISIC_9000005": "unreadable image",
            "ISIC_0000000": "duplicate image id",
            "ISIC_9000006": "2 classes set",
        },
    }


HAM_COLUMNS = ["lesion_id", "image_id", "dx", "dx_type", "age", "sex", "localization"]


def ham10000(root: Path) -> dict:
    dxs = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]
    rows = []
    n = 0
    for c, dx in enumerate(dxs):
        for k in range(3):  # 3 images of one lesion per class
            image_id = f"ISIC_{n:07d}"
            part = "HAM10000_images_part_1" if n % 2 else "HAM10000_images_part_2"
            write_image(root / part / f"{image_id}.jpg", n)
            rows.append([f"HAM_{c:07d}", image_id, dx, "histo", 50, "male", "back"])
            n += 1
    write_image(root / "HAM10000_images_part_1" / "ISIC_8000000.jpg", 500)
    rows.append(["HAM_9999999", "ISIC_8000000", "xyz", "histo", "", "unknown", "unknown"])
    write_csv(root / "HAM10000_metadata.csv", HAM_COLUMNS, rows)
    return {"good": 21, "quarantined": {"ISIC_8000000": "unknown label 'xyz'"}}


def pad_ufes_20(root: Path) -> dict:
    header = ["patient_id", "lesion_id", "smoke", "age", "img_id", "diagnostic", "gender", "region", "biopsed"]
    rows = []
    n = 0
    for c, dx in enumerate(["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]):
        for k in range(4):
            patient = f"PAT_{c * 2 + k // 2}"
            # patient has two lesions, one image each: patient grouping must keep them together
            img = f"{patient}_{100 + n}_{n}.png"
            write_image(root / "images" / "imgs_part_1" / img, n)
            rows.append([patient, 100 + n, "False", 60, img, dx, "FEMALE", "FACE", "True"])
            n += 1
    write_csv(root / "metadata.csv", header, rows)
    return {"good": 24, "quarantined": {}}


def folder(root: Path) -> dict:
    for c, name in enumerate(["benign", "malignant"]):
        for k in range(5):
            write_image(root / name / f"img{k}.png", c * 10 + k)
    (root / "benign" / "notes.txt").write_text("not an image")
    write_image(root / "stray.jpg", 99)
    return {"good": 10, "quarantined": {"benign/notes": "not an image file type", "stray": "outside any class"}}
