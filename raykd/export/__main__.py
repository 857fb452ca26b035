"""``python -m raykd.export --model RUN_DIR [--fp16] [--int8] [--data DIR]``.

Exports the run's best model to ONNX next to it, checks ONNX Runtime against torch on real
validation images (fails above ``--tolerance``), and with ``--fp16`` / ``--int8`` writes and
measures the smaller variants. Before the ONNX file is written, fits a temperature and the
cancer-vs-benign threshold on the validation split (``--no-calibrate`` skips both). Prints a table
and writes ``export_report.json``, ``reliability.png`` and the model card (``model_card.json``/``.md``).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import typing

from raykd.cli import HelpFormatter
from raykd.console import configure
from raykd.export.onnx import ExportError
from raykd.export.options import ExportConfig
from raykd.export.run import ParityError, run_export

PROG = "python -m raykd.export"

#: The :class:`ExportConfig` fields that are flags, in the order ``--help`` lists them
#: (``latency_reps`` is set by a search space only).
FLAGS = ("split", "fp16", "int8", "tolerance", "max_images", "batch_size", "opset", "calibrate",
         "target_sensitivity")


def _add_option(p: argparse.ArgumentParser, f: dataclasses.Field, tp: type) -> None:
    """One :class:`ExportConfig` field as a flag: ``--name-with-dashes``, its type, default and help;
    a boolean off by default is ``--name``, one on by default is ``--no-name``."""
    flag, help_ = "--" + f.name.replace("_", "-"), f.metadata["help"]
    if tp is bool:
        if f.default:
            p.add_argument("--no-" + flag[2:], dest=f.name, action="store_false",
                           help=f.metadata.get("off_help", f"do not {help_}"))
        else:
            p.add_argument(flag, action="store_true", help=help_)
        return
    inner = [a for a in typing.get_args(tp) if a is not type(None)]  # ``int | None`` -> int
    p.add_argument(flag, type=inner[0] if inner else tp, default=f.default, help=help_)


def parse_args(argv: list[str] | None = None, *, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", "--checkpoint", dest="model", required=True, metavar="PATH",
                   help="run folder (with best/) or artifact folder, as raykd serve --model takes it")
    p.add_argument("--data", default=None,
                   help="dataset folder (default: the dataset the model was trained on)")
    p.add_argument("--out", default=None, help="output folder (default: the artifact folder)")
    fields, hints = {f.name: f for f in dataclasses.fields(ExportConfig)}, typing.get_type_hints(ExportConfig)
    for name in FLAGS:
        _add_option(p, fields[name], hints[name])
    return p.parse_args(argv)


def export_config(args: argparse.Namespace) -> ExportConfig:
    """The :class:`ExportConfig` the parsed flags give (every other field at its default)."""
    return ExportConfig(**{name: getattr(args, name) for name in FLAGS})


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    configure()
    args = parse_args(argv, prog=prog)
    try:
        report = run_export(export_config(args), args.model, data=args.data, out=args.out)
    except (FileNotFoundError, ValueError) as exc:  # a wrong folder, file or option: the user's to fix
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except (ParityError, ExportError) as exc:  # the export itself failed its check
        logging.getLogger("raykd.export").error("%s", exc)
        return 1
    print(report.table())
    for v in report.variants:
        print(f"{v.name}: {v.path}")
    if report.card:
        print(f"model card: {report.card}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
