"""``python -m raykd.evaluate --model PATH --data DATASET [--split test|val|train|all] [--out DIR]``.

Scores a saved model (a run folder, an artifact folder or an exported .onnx file) on any ingested
dataset, one it was not trained on included; classes are matched by name. Writes every training
metric (BMA first), the cancer-vs-benign view, the per-class table, the ECE and bootstrap 95 %
intervals for BMA and AUROC to evaluation.json and evaluation.md, with the confusion-matrix and
ROC PNGs, and prints a summary.

Everything but the argument parsing is :func:`raykd.export.evaluate.run_evaluate`.
"""

from __future__ import annotations

import argparse
import sys

from raykd.cli import HelpFormatter
from raykd.console import configure

PROG = "python -m raykd.evaluate"


def parse_args(argv: list[str] | None = None, *, prog: str = PROG) -> argparse.Namespace:
    from raykd.export.evaluate import DEFAULT_RESAMPLES, DEFAULT_SEED, SPLITS  # lazy: imports torch

    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", required=True, metavar="PATH",
                   help="run folder (with best/), artifact folder or .onnx file, as raykd serve --model "
                        "takes it")
    p.add_argument("--data", required=True, metavar="DATASET",
                   help="dataset folder or URI with a manifest.json (made by raykd data ingest|synth)")
    p.add_argument("--split", default="test", choices=SPLITS,
                   help="split to score (all: every split together)")
    p.add_argument("--out", default=None, metavar="DIR",
                   help="output folder (default: MODEL/evaluate-<dataset name>-<split>/, beside an .onnx "
                        "file)")
    p.add_argument("--bootstrap", type=int, default=DEFAULT_RESAMPLES, metavar="N",
                   help="bootstrap resamples for the 95 %% intervals of BMA and AUROC (0: none)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="seed of the bootstrap")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                   help="torch device (an .onnx file runs on ONNX Runtime's CPU)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    args = parse_args(argv, prog=prog)
    configure()
    from raykd.export.evaluate import run_evaluate  # lazy: imports torch

    try:
        evaluation = run_evaluate(args.model, args.data, split=args.split, out=args.out,
                                  resamples=args.bootstrap, seed=args.seed, batch_size=args.batch_size,
                                  device=args.device)
    except (FileNotFoundError, ValueError) as exc:  # a wrong path, split or class list: the user's to fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(evaluation.summary())
    return 0


if __name__ == "__main__":
    sys.exit(main())
