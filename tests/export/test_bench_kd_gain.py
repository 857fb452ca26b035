"""bench/kd_gain.py's calibration column: test ECE of a run's best model before and after a
temperature fitted on validation (the bench itself is long and not run here)."""

from __future__ import annotations

import importlib.util
import sys
from argparse import Namespace
from pathlib import Path

import pytest

from raykd.artifact.predict import TorchPredictor
from raykd.data.transforms import decode_image
from raykd.export.calibrate import ece, fit_temperature, softmax_t
from raykd.export.run import load_split_images
from tests.export.helpers import make_dataset, make_run

BENCH = Path(__file__).resolve().parents[2] / "bench" / "kd_gain.py"


@pytest.fixture(scope="module")
def kd_gain():
    spec = importlib.util.spec_from_file_location("bench_kd_gain", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    try:
        spec.loader.exec_module(module)
        yield module
    finally:
        sys.modules.pop(spec.name, None)


def test_calibration_reports_test_ece_before_and_after_the_val_temperature(kd_gain, tmp_path):
    dataset = make_dataset(tmp_path / "data", per_class=4, test_per_class=3)
    run = make_run(tmp_path / "run", dataset, summary=False)
    meta_before = (run / "best" / "meta.json").read_text()
    out = kd_gain.calibration(run, dataset, batch_size=5)
    # the same numbers through the other path: whole-split predict() of the serving predictor
    predictor = TorchPredictor.from_artifact(run, device="cpu")
    val_blobs, val_labels = load_split_images(dataset, "val")
    test_blobs, test_labels = load_split_images(dataset, "test")
    t = fit_temperature(predictor.logits([decode_image(b) for b in val_blobs]), val_labels)
    test_logits = predictor.logits([decode_image(b) for b in test_blobs])
    assert out["temperature"] == pytest.approx(t, rel=1e-4)
    assert out["ece_before"] == pytest.approx(ece(predictor.predict([decode_image(b) for b in test_blobs]),
                                                  test_labels), abs=1e-6)
    assert out["ece_after"] == pytest.approx(ece(softmax_t(test_logits, t), test_labels), abs=1e-4)
    assert (run / "best" / "meta.json").read_text() == meta_before  # the bench never rewrites a model


def test_the_table_shows_intervals_paired_differences_retention_and_ece_per_arm(kd_gain):
    from scipy import stats

    runs = [kd_gain.Outcome("baseline", s, 0.5, 0.4 + 0.01 * s, 1.0, 0.2, 0.1, 1.5, 1e6) for s in range(3)]
    runs += [kd_gain.Outcome("kd", s, 0.6, 0.5 + 0.02 * s, 1.0, 0.3 + 0.03 * s, 0.05, 2.0, 1e6) for s in range(3)]
    args = Namespace(pair="cnn", data_label="test data", epochs=15, seeds=3)
    teacher = {"run": "teacher-x", "test": 0.8, "flops": 1e7}
    text = kd_gain.table(runs, args, kd_gain.PAIRS["cnn"], teacher)
    header, _, base_row, kd_row = text.splitlines()[2:6]
    assert header.endswith("| retention | FLOPs ratio | test ECE before -> after |")
    # baseline 0.40, 0.41, 0.42: mean 0.41, t(2) interval 0.41 +- 4.303 * 0.01 / sqrt(3)
    h = stats.t.ppf(0.975, 2) * 0.01 / 3 ** 0.5
    assert base_row.startswith(f"| baseline | 0.4100 [{0.41 - h:.4f}, {0.41 + h:.4f}] | - |")
    assert base_row.endswith("| 0.51 | 1/10.0 | 0.2000 -> 0.1000 |")  # 0.41 / 0.8
    # kd - baseline per seed: 0.10, 0.11, 0.12: +11.0 points, 3 wins of 3
    hd = 100 * stats.t.ppf(0.975, 2) * 0.01 / 3 ** 0.5
    assert f"| +11.0 [{11 - hd:+.1f}, {11 + hd:+.1f}] points | 3/3 |" in kd_row
    assert kd_row.endswith("| 0.65 | 1/10.0 | 0.3300 -> 0.0500 |")  # ECE: mean of 0.30, 0.33, 0.36


def test_cached_runs_are_keyed_by_the_whole_resolved_config(kd_gain):
    from raykd.config import RunConfig, load_config

    def key(*sets):
        return kd_gain.run_key(load_config(RunConfig, None, ["name=a", "output_dir=/x", *sets]))

    assert key("train.epochs=15") == key("train.epochs=15")
    assert key("train.epochs=15") != key("train.epochs=30")  # another budget never reuses a run
    assert key("optim.lr=0.003") != key("optim.lr=0.001")
    assert key("data.path=/d1") != key("data.path=/d2")
    # the name and the folder are not part of what is trained
    assert kd_gain.run_key(load_config(RunConfig, None, ["name=a", "output_dir=/x"])) == \
        kd_gain.run_key(load_config(RunConfig, None, ["name=b", "output_dir=/y"]))
