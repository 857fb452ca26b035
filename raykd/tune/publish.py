"""Stage 3b: publish the winner (and the Pareto family): its test metrics, ONNX export with the parity
check, and the family file the Serve app reads.

The test split was scored once, at the end of each run, with the run's best epoch
(``summary.json``); only the published models' test numbers are reported, so the test split never
takes part in choosing them. The family file is written into the experiment folder and, as the
"latest" family, to ``<output_dir>/family.json`` (the path ``deploy/serve_config.yaml`` serves).

The family names copies, not the runs' ``best/`` folders: each member's served files (its
artifact folder with the ONNX variants and model card) are copied into
``<experiment>/published/<digest>/``, a folder named after their content (the sha256 of their
names and hashes), and the family file records each file's sha256 (:func:`publish_family`). A
run's ``best/`` is rewritten in place (a resumed trial, another export); a published folder never
is, so the files an earlier family file names stay valid while a new one is published, and a
reader of a bucket sees the old family or the new one, never a mix (the family file is uploaded
after what it names: :func:`raykd.storage.push_order`). Content addressing rather than one folder
per publish: publishing unchanged models again writes nothing new (a resumed search uploads
nothing), and two publishes of one model share its copy. Published folders are kept (every family
file ever written stays servable); delete those no family file names when they are no longer
served.

Each export calibrates its model on the validation split and writes its model card
(:mod:`raykd.export.card`); the card's headline numbers are the row's own (``summary.json``), passed
to the export, so card and leaderboard show the same test BMA. The published rows get the
calibration columns and the leaderboard files are written again with them. Two plots go into the
experiment folder: the winner's per-class ROC curves on the test split (``roc_curves.png``) and val
BMA against latency of every row with the family highlighted (``pareto.png``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from raykd.artifact.format import read_meta
from raykd.artifact.rundir import FAMILY_FILE, RunDir
from raykd.export.onnx import ExportError
from raykd.export.options import ExportConfig
from raykd.export.run import ParityError, run_export
from raykd.metrics.plots import plot_pareto, plot_roc_curves
from raykd.serve.family import FamilyEntry, served_files, write_family
from raykd.storage import file_sha256
from raykd.tune.leaderboard import CALIBRATION_COLUMNS, Leaderboard, Row, pareto_front

log = logging.getLogger(__name__)

__all__ = ["FAMILY_FILE", "PARETO_PLOT", "PUBLISHED_DIR", "ROC_PLOT", "Published", "calibration_columns",
           "export_row", "publish", "publish_family", "snapshot_model"]

ROC_PLOT = "roc_curves.png"
PARETO_PLOT = "pareto.png"
#: The experiment folder's content-addressed copies of the published models.
PUBLISHED_DIR = "published"
#: Hex digits of the content digest that name a published folder (the family records full hashes).
DIGEST_CHARS = 16


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
    out.family_files = publish_family(experiment_dir, space.output_dir, entries, winner=winner.run)
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


def snapshot_model(entry: FamilyEntry, store: str | os.PathLike) -> FamilyEntry:
    """``entry`` pointing at a copy of its served files (:func:`raykd.serve.family.served_files`) in
    ``store/<digest>/``, named after their content; an existing copy with that content is reused.

    The copy is made in a temporary sibling folder and renamed into place, so a push never sees half
    of it. An ONNX file outside the artifact folder is copied in beside the artifact's files.
    """
    base = Path(entry.artifact).resolve() if entry.artifact else None
    base = base if base is not None and base.is_dir() else None
    names: dict[str, Path] = {}
    for f in served_files(entry):
        rel = f.relative_to(base).as_posix() if base is not None and f.is_relative_to(base) else f.name
        if rel in names:
            raise ValueError(f"cannot publish {entry.name!r}: {f} and {names[rel]} would both be {rel}")
        names[rel] = f
    hashes = {rel: file_sha256(f) for rel, f in names.items()}
    listing = "".join(f"{rel}\t{hashes[rel]}\t{names[rel].stat().st_size}\n" for rel in sorted(names))
    folder = Path(store) / hashlib.sha256(listing.encode()).hexdigest()[:DIGEST_CHARS]
    if not _holds(folder, hashes):
        _copy_into(folder, names)

    def moved(value: str | None) -> str | None:
        if value is None:
            return None
        path = Path(value).resolve()
        return str(folder if path == base else folder / next(r for r, f in names.items() if f == path))

    return dataclasses.replace(entry, artifact=moved(entry.artifact), onnx=moved(entry.onnx), files=None)


def _holds(folder: Path, hashes: dict[str, str]) -> bool:
    """Whether ``folder`` holds exactly the files ``hashes`` names, with those hashes."""
    if not folder.is_dir():
        return False
    here = {f.relative_to(folder).as_posix() for f in folder.rglob("*") if f.is_file()}
    return here == set(hashes) and all(file_sha256(folder / rel) == h for rel, h in hashes.items())


def _copy_into(folder: Path, names: dict[str, Path]) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for rel, src in names.items():
            (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(src, tmp / rel)
        if folder.exists():  # a damaged copy: its content is no longer what its name says
            log.warning("replacing %s: its files no longer match the content it is named after", folder)
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def publish_family(experiment_dir: str | os.PathLike, output_dir: str | os.PathLike,
                   entries: list[FamilyEntry], winner: str) -> list[Path]:
    """Copy each entry's served files into ``<experiment_dir>/published/`` (:func:`snapshot_model`)
    and write the family file naming the copies, with their hashes, into the experiment folder and
    then into ``output_dir`` (the latest family). Returns both family files."""
    store = Path(experiment_dir) / PUBLISHED_DIR
    published = [snapshot_model(e, store) for e in entries]
    return [write_family(path, published, winner=winner)
            for path in (Path(experiment_dir) / FAMILY_FILE, Path(output_dir) / FAMILY_FILE)]


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
