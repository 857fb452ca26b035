"""``run_export``: artifact -> ONNX (+ fp16, int8), checked on real validation images.

Right after export, ONNX Runtime and torch score the same validation images through the serving
predictors (:mod:`raykd.serve.predictor`, which run the training-time evaluation transform). The
largest absolute difference of their probabilities must stay within ``tolerance`` or the export
fails (:class:`ParityError`) — a model that serves different answers than it was evaluated with is
worse than no model. The fp16 (paper 004, section 3.7) and int8 variants are reported with their
file size and their change in balanced multi-class accuracy (BMA) on the validation split, so the
size/accuracy trade-off is a measured number rather than an assumption.

Validation rows are read straight from ``DATASET/shards/*.parquet`` with pyarrow (no Ray needed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from raykd.artifact import find_artifact, load_artifact
from raykd.export.onnx import FP16_NAME, INT8_NAME, ONNX_NAME, convert_fp16, export_onnx, quantize_int8

log = logging.getLogger(__name__)

__all__ = ["ExportReport", "VariantReport", "ParityError", "load_split_images", "run_export"]

REPORT_NAME = "export_report.json"
DEFAULT_TOLERANCE = 1e-4


class ParityError(RuntimeError):
    """ONNX Runtime's probabilities differ from torch's by more than the tolerance."""


@dataclass
class VariantReport:
    """One exported file measured against the torch model on the same images."""

    name: str
    path: str
    size_bytes: int
    max_abs_diff: float
    bma: float | None
    bma_change: float | None
    images_per_s: float


@dataclass
class ExportReport:
    """What ``run_export`` measured: the torch reference and every exported variant."""

    artifact: str
    model_name: str
    dataset: str
    split: str
    num_images: int
    tolerance: float
    torch_bma: float | None
    torch_size_bytes: int
    torch_images_per_s: float
    variants: list[VariantReport] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def table(self) -> str:
        """A plain-text table (one row per backend) for the CLI."""
        fmt = "{:<10} {:>10} {:>12} {:>9} {:>11} {:>8}"
        rows = [fmt.format("variant", "size MB", "max|dp|", "BMA", "BMA change", "img/s")]

        def num(v, f):
            return "-" if v is None else format(v, f)

        rows.append(fmt.format("torch", num(self.torch_size_bytes / 1e6, ".2f"), "-",
                               num(self.torch_bma, ".4f"), "-", num(self.torch_images_per_s, ".1f")))
        for v in self.variants:
            rows.append(fmt.format(v.name, num(v.size_bytes / 1e6, ".2f"), num(v.max_abs_diff, ".2e"),
                                   num(v.bma, ".4f"), num(v.bma_change, "+.4f"), num(v.images_per_s, ".1f")))
        return "\n".join(rows)


def load_split_images(
    dataset: str | os.PathLike, split: str = "val", *, limit: int | None = None
) -> tuple[list[bytes], np.ndarray]:
    """Encoded images and labels of one split, read from ``dataset/shards/*.parquet`` with pyarrow.

    Rows are returned in file order; ``limit`` keeps the first ``limit`` rows.
    """
    import pyarrow.dataset as pads

    shards = Path(dataset) / "shards"
    files = sorted(shards.glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"no shards/*.parquet under {dataset}: pass --data with a raykd dataset folder "
            "(made by `python -m raykd.data`)"
        )
    ds = pads.dataset([str(f) for f in files], format="parquet")
    table = ds.to_table(columns=["image", "label"], filter=pads.field("split") == split)
    if table.num_rows == 0:
        raise ValueError(f"{dataset} has no rows in split {split!r}; pick another with --split")
    if limit is not None:
        table = table.slice(0, limit)
    return table.column("image").to_pylist(), np.asarray(table.column("label").to_numpy(), dtype=np.int64)


def _predict_all(predictor, images: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, float]:
    """Probabilities for every image, batch by batch, and the throughput in images/s."""
    t0 = time.perf_counter()
    out = [predictor.predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    seconds = time.perf_counter() - t0
    return np.concatenate(out), len(images) / max(seconds, 1e-9)


def _bma(probs: np.ndarray, labels: np.ndarray, meta) -> float | None:
    from raykd.metrics import compute_from_arrays

    return float(compute_from_arrays(probs, labels, meta.label_names, meta.malignant)["bma"])


def run_export(
    checkpoint: str | os.PathLike,
    *,
    data: str | os.PathLike | None = None,
    out: str | os.PathLike | None = None,
    split: str = "val",
    fp16: bool = False,
    int8: bool = False,
    tolerance: float = DEFAULT_TOLERANCE,
    max_images: int | None = None,
    batch_size: int = 32,
    opset: int = 17,
) -> ExportReport:
    """Export the artifact of ``checkpoint`` to ONNX, check parity, build and measure variants.

    Args:
        checkpoint: Run folder (holding ``best/``) or artifact folder.
        data: Dataset folder for the parity/BMA images (default: the artifact's ``meta.dataset``).
        out: Output folder (default: the artifact folder, next to ``model.safetensors``).
        split: Split to measure on.
        fp16: Also write ``model.fp16.onnx``.
        int8: Also write ``model.int8.onnx`` (dynamic quantisation).
        tolerance: Largest allowed |p_onnx - p_torch| for the fp32 export.
        max_images: Use only the first N images of the split (default: all).
        batch_size: Images per forward pass.
        opset: ONNX opset.

    Returns:
        The report (also written to ``out/export_report.json``).

    Raises:
        ParityError: when the fp32 ONNX model disagrees with torch beyond ``tolerance``.
    """
    from raykd.artifact.predict import TorchPredictor

    artifact, model, meta, dataset = _open_artifact(checkpoint, data)
    out_dir = Path(out) if out else artifact
    out_dir.mkdir(parents=True, exist_ok=True)

    variants = [name for name, wanted in (("onnx", True), ("fp16", fp16), ("int8", int8)) if wanted]
    steps = 2 + 2 * len(variants)  # read images, torch reference, then write and check each variant
    with tqdm(total=steps, desc=f"export {meta.model_name}", unit="step", disable=None) as bar:
        with _step(bar, f"read {split} images"):
            images, labels = _decoded_split(dataset, split, max_images)
        with _step(bar, "torch reference"):
            ref, torch_ips = _predict_all(TorchPredictor(model, meta, device="cpu"), images, batch_size)
            torch_bma = _bma(ref, labels, meta)
        report = ExportReport(
            artifact=str(artifact), model_name=meta.model_name, dataset=str(dataset), split=split,
            num_images=len(images), tolerance=tolerance, torch_bma=torch_bma,
            torch_size_bytes=(artifact / "model.safetensors").stat().st_size, torch_images_per_s=torch_ips,
        )
        paths = _write_variants(model, meta, out_dir, variants, opset=opset, bar=bar)
        for name, path in paths.items():
            with _step(bar, f"parity {name}"):
                variant = _measure_variant(name, path, images, labels, ref, torch_bma, meta, batch_size)
            report.variants.append(variant)
    (out_dir / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2))
    _check_parity(report, out_dir)
    return report


@contextlib.contextmanager
def _step(bar: tqdm, name: str) -> Iterator[None]:
    """One step of the export progress bar: shown as running while the block runs, counted after."""
    bar.set_postfix_str(name)
    yield
    bar.update()


def _open_artifact(checkpoint: str | os.PathLike, data: str | os.PathLike | None):
    """The artifact folder of ``checkpoint``, its model and meta, and the dataset to check it on."""
    artifact = find_artifact(checkpoint)
    model, meta = load_artifact(artifact)
    dataset = data or meta.dataset
    if not dataset:
        raise ValueError(
            f"{artifact}/meta.json names no dataset: pass --data DIR so the export can be checked "
            "on real validation images"
        )
    return artifact, model, meta, dataset


def _decoded_split(dataset, split: str, max_images: int | None) -> tuple[list[np.ndarray], np.ndarray]:
    """Decoded RGB images and labels of ``split`` (the first ``max_images`` rows)."""
    from raykd.data.transforms import decode_image

    blobs, labels = load_split_images(dataset, split, limit=max_images)
    images = [decode_image(b) for b in blobs]
    log.info("checking the export on %d %s images from %s", len(images), split, dataset)
    return images, labels


def _write_variants(model, meta, out_dir: Path, variants: list[str], *, opset: int,
                    bar: tqdm) -> dict[str, Path]:
    """Write the fp32 ONNX file, then the fp16 / int8 variants named in ``variants`` (made from it)."""
    paths: dict[str, Path] = {}
    with _step(bar, "onnx"):
        paths["onnx"] = export_onnx(model, meta, out_dir / ONNX_NAME, opset=opset)
    if "fp16" in variants:
        with _step(bar, "fp16"):
            paths["fp16"] = convert_fp16(paths["onnx"], out_dir / FP16_NAME)
    if "int8" in variants:
        with _step(bar, "int8"):
            paths["int8"] = quantize_int8(paths["onnx"], out_dir / INT8_NAME)
    return paths


def _measure_variant(name: str, path: Path, images: list[np.ndarray], labels: np.ndarray, ref: np.ndarray,
                     torch_bma: float | None, meta, batch_size: int) -> VariantReport:
    """Score ``images`` with ONNX Runtime on ``path``: difference to ``ref``, BMA, size and speed."""
    from raykd.artifact.predict import OnnxPredictor

    probs, ips = _predict_all(OnnxPredictor(path), images, batch_size)
    bma = _bma(probs, labels, meta)
    return VariantReport(
        name=name, path=str(path), size_bytes=path.stat().st_size,
        max_abs_diff=float(np.abs(probs - ref).max()), bma=bma,
        bma_change=None if bma is None or torch_bma is None else bma - torch_bma,
        images_per_s=ips,
    )


def _check_parity(report: ExportReport, out_dir: Path) -> None:
    """Raise :class:`ParityError` when the fp32 ONNX model is off torch by more than the tolerance."""
    diff, tolerance, n = report.variants[0].max_abs_diff, report.tolerance, report.num_images
    log.info("ONNX vs torch: max |p_onnx - p_torch| = %.3g over %d images (tolerance %.1g)",
             diff, n, tolerance)
    if not diff <= tolerance:  # also catches NaN
        raise ParityError(
            f"ONNX export of {report.artifact} disagrees with torch: max |p_onnx - p_torch| = {diff:.3g} > "
            f"tolerance {tolerance:.1g} on {n} {report.split} images (report: {out_dir / REPORT_NAME}). "
            "Raise --tolerance only if the difference is understood."
        )
