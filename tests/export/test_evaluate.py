"""raykd evaluate: a saved model scored on any dataset, classes matched by name, the same numbers as
the metrics module on the serving predictor's outputs, written as JSON, Markdown and PNGs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import balanced_accuracy_score, f1_score, roc_auc_score

from raykd.__main__ import main as raykd_main
from raykd.artifact.format import ArtifactMeta, load_artifact
from raykd.artifact.predict import TorchPredictor
from raykd.data.manifest import Manifest
from raykd.data.schema import SCHEMA
from raykd.data.transforms import decode_image
from raykd.evaluate import main as evaluate_main
from raykd.export.calibrate import ece
from raykd.export.evaluate import (
    ClassMismatchError,
    _auroc_macro,
    _bma,
    binary_view,
    bootstrap_intervals,
    default_out_dir,
    run_evaluate,
)
from raykd.export.onnx import export_onnx
from raykd.export.run import load_split_images
from raykd.metrics.classification import compute_from_arrays, per_class_table
from tests.export.helpers import LABELS, MALIGNANT, make_dataset, make_run
from tests.test_cli import option_entries

RESAMPLES = 200


def relabel(src: Path, dst: Path, label_names: list[str], *, rename: dict[str, str] | None = None,
            drop: tuple[str, ...] = ()) -> Path:
    """A copy of the dataset ``src`` whose manifest lists ``label_names`` (in that order), with
    classes renamed by ``rename`` and the rows of the classes in ``drop`` left out."""
    rename = rename or {}
    rows = []
    for row in pq.read_table(src / "shards" / "part-00000.parquet").to_pylist():
        name = rename.get(row["label_name"], row["label_name"])
        if name not in drop:
            rows.append({**row, "label_name": name, "label": label_names.index(name)})
    (dst / "shards").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), dst / "shards" / "part-00000.parquet")
    counts = {s: {n: sum(r["split"] == s and r["label_name"] == n for r in rows) for n in label_names}
              for s in ("train", "val", "test")}
    malignant = [m for m in MALIGNANT if m in label_names]
    Manifest(source="external", label_names=list(label_names), malignant=malignant, split_seed=0,
             split_fractions={"train": 0.7, "val": 0.15, "test": 0.15}, class_counts=counts,
             shards=["part-00000.parquet"]).save(dst)
    return dst


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds") / "lesions"
    return make_dataset(root, per_class=3, test_per_class=6, manifest=True)


@pytest.fixture(scope="module")
def run(tmp_path_factory, data) -> Path:
    return make_run(tmp_path_factory.mktemp("runs") / "cnn", data, summary=False)


@pytest.fixture(scope="module")
def evaluation(run, data):
    return run_evaluate(run, data, resamples=RESAMPLES, device="cpu")


@pytest.fixture(scope="module")
def served(run, data) -> tuple[np.ndarray, np.ndarray]:
    """The test split's probabilities straight from the serving predictor, and its labels."""
    model, meta = load_artifact(run)
    blobs, labels = load_split_images(data, "test")
    return TorchPredictor(model, meta, device="cpu").predict([decode_image(b) for b in blobs]), labels


def test_the_json_holds_the_metrics_the_metrics_module_computes_on_the_predictors_outputs(evaluation, served):
    probs, labels = served
    saved = json.loads(Path(evaluation.files["json"]).read_text())
    expected = compute_from_arrays(probs, labels, LABELS, MALIGNANT)
    assert list(saved["metrics"])[:4] == ["bma", "accuracy", "f1_macro", "auroc_macro"]
    for key, value in expected.items():
        assert saved["metrics"][key] == pytest.approx(value, abs=1e-6), key
    assert saved["metrics"]["bma"] == pytest.approx(balanced_accuracy_score(labels, probs.argmax(1)))
    assert saved["metrics"]["f1_macro"] == pytest.approx(f1_score(labels, probs.argmax(1), average="macro"))
    assert saved["metrics"]["ece"] == pytest.approx(ece(probs, labels))
    cm = np.asarray(saved["confusion_matrix"])
    assert cm.sum() == len(labels) == saved["dataset"]["num_images"] == 24
    assert saved["per_class"] == per_class_table(cm, LABELS)
    b = saved["binary"]
    assert b["sensitivity"] == pytest.approx(expected["binary/recall"])
    assert b["ppv"] == pytest.approx(expected["binary/precision"])
    assert b["positives"] == 12 and b["tp"] + b["fp"] + b["tn"] + b["fn"] == 24


def test_the_intervals_contain_the_estimates_and_repeat_with_their_seed(evaluation, served):
    iv = evaluation.intervals
    assert iv["resamples"] == RESAMPLES and iv["level"] == 0.95 and "bootstrap" in iv["method"]
    for name in ("bma", "auroc_macro"):
        assert iv[name]["low"] <= evaluation.metrics[name] <= iv[name]["high"], name
        assert iv[name]["high"] - iv[name]["low"] > 0
    probs, labels = served
    again = bootstrap_intervals(probs, labels, resamples=RESAMPLES, seed=0)
    assert again["bma"] == iv["bma"] and again["auroc_macro"] == iv["auroc_macro"]
    assert bootstrap_intervals(probs, labels, resamples=RESAMPLES, seed=1)["bma"] != again["bma"]


def test_the_bootstrap_scores_each_draw_as_the_metrics_module_does():
    rng = np.random.default_rng(3)
    probs = rng.dirichlet(np.ones(4), size=40).astype(np.float32)
    probs[:10] = probs[0]  # ties
    labels = rng.integers(0, 3, 40)  # class 3 absent: left out of both means
    expected = compute_from_arrays(probs, labels, LABELS)
    assert _bma(probs.argmax(1), labels, 4) == pytest.approx(expected["bma"])
    assert _auroc_macro(probs.astype(np.float64), labels) == pytest.approx(expected["auroc_macro"])
    present = [0, 1, 2]
    ovr = np.mean([roc_auc_score(labels == k, probs[:, k]) for k in present])
    assert _auroc_macro(probs.astype(np.float64), labels) == pytest.approx(ovr)


def test_the_cancer_view_counts_the_argmax_rule_and_the_models_threshold():
    meta = ArtifactMeta(model_name="m", num_classes=4, model_kwargs={}, label_names=LABELS,
                        malignant=MALIGNANT, preprocess={}, decision={"threshold": 0.5})
    #                  MEL   NV    BCC   BKL      argmax  P(malignant)  truth
    probs = np.array([[0.6, 0.4, 0.0, 0.0],   # MEL     0.6           MEL: caught by both rules
                      [0.3, 0.4, 0.3, 0.0],   # NV      0.6           BCC: missed by argmax, caught at 0.5
                      [0.1, 0.8, 0.0, 0.1],   # NV      0.1           NV: benign, cleared by both
                      [0.0, 0.3, 0.4, 0.3]])  # BCC     0.4           BKL: flagged by argmax only
    b = binary_view(probs, np.array([0, 2, 1, 3]), meta)
    assert (b["tp"], b["fn"], b["tn"], b["fp"]) == (1, 1, 1, 1)
    assert b["sensitivity"] == b["specificity"] == b["ppv"] == b["npv"] == 0.5
    assert b["decision"] == {"threshold": 0.5, "sensitivity": 1.0, "specificity": 1.0}


def test_the_report_and_the_plots_are_written(evaluation, run):
    out = run / "evaluate-lesions-test"
    assert Path(evaluation.files["json"]).parent == out
    for name in ("evaluation.json", "evaluation.md", "confusion_matrix.png", "roc_curves.png"):
        assert (out / name).is_file(), name
    for png in ("confusion_matrix.png", "roc_curves.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    md = (out / "evaluation.md").read_text()
    assert "| BMA |" in md and "percentile bootstrap, 200 resamples" in md and "| MEL |" in md


def test_a_dataset_listing_the_classes_in_another_order_scores_the_same(evaluation, data, run, tmp_path):
    other = relabel(data, tmp_path / "reordered", list(reversed(LABELS)))
    ev = run_evaluate(run, other, out=tmp_path / "out", resamples=RESAMPLES, device="cpu")
    assert ev.classes["reordered"] and ev.classes["label_map"] == {"BKL": 3, "BCC": 2, "NV": 1, "MEL": 0}
    assert ev.metrics["bma"] == evaluation.metrics["bma"]
    assert ev.metrics["auroc_macro"] == pytest.approx(evaluation.metrics["auroc_macro"])
    assert ev.per_class == evaluation.per_class and ev.confusion_matrix == evaluation.confusion_matrix
    assert ev.intervals["bma"] == evaluation.intervals["bma"]


def test_a_dataset_class_the_model_does_not_have_is_an_error_naming_it(data, run, tmp_path, capsys):
    other = relabel(data, tmp_path / "scc", ["MEL", "NV", "BCC", "SCC"], rename={"BKL": "SCC"})
    with pytest.raises(ClassMismatchError, match=r"SCC \(6 images\).*its classes are MEL, NV, BCC, BKL"):
        run_evaluate(run, other, resamples=0, device="cpu")
    assert evaluate_main(["--model", str(run), "--data", str(other), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "SCC" in err and "Traceback" not in err


def test_a_model_class_missing_from_the_data_is_reported_and_left_out_of_bma(data, run, served, tmp_path):
    other = relabel(data, tmp_path / "three", ["NV", "MEL", "BCC"], drop=("BKL",))
    ev = run_evaluate(run, other, out=tmp_path / "out", resamples=RESAMPLES, device="cpu")
    assert ev.classes["absent"] == ["BKL"] and ev.classes["not_in_dataset"] == ["BKL"]
    probs, labels = served
    keep = labels != LABELS.index("BKL")
    assert ev.dataset["num_images"] == int(keep.sum()) == 18
    assert ev.metrics["bma"] == pytest.approx(balanced_accuracy_score(labels[keep], probs[keep].argmax(1)))
    recalls = {r["label"]: r["recall"] for r in ev.per_class if r["support"]}
    assert set(recalls) == {"MEL", "NV", "BCC"}
    assert ev.metrics["bma"] == pytest.approx(np.mean(list(recalls.values())))
    assert "BKL" in ev.summary() and "left out of BMA" in ev.summary()


def test_onnx_and_torch_give_the_same_numbers(evaluation, run, data):
    model, meta = load_artifact(run)
    path = export_onnx(model, meta, run / "onnx" / "model.onnx")
    ev = run_evaluate(path, data, resamples=RESAMPLES, device="cpu")
    assert ev.model["backend"] == "onnx"
    assert Path(ev.files["json"]).parent == run / "onnx" / "evaluate-lesions-test-model"
    assert ev.confusion_matrix == evaluation.confusion_matrix
    for key in ("bma", "accuracy", "f1_macro", "auroc_macro", "binary/auroc", "ece", "brier"):
        assert ev.metrics[key] == pytest.approx(evaluation.metrics[key], abs=1e-5), key
    assert ev.intervals["bma"] == evaluation.intervals["bma"]


def test_the_raykd_command_evaluates_every_split_and_prints_a_summary(run, data, tmp_path, capsys):
    out = tmp_path / "all"
    assert raykd_main(["evaluate", "--model", str(run / "best"), "--data", str(data), "--split", "all",
                       "--out", str(out), "--bootstrap", "50", "--device", "cpu"]) == 0
    printed = capsys.readouterr().out
    assert "on lesions, split all (40 images)" in printed and "BMA" in printed and "95 % CI" in printed
    assert "cancer vs benign (MEL, BCC; argmax rule): sensitivity" in printed
    assert "the model was trained on these images" in printed
    assert f"to {out}" in printed
    saved = json.loads((out / "evaluation.json").read_text())
    assert saved["dataset"]["splits"] == ["train", "val", "test"] and saved["intervals"]["resamples"] == 50
    assert (out / "roc_curves.png").is_file() and (out / "confusion_matrix.png").is_file()


def test_the_default_output_folder_is_named_after_model_dataset_and_split(tmp_path):
    (tmp_path / "m.onnx").write_bytes(b"")
    assert default_out_dir(tmp_path, "s3://bucket/ham/", "val") == tmp_path / "evaluate-ham-val"
    assert default_out_dir(tmp_path / "m.onnx", tmp_path / "pad", "test") == tmp_path / "evaluate-pad-test-m"


@pytest.mark.parametrize("case, message", [
    ("missing model", "no such file or folder"),
    ("folder without best", "best/model.safetensors"),
    ("not a dataset", "is not a raykd dataset folder"),
    ("empty split", "no images in split 'test'"),
    ("onnx without a contract", "carries no raykd preprocessing contract"),
    ("not an onnx file", "ONNX Runtime cannot load it"),
])
def test_bad_input_exits_2_with_a_clear_message(case, message, run, data, tmp_path, capsys):
    model, dataset = str(run), str(data)
    if case == "missing model":
        model = str(tmp_path / "nowhere")
    elif case == "folder without best":
        model = str(tmp_path)
    elif case == "not a dataset":
        dataset = str(tmp_path)
    elif case == "empty split":
        dataset = str(make_dataset(tmp_path / "no-test", manifest=True))
    elif case == "onnx without a contract":
        model = str(tmp_path / "plain.onnx")
        x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["n", 4])
        y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["n", 4])
        graph = onnx.helper.make_graph([onnx.helper.make_node("Identity", ["x"], ["y"])], "plain", [x], [y])
        onnx.save(onnx.helper.make_model(graph), model)
    else:
        model = str(tmp_path / "broken.onnx")
        Path(model).write_bytes(b"not a protobuf")
    assert evaluate_main(["--model", model, "--data", dataset, "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err, err


def test_an_unknown_split_is_refused_before_anything_loads(run, data, capsys):
    with pytest.raises(ValueError, match="unknown split 'holdout'"):
        run_evaluate(run, data, split="holdout")
    with pytest.raises(SystemExit) as exit_info:
        evaluate_main(["--model", str(run), "--data", str(data), "--split", "holdout"])
    assert exit_info.value.code == 2 and "invalid choice: 'holdout'" in capsys.readouterr().err


def test_the_help_names_every_option_with_its_default(capsys):
    with pytest.raises(SystemExit) as exit_info:
        raykd_main(["evaluate", "--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    assert text.startswith("usage: raykd evaluate ")
    for invocation, help_text in option_entries(text)[1:]:
        assert "default" in help_text or "required" in help_text, invocation


def test_classes_match_across_the_datasets_codes_for_the_same_diagnosis():
    from raykd.export.evaluate import match_classes

    model = ["MEL", "NV", "BCC", "AK", "BKL", "DF", "VASC", "SCC"]  # ISIC 2019
    ham = ["akiec", "bcc", "bkl", "df", "mel", "nv", "vasc"]  # HAM10000's codes
    m = match_classes(model, ham, dict.fromkeys(ham, 3))
    assert m.label_map == [3, 2, 4, 5, 0, 1, 6]  # akiec is AK, and case does not matter
    assert m.not_in_dataset == ["SCC"]
    pad = ["ACK", "BCC", "MEL", "NEV", "SCC", "SEK"]  # PAD-UFES-20's codes
    assert match_classes(model, pad, dict.fromkeys(pad, 1)).label_map == [3, 2, 0, 1, 7, 4]
