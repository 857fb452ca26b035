"""Does distillation beat training alone? Each method against the baseline student, over seeds.

For a teacher/student pair and a list of methods, this trains the teacher once, then for every
seed the baseline student (the same architecture trained alone) and the student distilled by each
method, all on the same data, with the same budget (epochs, batch size, optimiser) and the same
seed, through the same training loop as every raykd run (``raykd.train.driver.run_train`` on the
in-process executor: no cluster needed). Each run keeps its best validation epoch; its test BMA is
scored once with it. Per method it prints the test BMA mean +- sd over seeds, the gain over the
baseline, and the paired comparison over seeds (mean difference +- sd, wins, paired t-test p).

Two pairs, as in the papers:

* ``cnn``: ``test_resnet`` -> ``raykd_test_hierattn`` (the CNN-teacher methods: SSD-KD's BLKD (kd),
  RKD, CRKD, FitNet, their combination, SSKD and SSD-KD, and DKD);
* ``vit``: an FCViT (64 wide, 4 blocks) -> its first 2 blocks (SkinDistilViT's cut student:
  skindistilvit, fcvit_probs on the student alone, and the cascade 4 -> 3 -> 2 blocks). The
  baseline is the same cut student trained alone.

    python bench/kd_gain.py --pair cnn --seeds 3          # about 30 minutes on 2 CPUs
    python bench/kd_gain.py --pair vit --seeds 3
    python bench/kd_gain.py --pair cnn --methods kd,dkd --seeds 5 --epochs 30
    python bench/kd_gain.py --pair cnn --methods kd,dkd --teacher-outputs 8   # + each from teacher outputs

Each student's best model is also calibrated as the export calibrates it (``raykd.export``: a
temperature fitted on the validation logits); its test ECE (15 bins) before and after goes into the
table and ``kd_gain.json``, so a method that distils sharper, over-confident students shows it.

With ``--teacher-outputs K`` every method that can read saved teacher outputs
(``raykd.train.teacher_outputs``: on K augmented views of every training image, built once after the
teacher) also runs from them, as ``<method>+outputs``, next to the same method with the teacher online.

The defaults are the default search's: the same data (2,000 images, atypical 0.1), teacher budget
(cosine, lr 1e-3, at most 40 epochs, patience 10) and student budget (15 epochs, lr 3e-3).

Any ingested dataset and any models (real images, a pretrained teacher):

    python bench/kd_gain.py --pair cnn --data data/ham10000-dev --methods kd,dkd --seeds 5 \
        --teacher-set student.name=tf_efficientnet_lite0 \
        --teacher-set student.pretrained_file=../shared/weights/tf_efficientnet_lite0.in1k.safetensors \
        --teacher-set student.image_size=112 --teacher-epochs 4 \
        --student-set student.name=mobilenetv3_small_050 --student-set student.image_size=112 \
        --epochs 10 --teacher-outputs 3 --outputs-only

Statistics (:mod:`raykd.metrics.compare`): per arm the mean test BMA over seeds with its 95 %
Student-t interval; per method the paired difference against the baseline seed by seed (same
initial student weights, data order and augmentations for every arm of a seed) with its 95 % t
interval over seeds, the wins and the paired t-test p; the retention (mean test BMA / the teacher's
test BMA) and the FLOPs ratio (student / teacher, one image, torch's FLOP counter).

Every run's folder is named after its role, its seed and a digest of its whole resolved config
(``kd-s0-3f9a1c02de``): a rerun with other epochs, lr, data or teacher trains anew, and a rerun with
the same reuses the finished runs.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

from raykd.metrics.compare import mean_interval, paired_difference

PAIRS = {
    "cnn": {
        "teacher": {"name": "test_resnet", "image_size": 32},
        "student": {"name": "raykd_test_hierattn", "image_size": 32},
        "methods": ["kd", "dkd", "rkd", "crkd", "fitnet", "dkd_combo", "sskd", "ssdkd"],
    },
    "vit": {
        "teacher": {"name": "raykd_test_fcvit", "image_size": 32,
                    "kwargs": {"embed_dim": 64, "patch_size": 4, "num_heads": 4}},
        "student": {"cut_blocks": [0, 1], "image_size": 32},
        "methods": ["skindistilvit", "fcvit_probs", "cascade"],
    },
}


@dataclass
class Outcome:
    method: str
    seed: int
    val: float
    test: float
    seconds: float
    #: Test ECE (15 bins) of the best model before / after temperature scaling fitted on val.
    ece_before: float | None = None
    ece_after: float | None = None
    temperature: float | None = None
    #: FLOPs of one forward pass of the student at its image size.
    flops: float | None = None


def calibration(run_dir: Path, data: Path, *, batch_size: int = 256) -> dict[str, float]:
    """Test ECE of a run's best model before and after a temperature fitted on its validation logits.

    The model is scored with the serving predictor (``TorchPredictor``, the evaluation transform)
    exactly as ``raykd.export`` scores it; nothing is written to the run folder.
    """
    from raykd.artifact.format import load_artifact
    from raykd.artifact.predict import TorchPredictor
    from raykd.export.calibrate import CalibrationScores, fit_temperature
    from raykd.export.run import score_split

    model, meta = load_artifact(run_dir)
    predictor = TorchPredictor(model, meta, device="cpu")
    val = score_split(predictor, data, "val", batch_size=batch_size)
    test = score_split(predictor, data, "test", batch_size=batch_size)
    t = fit_temperature(val.logits, val.labels)
    scores = CalibrationScores.of(test.logits, test.labels, t)
    return {"temperature": t, "ece_before": scores.ece_before, "ece_after": scores.ece_after}


def _sets(d: dict, prefix: str) -> list[str]:
    out = []
    for k, v in d.items():
        if isinstance(v, dict):
            out += _sets(v, f"{prefix}{k}.")
        elif isinstance(v, list):
            out.append(f"{prefix}{k}=[{', '.join(map(str, v))}]")
        else:
            out.append(f"{prefix}{k}={v}")
    return out


def run_key(cfg) -> str:
    """A digest of the whole resolved run config except its name and folder: two runs share a
    folder only when they would train the same thing."""
    from raykd.config import to_dict

    doc = {k: v for k, v in to_dict(cfg).items() if k not in ("name", "output_dir")}
    return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()[:10]


def _train(name: str, sets: list[str], out: Path) -> tuple[float, float, float, Path]:
    """Train (or reuse) run ``<name>-<config digest>``; returns val, test, seconds and its folder."""
    from raykd.config import RunConfig, load_config
    from raykd.train.driver import run_train

    cfg = load_config(RunConfig, None, [*sets, f"name={name}", f"output_dir={out}"])
    cfg = load_config(RunConfig, None, [*sets, f"name={name}-{run_key(cfg)}", f"output_dir={out}"])
    run_dir = out / cfg.name
    t0 = time.perf_counter()
    if (run_dir / "summary.json").is_file():  # a rerun of the bench reuses finished runs
        s = json.loads((run_dir / "summary.json").read_text())
        return s["best"], s["test"]["bma"], 0.0, run_dir
    r = run_train(cfg, in_process=True, resume=True)
    return r.best, r.test["bma"], time.perf_counter() - t0, run_dir


def _model_name(run_dir: Path) -> str:
    """The model a run trained (its saved artifact's name)."""
    from raykd.artifact.format import read_meta

    return read_meta(run_dir).model_name


def flops_of(run_dir: Path) -> float:
    """FLOPs of one image through the best model of a run, at the image size it was trained at."""
    from raykd.artifact.measure import artifact_flops

    return artifact_flops(run_dir)


def _cascade(name: str, base: list[str], teacher_dir: Path, depth: int, stop: int, out: Path) -> tuple:
    """SkinDistilViT's cascade: cut one block at a time, each step distilled from the step above.

    Returns the last step's val, test, seconds and folder."""
    parent, total = teacher_dir, 0.0
    for k in range(depth - 1, stop - 1, -1):
        sets = [*base, "distill.method=cascade", f"teacher.checkpoint={parent}",
                f"student.cut_blocks=[{', '.join(map(str, range(k)))}]"]
        val, test, s, parent = _train(f"{name}-d{k}", sets, out)
        total += s
    return val, test, total, parent


def _teacher_outputs(student: list[str], teacher_dir: Path, methods: list[str],
                     views: int) -> tuple[Path, list[str]]:
    """The teacher outputs on ``views`` views in the student's contract, and the methods that read them."""
    from raykd.config import RunConfig, load_config
    from raykd.data.manifest import Manifest
    from raykd.train.build import build_run
    from raykd.train.teacher_outputs import build_outputs, outputs_key

    readers, spec = [], None
    for method in methods:
        cfg = load_config(RunConfig, None, [*student, f"teacher.checkpoint={teacher_dir}", f"distill.method={method}"])
        parts = build_run(cfg, Manifest.load(cfg.data.path), probe=True)
        spec = parts.preprocess
        if parts.method.saved_outputs() is not None:
            readers.append(method)
    t0 = time.perf_counter()
    key = outputs_key(cfg.data.path, teacher_dir, cfg.train.recipe, spec, views=views, seed=0)
    path = build_outputs(cfg.data.path, teacher_dir, key, cpus_per_actor=1)
    print(f"teacher outputs: {views} views per image, {time.perf_counter() - t0:.0f} s, read by {', '.join(readers)}",
          flush=True)
    return path, readers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=sorted(PAIRS), default="cnn", help="teacher/student pair (default: cnn)")
    p.add_argument("--methods", default=None, help="comma-separated methods (default: the pair's list)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per method, at least 3 (default: 3)")
    p.add_argument("--epochs", type=int, default=15, help="epochs of every student run (default: 15)")
    p.add_argument("--teacher-epochs", type=int, default=40, help="teacher ceiling, early-stopped (default: 40)")
    p.add_argument("--data", default=None, metavar="DIR",
                   help="an ingested dataset (python -m raykd.data ingest ...); default: a generated one")
    p.add_argument("--images", type=int, default=2000, help="generated images (default: 2000)")
    p.add_argument("--atypical", type=float, default=0.1,
                   help="share of cue groups borrowed from a look-alike class (default: 0.1, as the default job)")
    p.add_argument("--lr", type=float, default=3e-3, help="student learning rate (default: 3e-3)")
    p.add_argument("--teacher-lr", type=float, default=1e-3, help="teacher learning rate (default: 1e-3)")
    p.add_argument("--teacher-set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override of the teacher's run, e.g. student.name=tf_efficientnet_lite0 (repeatable)")
    p.add_argument("--student-set", action="append", default=[], metavar="KEY=VALUE",
                   help="run-config override of every student run, e.g. student.image_size=112 (repeatable)")
    p.add_argument("--param", action="append", default=[], metavar="METHOD.KEY=VALUE",
                   help="a method parameter for every run of that method, e.g. dkd.warmup_epochs=2 (repeatable)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default: 2)")
    p.add_argument("--out", default="runs/bench-kd-gain", help="output folder (default: runs/bench-kd-gain)")
    p.add_argument("--teacher-outputs", type=int, default=None, metavar="K",
                   help="also run each method that can from teacher outputs saved on K views per image "
                        "(default: off)")
    p.add_argument("--outputs-only", action="store_true",
                   help="with --teacher-outputs: the methods that can read the teacher outputs run from them only")
    args = p.parse_args(argv)
    if args.seeds < 3:
        p.error("--seeds must be at least 3 for a paired comparison")
    if args.outputs_only and not args.teacher_outputs:
        p.error("--outputs-only needs --teacher-outputs K")
    logging.basicConfig(level=logging.WARNING)
    params: dict[str, list[str]] = {}
    for item in args.param:
        method, _, rest = item.partition(".")
        if not rest or "=" not in rest:
            p.error(f"--param {item!r}: expected METHOD.KEY=VALUE, e.g. dkd.warmup_epochs=2")
        params.setdefault(method, []).append(f"distill.params.{rest}")
    pair = PAIRS[args.pair]
    methods = args.methods.split(",") if args.methods else pair["methods"]
    root = Path(args.out).resolve()
    out = root / args.pair
    if args.data:
        data = Path(args.data).resolve()
        if not (data / "manifest.json").is_file():
            p.error(f"--data {args.data}: no ingested dataset there (manifest.json missing)")
        data_sets = [f"data.path={data}", "data.generate_if_missing=false"]
        args.data_label = data.name
    else:
        data = root / f"data-{args.images}-a{args.atypical:g}"
        data_sets = [f"data.path={data}", f"data.synth.num_images={args.images}", "data.synth.image_size=32",
                     f"data.synth.atypical={args.atypical}"]
        args.data_label = f"{args.images} synthetic 32-px images (atypical {args.atypical:g})"
    common = [*data_sets, "scaling.num_workers=1", f"scaling.cpus_per_worker={args.threads}",
              "scaling.executor=local", "optim.weight_decay=1e-4", "train.batch_size=32", "train.eval_batch_size=256"]

    t0 = time.perf_counter()
    teacher_sets = [*common, *_sets(pair["teacher"], "student."), f"optim.lr={args.teacher_lr}",
                    "optim.schedule=cosine", "optim.early_stop_patience=10", f"train.epochs={args.teacher_epochs}",
                    *args.teacher_set]
    t_val, t_test, _, teacher_dir = _train("teacher", teacher_sets, out)
    teacher = {"val": t_val, "test": t_test, "flops": flops_of(teacher_dir), "run": teacher_dir.name,
               "model": _model_name(teacher_dir)}
    print(f"teacher {teacher_dir.name}: val bma {t_val:.4f}, test bma {t_test:.4f}, "
          f"{teacher['flops'] / 1e6:.1f} MFLOPs ({time.perf_counter() - t0:.0f} s)", flush=True)

    student = [*common, *_sets(pair["student"], "student."), f"optim.lr={args.lr}", "optim.schedule=cosine",
               f"train.epochs={args.epochs}", *args.student_set]
    if "cut_blocks" in pair["student"]:  # a cut ViT: its blocks come from the trained teacher
        student.append(f"teacher.checkpoint={teacher_dir}")
    depth = len(pair["student"].get("cut_blocks", []))
    saved = (_teacher_outputs(student, teacher_dir, methods, args.teacher_outputs) if args.teacher_outputs
             else None)
    online = [m for m in methods if not (args.outputs_only and saved and m in saved[1])]
    runs = ["baseline", *online] + ([f"{m}+outputs" for m in saved[1]] if saved else [])
    results: list[Outcome] = []
    for seed in range(args.seeds):
        for method in runs:
            name = f"{method}-s{seed}"
            sets = [*student, f"train.seed={seed}", f"data.sampling.seed={seed}",
                    *params.get(method.removesuffix("+outputs"), [])]
            if method.endswith("+outputs"):
                sets += [f"teacher.checkpoint={teacher_dir}", f"distill.teacher_outputs={saved[0]}"]
                val, test, secs, run_dir = _train(name, [*sets, f"distill.method={method.removesuffix('+outputs')}"],
                                                  out)
            elif method == "cascade":
                val, test, secs, run_dir = _cascade(name, sets, teacher_dir, 4, depth, out)
            else:
                if method not in ("baseline", "fcvit_probs"):
                    sets.append(f"teacher.checkpoint={teacher_dir}")
                val, test, secs, run_dir = _train(name, [*sets, f"distill.method={method}"], out)
            cal = calibration(run_dir, data)
            results.append(Outcome(method, seed, val, test, secs, cal["ece_before"], cal["ece_after"],
                                   cal["temperature"], flops_of(run_dir)))
            print(f"  seed {seed} {method:14s} val bma {val:.4f}  test bma {test:.4f}  test ECE "
                  f"{cal['ece_before']:.4f} -> {cal['ece_after']:.4f} (T {cal['temperature']:.2f})  ({secs:.0f} s)",
                  flush=True)

    args.student_model = _model_name(run_dir) if results else None
    print(table(results, args, pair, teacher))
    (out / "kd_gain.json").write_text(json.dumps({"teacher": teacher, "args": {k: v for k, v in vars(args).items()},
                                                  "runs": [r.__dict__ for r in results]}, indent=2, default=str))
    print(f"total {time.perf_counter() - t0:.0f} s; runs in {out}")
    return 0


def table(results: list[Outcome], args, pair, teacher: dict | None = None) -> str:
    """The Markdown table: per arm the mean test BMA [95 % t interval over seeds]; per method the
    paired difference against the baseline [its 95 % t interval], wins, the paired t-test p, the
    retention of the teacher's test BMA and the FLOPs ratio; the mean test ECE before -> after."""
    base = {r.seed: r.test for r in results if r.method == "baseline"}
    student = getattr(args, "student_model", None) or pair["student"].get("name", "cut ViT")
    t_name = (teacher or {}).get("model") or pair["teacher"]["name"]
    head = (f"\nkd_gain: pair {args.pair} ({t_name} -> {student}), {args.data_label}, "
            f"{args.epochs} epochs, seeds {args.seeds}; test BMA, 95 % intervals: Student t over seeds "
            "(the paired difference: per seed, method - baseline); test ECE (15 bins) before -> after a "
            "temperature fitted on val, mean over seeds")
    if teacher:
        head += f"; teacher {teacher['run']} test BMA {teacher['test']:.4f}"
    lines = [head,
             ("| arm | test BMA mean [95 % CI] | paired diff vs baseline [95 % CI] | wins | paired t p "
              "| retention | FLOPs ratio | test ECE before -> after |"),
             "|---|---|---|---|---|---|---|---|"]
    for m in dict.fromkeys(r.method for r in results):
        runs = [r for r in results if r.method == m]
        vals = {r.seed: r.test for r in runs}
        arm = mean_interval(list(vals.values()))
        keep = f"{arm.mean / teacher['test']:.2f}" if teacher and teacher.get("test") else "-"
        flops = [r.flops for r in runs if r.flops]
        ratio = f"1/{teacher['flops'] / statistics.mean(flops):.1f}" if teacher and flops else "-"
        ece = ece_cell(runs)
        if m == "baseline":
            lines.append(f"| baseline | {arm.plain()} | - | - | - | {keep} | {ratio} | {ece} |")
            continue
        d = paired_difference(vals, base)
        p = f"{d.p_value:.3f}" if d.p_value is not None else "-"
        lines.append(f"| {m} | {arm.plain()} | {d.points()} | {d.wins}/{d.n} | {p} | {keep} | {ratio} | {ece} |")
    return "\n".join(lines)


def ece_cell(runs: list[Outcome]) -> str:
    """``before -> after`` test ECE, each the mean over the runs that have it."""
    before = [r.ece_before for r in runs if r.ece_before is not None]
    after = [r.ece_after for r in runs if r.ece_after is not None]
    if not before or not after:
        return "-"
    return f"{statistics.mean(before):.4f} -> {statistics.mean(after):.4f}"


if __name__ == "__main__":
    raise SystemExit(main())
