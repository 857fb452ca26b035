"""The export calibrates the model, puts temperature and decision into meta.json and the ONNX file,
and writes a model card with every documented field beside the model."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest

from raykd.artifact.format import read_meta
from raykd.artifact.predict import OnnxPredictor, TorchPredictor
from raykd.data.transforms import decode_image
from raykd.export.__main__ import parse_args
from raykd.export.calibrate import softmax_t
from raykd.export.card import CARD_JSON, CARD_KEYS, CARD_MD
from raykd.export.onnx import read_onnx_meta
from raykd.export.options import ExportConfig
from raykd.export.run import load_split_images, run_export
from tests.export.helpers import RUN_CONFIG, make_dataset, make_run

#: The nested keys the module docstring of raykd.export.card documents.
NESTED = {
    "model": {"name", "version", "num_classes", "params"},
    "data": {"dataset", "name", "source", "source_dir", "manifest_version", "synthetic", "split_seed",
             "split_sizes"},
    "classes": {"labels", "malignant"},
    "performance": {"split", "source", "bma", "auroc_macro", "binary_auroc", "accuracy", "num_samples", "served",
                    "per_class"},
    "calibration": {"temperature", "fitted", "bins", "val", "test"},
    "latency_ms": {"torch", "onnx"},
    "training": {"run_dir", "method", "teacher", "hyperparameters", "searched"},
}
SCORES = {"num_images", "ece_before", "ece_after", "brier_before", "brier_after", "nll_before", "nll_after"}


@pytest.fixture(scope="module")
def dataset_with_test(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("ds_test"), per_class=6, test_per_class=4, manifest=True)


@pytest.fixture(scope="module")
def exported(tmp_path_factory, dataset_with_test):
    run = make_run(tmp_path_factory.mktemp("card") / "run", dataset_with_test)
    return run, run_export(ExportConfig(max_images=8, latency_reps=2), run)


def _card(run) -> dict:
    return json.loads((run / "best" / CARD_JSON).read_text())


def test_the_card_json_has_every_documented_field_and_a_markdown_twin(exported):
    run, report = exported
    card = _card(run)
    assert tuple(card) == CARD_KEYS and report.card == str(run / "best" / CARD_JSON)
    for block, keys in NESTED.items():
        assert set(card[block]) == keys, block
    assert set(card["calibration"]["val"]) == SCORES and set(card["calibration"]["test"]) == SCORES
    assert set(card["size_bytes"]) == {"model.safetensors", "model.onnx"}
    assert all(size > 0 for size in card["size_bytes"].values())
    assert card["latency_ms"]["torch"] > 0 and card["latency_ms"]["onnx"] > 0
    assert [r["label"] for r in card["performance"]["per_class"]] == card["classes"]["labels"]
    assert card["data"]["split_sizes"] == {"train": 4, "val": 24, "test": 16}
    md = (run / "best" / CARD_MD).read_text()
    assert md.startswith("# Model card: raykd_test_tiny_cnn (run)") and "## Calibration" in md


def test_the_card_states_research_use_and_the_synthetic_data(exported):
    card = _card(exported[0])
    assert card["data"]["synthetic"] is True and card["data"]["source"] == "synthetic"
    assert "Not a medical device" in card["intended_use"]
    assert any("synthetic images" in line for line in card["limitations"])


def test_the_card_names_method_teacher_and_hyperparameters_from_the_run_config(exported):
    training = _card(exported[0])["training"]
    assert training["method"] == "kd"
    assert training["teacher"]["checkpoint"] == RUN_CONFIG["teacher"]["checkpoint"]
    assert training["hyperparameters"]["distill"] == RUN_CONFIG["distill"]["params"]
    assert training["hyperparameters"]["optim"]["lr"] == RUN_CONFIG["optim"]["lr"]


def test_the_card_headline_is_the_run_summary_on_the_test_split(exported):
    run, _ = exported
    perf = _card(run)["performance"]
    summary = json.loads((run / "summary.json").read_text())["test"]
    assert perf["split"] == "test" and perf["source"] == "run summary"
    assert perf["bma"] == pytest.approx(summary["bma"]) and perf["auroc_macro"] == pytest.approx(summary["auroc_macro"])
    assert perf["served"]["bma"] == pytest.approx(summary["bma"])  # a temperature never moves the argmax


def test_meta_and_onnx_carry_the_fitted_temperature_and_the_decision(exported):
    run, report = exported
    meta, onnx_meta = read_meta(run), read_onnx_meta(run / "best" / "model.onnx")
    t = report.calibration["temperature"]
    assert meta.temperature == onnx_meta.temperature == t != 1.0
    assert meta.decision == onnx_meta.decision == report.decision
    assert report.decision["target_sensitivity"] == 0.95 and 0.0 <= report.decision["threshold"] <= 1.0


def test_served_probabilities_are_the_softmax_of_the_logits_over_the_temperature(exported, dataset_with_test):
    run, report = exported
    blobs, _ = load_split_images(dataset_with_test, "test", limit=6)
    images = [decode_image(b) for b in blobs]
    logits = TorchPredictor.from_artifact(run, device="cpu").logits(images)
    served = OnnxPredictor(run / "best" / "model.onnx").predict(images)
    np.testing.assert_allclose(served, softmax_t(logits, report.calibration["temperature"]), atol=1e-5)
    assert np.abs(served - softmax_t(logits, 1.0)).max() > 1e-3  # the temperature is really applied


def test_the_threshold_reaches_the_target_sensitivity_on_validation_and_is_reported_on_test(exported):
    run, report = exported
    d = report.decision
    assert d["val_sensitivity"] >= 0.95 and d["val_images"] == 24
    assert {"test_sensitivity", "test_specificity", "test_images"} <= set(d)
    saved = json.loads((run / "best" / "export_report.json").read_text())
    assert set(saved["calibration"]["test"]) == SCORES and "predictions" not in saved
    assert saved["card"] == report.card and (run / "best" / "reliability.png").stat().st_size > 5000


def test_no_calibrate_keeps_the_meta_as_it_was(tmp_path, dataset_with_test):
    run = make_run(tmp_path / "plain", dataset_with_test, summary=False)
    before = (run / "best" / "meta.json").read_text()
    report = run_export(ExportConfig(calibrate=False, max_images=4, latency_reps=1), run)
    assert (run / "best" / "meta.json").read_text() == before
    assert report.calibration is None and report.decision == {} and read_onnx_meta(report.variants[0].path).temperature == 1.0
    card = _card(run)
    assert card["calibration"]["fitted"] is False and card["operating_point"] is None
    assert card["performance"]["source"] == "export"  # no summary.json: the export's own scores


def test_a_model_without_malignant_classes_gets_no_decision(tmp_path, dataset_with_test, caplog):
    run = make_run(tmp_path / "benign", dataset_with_test, summary=False, malignant=())
    with caplog.at_level(logging.INFO, logger="raykd.export.run"):
        report = run_export(ExportConfig(max_images=4, latency_reps=1), run)
    assert report.decision == {} and read_meta(run).decision == {}
    assert report.calibration["temperature"] == read_meta(run).temperature
    assert "no malignant class" in caplog.text
    assert _card(run)["operating_point"] is None


def test_the_cli_takes_the_calibration_options():
    args = parse_args(["--model", "r", "--no-calibrate", "--target-sensitivity", "0.9"])
    assert args.calibrate is False and args.target_sensitivity == 0.9
    assert parse_args(["--model", "r"]).calibrate is True


def test_a_target_sensitivity_outside_zero_one_is_refused(tmp_path, dataset_with_test):
    run = make_run(tmp_path / "r", dataset_with_test, summary=False)
    with pytest.raises(ValueError, match="target-sensitivity"):
        run_export(ExportConfig(target_sensitivity=1.5), run)
