"""The ``captum-faithful`` console script.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``;
the parser it adds sets ``func(args) -> int``. With no subcommand the default job
(``demo``) runs. Every subcommand takes ``--debug``; errors are reported as described
in :mod:`captum_faithful._cli` (status 2 for a usage error, one line on stderr).
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Sequence

from captum_faithful._cli import USAGE_ERROR, ArgumentParser, run_command

PROG = "captum-faithful"

# Modules that provide a subcommand; the first is the default job.
SUBCOMMAND_MODULES: tuple[str, ...] = (
    "captum_faithful.demo.cli",
    "captum_faithful.evaluation.cli",
)


def build_parser() -> tuple[argparse.ArgumentParser, list[str]]:
    """The parser and the names of its subcommands, the default job first."""
    parser = ArgumentParser(
        prog=PROG,
        description=(
            "Faithful attributions for Captum: explain, score, report. Without a "
            "subcommand, runs `demo`."
        ),
    )
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for module in SUBCOMMAND_MODULES:
        importlib.import_module(module).add_parser(subparsers)
    for subparser in subparsers.choices.values():
        subparser.add_argument(
            "--debug",
            action="store_true",
            help="on an error, print the Python traceback too",
        )
    return parser, list(subparsers.choices)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser, commands = build_parser()
    if commands and (not argv or argv[0] not in (*commands, "-h", "--help")):
        argv = [commands[0], *argv]
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return USAGE_ERROR
    return run_command(args.func, args, f"{PROG} {args.command}")


if __name__ == "__main__":
    sys.exit(main())
