import csv
import os

import pytest

from captum_faithful.cli import SUBCOMMAND_MODULES, build_parser, main
from captum_faithful.demo.job import METHODS, METRIC_INFO

PATH_METHODS = {key for key, method in METHODS.items() if method.path}
CNN_METHODS = {key for key, method in METHODS.items() if method.model == "cnn"}


def test_demo_is_the_default_job():
    assert SUBCOMMAND_MODULES[0] == "captum_faithful.demo.cli"
    parser, commands = build_parser()
    assert commands[0] == "demo"
    args = parser.parse_args(["demo", "--quick"])
    assert args.quick and args.func is not None
    assert set(args.methods) == set(METHODS)


@pytest.mark.slow  # trains the quick demo (once per session)
def test_quick_demo_end_to_end(quick_demo, tmp_path, capsys):
    out = tmp_path / "report"
    code = main(
        [
            "--quick",
            "--out",
            str(out),
            "--n-images",
            "4",
            "--batch-size",
            "4",
            "--no-progress",
        ]
    )
    assert code == 0
    printed = capsys.readouterr().out
    report = (out / "report.md").read_text()
    figure = (out / "attributions.png").read_bytes()
    assert figure[:8] == b"\x89PNG\r\n\x1a\n" and len(figure) > 10_000
    with open(out / "per_image.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    seen = {(row["method"], row["metric"]) for row in rows}
    for key, method in METHODS.items():
        assert method.label in report and method.label in printed
        expected = {
            "insertion",
            "deletion",
            "saco",
            "faithfulness_correlation",
            "localisation",
        }
        if key in PATH_METHODS:
            expected.add("path_monotonicity")
        if key in CNN_METHODS:
            expected.add("activation_deviation")
        assert {metric for m, metric in seen if m == key} == expected, key
    for label, _ in METRIC_INFO.values():
        assert label in report
    # four images per method and metric, each with its explanation time
    assert len(rows) == 4 * len(seen)
    assert {int(row["index"]) for row in rows} == {0, 1, 2, 3}
    assert all(float(row["seconds"]) > 0 for row in rows)
    # the comparisons the papers make, with p-values
    for a, b in (
        ("UNI", "IG (black)"),
        ("FG-TransMM", "TransMM"),
        ("FG-TransMM", "FG-TransMM (shuffled)"),
        ("FEI (vm)", "FEI (none)"),
    ):
        assert f"| {a} | {b} |" in report
    assert f"CNN {quick_demo.accuracy['cnn']:.3f}" in report
    assert "explained variance" in report
    # localisation values are shares
    shares = [
        float(r["value"])
        for r in rows
        if r["metric"] == "localisation" and r["value"] not in ("", "nan")
    ]
    assert shares and all(0.0 <= v <= 1.0 for v in shares)
    # nothing but the three outputs is left in the folder
    assert sorted(os.listdir(out)) == ["attributions.png", "per_image.csv", "report.md"]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n-images", "0"], "--n-images"),
        (["--n-images", "many"], "--n-images"),
        (["--methods", "gradcam"], "--methods"),
        (["--seed", "-3"], "--seed"),
        (["--device", "tpu:9"], "--device"),
        (["--bogus"], "unrecognized arguments"),
    ],
)
def test_bad_options_exit_nonzero_with_a_message(argv, message, tmp_path, capsys):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out), *argv])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = main(["demo", "--quick", "--out", str(blocker / "report")])
    assert code == 2
    err = capsys.readouterr().err
    assert "cannot write to the output folder" in err and "report" in err
    assert blocker.read_text() == "not a folder"
