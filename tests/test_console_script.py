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


def _usage_error(argv, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    return captured.err.splitlines()


def test_an_option_without_a_subcommand_is_a_usage_error(capsys, monkeypatch):
    """``captum-faithful --methods uni`` (the subcommand forgotten) must not start
    the demo: options belong to a subcommand."""
    ran = []
    monkeypatch.setattr("captum_faithful.demo.cli.main", lambda args: ran.append(1))
    err = _usage_error(["--methods", "uni"], capsys)
    assert ran == []
    assert err == [
        "captum-faithful: error: --methods needs a subcommand: options belong to "
        "one of demo, evaluate (e.g. captum-faithful demo --methods); with no "
        "arguments at all captum-faithful runs demo (see captum-faithful --help)"
    ]


@pytest.mark.parametrize(
    "word, hint",
    [
        ("evalute", "; did you mean 'evaluate'?"),
        ("dmeo", "; did you mean 'demo'?"),
        ("xyzzy", ""),
    ],
)
def test_a_mistyped_subcommand_names_the_choices_and_the_closest(word, hint, capsys):
    err = _usage_error([word, "cfg.py"], capsys)
    assert err == [
        f"captum-faithful: error: argument COMMAND: invalid choice: {word!r} "
        f"(choose from demo, evaluate){hint} (see captum-faithful --help)"
    ]


def test_no_arguments_run_the_default_job(monkeypatch):
    seen = []
    monkeypatch.setattr(
        "captum_faithful.cli.run_command",
        lambda func, args, prog: seen.append((args.command, prog)) or 0,
    )
    assert main([]) == 0
    assert seen == [("demo", "captum-faithful demo")]
