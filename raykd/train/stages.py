"""Teacher-side stages some methods need before distillation starts (run on the driver, once).

``sskd`` / ``ssdkd`` (SSD-KD, after Xu et al. 2020): the teacher's projection head is first trained
on the rotation-contrastive task with the teacher frozen. The head is saved in the run folder, so
a resumed run or a retried worker group reuses it.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pyarrow.dataset as pads
import torch
from torch import nn

from raykd.data.manifest import Manifest
from raykd.data.transforms import PreprocessSpec, build_eval_transform, decode_image, to_chw_batch

log = logging.getLogger(__name__)

SSKD_HEAD = "sskd_teacher_head.safetensors"


def split_batches(path: str | Path, split: str, spec: PreprocessSpec, batch_size: int = 32) -> list[torch.Tensor]:
    """Eval-transformed image batches of one split, in memory (small stages only)."""
    manifest = Manifest.load(path)
    table = pads.dataset(manifest.shard_paths(path), format="parquet").to_table(
        columns=["image"], filter=pads.field("split") == split)
    tf = build_eval_transform(spec)
    images = [tf(image=decode_image(b))["image"] for b in table.column("image").to_pylist()]
    return [torch.from_numpy(to_chw_batch(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]


def sskd_teacher_head(run_dir: Path, data_path: str, teacher: nn.Module, spec: PreprocessSpec, *, epochs: int) -> Path:
    """Train (or reuse) the SSKD teacher head; returns the safetensors file."""
    from safetensors.torch import save_file

    from raykd.distill.methods.sskd import pretrain_sskd_teacher_head

    out = Path(run_dir) / SSKD_HEAD
    if out.is_file():
        return out
    train = split_batches(data_path, "train", spec)
    val = split_batches(data_path, "val", spec)
    log.info("SSKD stage 1: training the teacher's projection head (%d epochs, %d batches)", epochs, len(train))
    state = pretrain_sskd_teacher_head(teacher, train, epochs=epochs, val_batches=val or None,
                                       patience=min(15, epochs), milestones=(epochs // 2, 3 * epochs // 4))
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(out))
    return out
