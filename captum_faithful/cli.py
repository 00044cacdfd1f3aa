"""The ``captum-faithful`` console script.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``;
the parser it adds sets ``func(args) -> int``. With no subcommand the default job
(``demo``) runs.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

# Modules that provide a subcommand; the first is the default job.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "captum_faithful.demo.cli",
    "captum_faithful.evaluation.cli",
)


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser and the names of its subcommands, the default job first."""
    parser = argparse.ArgumentParser(
        prog="captum-faithful",
        description="Faithful attributions for Captum: explain, score, report.",
    )
    subparsers = parser.add_subparsers(dest="command")
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    return parser, list(subparsers.choices)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if commands and (not argv or argv[0] not in (*commands, "-h", "--help")):
        argv = [commands[0], *argv]
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
