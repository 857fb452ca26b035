"""``python -m raykd.export --model RUN_DIR [--fp16] [--int8] [--data DIR]``.

Exports the run's best model to ONNX next to it, checks ONNX Runtime against torch on real
validation images (fails above ``--tolerance``), and with ``--fp16`` / ``--int8`` writes and
measures the smaller variants. Before the ONNX file is written, fits a temperature and the
cancer-vs-benign threshold on the validation split (``--no-calibrate`` skips both). Prints a table
and writes ``export_report.json``, ``reliability.png`` and the model card (``model_card.json``/``.md``).
"""

from __future__ import annotations

import argparse
import logging
import sys

from raykd.cli import HelpFormatter
from raykd.export.calibrate import DEFAULT_TARGET_SENSITIVITY
from raykd.export.onnx import ExportError
from raykd.export.run import DEFAULT_TOLERANCE, ParityError, run_export

PROG = "python -m raykd.export"


def parse_args(argv: list[str] | None = None, *, prog: str = PROG) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog=prog, description=__doc__.split("\n\n")[1],
                                formatter_class=HelpFormatter)
    p.add_argument("--model", "--checkpoint", dest="model", required=True, metavar="PATH",
                   help="run folder (with best/) or artifact folder, as raykd serve --model takes it")
    p.add_argument("--data", default=None,
                   help="dataset folder (default: the dataset the model was trained on)")
    p.add_argument("--out", default=None, help="output folder (default: the artifact folder)")
    p.add_argument("--split", default="val", help="split for the parity check and BMA (default: val)")
    p.add_argument("--fp16", action="store_true", help="also write and measure a float16 model")
    p.add_argument("--int8", action="store_true",
                   help="also write and measure an int8 dynamically quantised model")
    p.add_argument("--tolerance", type=float, default=DEFAULT_TOLERANCE,
                   help="max |p_onnx - p_torch| allowed")
    p.add_argument("--max-images", type=int, default=None,
                   help="use only the first N images of the split (default: all)")
    p.add_argument("--batch-size", type=int, default=32, help="images per forward pass")
    p.add_argument("--opset", type=int, default=17, help="ONNX opset")
    p.add_argument("--no-calibrate", dest="calibrate", action="store_false",
                   help="keep the model's temperature and decision as they are (default: fit both on val)")
    p.add_argument("--target-sensitivity", type=float, default=DEFAULT_TARGET_SENSITIVITY,
                   help="validation sensitivity the cancer-vs-benign threshold must reach, in (0, 1]")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_args(argv, prog=prog)
    try:
        report = run_export(
            args.model, data=args.data, out=args.out, split=args.split, fp16=args.fp16,
            int8=args.int8, tolerance=args.tolerance, max_images=args.max_images,
            batch_size=args.batch_size, opset=args.opset, calibrate=args.calibrate,
            target_sensitivity=args.target_sensitivity,
        )
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
