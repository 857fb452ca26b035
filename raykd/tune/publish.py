"""Stage 3b: publish the winner (and the Pareto family): its test metrics, ONNX export with the parity
check, and the family file the Serve app reads.

The test split was scored once, at the end of each run, with the run's best epoch
(``summary.json``); only the published models' test numbers are reported, so the test split never
takes part in choosing them. The family file is written into the experiment folder and, as the
"latest" family, to ``<output_dir>/family.json`` (the path ``deploy/serve_config.yaml`` serves).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path

from raykd.artifact.rundir import RunDir
from raykd.tune.leaderboard import Leaderboard, Row

log = logging.getLogger(__name__)

__all__ = ["FAMILY_FILE", "Published", "publish"]

FAMILY_FILE = "family.json"


@dataclass
class Published:
    winner: Row
    family: list[Row]
    onnx: dict[str, str] = field(default_factory=dict)  # run -> model.onnx
    family_files: list[Path] = field(default_factory=list)
    export_errors: dict[str, str] = field(default_factory=dict)


def publish(plan, board: Leaderboard) -> Published | None:
    """Test metrics, ONNX export and family file of the leaderboard's winner (and Pareto family)."""
    from raykd.export.onnx import ExportError
    from raykd.export.run import ParityError, run_export
    from raykd.serve.family import FamilyEntry, write_family

    space = plan.space
    family = board.family()
    if not family:
        log.warning("no trial finished: nothing to export")
        return None
    winner = family[0]
    out = Published(winner=winner, family=family)
    entries = []
    for row in family:
        run_dir = RunDir(row.run_dir)
        row.test = (run_dir.read_summary() or {}).get("test", {})
        artifact = run_dir.best_dir
        onnx = None
        if space.export.onnx:
            try:
                report = run_export(row.run_dir, tolerance=space.export.tolerance,
                                    max_images=space.export.max_images)
                onnx = report.variants[0].path
                out.onnx[row.run] = onnx
            except (ParityError, ExportError, ValueError) as e:
                log.error("ONNX export of %s failed: %s", row.run, e)
                out.export_errors[row.run] = str(e)
        entries.append(FamilyEntry(
            name=row.run, version=row.trial_id, artifact=str(artifact), onnx=onnx,
            params=int(row.params or 0), size_bytes=run_dir.best_weights.stat().st_size,
            val_bma=row.val.get("bma"), latency_ms=row.latency_ms,
        ))
    experiment_dir = plan.experiment_dir
    for path in (experiment_dir / FAMILY_FILE, Path(space.output_dir) / FAMILY_FILE):
        out.family_files.append(write_family(path, entries, winner=winner.run))
    (experiment_dir / "winner.json").write_text(json.dumps({
        "winner": winner.run, "trial_id": winner.trial_id, "method": winner.method, "student": winner.student,
        "hparams": winner.hparams, "val": winner.val, "test": winner.test, "onnx": out.onnx.get(winner.run),
        "artifact": str(RunDir(winner.run_dir).best_dir),
        "family": [{"run": r.run, "val": r.val.get(board.metric), "test": r.test.get(board.metric),
                    "params": r.params, "latency_ms": r.latency_ms, "onnx": out.onnx.get(r.run)}
                   for r in family],
    }, indent=2, default=str))
    log.info("winner %s (%s, %s): val %s %.4f, test %s %.4f; ONNX %s", winner.run, winner.method,
             winner.student, board.metric, winner.val.get(board.metric, float("nan")), board.metric,
             winner.test.get(board.metric, float("nan")), out.onnx.get(winner.run, "not exported"))
    return out
