"""What the subcommands of the ``captum-faithful`` console script share.

Every mistake a user can make on the command line, or in a file it names, ends the
command with exit status 2 and one line on stderr that names the flag or argument to
fix (:class:`UsageError`, and :class:`ArgumentParser` for argparse's own errors). A
failure while the job runs ends it with status 1 and one line. ``--debug`` prints the
Python traceback before that line.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

import torch

from captum_faithful._utils import check_device_available

#: Exit status of a usage error (as argparse uses) and of a failure while running.
USAGE_ERROR = 2
RUN_FAILURE = 1


class UsageError(Exception):
    """A mistake in the command line or in a file it names (exit status 2).

    The message starts with the flag or argument to fix, e.g.
    ``"argument --out: ..."``, as argparse words its own errors.
    """


def one_line(text: object) -> str:
    """``text`` with every run of whitespace, newlines included, made one space."""
    return " ".join(str(text).split())


class ArgumentParser(argparse.ArgumentParser):
    """argparse, with its errors on one line instead of the usage block.

    Sub-parsers made with ``add_subparsers().add_parser`` are of this class too.
    """

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(
            USAGE_ERROR,
            f"{self.prog}: error: {one_line(message)} (see {self.prog} --help)\n",
        )


def run_command(
    func: Callable[[argparse.Namespace], int | None],
    args: argparse.Namespace,
    prog: str,
) -> int:
    """Call ``func(args)`` and turn an exception into an exit status and one line.

    :class:`UsageError` gives 2, any other exception 1 (with a hint to ``--debug``),
    Ctrl-C 130. With ``args.debug`` the traceback is printed first.
    """
    debug = bool(getattr(args, "debug", False))
    try:
        return int(func(args) or 0)
    except UsageError as err:
        if debug:
            traceback.print_exc()
        print(f"{prog}: error: {one_line(err)}", file=sys.stderr)
        return USAGE_ERROR
    except KeyboardInterrupt:
        if debug:
            traceback.print_exc()
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 - reported in one line, traceback with --debug
        if debug:
            traceback.print_exc()
            hint = ""
        else:
            hint = " (run again with --debug for the traceback)"
        print(
            f"{prog}: error: {type(err).__name__}: {one_line(err)}{hint}",
            file=sys.stderr,
        )
        return RUN_FAILURE


def positive_int(text: str) -> int:
    """argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """argparse type: an integer >= 0."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer, got {value}"
        )
    return value


def device(text: str) -> str:
    """argparse type: a torch device that exists here (``cpu``, ``cuda[:i]``, ``mps``)."""
    try:
        parsed = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; e.g. 'cpu' or 'cuda:0'"
        ) from None
    if parsed.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(
            f"unsupported device {text!r}; use 'cpu' or 'cuda[:i]'"
        )
    try:
        check_device_available("device", parsed)
    except ValueError as err:
        raise argparse.ArgumentTypeError(str(err)) from None
    return str(parsed)
