"""Stage 3a: the leaderboard of every trial (CSV, JSON and a Markdown table), the Pareto family and
the cascade's BMA-per-depth table.

One row per training run: a trial, or one depth of a cascade trial. Rows carry the method, the
student, the searched hyperparameters, the validation metrics of the best epoch (BMA first), the
parameter count, the weight size and the CPU latency (batch 1, one thread, measured here one model
at a time so that the numbers are comparable), the status (``ok``; ``stopped`` when ASHA ended the
trial early; ``failed`` with its error) and the run folder. Rows are ranked by the validation
metric; test metrics are shown only for the models stage 3 publishes, each scored once, and so
are the calibration columns (``temperature``, ``ece_before``/``ece_after``,
``brier_before``/``brier_after`` on ``calibration_split``: the test split, else val), which the
export of those models measures (:mod:`raykd.export.calibrate`).
"""

from __future__ import annotations

import csv
import json
import logging
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raykd.artifact.format import find_artifact, load_artifact
from raykd.artifact.measure import measure_latency, model_cost
from raykd.artifact.rundir import RunDir, TrialDir
from raykd.metrics.classification import metric_mode
from raykd.tune.space import trial_key, trial_knob

log = logging.getLogger(__name__)

__all__ = ["Leaderboard", "Row", "build_leaderboard", "pareto_front"]

VAL_COLUMNS = ("bma", "accuracy", "f1_weighted", "auroc_macro", "mcc")
#: The calibration columns of a published row (Row.calibration keys), in order.
CALIBRATION_COLUMNS = ("calibration_split", "temperature", "ece_before", "ece_after", "brier_before", "brier_after")


@dataclass
class Row:
    trial_id: str
    run: str
    status: str  # ok | stopped | failed
    method: str  # the space's label
    student: str
    teacher: str | None = None
    hparams: dict[str, Any] = field(default_factory=dict)
    val: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    params: int | None = None
    size_mb: float | None = None
    latency_ms: float | None = None
    epochs: int | None = None
    depth: int | None = None
    error: str | None = None
    run_dir: str | None = None
    paper: bool = False  # the method's paper setting (the first trial of each method)
    teacher_mode: str | None = None  # where the teacher's outputs came from: none | online | saved
    #: Published rows only: CALIBRATION_COLUMNS measured by the export (empty for the others).
    calibration: dict[str, Any] = field(default_factory=dict)

    def value(self, metric: str) -> float | None:
        v = self.val.get(metric)
        return None if v is None or (isinstance(v, float) and math.isnan(v)) else float(v)


def pareto_front(rows: list[Row], metric: str, objectives: list[str]) -> list[Row]:
    """Rows no other row beats on ``metric`` (maximised unless ``loss``) and every objective (minimised)."""
    sign = 1.0 if metric_mode(metric) == "max" else -1.0

    def point(r: Row) -> tuple[float, ...] | None:
        m = r.value(metric)
        costs = [getattr(r, o) for o in objectives]
        if m is None or any(c is None for c in costs):
            return None
        return (-sign * m, *(float(c) for c in costs))  # all minimised

    pts = [(r, point(r)) for r in rows]
    pts = [(r, p) for r, p in pts if p is not None]
    front = []
    for r, p in pts:
        dominated = any(all(a <= b for a, b in zip(q, p, strict=True)) and q != p for _, q in pts)
        if not dominated:
            front.append(r)
    return front


@dataclass
class Leaderboard:
    rows: list[Row]
    metric: str = "bma"
    objectives: list[str] = field(default_factory=list)
    cascades: dict[str, list[dict]] = field(default_factory=dict)

    def ranked(self) -> list[Row]:
        """ok and stopped rows by the metric (best first), then failed rows."""
        sign = -1.0 if metric_mode(self.metric) == "max" else 1.0
        scored = [r for r in self.rows if r.status != "failed" and r.value(self.metric) is not None]
        rest = [r for r in self.rows if r not in scored]
        return sorted(scored, key=lambda r: sign * r.value(self.metric)) + rest

    def winner(self) -> Row | None:
        """The best finished (``ok``) row: a stopped trial was never tested."""
        return next((r for r in self.ranked() if r.status == "ok"), None)

    def family(self) -> list[Row]:
        """The winner, plus the Pareto front of the finished rows in multi-objective mode."""
        win = self.winner()
        if win is None:
            return []
        if not self.objectives:
            return [win]
        front = pareto_front([r for r in self.rows if r.status == "ok"], self.metric, self.objectives)
        return [win] + [r for r in self.ranked() if r in front and r is not win]

    # ---------------------------------------------------------------------------------------------
    def records(self) -> list[dict[str, Any]]:
        out = []
        for rank, r in enumerate(self.ranked(), 1):
            d = asdict(r)
            d["rank"] = rank
            out.append(d)
        return out

    def write(self, directory: str | Path) -> dict[str, Path]:
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"json": directory / "leaderboard.json", "csv": directory / "leaderboard.csv",
                 "md": directory / "leaderboard.md"}
        recs = self.records()
        doc = {"metric": self.metric, "objectives": self.objectives, "rows": recs, "cascades": self.cascades}
        paths["json"].write_text(json.dumps(doc, indent=2, default=_json))
        flat = [_flatten(r) for r in recs]
        keys: list[str] = []
        for prefix in ("", "val_", "cost", "hp_", "test_", "calib", "end"):
            for row in flat:
                keys += [k for k in row if k not in keys and _group(k) == prefix]
        with paths["csv"].open("w", newline="") as fh:
            w = csv.DictWriter(fh, fieldnames=keys)
            w.writeheader()
            w.writerows(flat)
        paths["md"].write_text(self.markdown() + "\n")
        for trial_id, steps in self.cascades.items():
            png = directory / f"cascade_{trial_id}.png"
            paths[f"cascade_{trial_id}"] = _plot_cascade(png, trial_id, steps, self.metric)
        return paths

    def markdown(self) -> str:
        cols = [c for c in VAL_COLUMNS if any(c in r.val for r in self.rows)]
        if self.metric not in cols:
            cols.insert(0, self.metric)
        calib = any(r.calibration for r in self.rows)
        calib_head = ["ECE before", "ECE after", "Brier before", "Brier after"] if calib else []
        head = ["#", "trial", "method", "student", *[f"val {c}" for c in cols], "params", "ms/img",
                *calib_head, "teacher", "status", "hyperparameters"]
        lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for rank, r in enumerate(self.ranked(), 1):
            vals = [_fmt(r.val.get(c)) for c in cols]
            status = r.status if r.status != "failed" else f"failed: {_short(r.error)}"
            hp = ", ".join(f"{k}={_fmt(v)}" for k, v in r.hparams.items())
            method = f"{r.method} (paper)" if r.paper else r.method
            cal = [_fmt(r.calibration.get(k)) for k in CALIBRATION_COLUMNS[2:]] if calib else []
            lines.append("| " + " | ".join([str(rank), r.run, method, r.student, *vals, _count(r.params),
                                            _fmt(r.latency_ms, 2), *cal, r.teacher_mode or "-", status, hp]) + " |")
        out = "\n".join(lines)
        for trial_id, steps in self.cascades.items():
            out += "\n\n" + cascade_markdown(trial_id, steps, self.metric)
        return out


def cascade_markdown(trial_id: str, steps: list[dict], metric: str = "bma") -> str:
    """BMA per depth of one cascade trial (the layout of SkinDistilViT's Table 2)."""
    lines = [f"Cascade {trial_id}: val {metric} per depth (blocks)", "",
             f"| depth | run | params | val {metric} | test {metric} |", "|---|---|---|---|---|"]
    for s in sorted(steps, key=lambda s: -s["depth"]):
        run = "parent (teacher)" if s.get("parent") else s.get("run")
        val, test = (s.get("val") or {}).get(metric), (s.get("test") or {}).get(metric)
        lines.append(f"| {s['depth']} | {run} | {_count(s.get('params'))} | {_fmt(val)} | {_fmt(test)} |")
    return "\n".join(lines)


def _plot_cascade(path: Path, trial_id: str, steps: list[dict], metric: str) -> Path:
    import matplotlib  # lazy: matplotlib is heavy

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # lazy: matplotlib is heavy

    pts = sorted((s["depth"], (s.get("val") or {}).get(metric)) for s in steps)
    pts = [(d, v) for d, v in pts if v is not None]
    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.plot([d for d, _ in pts], [v for _, v in pts], marker="o")
    ax.set_xlabel("transformer blocks kept")
    ax.set_ylabel(f"val {metric}")
    ax.set_title(f"cascading distillation {trial_id}")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _json(v: Any) -> Any:
    return None if isinstance(v, float) and math.isnan(v) else str(v)


def _flatten(rec: dict[str, Any]) -> dict[str, Any]:
    out = {k: rec[k] for k in ("rank", "trial_id", "run", "status", "method", "student", "teacher")}
    out.update({f"val_{k}": v for k, v in rec["val"].items()})
    out.update({k: rec[k] for k in ("params", "size_mb", "latency_ms", "epochs", "depth")})
    out.update({f"hp_{k}": v for k, v in rec["hparams"].items()})
    out.update({f"test_{k}": v for k, v in rec["test"].items()})
    out.update({k: rec["calibration"][k] for k in CALIBRATION_COLUMNS if k in rec["calibration"]})
    out.update({"error": rec["error"], "run_dir": rec["run_dir"]})
    return out


def _group(key: str) -> str:
    """CSV column groups, in order: identity, validation, cost, hyperparameters, test, error/run."""
    if key in ("params", "size_mb", "latency_ms", "epochs", "depth"):
        return "cost"
    if key in ("error", "run_dir"):
        return "end"
    if key in CALIBRATION_COLUMNS:
        return "calib"
    return next((p for p in ("val_", "hp_", "test_") if key.startswith(p)), "")


def _fmt(v: Any, digits: int = 4) -> str:
    if v is None:
        return "-"
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if v != 0 and (abs(v) < 1e-3 or abs(v) >= 1e5):
        return f"{v:.2e}"
    return f"{v:.{digits}f}"


def _count(n: Any) -> str:
    if n is None:
        return "-"
    n = float(n)
    return f"{n / 1e6:.2f}M" if n >= 1e6 else f"{n / 1e3:.1f}k" if n >= 1e3 else str(int(n))


def _short(text: str | None, n: int = 140) -> str:
    line = (text or "").strip().splitlines()
    line = line[-1] if line else ""
    line = line.replace("|", "/")
    return line if len(line) <= n else line[: n - 3] + "..."


# -------------------------------------------------------------------------------------------------
# Building the rows from the search's records and the run folders
# -------------------------------------------------------------------------------------------------


def _best_row(run_dir: Path, metric: str) -> tuple[dict[str, float], int]:
    history = RunDir(run_dir).read_metrics()
    if not history:
        return {}, 0
    sign = 1.0 if metric_mode(metric) == "max" else -1.0
    scored = [r for r in history if isinstance(r.get(f"val/{metric}"), (int, float))]
    best = max(scored, key=lambda r: sign * r[f"val/{metric}"]) if scored else history[-1]
    return {k[4:]: v for k, v in best.items() if k.startswith("val/")}, len(history)


def _hparams(config: dict[str, Any], label: str) -> dict[str, Any]:
    out = {}
    for k, v in config.items():
        if k in ("method", trial_key(label, "student")):
            continue
        out[trial_knob(k, label) or k] = v
    return out


def _run_row(base: dict[str, Any], run_dir: Path, metric: str, failed: bool, error: str | None) -> Row:
    summary = RunDir(run_dir).read_summary()
    if summary is not None:
        val, epochs, status = summary.get("val", {}), summary.get("epochs"), "ok"
    else:
        val, epochs = _best_row(run_dir, metric)
        status = "failed" if failed else "stopped"
    return Row(**base, status=status, val=val, epochs=epochs, error=error if status == "failed" else None,
               run_dir=str(run_dir), teacher_mode=(summary or {}).get("teacher"))


def _measure(row: Row, reps: int) -> None:
    """Cost of the row's best model, measured now on this machine (one model at a time)."""
    try:
        path = find_artifact(row.run_dir)
    except (FileNotFoundError, TypeError):
        return
    model, meta = load_artifact(path)
    cost = model_cost(model)
    row.params, row.size_mb = int(cost["params"]), cost["size_mb"]
    row.latency_ms = measure_latency(model, int(meta.preprocess.get("image_size", 224)), reps=reps)


def build_leaderboard(plan, records) -> Leaderboard:
    """Rows for every trial record (a ``raykd.tune.search.TrialRecord``), costs measured here."""
    space = plan.space
    metric = space.search.metric
    rows: list[Row] = []
    cascades: dict[str, list[dict]] = {}
    for rec in records:
        trial_dir = TrialDir(plan.runs_dir / rec.trial_id)
        info = trial_dir.read_trial() or {}
        label = info.get("label") or rec.config.get("method") or "?"
        student = info.get("student")
        if student is None and label in space.methods:
            try:
                student = plan.resolve(rec.config).student
            except KeyError:
                student = "?"
        base = dict(trial_id=rec.trial_id, method=label, student=student or "?", teacher=info.get("teacher"),
                    hparams=_hparams(rec.config, label), paper=bool(info.get("paper")))
        failed = rec.status == "ERROR"
        pipeline = trial_dir.read_pipeline()
        if info.get("pipeline") or pipeline is not None:  # a method trained as several runs
            steps = (pipeline or {}).get("steps", [])
            cascades[rec.trial_id] = steps
            done = [s for s in steps if not s.get("parent")]
            for s in done:
                b = dict(base, run=s["run"], student=f"{student}[{s['depth']}]")
                row = _run_row(b, Path(s["run_dir"]), metric, False, None)
                row.depth = s["depth"]
                row.params = int(s["params"]) if isinstance(s.get("params"), (int, float)) else None
                row.size_mb, row.latency_ms = s.get("size_mb"), s.get("latency_ms")
                rows.append(row)
            if failed or not done:
                rows.append(Row(**base, run=rec.trial_id, status="failed" if failed else "stopped",
                                error=rec.error, run_dir=str(trial_dir.path)))
            continue
        row = _run_row(dict(base, run=rec.trial_id), trial_dir.path, metric, failed, rec.error)
        last = rec.last_result or {}
        row.params = int(last["params"]) if isinstance(last.get("params"), (int, float)) else None
        row.size_mb, row.latency_ms = last.get("size_mb"), last.get("latency_ms")
        rows.append(row)
    for row in rows:  # measured in the trial already, unless it was replayed after an interruption
        if row.status != "failed" and row.latency_ms is None:
            _measure(row, space.export.latency_reps)
    return Leaderboard(rows=rows, metric=metric, objectives=list(space.search.objectives), cascades=cascades)
