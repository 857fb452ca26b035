"""Ray-free predictors: same preprocessing as training, same answers from torch and ONNX Runtime."""

from __future__ import annotations

from unittest import mock

import numpy as np
import pytest
import torch

from raykd.artifact.format import load_artifact
from raykd.data.dataset import PipelineSpec, decode_and_transform
from raykd.data.transforms import PreprocessSpec, decode_image, normalize_chw
from raykd.export.onnx import export_onnx
from raykd.serve.backend import (
    FallbackPredictor,
    OnnxPredictor,
    TorchPredictor,
    load_predictor,
    plan_backend,
    preprocess_images,
    select_device,
)
from raykd.serve.family import FamilyEntry
from tests.export.helpers import encoded_image, make_artifact


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    root = tmp_path_factory.mktemp("vit")
    path = make_artifact(root / "best", "test_vit", {"img_size": 64}, image_size=64)
    model, meta = load_artifact(path)
    return path, export_onnx(model, meta, path / "model.onnx")


@pytest.fixture(scope="module")
def images():
    return [decode_image(encoded_image(i, ".jpg" if i % 2 else ".png", (70 + 10 * i, 50))) for i in range(5)]


def test_serving_preprocessing_is_the_training_evaluation_pipeline(vit):
    """The predictor's batch equals what the model sees in training: Ray Data's eval map function
    (uint8) normalised on the device."""
    predictor = TorchPredictor.from_artifact(vit[0], device="cpu")
    blobs = [encoded_image(i, ".jpg") for i in range(3)]
    spec = PreprocessSpec.from_dict(predictor.meta.preprocess)
    trained = decode_and_transform(
        {"image_id": np.array(["a", "b", "c"]), "image": np.array(blobs, dtype=object), "label": np.zeros(3)},
        PipelineSpec(preprocess=spec, train=False),
    )["image"]
    assert trained.dtype == np.uint8
    trained = normalize_chw(torch.from_numpy(trained), spec).numpy()
    served = preprocess_images([decode_image(b) for b in blobs], predictor.transform)
    np.testing.assert_allclose(served, trained, atol=1e-5)  # albumentations vs torch float rounding


def test_torch_and_onnx_predictors_give_the_same_probabilities(vit, images):
    torch_probs = TorchPredictor.from_artifact(vit[0], device="cpu").predict(images)
    onnx_probs = OnnxPredictor(vit[1]).predict(images)
    assert torch_probs.shape == (5, 4)
    np.testing.assert_allclose(torch_probs.sum(1), 1.0, atol=1e-6)
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-5)


def test_device_choice_follows_cuda_availability():
    entry = FamilyEntry("m", artifact="a", onnx="m.onnx")
    with mock.patch("torch.cuda.is_available", return_value=True):
        assert select_device("auto") == "cuda"
        assert select_device("cpu") == "cpu"
        assert plan_backend(entry) == ("torch", "cuda")
        assert plan_backend(entry, backend="onnx") == ("onnx", "cpu")
        assert plan_backend(FamilyEntry("m", onnx="m.onnx")) == ("onnx", "cpu")  # no torch weights
    with mock.patch("torch.cuda.is_available", return_value=False):
        assert select_device("auto") == "cpu"
        assert plan_backend(entry) == ("onnx", "cpu")
        assert plan_backend(entry, backend="torch") == ("torch", "cpu")
        with pytest.raises(RuntimeError, match="cuda"):
            select_device("cuda")


def test_a_gpu_that_cannot_take_the_model_leaves_the_onnx_path_serving(vit, images):
    """With CUDA reported but unusable (this torch has no CUDA), loading on 'cuda' really fails."""
    path, onnx = vit
    entry = FamilyEntry("vit", artifact=str(path), onnx=str(onnx))
    with mock.patch("torch.cuda.is_available", return_value=True):
        predictor = load_predictor(entry)
    assert isinstance(predictor, OnnxPredictor)
    expected = TorchPredictor.from_artifact(path, device="cpu").predict(images)
    np.testing.assert_allclose(predictor.predict(images), expected, atol=1e-5)


def test_torch_failing_at_predict_time_is_answered_by_onnx(vit, images, tmp_path):
    path, _ = vit
    entry = FamilyEntry("vit", artifact=str(path))  # no ONNX file: the fallback exports one
    predictor = load_predictor(entry, backend="torch", device="cpu", cache_dir=tmp_path)
    assert isinstance(predictor, FallbackPredictor) and predictor.backend == "torch"
    expected = predictor.predict(images)
    assert predictor.fallbacks == 0

    def cuda_fault(module, args):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    predictor.primary.model.register_forward_pre_hook(cuda_fault)
    with pytest.raises(RuntimeError):
        predictor.primary.predict(images)
    np.testing.assert_allclose(predictor.predict(images), expected, atol=1e-5)
    assert predictor.fallbacks == 1 and (tmp_path / "vit.onnx").is_file()


def test_cpu_replica_without_onnx_file_exports_one_and_serves_it(tmp_path, images):
    path = make_artifact(tmp_path / "cnn", "raykd_test_tiny_cnn", {}, image_size=32)
    with mock.patch("torch.cuda.is_available", return_value=False):
        predictor = load_predictor(FamilyEntry("cnn", artifact=str(path)), cache_dir=tmp_path / "cache")
    assert isinstance(predictor, OnnxPredictor) and predictor.params == 1308
    model, meta = load_artifact(path)
    torch.manual_seed(0)
    expected = TorchPredictor(model, meta).predict(images)
    np.testing.assert_allclose(predictor.predict(images), expected, atol=1e-5)


def test_predict_refuses_an_empty_batch(vit):
    with pytest.raises(ValueError, match="at least one image"):
        OnnxPredictor(vit[1]).predict([])
