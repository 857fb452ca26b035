"""Ray-free predictors of a saved model: decoded RGB uint8 images in, class probabilities out.

Both backends share :func:`preprocess_images`, which is the evaluation transform used during
training (``raykd.data.transforms``: black-border crop, resize, normalise, NCHW), and
:func:`softmax`, so torch and ONNX Runtime answer the same question and differ only by kernel
rounding. The export parity check compares exactly these two classes; the Serve app wraps them
(:mod:`raykd.serve.backend`: backend choice and the GPU -> CPU fallback).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from raykd.artifact.format import ArtifactMeta, load_artifact
from raykd.artifact.onnx_meta import meta_from_props
from raykd.data.transforms import PreprocessSpec, build_eval_transform, to_chw_batch

__all__ = ["OnnxPredictor", "Predictor", "TorchPredictor", "eval_transform", "preprocess_images", "select_device",
           "softmax"]


def softmax64(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax computed and returned in float64 (stable for fp16 logits too)."""
    z = np.asarray(logits, dtype=np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise softmax in float64 then float32 (what the predictors answer)."""
    return softmax64(logits).astype(np.float32)


def eval_transform(preprocess: dict) -> Callable:
    """The training-time evaluation transform for a ``PreprocessSpec.to_dict()`` contract."""
    return build_eval_transform(PreprocessSpec.from_dict(preprocess))


def preprocess_images(images: Sequence[np.ndarray], transform: Callable) -> np.ndarray:
    """Evaluation preprocessing of decoded RGB uint8 HWC images into a normalised NCHW batch.

    ``transform`` comes from :func:`eval_transform`; together with ``to_chw_batch`` this is the
    code that evaluates during training (``raykd.data.dataset``), not a copy of it.
    """
    if len(images) == 0:
        raise ValueError("predict() needs at least one image")
    return to_chw_batch([transform(image=img)["image"] for img in images])


def select_device(device: str = "auto") -> str:
    """``"cuda"`` when asked for (or ``"auto"``) and a CUDA device is present, else ``"cpu"``."""
    import torch  # lazy: torch is heavy

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
        import torch  # lazy: torch is heavy

        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return softmax(self.model(x).float().cpu().numpy() / self.meta.temperature)

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.predict_batch(preprocess_images(images, self.transform))

    def logits(self, images: Sequence[np.ndarray]) -> np.ndarray:
        """``(N, C)`` float32 raw logits (before the temperature): what calibration is fitted on."""
        import torch  # lazy: torch is heavy

        batch = preprocess_images(images, self.transform)
        with torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(batch)).to(self.device)
            return self.model(x).float().cpu().numpy()


class OnnxPredictor:
    """An ONNX model on ONNX Runtime's CPU provider; the file carries its preprocessing contract.

    Args:
        path: ``.onnx`` file written by :func:`raykd.export.onnx.export_onnx` (or a variant).
        threads: Intra-op threads (default: ONNX Runtime's choice, all cores).
    """

    backend = "onnx"

    def __init__(self, path: str | os.PathLike, *, threads: int | None = None) -> None:
        import onnxruntime as ort  # lazy: onnxruntime is heavy

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
        return softmax(logits / self.meta.temperature)

    def predict(self, images: Sequence[np.ndarray]) -> np.ndarray:
        return self.predict_batch(preprocess_images(images, self.transform))
