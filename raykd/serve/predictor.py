"""Ray-free predictors: decoded RGB uint8 images in, class probabilities out.

Both backends share :func:`preprocess_images`, which is the evaluation transform used during
training (``raykd.data.transforms``: black-border crop, resize, normalise, NCHW), and
:func:`softmax`, so torch and ONNX Runtime answer the same question and differ only by kernel
rounding. The export parity check compares exactly these two classes.

Backend choice (:func:`load_predictor`): on a machine with a CUDA device the torch model runs on
the GPU and an ONNX Runtime CPU predictor is kept as fallback (built lazily, exporting the artifact
when no ONNX file was given); without a GPU the ONNX Runtime CPU path serves directly, which on CPU
is the faster one (``bench/inference.py``).
"""

from __future__ import annotations

import logging
import os
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from raykd.export.artifact import ArtifactMeta, count_params, load_artifact
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
]

BACKENDS = ("auto", "torch", "onnx")


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 then float32 (stable for fp16 logits too)."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def eval_transform(preprocess: dict) -> Callable:
    """The training-time evaluation transform for a ``PreprocessSpec.to_dict()`` contract."""
    from raykd.data.transforms import PreprocessSpec, build_eval_transform

    return build_eval_transform(PreprocessSpec.from_dict(preprocess))


def preprocess_images(images: Sequence[np.ndarray], transform: Callable) -> np.ndarray:
    """Evaluation preprocessing of decoded RGB uint8 HWC images into a normalised NCHW batch.

    ``transform`` comes from :func:`eval_transform`; together with ``to_chw_batch`` this is the
    code that evaluates during training (``raykd.data.dataset``), not a copy of it.
    """
    from raykd.data.transforms import to_chw_batch

    if len(images) == 0:
        raise ValueError("predict() needs at least one image")
    return to_chw_batch([transform(image=img)["image"] for img in images])


def select_device(device: str = "auto") -> str:
    """``"cuda"`` when asked for (or ``"auto"``) and a CUDA device is present, else ``"cpu"``."""
    import torch

    if device not in ("auto", "cpu", "cuda"):
        raise ValueError(f"device {device!r}: use 'auto', 'cpu' or 'cuda'")
    if device == "cpu":
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if device == "cuda":
        raise RuntimeError("device 'cuda' requested but torch.cuda.is_available() is False")
    return "cpu"


class Predictor(Protocol):
    """What the Serve app needs from a model."""

    meta: ArtifactMeta
    backend: str

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``(N, C)`` float32 probabilities for N decoded RGB uint8 HWC images."""
        ...


class TorchPredictor:
    """A torch model on CPU or GPU.

    Args:
        model: The model (put in eval mode and moved to ``device``).
        meta: Its artifact metadata (preprocessing contract, labels).
        device: ``"auto"``, ``"cpu"`` or ``"cuda"``.
    """

    backend = "torch"

    def __init__(self, model, meta: ArtifactMeta, *, device: str = "auto") -> None:
        self.device = select_device(device)
        self.model = model.to(self.device).eval()
        self.meta = meta
        self.transform = eval_transform(meta.preprocess)
        self.params = sum(p.numel() for p in self.model.parameters())

    @classmethod
    def from_artifact(cls, path: str | os.PathLike, *, device: str = "auto") -> TorchPredictor:
        model, meta = load_artifact(path)
        return cls(model, meta, device=device)

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        """Probabilities for an already preprocessed NCHW float32 batch."""
        import torch

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return softmax(self.model(x).float().cpu().numpy())

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.predict_batch(preprocess_images(images, self.transform))


class OnnxPredictor:
    """An ONNX model on ONNX Runtime's CPU provider; the file carries its preprocessing contract.

    Args:
        path: ``.onnx`` file written by :func:`raykd.export.onnx.export_onnx` (or a variant).
        threads: Intra-op threads (default: ONNX Runtime's choice, all cores).
    """

    backend = "onnx"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        import onnxruntime as ort

        from raykd.export.onnx import meta_from_props

        self.path = Path(path)
        opts = ort.SessionOptions()
        if threads:
            opts.intra_op_num_threads = threads
        opts.log_severity_level = 3  # keep fp16 cast-insertion notes out of replica logs
        # Idle ONNX Runtime threads busy-wait by default; a replica shares its cores with the HTTP
        # proxy, request decoding and other replicas, so let them sleep.
        opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self.session = ort.InferenceSession(str(self.path), opts, providers=["CPUExecutionProvider"])
        props = self.session.get_modelmeta().custom_metadata_map
        self.meta = meta_from_props(props, source=str(self.path))
        self.transform = eval_transform(self.meta.preprocess)
        self.precision = props.get("precision", "fp32")
        self.input_name = self.session.get_inputs()[0].name
        self.params = int(props.get("params", 0))

    def predict_batch(self, batch: np.ndarray) -> np.ndarray:
        logits = self.session.run(None, {self.input_name: np.ascontiguousarray(batch, dtype=np.float32)})[0]
        return softmax(logits)

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.predict_batch(preprocess_images(images, self.transform))


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
    from raykd.export.onnx import export_onnx

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
