"""``run_export``: artifact -> ONNX (+ fp16, int8), checked on real validation images.

Right after export, ONNX Runtime and torch score the same validation images through the serving
predictors (:mod:`raykd.serve.backend`, which run the training-time evaluation transform). The
largest absolute difference of their probabilities must stay within ``cfg.tolerance`` or the export
fails (:class:`ParityError`) — a model that serves different answers than it was evaluated with is
worse than no model. The fp16 (Islam et al. fusion paper, section 3.7) and int8 variants are reported with their
file size and their change in balanced multi-class accuracy (BMA) on the validation split, so the
size/accuracy trade-off is a measured number rather than an assumption.

Before the ONNX file is written, the torch model scores the whole validation split (and the test
split when the dataset has one) and, unless ``cfg.calibrate`` is False, the export fits a temperature
on the validation logits and chooses the cancer-vs-benign threshold that reaches
``cfg.target_sensitivity`` there (:mod:`raykd.export.calibrate`). Both go into the artifact's
``meta.json`` (``temperature``, ``decision``) and hence into the ONNX metadata, so torch and ONNX
Runtime serve the same calibrated probabilities and the parity check compares them. ECE and Brier
before/after go into the report, a reliability diagram into ``reliability.png`` and, once parity
holds, a model card (:mod:`raykd.export.card`) into ``model_card.json`` / ``model_card.md`` beside
the model.

Validation rows are read straight from ``DATASET/shards/*.parquet`` with pyarrow (no Ray needed).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import statistics
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
from tqdm import tqdm

from raykd.artifact.format import (
    BEST_DIR,
    WEIGHTS_NAME,
    count_params,
    find_artifact,
    load_artifact,
    write_meta,
)
from raykd.artifact.measure import measure_latency
from raykd.artifact.predict import OnnxPredictor, TorchPredictor, softmax
from raykd.artifact.rundir import RunDir
from raykd.data.manifest import MANIFEST_NAME, Manifest, is_uri
from raykd.data.transforms import PreprocessSpec, decode_image
from raykd.export.calibrate import (
    DEFAULT_BINS,
    CalibrationScores,
    choose_threshold,
    fit_temperature,
    operating_point,
    reliability_diagram,
    softmax_t,
)
from raykd.export.card import build_card, performance_section, write_card
from raykd.export.onnx import FP16_NAME, INT8_NAME, ONNX_NAME, convert_fp16, export_onnx, quantize_int8
from raykd.export.options import ExportConfig
from raykd.metrics.classification import compute_from_arrays, per_class_table

log = logging.getLogger(__name__)

__all__ = ["ExportConfig", "ExportReport", "ParityError", "ScoredSplit", "VariantReport", "load_split_images",
           "run_export", "score_split", "split_size"]

REPORT_NAME = "export_report.json"
RELIABILITY_NAME = "reliability.png"
DECISION_RULE = ("malignant when P(malignant) >= threshold, P(malignant) being the sum of the served "
                 "(temperature-scaled) probabilities of the malignant classes")


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
    #: ``{"temperature", "fitted", "bins", "val": CalibrationScores, "test": ... | None}``; None
    #: when the export did not calibrate.
    calibration: dict | None = None
    #: The cancer-vs-benign operating point written to ``meta.decision`` (empty: none).
    decision: dict = field(default_factory=dict)
    #: Single-image CPU latency (median ms, one thread) of ``torch`` and ``onnx``.
    latency_ms: dict = field(default_factory=dict)
    card: str | None = None
    reliability: str | None = None
    #: Served probabilities and labels of each fully scored split (``val``, ``test``), for plots;
    #: not written to ``export_report.json``.
    predictions: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict, repr=False,
                                                                 compare=False)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.pop("predictions")
        return out

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
        if self.calibration:
            c = self.calibration
            for split in ("val", "test"):
                if c.get(split):
                    s = c[split]
                    rows.append(f"{split}: ECE {s['ece_before']:.4f} -> {s['ece_after']:.4f}, Brier "
                                f"{s['brier_before']:.4f} -> {s['brier_after']:.4f} at temperature "
                                f"{c['temperature']:.3f}")
        if self.decision:
            d = self.decision
            rows.append(f"decision: malignant when P(malignant) >= {d['threshold']:.4g} (target sensitivity "
                        f"{d['target_sensitivity']}; val sensitivity {num(d.get('val_sensitivity'), '.3f')}, "
                        f"specificity {num(d.get('val_specificity'), '.3f')})")
        return "\n".join(rows)


def load_split_images(
    dataset: str | os.PathLike, split: str = "val", *, limit: int | None = None
) -> tuple[list[bytes], np.ndarray]:
    """Encoded images and labels of one split, read from ``dataset/shards/*.parquet`` with pyarrow.

    Rows are returned in file order; ``limit`` keeps the first ``limit`` rows.
    """
    import pyarrow.dataset as pads  # lazy: pyarrow is heavy

    ds = _shards(dataset)
    table = ds.to_table(columns=["image", "label"], filter=pads.field("split") == split)
    if table.num_rows == 0:
        raise ValueError(f"{dataset} has no rows in split {split!r}; pick another with --split")
    if limit is not None:
        table = table.slice(0, limit)
    return table.column("image").to_pylist(), np.asarray(table.column("label").to_numpy(), dtype=np.int64)


def _shards(dataset: str | os.PathLike):
    """The dataset's shards (a folder or a URI) as one pyarrow dataset, in the manifest's order."""
    import pyarrow.dataset as pads  # lazy: pyarrow is heavy

    if is_uri(dataset) or (Path(dataset) / MANIFEST_NAME).is_file():
        return Manifest.load(dataset).shard_dataset(dataset)
    files = sorted((Path(dataset) / "shards").glob("*.parquet"))  # shards without a manifest
    if not files:
        raise FileNotFoundError(f"no shards/*.parquet under {dataset}: pass --data with a raykd dataset folder "
                                "(made by `python -m raykd.data`)")
    return pads.dataset([str(f) for f in files], format="parquet")


def split_size(dataset: str | os.PathLike, split: str) -> int:
    """Number of rows of ``split`` in ``dataset/shards/*.parquet`` (0 when the split is empty)."""
    import pyarrow.dataset as pads  # lazy: pyarrow is heavy

    ds = _shards(dataset)
    return ds.count_rows(filter=pads.field("split") == split)


@dataclass
class ScoredSplit:
    """Raw logits (before any temperature) of a whole split, its labels and the scoring time."""

    split: str
    logits: np.ndarray
    labels: np.ndarray
    #: Seconds spent in preprocessing and the forward pass (decoding excluded, as for the variants).
    seconds: float

    @property
    def images_per_s(self) -> float:
        return len(self.labels) / max(self.seconds, 1e-9)


def score_split(predictor, dataset: str | os.PathLike, split: str, *,
                batch_size: int = ExportConfig.batch_size, limit: int | None = None) -> ScoredSplit:
    """Logits of every image of ``split`` through ``predictor.logits`` (a :class:`TorchPredictor`).

    Images are decoded one batch at a time, so a large split never sits decoded in memory.
    """
    blobs, labels = load_split_images(dataset, split, limit=limit)
    out, seconds = [], 0.0
    for i in range(0, len(blobs), batch_size):
        images = [decode_image(b) for b in blobs[i : i + batch_size]]
        t0 = time.perf_counter()
        out.append(predictor.logits(images))
        seconds += time.perf_counter() - t0
    return ScoredSplit(split=split, logits=np.concatenate(out), labels=labels, seconds=seconds)


def _predict_all(predictor, images: list[np.ndarray], batch_size: int) -> tuple[np.ndarray, float]:
    """Probabilities for every image, batch by batch, and the throughput in images/s."""
    t0 = time.perf_counter()
    out = [predictor.predict(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    seconds = time.perf_counter() - t0
    return np.concatenate(out), len(images) / max(seconds, 1e-9)


def _bma(probs: np.ndarray, labels: np.ndarray, meta) -> float | None:
    return float(compute_from_arrays(probs, labels, meta.label_names, meta.malignant)["bma"])


def run_export(cfg: ExportConfig, checkpoint: str | os.PathLike, *, data: str | os.PathLike | None = None,
               out: str | os.PathLike | None = None,
               run_metrics: dict[str, dict] | None = None) -> ExportReport:
    """Calibrate the artifact of ``checkpoint``, export it to ONNX, check parity, write its card.

    Args:
        cfg: How: the split, the variants, the parity tolerance, the calibration and the rest
            (:class:`~raykd.export.options.ExportConfig`, which documents each option).
        checkpoint: Run folder (holding ``best/``) or artifact folder.
        data: Dataset folder for the parity/BMA images (default: the artifact's ``meta.dataset``).
        out: Output folder (default: the artifact folder, next to ``model.safetensors``).
        run_metrics: The run's own ``{"val": {...}, "test": {...}}`` metrics for the model card's
            headline numbers (the search passes its leaderboard row's, so card and leaderboard
            agree); default: the run folder's ``summary.json`` when there is one, else the
            export's own scoring.

    Returns:
        The report (also written to ``out/export_report.json``).

    Raises:
        ParityError: when the fp32 ONNX model disagrees with torch beyond ``cfg.tolerance``.
    """
    _check_options(cfg)
    artifact, model, meta, dataset = _open_artifact(checkpoint, data)
    out_dir = Path(out) if out else artifact
    out_dir.mkdir(parents=True, exist_ok=True)
    predictor = TorchPredictor(model, meta, device="cpu")

    variants = [name for name, wanted in (("onnx", True), ("fp16", cfg.fp16), ("int8", cfg.int8)) if wanted]
    # score, calibrate, read images, torch reference, write and check each variant, latency, card
    steps = 6 + 2 * len(variants)
    with tqdm(total=steps, desc=f"export {meta.model_name}", unit="step", disable=None) as bar:
        with _step(bar, "score val and test"):
            scored = _score_splits(predictor, dataset, cfg)
        with _step(bar, "calibrate"):
            calibration, reliability = _calibrate_step(meta, scored, artifact, out_dir, cfg)
        with _step(bar, f"read {cfg.split} images"):
            images, labels = _decoded_split(dataset, cfg.split, cfg.max_images)
        with _step(bar, "torch reference"):
            ref, torch_ips = _torch_reference(predictor, meta, scored, images, cfg)
            torch_bma = _bma(ref, labels, meta)
        report = _reference_report(cfg, artifact, meta, dataset, scored, images, torch_bma, torch_ips,
                                   calibration, reliability)
        paths = _write_variants(model, meta, out_dir, variants, opset=cfg.opset, bar=bar)
        for name, path in paths.items():
            with _step(bar, f"parity {name}"):
                variant = _measure_variant(name, path, images, labels, ref, torch_bma, meta, cfg.batch_size)
            report.variants.append(variant)
        _save_report(report, out_dir)
        _check_parity(report, out_dir)
        with _step(bar, "latency"):
            report.latency_ms = _latency(model, meta, paths["onnx"], cfg.latency_reps)
        with _step(bar, "model card"):
            report.card = str(_write_model_card(report, meta, artifact, out_dir, dataset, scored, paths,
                                                run_metrics))
    _save_report(report, out_dir)
    return report


def _check_options(cfg: ExportConfig) -> None:
    """Refuse an option no export can honour, before any file is opened."""
    if not 0.0 < cfg.target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity must lie in (0, 1], got {cfg.target_sensitivity} "
                         "(--target-sensitivity / export.target_sensitivity)")


def _score_splits(predictor, dataset, cfg: ExportConfig) -> dict[str, ScoredSplit]:
    """Raw logits of the whole val and test splits (those the dataset has; else ``cfg.split``)."""
    present = [name for name in ("val", "test") if split_size(dataset, name)]
    if cfg.calibrate and "val" not in present:
        raise ValueError(f"{dataset} has no val split to fit the temperature and threshold on: pass "
                         "--no-calibrate, or --data with a dataset that has one")
    return {name: score_split(predictor, dataset, name, batch_size=cfg.batch_size)
            for name in present or [cfg.split]}


def _calibrate_step(meta, scored: dict[str, ScoredSplit], artifact: Path, out_dir: Path,
                    cfg: ExportConfig) -> tuple[dict | None, Path | None]:
    """Fit and record the temperature and decision (``cfg.calibrate``): the calibration scores and
    the reliability diagram, or ``(None, None)`` when the artifact keeps its meta as it is."""
    if not cfg.calibrate:
        log.info("calibration skipped: serving temperature %.3g and decision %s as in %s",
                 meta.temperature, meta.decision or "none", artifact)
        return None, None
    calibration = _calibrate(meta, scored, cfg.target_sensitivity)
    reliability = _reliability(meta, scored, calibration, out_dir / RELIABILITY_NAME)
    write_meta(artifact, meta)  # before the ONNX file, which embeds the meta
    return calibration, reliability


def _torch_reference(predictor, meta, scored: dict[str, ScoredSplit], images: list[np.ndarray],
                     cfg: ExportConfig) -> tuple[np.ndarray, float]:
    """Torch's served probabilities of ``images`` (the parity reference) and its images/s."""
    if cfg.split in scored:  # the rows of _decoded_split are the first rows of the scored split
        return (softmax(scored[cfg.split].logits[: len(images)] / meta.temperature),
                scored[cfg.split].images_per_s)
    return _predict_all(predictor, images, cfg.batch_size)


def _reference_report(cfg: ExportConfig, artifact: Path, meta, dataset, scored: dict[str, ScoredSplit],
                      images: list[np.ndarray], torch_bma: float | None, torch_ips: float,
                      calibration: dict | None, reliability: Path | None) -> ExportReport:
    """The report as far as torch goes (the variants and the rest are added as they are measured)."""
    return ExportReport(
        artifact=str(artifact), model_name=meta.model_name, dataset=str(dataset), split=cfg.split,
        num_images=len(images), tolerance=cfg.tolerance, torch_bma=torch_bma,
        torch_size_bytes=(artifact / WEIGHTS_NAME).stat().st_size, torch_images_per_s=torch_ips,
        calibration=calibration, decision=dict(meta.decision),
        reliability=str(reliability) if reliability else None,
        predictions={name: (softmax(sc.logits / meta.temperature), sc.labels) for name, sc in scored.items()},
    )


def _save_report(report: ExportReport, out_dir: Path) -> None:
    (out_dir / REPORT_NAME).write_text(json.dumps(report.to_dict(), indent=2))


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


def _calibrate(meta, scored: dict[str, ScoredSplit], target_sensitivity: float) -> dict:
    """Fit ``meta.temperature`` on the validation logits, set ``meta.decision``; ECE/Brier before/after."""
    val = scored["val"]
    meta.temperature = fit_temperature(val.logits, val.labels)
    meta.decision = _decision(meta, scored, target_sensitivity)
    out = {"temperature": meta.temperature, "fitted": True, "bins": DEFAULT_BINS, "val": None, "test": None}
    for name, s in scored.items():
        out[name] = CalibrationScores.of(s.logits, s.labels, meta.temperature, DEFAULT_BINS).to_dict()
        log.info("%s split (%d images): ECE %.4f -> %.4f, Brier %.4f -> %.4f at temperature %.3f", name,
                 len(s.labels), out[name]["ece_before"], out[name]["ece_after"], out[name]["brier_before"],
                 out[name]["brier_after"], meta.temperature)
    return out


def _decision(meta, scored: dict[str, ScoredSplit], target_sensitivity: float) -> dict:
    """The cancer-vs-benign threshold reaching ``target_sensitivity`` on validation, or ``{}``.

    The malignant probability is computed exactly as a server computes it from the predictors'
    float32 probabilities, so a validation image on the threshold is flagged there too.
    """
    malignant = meta.malignant_indices()
    if not malignant:
        log.info("%s has no malignant class among its labels %s: no cancer-vs-benign decision point",
                 meta.model_name, meta.label_names)
        return {}

    def malignant_prob(s: ScoredSplit) -> tuple[np.ndarray, np.ndarray]:
        probs = softmax(s.logits / meta.temperature)
        return probs[:, malignant].sum(axis=1), np.isin(s.labels, malignant)

    p, y = malignant_prob(scored["val"])
    if not y.any():
        log.warning("the validation split holds no malignant (%s) image: no cancer-vs-benign decision point",
                    ", ".join(meta.malignant))
        return {}
    threshold = choose_threshold(p, y, target_sensitivity)
    decision = {"threshold": threshold, "target_sensitivity": float(target_sensitivity), "rule": DECISION_RULE,
                "malignant": list(meta.malignant)}
    for name, s in scored.items():
        p, y = malignant_prob(s)
        op = operating_point(p, y, threshold)
        decision.update({f"{name}_sensitivity": op["sensitivity"], f"{name}_specificity": op["specificity"],
                         f"{name}_images": len(y)})
    log.info("decision: malignant when P(malignant) >= %.4g; val sensitivity %s, specificity %s (target %.3g)",
             threshold, decision["val_sensitivity"], decision["val_specificity"], target_sensitivity)
    return decision


def _reliability(meta, scored: dict[str, ScoredSplit], calibration: dict, path: Path) -> Path:
    """Reliability diagram before/after the temperature, on the test split (held out) or else val."""
    s = scored.get("test") or scored["val"]
    return reliability_diagram(softmax_t(s.logits, 1.0), softmax_t(s.logits, calibration["temperature"]), s.labels,
                               path, bins=calibration["bins"],
                               title=f"{meta.model_name} {meta.version}: {s.split} split, T = "
                                     f"{calibration['temperature']:.3f}")


def _latency(model, meta, onnx_path: Path, reps: int) -> dict[str, float]:
    """Median single-image CPU milliseconds on one thread: torch (as the leaderboard measures it) and ONNX."""
    size = PreprocessSpec.from_dict(meta.preprocess).image_size
    torch_ms = measure_latency(model, size, reps=reps)
    onnx = OnnxPredictor(onnx_path, threads=1)
    x = np.random.default_rng(0).standard_normal((1, 3, size, size)).astype(np.float32)
    for _ in range(3):
        onnx.predict_batch(x)
    times = []
    for _ in range(max(1, reps)):
        t0 = time.perf_counter()
        onnx.predict_batch(x)
        times.append((time.perf_counter() - t0) * 1e3)
    return {"torch": torch_ms, "onnx": statistics.median(times)}


def _run_folder(artifact: Path) -> Path | None:
    """The run folder holding ``artifact`` as its ``best/`` (it has a saved config), or None."""
    parent = artifact.resolve().parent
    return parent if artifact.name == BEST_DIR and RunDir(parent).config_file.is_file() else None


def _write_model_card(report: ExportReport, meta, artifact: Path, out_dir: Path, dataset,
                      scored: dict[str, ScoredSplit], paths: dict[str, Path],
                      run_metrics: dict[str, dict] | None) -> Path:
    """Build the model card from this export's measurements and write it beside the model.

    The headline numbers are the run's own (``run_metrics``, else ``summary.json``), the ones the
    leaderboard shows; the served numbers and the per-class table come from the scoring above.
    """
    split = "test" if "test" in scored else next(iter(scored))
    probs, labels = report.predictions[split]
    served = compute_from_arrays(probs, labels, meta.label_names, meta.malignant)
    n = meta.num_classes
    cm = np.bincount(labels * n + probs.argmax(axis=1), minlength=n * n).reshape(n, n)
    run_dir = _run_folder(artifact)
    if run_metrics is None and run_dir is not None:
        run_metrics = RunDir(run_dir).read_summary()
    perf = performance_section((run_metrics or {}).get(split), served, per_class_table(cm, meta.label_names), split)
    headline, own = perf["bma"], perf["served"]["bma"]
    if headline is not None and own is not None and abs(headline - own) > 0.01:
        log.warning("the run scored %s BMA %.4f, this export %.4f on the same split: check that --data is the "
                    "dataset the run was trained on", split, headline, own)
    files = {WEIGHTS_NAME: artifact / WEIGHTS_NAME, **{p.name: p for p in paths.values()}}
    card = build_card(meta=meta, dataset=dataset, performance=perf, calibration=report.calibration,
                      latency_ms=report.latency_ms, files=files, run_dir=run_dir,
                      split_sizes={name: len(s.labels) for name, s in scored.items()},
                      params=count_params(artifact))
    json_path, _ = write_card(out_dir, card)
    if out_dir.resolve() != artifact.resolve():  # the Serve app reads the card from the artifact folder
        write_card(artifact, card)
    log.info("model card: %s", json_path)
    return json_path
