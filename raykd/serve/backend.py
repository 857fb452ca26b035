"""Which backend serves a model, and its GPU -> CPU fallback; test-time augmentation.

The predictors themselves (torch and ONNX Runtime, Ray-free, sharing one preprocessing) are
:mod:`raykd.artifact.predict`'s.

Backend choice (:func:`load_predictor`): on a machine with a CUDA device the torch model runs on
the GPU and an ONNX Runtime CPU predictor is kept as fallback (built lazily, exporting the artifact
when no ONNX file was given); without a GPU the ONNX Runtime CPU path serves directly, which on CPU
is the faster one (``bench/inference.py``).

Test-time augmentation (:func:`predict_tta`) wraps any predictor: ``"flip"`` averages the
probabilities of each image and its horizontal and vertical mirror images (three forward passes'
worth of work in one batch). A lesion has no preferred orientation (training augments with
flips and 90-degree rotations), so the mirrors are equally valid views.
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from raykd.artifact.format import count_params, load_artifact
from raykd.artifact.predict import (  # noqa: F401 - part of this module's API
    OnnxPredictor,
    Predictor,
    TorchPredictor,
    eval_transform,
    preprocess_images,
    select_device,
    softmax,
)
from raykd.export.onnx import export_onnx
from raykd.serve.family import FamilyEntry

log = logging.getLogger(__name__)

__all__ = [
    "Predictor",
    "TorchPredictor",
    "OnnxPredictor",
    "FallbackPredictor",
    "eval_transform",
    "preprocess_images",
    "softmax",
    "select_device",
    "load_predictor",
    "measure_latency_ms",
    "plan_backend",
    "predict_tta",
    "torch_model",
    "TTA_MODES",
]

BACKENDS = ("auto", "torch", "onnx")
#: Test-time augmentations :func:`predict_tta` knows: ``"none"`` and ``"flip"``.
TTA_MODES = ("none", "flip")


class FallbackPredictor:
    """Runs ``primary``; when it raises, answers with ``fallback`` (built on first need).

    This is the "torch on GPU fails -> ONNX Runtime on CPU" path: a CUDA error or out-of-memory on
    one batch must not fail the requests, and the fallback gives the same probabilities (checked
    by the export parity test). The primary is retried on later batches; ``fallbacks`` counts the
    batches it did not answer.
    """

    def __init__(self, primary: Predictor, fallback: Callable[[], Predictor]) -> None:
        self.primary = primary
        self._make_fallback = fallback
        self._fallback: Predictor | None = None
        self._lock = threading.Lock()
        self.fallbacks = 0
        self.meta = primary.meta
        self.params = getattr(primary, "params", 0)

    @property
    def backend(self) -> str:
        return self.primary.backend

    def fallback(self) -> Predictor:
        with self._lock:
            if self._fallback is None:
                self._fallback = self._make_fallback()
            return self._fallback

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        try:
            return self.primary.predict(images)
        except Exception as exc:  # noqa: BLE001 - any backend fault is served by the fallback
            self.fallbacks += 1
            log.warning("%s predictor failed (%s: %s); answering with the ONNX Runtime fallback",
                        self.primary.backend, type(exc).__name__, exc)
            return self.fallback().predict(images)


def _onnx_for(entry: FamilyEntry, cache_dir: str | os.PathLike | None) -> OnnxPredictor:
    """The entry's ONNX predictor, exporting its artifact when it has no ONNX file.

    The export goes to ``cache_dir`` when given (kept), else to a temporary folder removed right
    after ONNX Runtime has read the file (a session keeps the whole model in memory).
    """
    if entry.onnx:
        return OnnxPredictor(entry.onnx)

    model, meta = load_artifact(entry.artifact)
    with tempfile.TemporaryDirectory(prefix="raykd-onnx-") as tmp:
        path = export_onnx(model, meta, Path(cache_dir or tmp) / f"{entry.name}.onnx")
        log.info("model %s had no ONNX file; exported it for the CPU path%s", entry.name,
                 f" to {path}" if cache_dir else "")
        return OnnxPredictor(path)


def plan_backend(entry: FamilyEntry, backend: str = "auto", device: str = "auto") -> tuple[str, str]:
    """Which backend and torch device serve ``entry``: ``("torch", "cuda")``, ``("onnx", "cpu")``...

    ``"auto"`` picks torch on the GPU when there is one and the entry has a torch artifact,
    otherwise ONNX Runtime on CPU (faster than torch on CPU, ``bench/inference.py``).
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend {backend!r}: use one of {BACKENDS}")
    if backend == "onnx":
        return "onnx", "cpu"
    if backend == "torch":
        if not entry.artifact:
            raise ValueError(f"model {entry.name!r} has no torch artifact; serve it with backend 'onnx'")
        return "torch", select_device(device)
    if entry.artifact and select_device(device) == "cuda":
        return "torch", "cuda"
    return "onnx", "cpu"


def load_predictor(
    entry: FamilyEntry,
    *,
    backend: str = "auto",
    device: str = "auto",
    cache_dir: str | os.PathLike | None = None,
) -> Predictor:
    """Build the predictor serving ``entry`` (see :func:`plan_backend`).

    Torch predictors come wrapped in a :class:`FallbackPredictor` whose fallback is ONNX Runtime on
    CPU; a torch model that cannot even be loaded on its device is replaced by the ONNX path at
    once. An entry without an ONNX file is exported into ``cache_dir`` when the ONNX path is
    needed; if that export fails on a CPU-only replica, torch on CPU serves instead.

    Args:
        entry: The family entry (artifact and/or ONNX file).
        backend: ``"auto"``, ``"torch"`` or ``"onnx"``.
        device: Torch device preference (``"auto"``, ``"cpu"``, ``"cuda"``).
        cache_dir: Where to export ONNX files for entries that only have an artifact.
    """
    kind, dev = plan_backend(entry, backend, device)
    if kind == "torch":
        try:
            primary = TorchPredictor.from_artifact(entry.artifact, device=dev)
        except Exception as exc:  # noqa: BLE001 - e.g. CUDA init failure or out of memory
            log.warning("torch could not load %s on %s (%s: %s); serving with ONNX Runtime on CPU",
                        entry.name, dev, type(exc).__name__, exc)
            return _onnx_for(entry, cache_dir)
        if not entry.params:
            entry.params = primary.params
        return FallbackPredictor(primary, lambda: _onnx_for(entry, cache_dir))
    try:
        predictor = _onnx_for(entry, cache_dir)
    except Exception as exc:
        if backend == "onnx" or not entry.artifact:
            raise
        log.warning("ONNX path unavailable for %s (%s); serving torch on CPU", entry.name, exc)
        return TorchPredictor.from_artifact(entry.artifact, device="cpu")
    if not entry.params and entry.artifact:
        entry.params = count_params(entry.artifact)
    return predictor


def measure_latency_ms(predictor: Predictor, *, repeats: int = 3) -> float:
    """Median single-image latency (preprocessing and resize included) on a mid-grey 256x256 image."""
    image = np.full((256, 256, 3), 128, dtype=np.uint8)  # resized to the model's size by the transform
    predictor.predict([image])  # warm-up (allocations, lazy kernels)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        predictor.predict([image])
        times.append((time.perf_counter() - t0) * 1e3)
    return float(np.median(times))


def _views(image: np.ndarray, tta: str) -> list[np.ndarray]:
    if tta == "flip":
        return [image, np.ascontiguousarray(image[:, ::-1]), np.ascontiguousarray(image[::-1])]
    return [image]


def predict_tta(predictor: Predictor, images: Sequence[np.ndarray], tta: str = "none") -> np.ndarray:
    """``predictor.predict`` averaged over test-time views of each image (any backend).

    Args:
        predictor: Any predictor (torch, ONNX Runtime, or the fallback pair).
        images: Decoded RGB uint8 HWC images.
        tta: ``"none"`` (one view) or ``"flip"`` (the image and its horizontal and vertical
            flips; the flips are taken before the evaluation crop and resize, which treat both
            orientations alike).

    Returns:
        ``(N, C)`` probabilities: the mean of the views' probabilities (probabilities, not logits,
        so each view's calibrated answer counts equally).
    """
    if tta not in TTA_MODES:
        raise ValueError(f"tta {tta!r}: use one of {TTA_MODES}")
    if tta == "none":
        return predictor.predict(images)
    views = [_views(img, tta) for img in images]
    per_image = len(views[0])
    probs = predictor.predict([v for group in views for v in group])
    return probs.reshape(len(images), per_image, -1).mean(axis=1).astype(np.float32)


def torch_model(predictor: Predictor):
    """The torch model behind ``predictor`` (a :class:`TorchPredictor` or the torch primary of a
    :class:`FallbackPredictor`), or None for ONNX Runtime: explanations need gradients."""
    if isinstance(predictor, FallbackPredictor):
        predictor = predictor.primary
    return getattr(predictor, "model", None) if isinstance(predictor, TorchPredictor) else None
