"""Stage 3b: publish the winner (and the Pareto family): its test metrics, ONNX export with the parity
check, and the family file the Serve app reads.

The test split was scored once, at the end of each run, with the run's best epoch
(``summary.json``); only the published models' test numbers are reported, so the test split never
takes part in choosing them. The family file is written into the experiment folder and, as the
"latest" family, to ``<output_dir>/family.json`` (the path ``deploy/serve_config.yaml`` serves).

Each export calibrates its model on the validation split and writes its model card
(:mod:`raykd.export.card`); the card's headline numbers are the row's own (``summary.json``), passed
to the export, so card and leaderboard show the same test BMA. The published rows get the
calibration columns and the leaderboard files are written again with them. Two plots go into the
experiment folder: the winner's per-class ROC curves on the test split (``roc_curves.png``) and val
BMA against latency of every row with the family highlighted (``pareto.png``).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykd.artifact.format import read_meta
from raykd.artifact.rundir import RunDir
from raykd.export.onnx import ExportError
from raykd.export.options import ExportConfig
from raykd.export.run import ParityError, run_export
from raykd.metrics.plots import plot_pareto, plot_roc_curves
from raykd.serve.family import FamilyEntry, write_family
from raykd.tune.leaderboard import CALIBRATION_COLUMNS, Leaderboard, Row, pareto_front

log = logging.getLogger(__name__)

__all__ = ["FAMILY_FILE", "PARETO_PLOT", "ROC_PLOT", "Published", "calibration_columns", "export_row", "publish"]

FAMILY_FILE = "family.json"
ROC_PLOT = "roc_curves.png"
PARETO_PLOT = "pareto.png"


@dataclass
class Published:
    winner: Row
    family: list[Row]
    onnx: dict[str, str] = field(default_factory=dict)  # run -> model.onnx
    family_files: list[Path] = field(default_factory=list)
    export_errors: dict[str, str] = field(default_factory=dict)
    cards: dict[str, str] = field(default_factory=dict)  # run -> model_card.json
    plots: dict[str, Path] = field(default_factory=dict)  # roc, pareto


def calibration_columns(report) -> dict[str, Any]:
    """A published row's calibration columns from its export report: test split, else val; {} if none."""
    calib = report.calibration
    if not calib:
        return {}
    split = "test" if calib.get("test") else "val"
    scores = calib[split]
    values = {"calibration_split": split, "temperature": calib["temperature"], **scores}
    return {k: values[k] for k in CALIBRATION_COLUMNS}


def export_row(row: Row, export) -> Any:
    """Export one published row's model (an ``ExportConfig`` says how) and fill its calibration columns.

    The row's own validation and test metrics go to the export as the model card's headline
    numbers: the card and the leaderboard then show the same values by construction.

    Returns:
        The :class:`~raykd.export.run.ExportReport`.
    """
    report = run_export(ExportConfig.from_checks(export), row.run_dir,
                        run_metrics={"val": row.val, "test": row.test})
    row.calibration = calibration_columns(report)
    return report


def publish(plan, board: Leaderboard) -> Published | None:
    """Test metrics, ONNX export and family file of the leaderboard's winner (and Pareto family)."""
    space = plan.space
    family = board.family()
    if not family:
        log.warning("no trial finished: nothing to export")
        return None
    winner = family[0]
    out = Published(winner=winner, family=family)
    entries = []
    reports = {}
    for row in family:
        run_dir = RunDir(row.run_dir)
        row.test = (run_dir.read_summary() or {}).get("test", {})
        artifact = run_dir.best_dir
        onnx = None
        if space.export.onnx:
            try:
                report = reports[row.run] = export_row(row, space.export)
                onnx = report.variants[0].path
                out.onnx[row.run] = onnx
                if report.card:
                    out.cards[row.run] = report.card
            except (ParityError, ExportError, ValueError) as e:
                log.error("ONNX export of %s failed: %s", row.run, e)
                out.export_errors[row.run] = str(e)
        entries.append(FamilyEntry(
            name=row.run, version=row.trial_id, artifact=str(artifact), onnx=onnx,
            params=int(row.params or 0), size_bytes=run_dir.best_weights.stat().st_size,
            val_bma=row.val.get("bma"), latency_ms=row.latency_ms,
        ))
    experiment_dir = plan.experiment_dir
    out.plots = _plots(board, family, reports.get(winner.run), experiment_dir)
    board.write(experiment_dir)  # again, now with the published rows' test and calibration columns
    for path in (experiment_dir / FAMILY_FILE, Path(space.output_dir) / FAMILY_FILE):
        out.family_files.append(write_family(path, entries, winner=winner.run))
    (experiment_dir / "winner.json").write_text(json.dumps({
        "winner": winner.run, "trial_id": winner.trial_id, "method": winner.method, "student": winner.student,
        "hparams": winner.hparams, "val": winner.val, "test": winner.test, "onnx": out.onnx.get(winner.run),
        "artifact": str(RunDir(winner.run_dir).best_dir), "calibration": winner.calibration,
        "card": out.cards.get(winner.run),
        "family": [{"run": r.run, "val": r.val.get(board.metric), "test": r.test.get(board.metric),
                    "params": r.params, "latency_ms": r.latency_ms, "onnx": out.onnx.get(r.run)}
                   for r in family],
    }, indent=2, default=str))
    log.info("winner %s (%s, %s): val %s %.4f, test %s %.4f; ONNX %s", winner.run, winner.method,
             winner.student, board.metric, winner.val.get(board.metric, float("nan")), board.metric,
             winner.test.get(board.metric, float("nan")), out.onnx.get(winner.run, "not exported"))
    return out


def _plots(board: Leaderboard, family: list[Row], winner_report, directory: Path) -> dict[str, Path]:
    """The winner's per-class ROC curves (test split, else val) and the val-metric-vs-latency plot."""
    out: dict[str, Path] = {}
    winner = family[0]
    if winner_report is not None and winner_report.predictions:
        split = "test" if "test" in winner_report.predictions else "val"
        probs, labels = winner_report.predictions[split]
        names = read_meta(winner.run_dir).label_names
        out["roc"] = plot_roc_curves(probs, labels, names, directory / ROC_PLOT,
                                     title=f"{winner.run} ({winner.method}, {winner.student}): {split} split")
    rows = [r for r in board.rows if r.status != "failed" and r.latency_ms is not None
            and r.value(board.metric) is not None]
    if rows:
        in_family = {id(r) for r in family}
        on_front = {id(r) for r in pareto_front(rows, board.metric, ["latency_ms"])}
        out["pareto"] = plot_pareto([float(r.latency_ms) for r in rows], [r.value(board.metric) for r in rows],
                                    [r.run for r in rows], [id(r) in in_family for r in rows],
                                    directory / PARETO_PLOT, metric=board.metric,
                                    title=f"val {board.metric} vs CPU latency ({len(rows)} models)",
                                    front=[id(r) in on_front for r in rows])
    return out
