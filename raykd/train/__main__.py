"""``python -m raykd.train --config FILE [--set key=value ...] [--resume]``: one training run."""

from __future__ import annotations

import argparse
import json
import sys

from raykd.artifact.rundir import RunDir
from raykd.cli import HelpFormatter
from raykd.config import ConfigError, RunConfig, load_config
from raykd.console import configure, log_to_file
from raykd.distill import METHODS
from raykd.distill.base import param_table
from raykd.storage import Mirror
from raykd.train.driver import resolve_outputs, run_train
from raykd.train.trainer import ClusterResourcesError

PROG = "python -m raykd.train"


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    p.add_argument("--config", default=None, help="YAML run config (default: the built-in tiny CPU run)")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set optim.lr=3e-4 (repeatable; default: none)")
    p.add_argument("--resume", action="store_true", help="continue the run of the same name from its last checkpoint")
    p.add_argument("--address", default=None, help="Ray cluster address (default: $RAY_ADDRESS or a local cluster)")
    p.add_argument("--verbose", action="store_true",
                   help="also print Ray's INFO lines (default: raykd's progress only; all of it in <run>/raykd.log)")
    p.add_argument("--list-methods", action="store_true", help="print every distillation method and its parameters")
    args = p.parse_args(argv)
    if args.list_methods:
        print(list_methods())
        return 0
    configure(verbose=args.verbose)

    try:
        cfg = load_config(RunConfig, args.config, args.overrides + ([f"address={args.address}"] if args.address else []))
        cfg = resolve_outputs(cfg)  # a URI output_dir: its local mirror
        log_to_file(RunDir.of(cfg).path)

        result = run_train(cfg, resume=args.resume)
    except (ConfigError, ValueError, FileExistsError, FileNotFoundError, ClusterResourcesError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2

    mirror = Mirror.of(cfg)
    stored = {"stored_at": mirror.uri_of(result.run_dir)} if mirror is not None else {}
    print(json.dumps({"run_dir": str(result.run_dir), **stored, "best": result.best, "best_epoch": result.best_epoch,
                      "epochs": result.epochs, "test_bma": result.test.get("bma")}, indent=2))
    return 0


def list_methods() -> str:
    """Every registered method with its tunable parameters, defaults and ranges or choices."""
    lines = []
    for name in METHODS.names():
        cls = METHODS.get(name)
        lines.append(f"{name}{'' if cls.needs_teacher else '  (no teacher)'}")
        for row in param_table(name):
            valid = f"range {list(row['range'])}" if row["range"] is not None else f"choices {row['choices']}"
            lines.append(f"    {row['name']:<22} default {row['default']!r:<8} {valid}  {row['help']}")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
