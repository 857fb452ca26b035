"""``raykd COMMAND ...`` (or ``python -m raykd COMMAND ...``): one entry point for the raykd programs.

``raykd train --config FILE`` is ``python -m raykd.train --config FILE``, and so on for every
command: the dispatcher only picks the program and hands it the remaining arguments. A program is
imported only once its command is chosen, so ``raykd --help`` stays fast (no torch, no Ray).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence
from importlib.metadata import PackageNotFoundError
from importlib.metadata import version as dist_version

import raykd
from raykd.registry import Registry

__all__ = ["COMMANDS", "main", "version"]

#: Command -> (module whose ``main(argv, prog=...)`` runs it, one line for ``raykd --help``).
COMMANDS: dict[str, tuple[str, str]] = {
    "data": ("raykd.data.__main__", "make, ingest and inspect datasets (synth, ingest, inspect)"),
    "train": ("raykd.train.__main__", "one training run: a teacher, a baseline or a distilled student"),
    "tune": ("raykd.tune.__main__", "the main job: train teachers, search methods, leaderboard, export"),
    "export": ("raykd.export.__main__", "export a run's best model to ONNX (parity-checked; fp16, int8)"),
    "evaluate": ("raykd.evaluate", "score a saved model on any dataset, an external test set included"),
    "serve": ("raykd.serve.__main__", "serve a model family over HTTP with Ray Serve"),
}


def version() -> str:
    """The installed distribution's version, else the package's ``__version__``."""
    try:
        return dist_version("raykd")
    except PackageNotFoundError:
        return getattr(raykd, "__version__", "unknown")


class _VersionAction(argparse.Action):
    """``--version``, looked up only when asked for (importlib.metadata is not free)."""

    def __init__(self, option_strings: Sequence[str], dest: str = argparse.SUPPRESS, **kwargs) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS,
                         help="print the raykd version and exit", **kwargs)

    def __call__(self, parser, namespace, values, option_string=None) -> None:
        print(f"{parser.prog} {version()}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    width = max(map(len, COMMANDS))
    listing = "\n".join(f"  {name:<{width}}  {line}" for name, (_, line) in COMMANDS.items())
    p = argparse.ArgumentParser(
        prog="raykd",
        description=__doc__.split("\n\n")[0].replace("``", ""),
        epilog=f"commands:\n{listing}\n\n`raykd COMMAND --help` shows a command's options; "
               "`raykd COMMAND ...` is the same as `python -m raykd.COMMAND ...`.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--version", action=_VersionAction)
    p.add_argument("command", metavar="COMMAND", help=f"one of: {', '.join(COMMANDS)}")
    p.add_argument("args", nargs=argparse.REMAINDER, metavar="...", help="the command's own arguments")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``raykd COMMAND ARGS...``; returns the command's exit code (2 for a usage error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not argv:
        parser.error(f"a command is required, one of: {', '.join(COMMANDS)}")
    if argv[0].startswith("-"):
        if argv[0] in ("-h", "--help", "--version"):
            parser.parse_args(argv[:1])  # prints the help or the version and exits 0
        parser.error(f"unrecognized option {argv[0]}: a command's options go after it (raykd COMMAND --help)")
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        known: Registry[str] = Registry("command")
        for command, (module, _) in COMMANDS.items():
            known.add(command, module)
        parser.error(known.unknown_message(name))
    module = importlib.import_module(COMMANDS[name][0])
    return module.main(rest, prog=f"raykd {name}")


if __name__ == "__main__":
    sys.exit(main())
