"""A contact sheet of sample images per class, read straight from the shards (no Ray needed)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from raykd.data.manifest import Manifest


def contact_sheet(path: str | Path, out: str | Path, *, per_class: int = 6, tile: int = 96) -> Path:
    """Write a PNG grid: one row per class, up to ``per_class`` images each, labelled."""
    import cv2  # lazy: cv2 is heavy

    from raykd.data.transforms import decode_image  # lazy: imports torch

    manifest = Manifest.load(path)
    ds = manifest.shard_dataset(path)
    picked: dict[int, list[np.ndarray]] = {c: [] for c in range(manifest.num_classes)}
    for batch in ds.to_batches(columns=["image", "label"], batch_size=256):
        for data, label in zip(batch.column("image").to_pylist(), batch.column("label").to_pylist()):
            if len(picked[label]) < per_class:
                picked[label].append(cv2.resize(decode_image(data), (tile, tile), interpolation=cv2.INTER_AREA))
        if all(len(v) >= per_class for v in picked.values()):
            break
    label_w = 70
    sheet = np.full((tile * manifest.num_classes, label_w + tile * per_class, 3), 255, np.uint8)
    for c, images in picked.items():
        y = c * tile
        cv2.putText(sheet, manifest.label_names[c], (4, y + tile // 2), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        for j, img in enumerate(images):
            sheet[y : y + tile, label_w + j * tile : label_w + (j + 1) * tile] = img
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(out), cv2.cvtColor(sheet, cv2.COLOR_RGB2BGR))
    return out
