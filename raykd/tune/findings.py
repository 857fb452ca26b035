"""What a search found, in a few lines: the teachers, each method against its student trained
alone, and where the time went.

A leaderboard ranks trials; a user also needs the answer the product exists for: does a distilled
student beat the same student trained alone? The comparison comes from the confirmation stage
(:mod:`raykd.tune.confirm`), never from the search's own trials: there, one arm's best of N tuned
trials would meet another arm's best of M, and the best of several noisy runs sits above its mean
by selection alone. Per student architecture the findings give the baseline's mean test metric
over the confirmation seeds with its 95 % Student-t interval, and per method its mean, the paired
difference against the baseline (per seed, then a t interval over the seeds), the wins, and the
retention (its mean / its teacher's test metric) at its FLOPs ratio to the teacher. The compute
share is the part of the runs' wall time spent in training and evaluation steps (each trial's
``trial_timing.json``, each confirmation run's ``timing.json``).
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from raykd.artifact.measure import artifact_flops
from raykd.artifact.rundir import RunDir, TrialDir
from raykd.metrics.compare import Interval, mean_interval, paired_difference

__all__ = ["FINDINGS_FILE", "Findings", "collect_findings", "compare_arms", "tuned_trials"]

FINDINGS_FILE = "findings.json"
STAGE_2 = "stage 2 (trials)"
STAGE_2B = "stage 2b (confirmation)"


@dataclass
class Findings:
    metric: str
    teachers: dict[str, dict[str, Any]] = field(default_factory=dict)  # name -> val, test, epochs, best_epoch, flops
    comparisons: list[dict[str, Any]] = field(default_factory=list)  # one per student architecture
    confirmed: list[dict[str, Any]] = field(default_factory=list)  # every confirmation run
    seeds: list[int] = field(default_factory=list)
    trials_per_arm: dict[str, int] = field(default_factory=dict)  # "label/student" -> tuned trials
    trial_wall_s: float = 0.0
    trial_steps_s: float = 0.0
    trial_train_s: float = 0.0  # training steps alone, the waits for their batches included
    trial_wait_s: float = 0.0  # of which waiting for the next training batch
    trials_timed: int = 0
    runs_timed: int = 0  # confirmation runs among the timed ones
    stage_s: dict[str, float] = field(default_factory=dict)
    slots: int = 1  # trials at once

    @property
    def slot_share(self) -> float | None:
        """Training and evaluation steps over all the trial slots' time in stage 2 and the
        confirmation (trial process start-up and scheduling gaps included)."""
        wall = (self.stage_s.get(STAGE_2, 0.0) + self.stage_s.get(STAGE_2B, 0.0)) * self.slots
        return self.trial_steps_s / wall if wall > 0 else None

    @property
    def compute_share(self) -> float | None:
        return self.trial_steps_s / self.trial_wall_s if self.trial_wall_s > 0 else None

    @property
    def data_wait_share(self) -> float | None:
        """The share of the training steps' time spent waiting for the next batch."""
        return self.trial_wait_s / self.trial_train_s if self.trial_train_s > 0 else None

    def lines(self) -> list[str]:
        m = self.metric
        out = []
        for n, t in self.teachers.items():
            test = f", test {m} {t['test']:.4f}" if t.get("test") is not None else ""
            flops = f", {t['flops'] / 1e6:.1f} MFLOPs" if t.get("flops") else ""
            out.append(f"teacher {n}: val {m} {t['val']:.4f}{test} (best epoch {t['best_epoch']} of {t['epochs']}){flops}")
        if self.seeds:
            out.append(f"confirmation: each arm's best trial retrained on seeds {_seed_list(self.seeds)}, the same "
                       f"initial weights, data order and augmentations for every arm of a seed; test {m}, mean "
                       "[95 % t interval over seeds]; each method minus the baseline paired by seed")
        for c in self.comparisons:
            out += _comparison_lines(c, m)
        if not self.seeds:
            out.append("no confirmation stage (confirm.seeds 0): no distillation gain reported (the search's best "
                       "trials of each arm are no fair comparison)")
        elif not self.comparisons:
            out.append("no student architecture has a confirmed baseline and a confirmed distilled arm: no "
                       "distillation gain to report")
        share = self.compute_share
        if share is not None:
            runs = f", {self.runs_timed} confirmation runs" if self.runs_timed else ""
            out.append(f"compute share: {100 * share:.0f} % of {self.trial_wall_s:.0f} s of run wall time in "
                       f"training and evaluation steps ({self.trials_timed - self.runs_timed} trials{runs})")
        if self.data_wait_share is not None:
            out.append(f"data wait: {100 * self.data_wait_share:.1f} % of the {self.trial_train_s:.0f} s of training "
                       "steps spent waiting for the next batch")
        if self.slot_share is not None:
            wall = self.stage_s.get(STAGE_2, 0.0) + self.stage_s.get(STAGE_2B, 0.0)
            out.append(f"stages 2 and 2b: {100 * self.slot_share:.0f} % of {self.slots} trial slots x "
                       f"{wall:.0f} s in training and evaluation steps")
        if self.stage_s:
            out.append("job wall time: " + ", ".join(f"{k} {v:.0f} s" for k, v in self.stage_s.items()))
        return out

    def write(self, directory: Path) -> Path:
        path = Path(directory) / FINDINGS_FILE
        path.write_text(json.dumps({**asdict(self), "compute_share": self.compute_share,
                                    "data_wait_share": self.data_wait_share,
                                    "slot_share": self.slot_share, "lines": self.lines()}, indent=2, default=float))
        return path


def _seed_list(seeds: list[int]) -> str:
    if len(seeds) > 2 and seeds == list(range(seeds[0], seeds[0] + len(seeds))):
        return f"{seeds[0]}-{seeds[-1]}"
    return ", ".join(map(str, seeds))


def _comparison_lines(c: dict[str, Any], m: str) -> list[str]:
    """The line of one student architecture and one indented line per method."""
    b = c["baseline"]
    n = c.get("trials_per_arm")
    tuned = f", {n} tuned trial{'s' if n != 1 else ''} per arm" if n else ""
    if b is None:
        head = f"student {c['student']}: no confirmed baseline arm: no paired difference"
    else:
        base = Interval(**b["interval"])
        sig = [a["label"] for a in c["arms"] if a.get("diff") and Interval(**_iv(a["diff"])).low > 0]
        best = max((a for a in c["arms"] if a.get("diff")), key=lambda a: a["diff"]["mean"], default=None)
        head = f"student {c['student']}: alone ({b['label']}) test {m} {base.plain()} ({base.n} seeds{tuned})"
        if best is not None:
            head += (f"; best method {best['label']} {Interval(**_iv(best['diff'])).points()}; above the baseline "
                     f"with an interval above 0: {', '.join(sig) if sig else 'none'}")
    lines = [head]
    for a in c["arms"]:
        arm = Interval(**a["interval"])
        text = f"  {a['label']} ({a['method']}): test {m} {arm.plain()}"
        if a.get("diff"):
            d = a["diff"]
            text += f"; vs baseline {Interval(**_iv(d)).points()}, wins {d['wins']}/{d['n']}"
        if a.get("retention") is not None:
            text += f"; retention {a['retention']:.2f} of teacher {a['teacher']}"
            if a.get("flops_ratio"):
                text += f" at 1/{1 / a['flops_ratio']:.1f} of its FLOPs"
        lines.append(text)
    return lines


def _iv(d: dict[str, Any]) -> dict[str, Any]:
    return {k: d[k] for k in ("mean", "low", "high", "n", "level")}


def tuned_trials(plan, records) -> Counter:
    """``(label, student) -> trials`` the search ran for each arm (finished or not)."""
    arms = (plan.resolve(rec.config) for rec in records if rec.config.get("method") in plan.space.methods)
    return Counter((r.label, r.student) for r in arms)


def collect_findings(plan, board, stage_s: dict[str, float] | None = None, slots: int = 1,
                     confirmed: list | None = None, records: list | None = None) -> Findings:
    """Findings of a finished search from its plan (teachers, runs folder), leaderboard, trial
    records and confirmation runs (:func:`raykd.tune.confirm.run_confirmation`)."""
    metric = board.metric
    confirmed = list(confirmed or [])
    f = Findings(metric=metric, stage_s=dict(stage_s or {}), slots=slots,
                 confirmed=[r.to_dict() for r in confirmed], seeds=sorted({r.seed for r in confirmed}))
    for name, folder in plan.teachers.items():
        s = RunDir(folder).read_summary()
        if s is not None and s.get("best") is not None:
            f.teachers[name] = {"val": float(s["best"]), "test": (s.get("test") or {}).get(metric),
                                "epochs": s.get("epochs"), "best_epoch": s.get("best_epoch"), "flops": _flops(folder)}
    f.trials_per_arm = {f"{label}/{student}": n for (label, student), n in tuned_trials(plan, records or []).items()}
    f.comparisons = compare_arms(confirmed, f.teachers, metric, f.trials_per_arm, plan.space.confirm.level)
    timings = [TrialDir(d).read_trial_timing() for d in sorted(plan.runs_dir.glob("*"))]
    runs = [RunDir(r.run_dir).read_timing() for r in confirmed if r.error is None]
    for t in filter(None, timings + runs):
        f.trial_wall_s += t.get("wall_s", 0.0)
        f.trial_steps_s += t.get("train_s", 0.0) + t.get("eval_s", 0.0)
        f.trial_train_s += t.get("train_s", 0.0)
        f.trial_wait_s += t.get("train_wait_s", 0.0)
        f.trials_timed += 1
    f.runs_timed = sum(1 for t in runs if t)
    return f


def _flops(folder: str) -> float | None:
    """FLOPs of one image through the best model of a run or artifact folder (None if unreadable)."""
    try:
        return artifact_flops(folder)
    except (OSError, ValueError, KeyError, RuntimeError):
        return None


def compare_arms(confirmed: list, teachers: dict[str, dict[str, Any]], metric: str, tuned: dict[str, int],
             level: float) -> list[dict[str, Any]]:
    """Per student architecture: each confirmed arm's interval and, against the baseline arm of the
    same student, the paired difference; retention and FLOPs ratio against the arm's teacher."""
    by_student: dict[str, dict[str, dict]] = {}
    for r in confirmed:
        score = (r.test or {}).get(metric) if r.error is None else None
        if score is None:
            continue
        arm = by_student.setdefault(r.student, {}).setdefault(r.label, {"run": r, "scores": {}})
        arm["scores"][r.seed] = float(score)
    out = []
    for student, arms in by_student.items():
        base_label = next((k for k, a in arms.items() if a["run"].method == "baseline"), None)
        base = arms[base_label]["scores"] if base_label else None
        rows, baseline = [], None
        for label, a in arms.items():
            iv = mean_interval(list(a["scores"].values()), level)
            if label == base_label:
                baseline = {"label": label, "interval": iv.to_dict(), "scores": a["scores"]}
                continue
            run = a["run"]
            row = {"label": label, "method": run.method, "teacher": run.teacher, "interval": iv.to_dict(),
                   "scores": a["scores"], "diff": None, "retention": None, "flops_ratio": None}
            if base and set(base) & set(a["scores"]):
                row["diff"] = asdict(paired_difference(a["scores"], base, level))
            t = teachers.get(run.teacher or "")
            if t and t.get("test"):
                row["retention"] = iv.mean / t["test"]
            flops = _flops(run.run_dir)
            if t and t.get("flops") and flops:
                row["flops_ratio"] = flops / t["flops"]
            rows.append(row)
        n = {tuned.get(f"{k}/{student}") for k in arms}
        out.append({"student": student, "baseline": baseline, "arms": rows,
                    "trials_per_arm": n.pop() if len(n) == 1 else None})
    return out
