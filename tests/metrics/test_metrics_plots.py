"""The run folder gets a confusion-matrix PNG, a per-class CSV and a JSON summary."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from raykd.metrics.plots import plot_confusion_matrix, write_report

NAMES = ["MEL", "NV", "BCC"]
CM = np.array([[2, 1, 0], [1, 1, 0], [0, 0, 0]])  # BCC absent: its row normalises to zeros


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_matrix_png_is_written(tmp_path, normalize):
    path = tmp_path / "nested" / "cm.png"
    plot_confusion_matrix(CM, NAMES, path, normalize=normalize, title="val epoch 1")
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 1000


def test_plot_rejects_a_matrix_that_does_not_match_the_names(tmp_path):
    with pytest.raises(ValueError, match="label_names"):
        plot_confusion_matrix(np.eye(2), NAMES, tmp_path / "cm.png")


def test_write_report_writes_png_csv_and_json(tmp_path):
    paths = write_report(tmp_path, CM, NAMES, metrics={"bma": 0.5, "auroc_macro": float("nan")}, prefix="val")
    assert paths["confusion_matrix"].stat().st_size > 1000
    with paths["per_class"].open() as handle:
        rows = list(csv.DictReader(handle))
    assert [r["label"] for r in rows] == NAMES
    # MEL: 2 of 3 true MEL predicted MEL (recall 2/3); 2 of 3 predicted MEL are MEL (precision 2/3).
    assert float(rows[0]["recall"]) == pytest.approx(2 / 3)
    assert float(rows[0]["precision"]) == pytest.approx(2 / 3)
    assert rows[2]["support"] == "0" and float(rows[2]["recall"]) == 0.0
    summary = json.loads(paths["metrics"].read_text())
    assert summary["metrics"] == {"bma": 0.5, "auroc_macro": None}  # NaN is written as null
    assert summary["confusion_matrix"] == CM.tolist()
