"""``python -m raykd.data {synth,ingest,inspect}``: make, ingest and look at datasets."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from raykd.cli import HelpFormatter
from raykd.config import ConfigError
from raykd.console import configure
from raykd.data.ingest import ingest
from raykd.data.inspect import contact_sheet
from raykd.data.manifest import Manifest
from raykd.data.synthetic import make_synthetic
from raykd.data.writer import IngestError, summary

PROG = "python -m raykd.data"


def _fractions(args: argparse.Namespace) -> dict[str, float]:
    fr = {"train": args.train, "val": args.val, "test": args.test}
    total = sum(fr.values())
    if abs(total - 1.0) > 1e-6 or min(fr.values()) < 0:
        raise ConfigError(f"--train/--val/--test must be >= 0 and sum to 1, got {total:g}")
    return fr


def _add_split_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", type=float, default=0.7, help="train fraction")
    p.add_argument("--val", type=float, default=0.15, help="validation fraction")
    p.add_argument("--test", type=float, default=0.15, help="test fraction")
    p.add_argument("--split-seed", type=int, default=42, help="seed of the lesion-grouped split")
    p.add_argument("--shard-mb", type=float, default=64.0, help="target Parquet shard size in MB")
    p.add_argument("--overwrite", action="store_true", help="replace a dataset already in --out")


def main(argv: list[str] | None = None, *, prog: str = PROG) -> int:
    parser = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)

    def add_parser(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, description=help, formatter_class=HelpFormatter)

    s = add_parser("synth", help="generate the synthetic ISIC-2019-like dataset")
    s.add_argument("--out", required=True, type=Path, help="folder to write the dataset to")
    s.add_argument("--num-images", type=int, default=2000, help="number of images")
    s.add_argument("--image-size", type=int, default=128, help="image side in pixels")
    s.add_argument("--seed", type=int, default=0, help="seed of the generator")
    s.add_argument("--atypical", type=float, default=0.22,
                   help="chance that a lesion's cue group comes from a look-alike class (default: 0.22)")
    _add_split_args(s)

    g = add_parser("ingest", help="ingest a dataset in its publisher's layout")
    g.add_argument("--format", required=True, choices=["isic2019", "ham10000", "pad_ufes_20", "folder"],
                   help="the publisher's layout of --src")
    g.add_argument("--src", required=True, type=Path, help="the dataset as downloaded")
    g.add_argument("--out", required=True, type=Path, help="folder to write the dataset to")
    g.add_argument("--malignant", default=None,
                   help="comma-separated label names counted malignant (default: the format's own list)")
    g.add_argument("--binary", action="store_true",
                   help="write the benign-vs-malignant task: the --malignant classes become 'malignant', "
                        "the others 'benign'")
    _add_split_args(g)

    i = add_parser("inspect", help="class counts per split and a contact sheet of samples")
    i.add_argument("path", type=Path, help="dataset folder")
    i.add_argument("--sheet", type=Path, default=None, help="PNG path (default: PATH/contact_sheet.png)")
    i.add_argument("--per-class", type=int, default=6, help="images per class on the contact sheet")

    args = parser.parse_args(argv)
    configure()
    try:
        return _run(args)
    except (ConfigError, IngestError, FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def _run(args: argparse.Namespace) -> int:
    if args.cmd == "synth":
        t0 = time.perf_counter()
        manifest = make_synthetic(
            args.out, num_images=args.num_images, image_size=args.image_size, seed=args.seed,
            atypical=args.atypical, fractions=_fractions(args), split_seed=args.split_seed, shard_mb=args.shard_mb,
            overwrite=args.overwrite,
        )
        print(summary(manifest))
        print(f"wrote {len(manifest.shards)} shard(s) to {args.out} in {time.perf_counter() - t0:.1f} s")
        return 0
    if args.cmd == "ingest":
        t0 = time.perf_counter()
        manifest = ingest(
            args.format, args.src, args.out, fractions=_fractions(args), split_seed=args.split_seed,
            shard_mb=args.shard_mb, overwrite=args.overwrite,
            malignant=args.malignant.split(",") if args.malignant else None, binary=args.binary,
        )
        print(summary(manifest))
        print(f"wrote {len(manifest.shards)} shard(s) to {args.out} in {time.perf_counter() - t0:.1f} s")
        return 0
    if args.cmd == "inspect":
        manifest = Manifest.load(args.path)
        print(summary(manifest))
        sheet = contact_sheet(args.path, args.sheet or args.path / "contact_sheet.png", per_class=args.per_class)
        print(f"contact sheet: {sheet}")
        return 0
    raise AssertionError(args.cmd)


if __name__ == "__main__":
    sys.exit(main())
