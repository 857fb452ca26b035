"""What a search found, in a few lines: the teachers, distillation against training alone, and
where the time went.

A leaderboard ranks trials; a user also needs the answer the product exists for: does a distilled
student beat the same student trained alone? For every student architecture with both a baseline
trial and a distilled trial, the best of each is picked by *validation* metric (as the search
picks) and compared on the test split, which each run scores once with its best epoch. The
compute share is the part of the trials' wall time spent in training and evaluation steps
(``trial_timing.json`` of each trial), the rest being start-up, model builds, data set-up and
reporting.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raykd.artifact.rundir import RunDir, TrialDir

__all__ = ["FINDINGS_FILE", "Findings", "collect_findings"]

FINDINGS_FILE = "findings.json"
STAGE_2 = "stage 2 (trials)"


@dataclass
class Findings:
    metric: str
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> val, epochs, best_epoch
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # one per student architecture
    trial_wall_s: float = 0.0
    trial_steps_s: float = 0.0
    trials_timed: int = 0
    stage_s: dict[str, float] = field(default_factory=dict)
    slots: int = 1  # trials at once

    @property
    def slot_share(self) -> float | None:
        """Training and evaluation steps over all the trial slots' time in stage 2 (trial process
        start-up and scheduling gaps included)."""
        wall = self.stage_s.get(STAGE_2, 0.0) * self.slots
        return self.trial_steps_s / wall if wall > 0 else None

    @property
    def compute_share(self) -> float | None:
        return self.trial_steps_s / self.trial_wall_s if self.trial_wall_s > 0 else None

    def lines(self) -> list[str]:
        m = self.metric
        out = [f"teacher {n}: val {m} {t['val']:.4f} (best epoch {t['best_epoch']} of {t['epochs']})"
               for n, t in self.teachers.items()]
        for c in self.comparisons:
            out.append(
                f"student {c['student']}: best baseline {c['baseline']['run']} test {m} {c['baseline']['test']:.4f}; "
                f"best distilled {c['distilled']['run']} ({c['distilled']['method']}) test {m} "
                f"{c['distilled']['test']:.4f}; KD gain {100 * c['gain']:+.1f} points")
        if not self.comparisons:
            out.append("no student architecture has both a finished baseline and a finished distilled trial: "
                       "no KD gain to report")
        share = self.compute_share
        if share is not None:
            out.append(f"compute share: {100 * share:.0f} % of {self.trial_wall_s:.0f} s of trial wall time in "
                       f"training and evaluation steps ({self.trials_timed} trials)")
        if self.slot_share is not None:
            out.append(f"stage 2: {100 * self.slot_share:.0f} % of its {self.slots} trial slots x "
                       f"{self.stage_s[STAGE_2]:.0f} s in training and evaluation steps")
        if self.stage_s:
            out.append("job wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.stage_s.items()))
        return out

    def write(self, directory: Path) -> Path:
        path = Path(directory) / FINDINGS_FILE
        path.write_text(json.dumps({**asdict(self), "compute_share": self.compute_share,
                                    "slot_share": self.slot_share, "lines": self.lines()}, indent=2, default=float))
        return path


def collect_findings(plan, board, stage_s: dict[str, float] | None = None, slots: int = 1) -> Findings:
    """Findings of a finished search from its plan (teachers, runs folder) and leaderboard."""
    metric = board.metric
    f = Findings(metric=metric, stage_s=dict(stage_s or {}), slots=slots)
    for name, folder in plan.teachers.items():
        s = RunDir(folder).read_summary()
        if s is not None and s.get("best") is not None:
            f.teachers[name] = {"val": float(s["best"]), "epochs": s.get("epochs"), "best_epoch": s.get("best_epoch")}
    by_student: dict[str, dict[str, list]] = {}
    for row in board.rows:
        if row.status != "ok" or row.value(metric) is None or row.depth is not None:
            continue
        method = plan.space.methods[row.method].method if row.method in plan.space.methods else row.method
        kind = "baseline" if method == "baseline" else "distilled"
        by_student.setdefault(row.student, {"baseline": [], "distilled": []})[kind].append(row)
    for student, groups in by_student.items():
        if not groups["baseline"] or not groups["distilled"]:
            continue
        picked = {}
        for kind, rows in groups.items():
            best = max(rows, key=lambda r: r.value(metric))
            test = (RunDir(best.run_dir).read_summary() or {}).get("test", {}).get(metric)
            picked[kind] = {"run": best.run, "method": best.method, "val": best.value(metric), "test": test}
        if picked["baseline"]["test"] is None or picked["distilled"]["test"] is None:
            continue
        f.comparisons.append({"student": student, **picked,
                              "gain": picked["distilled"]["test"] - picked["baseline"]["test"]})
    for t in filter(None, (TrialDir(d).read_trial_timing() for d in sorted(plan.runs_dir.glob("*")))):
        f.trial_wall_s += t.get("wall_s", 0.0)
        f.trial_steps_s += t.get("train_s", 0.0) + t.get("eval_s", 0.0)
        f.trials_timed += 1
    return f
