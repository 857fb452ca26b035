"""``python -m raykd.tune [--space FILE] [--config FILE] [--set key=value ...] [--resume]``.

The main job: train the teacher(s) of the space, search methods and hyperparameters with Ray Tune
+ Optuna + ASHA, then print the leaderboard and where the exported winner is. Runs on a local Ray
cluster, or unchanged on a running one (``$RAY_ADDRESS``, ``--address``, or ``ray job submit --
python -m raykd.tune``). Without arguments it runs ``search_spaces/default.yaml``.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from raykd.artifact.rundir import RunDir
from raykd.cli import HelpFormatter
from raykd.config import ConfigError
from raykd.console import configure
from raykd.storage import Mirror
from raykd.tune.search import prepare_search, run_tune
from raykd.tune.space_file import load_space
from raykd.tune.tracking import parse_tracking

DEFAULT_SPACE = "search_spaces/default.yaml"
PROG = "python -m raykd.tune"


def default_space() -> Path:
    """``search_spaces/default.yaml`` of the working directory, else of this checkout."""
    here = Path(DEFAULT_SPACE)
    if here.is_file():
        return here
    return Path(__file__).resolve().parents[2] / DEFAULT_SPACE


def parse_args(argv: list[str] | None = None, *, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--space", default=None, help=f"search-space YAML (default: {DEFAULT_SPACE})")
    p.add_argument("--config", default=None,
                   help="run-config YAML under the space's base: (default: none, the space's base: alone)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a key of the space, e.g. --set budget.num_samples=4 "
                        "--set base.train.epochs=2 --set output_dir=/mnt/runs (repeatable; default: none)")
    p.add_argument("--resume", action="store_true",
                   help="continue the interrupted experiment of the same name")
    p.add_argument("--verbose", action="store_true",
                   help="also print Ray's and Optuna's INFO lines and Tune's status tables (default: "
                        "raykd's progress and results only; everything is in <experiment>/raykd.log)")
    p.add_argument("--address", default=None,
                   help="Ray cluster address (default: $RAY_ADDRESS or a local cluster)")
    p.add_argument("--tracking", default=None, metavar="mlflow[:URI]|tensorboard|wandb",
                   help="track the trials through a Ray Tune logger callback: mlflow (a local store in "
                        "<experiment>/mlruns; mlflow:URI for a tracking server or database; the exports "
                        "go there too), tensorboard, or wandb (needs pip install wandb) (default: none)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = parse_args(argv, prog=prog)

    configure(verbose=args.verbose)  # raykd's lines on the console; Ray's detail in <experiment>/raykd.log

    overrides = list(args.overrides) + ([f"address={args.address}"] if args.address else [])
    try:
        tracking = parse_tracking(args.tracking)  # a bad value or a missing package: before Ray starts
        space = load_space(args.space or default_space(), overrides, base_config=args.config)

        space = prepare_search(space)  # the dataset, every method/student pair: before Ray starts
        outcome = run_tune(space, resume=args.resume, prepared=True, tracking=tracking, verbose=args.verbose)
    except (ConfigError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print()
    print(outcome.leaderboard.markdown())
    print()
    print(f"experiment: {outcome.experiment_dir}")
    if space.mirror_uri:
        print(f"stored at: {Mirror.of(space).uri_of(outcome.experiment_dir)} (the folder above is its local copy)")
    print(f"leaderboard: {outcome.experiment_dir / 'leaderboard.md'} (.csv, .json)")
    pub = outcome.published
    if pub is None:
        print("no trial finished: nothing exported")
        return 1
    m = outcome.leaderboard.metric
    w = pub.winner
    print(f"winner: {w.run} ({w.method}, {w.student}): val {m} {w.val.get(m, float('nan')):.4f}, "
          f"test {m} {w.test.get(m, float('nan')):.4f}, {w.latency_ms or float('nan'):.2f} ms/image on CPU")
    print(f"winner model: {RunDir(w.run_dir).best_dir}")
    onnx = pub.onnx.get(w.run) or "not exported: " + pub.export_errors.get(w.run, "export is off")
    print(f"winner ONNX: {onnx}")
    if len(pub.family) > 1:
        print("Pareto family: " + ", ".join(f"{r.run} ({m} {r.val.get(m, float('nan')):.4f}, "
                                            f"{r.latency_ms or float('nan'):.2f} ms)" for r in pub.family))
    print(f"family file (serve with raykd serve --family ...): {pub.family_files[-1]}")
    if outcome.findings is not None:
        print()
        print("findings:")
        for line in outcome.findings.lines():
            print(f"  {line}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
