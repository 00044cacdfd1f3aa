"""The console script's shared error handling (``captum_faithful._cli``)."""

import argparse

import pytest

from captum_faithful._cli import UsageError, run_command
from captum_faithful.cli import build_parser, main


def _raise(exception):
    def func(args):
        raise exception

    return func


@pytest.mark.parametrize(
    "exception, code, line",
    [
        (
            UsageError("argument --x: bad\nvalue"),
            2,
            "prog: error: argument --x: bad value",
        ),
        (
            ValueError("deep\n  inside"),
            1,
            "prog: error: ValueError: deep inside (run again with --debug for the "
            "traceback)",
        ),
        (KeyboardInterrupt(), 130, "prog: interrupted"),
    ],
)
def test_run_command_reports_in_one_line(exception, code, line, capsys):
    args = argparse.Namespace(debug=False)
    assert run_command(_raise(exception), args, "prog") == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err == line + "\n"


def test_run_command_with_debug_prints_the_traceback_first(capsys):
    args = argparse.Namespace(debug=True)
    assert run_command(_raise(ValueError("broken")), args, "prog") == 1
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert "ValueError: broken" in err
    assert err[-1] == "prog: error: ValueError: broken"


def test_run_command_returns_the_status_of_the_command():
    args = argparse.Namespace(debug=False)
    assert run_command(lambda a: None, args, "prog") == 0
    assert run_command(lambda a: 3, args, "prog") == 3


def test_every_subcommand_takes_debug():
    parser, commands = build_parser()
    for command in commands:
        required = ["config.yaml"] if command == "evaluate" else []
        assert parser.parse_args([command, *required, "--debug"]).debug


def test_unknown_subcommand_option_at_the_top_is_one_line(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["--frobnicate"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.splitlines()
    assert err == [
        "captum-faithful: error: unrecognized arguments: --frobnicate "
        "(see captum-faithful --help)"
    ]
