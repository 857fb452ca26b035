"""Stage 3b without a search: a published row and its model card show the same numbers, the
leaderboard gets the calibration columns for the published rows only, and the ROC and Pareto plots
are written."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from raykd.artifact.format import load_artifact
from raykd.artifact.measure import measure_latency
from raykd.artifact.rundir import RunDir
from raykd.metrics.plots import plot_pareto, plot_roc_curves
from raykd.tune.leaderboard import CALIBRATION_COLUMNS, Leaderboard, _run_row
from raykd.tune.publish import PARETO_PLOT, ROC_PLOT, _plots, export_row
from raykd.tune.space import ExportConfig
from tests.export.helpers import LABELS, make_dataset, make_run

PNG = b"\x89PNG\r\n\x1a\n"


def _row(run: Path):
    """The leaderboard row of a finished run, built as the search builds it, with its test metrics as
    publish reads them."""
    base = {"trial_id": run.name, "run": run.name, "method": "kd", "student": "raykd_test_tiny_cnn"}
    row = _run_row(base, run, "bma", False, None)
    row.test = RunDir(run).read_summary()["test"]
    model, _ = load_artifact(run)
    row.latency_ms = measure_latency(model, 32, reps=2)
    return row


@pytest.fixture(scope="module")
def published(tmp_path_factory):
    root = tmp_path_factory.mktemp("publish")
    dataset = make_dataset(root / "data", per_class=5, test_per_class=4, manifest=True)
    winner, other = _row(make_run(root / "runs" / "win", dataset, seed=0)), _row(
        make_run(root / "runs" / "other", dataset, seed=1))
    report = export_row(winner, ExportConfig(max_images=8, latency_reps=2))
    return root, winner, other, report


def test_the_published_row_and_its_model_card_show_the_same_numbers(published):
    _, winner, _, report = published
    card = json.loads(Path(report.card).read_text())
    perf = card["performance"]
    assert perf["split"] == "test" and perf["source"] == "run summary"
    for key, src in (("bma", "bma"), ("auroc_macro", "auroc_macro"), ("binary_auroc", "binary/auroc"),
                     ("accuracy", "accuracy")):
        assert perf[key] == pytest.approx(winner.test[src]), key
    cal = card["calibration"]
    assert winner.calibration == {"calibration_split": "test", "temperature": cal["temperature"],
                                  **{k: cal["test"][k] for k in CALIBRATION_COLUMNS[2:]}}


def test_only_published_rows_get_calibration_columns_in_the_leaderboard(published, tmp_path):
    _, winner, other, _ = published
    paths = Leaderboard(rows=[winner, other]).write(tmp_path)
    with paths["csv"].open() as fh:
        table = {r["run"]: r for r in csv.DictReader(fh)}
    for col in CALIBRATION_COLUMNS:
        assert table["other"][col] == ""
    assert float(table["win"]["ece_after"]) == pytest.approx(winner.calibration["ece_after"])
    assert table["win"]["calibration_split"] == "test"
    md = paths["md"].read_text()
    assert "| ECE before | ECE after | Brier before | Brier after |" in md
    assert "ECE before" not in Leaderboard(rows=[other]).markdown()  # nothing published: no empty columns


def test_publish_writes_the_winners_roc_curves_and_the_pareto_plot(published, tmp_path):
    _, winner, other, report = published
    board = Leaderboard(rows=[winner, other])
    plots = _plots(board, [winner], report, tmp_path)
    assert plots == {"roc": tmp_path / ROC_PLOT, "pareto": tmp_path / PARETO_PLOT}
    for path in plots.values():
        assert path.read_bytes()[:8] == PNG and path.stat().st_size > 5000


def test_roc_curves_name_a_class_without_positives_instead_of_drawing_it(tmp_path):
    rng = np.random.default_rng(0)
    probs = rng.dirichlet(np.ones(len(LABELS)), 40)
    labels = rng.integers(0, 3, 40)  # the fourth class never occurs
    path = plot_roc_curves(probs, labels, LABELS, tmp_path / "roc.png")
    assert path.read_bytes()[:8] == PNG
    with pytest.raises(ValueError, match=r"\(N, 4\)"):
        plot_roc_curves(probs[:, :3], labels, LABELS, tmp_path / "bad.png")


def test_the_pareto_plot_needs_at_least_one_model(tmp_path):
    assert plot_pareto([1.0, 2.0], [0.5, 0.6], ["a", "b"], [True, False], tmp_path / "p.png").is_file()
    assert plot_pareto([1.0, 2.0], [0.5, 0.6], ["a", "b"], [False, True], tmp_path / "f.png",
                       front=[True, True]).is_file()
    with pytest.raises(ValueError, match="at least one"):
        plot_pareto([], [], [], [], tmp_path / "empty.png")


def test_the_search_spaces_export_section_takes_the_calibration_options():
    from raykd.config import ConfigError, from_dict, validate

    cfg = from_dict(ExportConfig, {"target_sensitivity": 0.9, "calibrate": False}, where="s.yaml", prefix="export.")
    validate(cfg, where="s.yaml", prefix="export.")
    assert (cfg.target_sensitivity, cfg.calibrate) == (0.9, False)
    assert ExportConfig().target_sensitivity == 0.95 and ExportConfig().calibrate is True
    with pytest.raises(ConfigError, match="export.target_sensitivity"):
        validate(from_dict(ExportConfig, {"target_sensitivity": 1.5}), where="s.yaml", prefix="export.")
