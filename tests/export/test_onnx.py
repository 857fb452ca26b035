"""ONNX export: dynamic batch, contract in the metadata, parity on real images, fp16 / int8 variants."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from timm.models import register_model
from torch import nn

from raykd.artifact.format import load_artifact
from raykd.data.transforms import decode_image
from raykd.export.__main__ import main as export_main
from raykd.export.onnx import export_onnx, read_onnx_meta
from raykd.export.options import ExportConfig
from raykd.export.run import ParityError, load_split_images, run_export
from raykd.serve.backend import OnnxPredictor, TorchPredictor
from tests.export.helpers import LABELS, make_artifact


class _TraceTrap(nn.Module):
    """Python control flow on the batch size: tracing (batch 2) bakes in the ``else`` branch."""

    pretrained_cfg = {"input_size": (3, 32, 32)}

    def __init__(self, num_classes: int = 4, **_):
        super().__init__()
        self.head = nn.Linear(3, num_classes)

    def forward(self, x):
        logits = self.head(x.mean((2, 3)))
        return logits * 3.0 if x.shape[0] > 2 else logits


@register_model
def onnx_trace_trap_for_tests(pretrained: bool = False, **kwargs) -> nn.Module:
    return _TraceTrap(**kwargs)


@pytest.fixture(scope="module")
def report(vit_run, dataset):
    return run_export(ExportConfig(fp16=True, int8=True), vit_run)


def test_export_matches_torch_on_real_validation_images(report, dataset):
    blobs, labels = load_split_images(dataset, "val")
    assert report.num_images == len(blobs) == 12 and sorted(set(labels.tolist())) == [0, 1, 2, 3]
    fp32 = report.variants[0]
    assert fp32.name == "onnx" and fp32.max_abs_diff <= report.tolerance
    assert fp32.bma_change == 0.0  # same argmax on every image when probabilities agree to 1e-4


def test_onnx_file_has_a_dynamic_batch_axis_and_serves_any_batch_size(report, vit_run):
    sess = ort.InferenceSession(report.variants[0].path, providers=["CPUExecutionProvider"])
    assert sess.get_inputs()[0].shape[0] == "batch"
    model, _ = load_artifact(vit_run)
    torch.manual_seed(0)
    for n in (1, 5):
        x = torch.randn(n, 3, 64, 64)
        with torch.no_grad():
            ref = model(x).numpy()
        np.testing.assert_allclose(sess.run(None, {"images": x.numpy()})[0], ref, atol=1e-4)


def test_onnx_file_carries_the_preprocessing_contract(report, vit_run):
    _, meta = load_artifact(vit_run)
    for variant in report.variants:
        assert read_onnx_meta(variant.path) == meta
    assert OnnxPredictor(report.variants[0].path).meta.preprocess["image_size"] == 64


def test_fp16_and_int8_variants_are_smaller_and_their_bma_change_is_reported(report, vit_run):
    sizes = {v.name: v.size_bytes for v in report.variants}
    # fp16 halves the weights (graph and metadata stay): between 40 % and 60 % of fp32.
    assert 0.4 < sizes["fp16"] / sizes["onnx"] < 0.6
    assert sizes["int8"] < 0.5 * sizes["onnx"]
    for v in report.variants:
        assert v.bma_change == pytest.approx(v.bma - report.torch_bma)
    fp16 = next(v for v in report.variants if v.name == "fp16")
    assert fp16.max_abs_diff < 1e-2  # half precision keeps probabilities to ~1e-3
    saved = json.loads((vit_run / "best" / "export_report.json").read_text())
    assert [v["name"] for v in saved["variants"]] == ["onnx", "fp16", "int8"]


def test_parity_is_checked_through_the_serving_predictors(vit_run, dataset):
    model, meta = load_artifact(vit_run)
    blobs, _ = load_split_images(dataset, "val", limit=4)
    images = [decode_image(b) for b in blobs]
    onnx_probs = OnnxPredictor(vit_run / "best" / "model.onnx").predict(images)
    torch_probs = TorchPredictor(model, meta, device="cpu").predict(images)
    np.testing.assert_allclose(onnx_probs, torch_probs, atol=1e-5)
    np.testing.assert_allclose(onnx_probs.sum(1), 1.0, atol=1e-6)


def test_an_export_that_disagrees_with_torch_fails(tmp_path, dataset):
    run = tmp_path / "trap"
    make_artifact(run / "best", "onnx_trace_trap_for_tests", {}, image_size=32, dataset=dataset)
    with pytest.raises(ParityError, match="disagrees with torch"):
        run_export(ExportConfig(batch_size=8), run)
    assert json.loads((run / "best" / "export_report.json").read_text())["variants"][0]["max_abs_diff"] > 1e-2


def test_export_without_validation_data_names_the_flag(tmp_path):
    make_artifact(tmp_path / "best", "raykd_test_tiny_cnn", {}, image_size=32)
    with pytest.raises(ValueError, match="--data"):
        run_export(ExportConfig(), tmp_path)


def test_export_to_an_explicit_path_without_a_run(tmp_path):
    path = make_artifact(tmp_path / "a", "raykd_test_tiny_cnn", {}, image_size=32)
    model, meta = load_artifact(path)
    out = export_onnx(model, meta, tmp_path / "x" / "tiny.onnx")
    assert read_onnx_meta(out).label_names == LABELS


def test_cli_exports_a_run_and_prints_the_table(tmp_path, dataset, capsys):
    run = tmp_path / "run"
    make_artifact(run / "best", "raykd_test_tiny_cnn", {}, image_size=32)
    assert export_main(["--model", str(run), "--data", str(dataset), "--int8", "--max-images", "6"]) == 0
    out = capsys.readouterr().out
    assert "int8" in out and "BMA change" in out
    assert (run / "best" / "model.int8.onnx").is_file()
    assert export_main(["--checkpoint", str(tmp_path / "nothing")]) == 2
