"""The ``captum-faithful`` console script.

Each subcommand lives in its own module, which provides ``add_parser(subparsers)``;
the parser it adds sets ``func(args) -> int``. With no arguments at all the default
job (``demo``) runs; options without a subcommand, and a word that is no subcommand,
are usage errors (status 2) that name the subcommands and the closest match. Every
subcommand takes ``--debug``; errors are reported as described
in :mod:`captum_faithful._cli` (status 2 for a usage error, one line on stderr).
"""

from __future__ import annotations

import argparse
import difflib
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
            "Faithful attributions for Captum: explain, score, report. With no "
            "arguments at all, runs `demo`."
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
    if not argv:
        argv = [commands[0]]
    elif argv[0] not in (*commands, "-h", "--help"):
        parser.error(_not_a_command(argv[0], commands))
    args = parser.parse_args(argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return USAGE_ERROR
    return run_command(args.func, args, f"{PROG} {args.command}")


def _not_a_command(word: str, commands: list[str]) -> str:
    """The error for a first argument that is no subcommand."""
    choices = ", ".join(commands)
    if word.startswith("-"):
        return (
            f"{word} needs a subcommand: options belong to one of {choices} "
            f"(e.g. {PROG} {commands[0]} {word}); with no arguments at all "
            f"{PROG} runs {commands[0]}"
        )
    closest = difflib.get_close_matches(word, commands, n=1)
    hint = f"; did you mean {closest[0]!r}?" if closest else ""
    return f"argument COMMAND: invalid choice: {word!r} (choose from {choices}){hint}"


if __name__ == "__main__":
    sys.exit(main())
