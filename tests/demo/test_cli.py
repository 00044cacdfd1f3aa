import csv
import os
import re

import pytest
import torch

from captum_faithful.cli import SUBCOMMAND_MODULES, build_parser, main
from captum_faithful.demo.models import CACHE_ENV
from captum_faithful.demo.registry import METHODS, METRIC_INFO

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
def test_quick_demo_end_to_end(quick_demo, tmp_path, capsys, monkeypatch):
    import captum_faithful.demo.job as job

    chosen_on = []

    def recording(vit, saes, images, **kwargs):
        chosen_on.append(images.clone())
        return choose_gating(vit, saes, images, **kwargs)

    choose_gating = job.choose_gating
    monkeypatch.setattr(job, "choose_gating", recording)
    out = tmp_path / "report"
    code = main(
        [
            "demo",
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
    captured = capsys.readouterr()
    printed = captured.out
    # no third-party progress bars (the models are loaded from the cache here)
    for bar in ("Loading weights", "Writing model shards"):
        assert bar not in captured.out and bar not in captured.err
    report = (out / "report.md").read_text()
    for name in ("attributions_cnn.png", "attributions_vit.png"):
        figure = (out / name).read_bytes()
        assert figure[:8] == b"\x89PNG\r\n\x1a\n" and len(figure) > 10_000
        # legible at screen width: at most 1500 pixels wide (PNG header)
        assert int.from_bytes(figure[16:20], "big") <= 1500
        assert f"]({name})" in report
    # the summary leads, before the figures and the big table
    assert report.index("## Summary") < report.index("attributions_cnn.png")
    assert report.index("attributions_vit.png") < report.index("## How to read this")
    assert report.index("## How to read this") < report.index("## Comparisons")
    assert "Holm's step-down method" in report
    assert (
        "**Only 4 images per method (`--quick`): these comparisons have little power.**"
        in report
    )
    with open(out / "per_image.csv", newline="") as stream:
        rows = list(csv.DictReader(stream))
    seen = {(row["method"], row["metric"]) for row in rows}
    for key, method in METHODS.items():
        assert method.label in report and method.label in printed
        expected = {
            "insertion",
            "insertion_random_color",
            "deletion",
            "deletion_random_color",
            "saco",
            "faithfulness_correlation",
            "localisation",
            "precision",
        }
        if key in PATH_METHODS:
            expected.add("path_monotonicity")
        if key in CNN_METHODS or key.startswith("fei-"):
            expected.add("activation_deviation")
        assert {metric for m, metric in seen if m == key} == expected, key
    for label, _ in METRIC_INFO.values():
        assert label in report
    # four images per method and metric, each with its explanation time
    assert len(rows) == 4 * len(seen)
    assert {int(row["index"]) for row in rows} == {0, 1, 2, 3}
    assert all(float(row["seconds"]) > 0 for row in rows)
    # FG-TransMM is one of the three variants at the chosen configuration: that
    # variant's row holds the same values, and the report shows it once
    values = {}
    for row in rows:
        values.setdefault(row["method"], {})[row["index"], row["metric"]] = row["value"]
    twins = [
        variant
        for variant in ("combined", "activation", "gradient")
        if values[f"fg-transmm-{variant}"] == values["fg-transmm"]
    ]
    assert len(twins) == 1
    chosen = f"FG-TransMM = FG-TransMM {twins[0]}"
    assert f"shown once, as {chosen}" in report
    assert report.count(f"| {chosen} | ViT |") == 1
    assert f"| FG-TransMM {twins[0]} | ViT |" not in report
    assert "| FG-TransMM | ViT |" not in report

    def label(key):
        return (
            chosen
            if key in ("fg-transmm", f"fg-transmm-{twins[0]}")
            else (METHODS[key].label)
        )

    # the comparisons the papers make, with p-values, each once
    for a, b in (
        ("uni", "ig-black"),
        ("uni", "ig-blur"),
        ("fg-transmm", "transmm"),
        ("fg-transmm-combined", "transmm"),
        ("fg-transmm-activation", "transmm"),
        ("fg-transmm-gradient", "transmm"),
        ("fei-vm", "fei-none"),
        ("fei-vm-attention", "fei-none-vit"),
        ("fg-transmm-combined", "fg-transmm-shuffled"),
        ("fg-transmm-shuffled", "transmm"),
    ):
        for reference in ("blur", "random colour"):
            row = f"| {label(a)} | {label(b)} | insertion AUC ({reference}) |"
            assert report.count(row) == 1, row
    # the gating was chosen once, on validation images none of which was scored
    assert len(chosen_on) == 1
    validation = chosen_on[0].flatten(1)
    scored = quick_demo.x_test[:4].flatten(1)
    assert len(validation) == len(quick_demo.y_validation) == 120
    assert not bool((validation[:, None] == scored[None]).all(-1).any())
    assert "configuration chosen on validation images" in report
    # the shuffled-decoder control is scored, not copied from a real row
    assert values["fg-transmm-shuffled"] != values["fg-transmm-combined"]
    assert values["fg-transmm-shuffled"] != values["fg-transmm"]
    # every metric is explained, naming its reference
    assert "## How to read this" in report
    for label, _ in METRIC_INFO.values():
        assert f"- **{label}**" in report
    # each row carries the image's true class and the class its model predicted
    x = quick_demo.x_test[:4]
    with torch.no_grad():
        predicted = {
            "cnn": quick_demo.cnn(x).argmax(-1),
            "vit": quick_demo.vit(x).logits.argmax(-1),
        }
    for row in rows:
        index = int(row["index"])
        assert int(row["true_class"]) == int(quick_demo.y_test[index])
        model = METHODS[row["method"]].model
        assert int(row["predicted_class"]) == int(predicted[model][index]), row
    assert "**Chosen: blocks" in report and "The whole validation table" in report
    assert f"CNN {quick_demo.accuracy['cnn']:.3f}" in report
    assert "explained variance" in report
    # localisation values are shares
    shares = [
        float(r["value"])
        for r in rows
        if r["metric"] == "localisation" and r["value"] not in ("", "nan")
    ]
    assert shares and all(0.0 <= v <= 1.0 for v in shares)
    precisions = [float(r["value"]) for r in rows if r["metric"] == "precision"]
    assert precisions and all(0.0 <= v <= 1.0 for v in precisions)
    # the language-model section: Table 8 in miniature, with a verdict computed
    # from the table and the time its steps took
    assert "## Language model: attribution patching against activation patching" in (
        report
    )
    for label in (
        "UNI (learned)",
        "random",
        "zero embeddings",
        "counterfactual prompt",
    ):
        for n_steps in (1, 16):
            assert f"| {label} | {n_steps} |" in report, (label, n_steps)
            # the terminal gets the table too
            assert re.search(rf"{re.escape(label)}\s+{n_steps}\s", printed)
    assert report.count("the paper's claim (UNI's baseline closer than a random") == 2
    assert "load (or train) the language model" in report
    assert "language model: activation and attribution patching" in report
    # nothing but the three outputs is left in the folder
    assert sorted(os.listdir(out)) == [
        "attributions_cnn.png",
        "attributions_vit.png",
        "per_image.csv",
        "report.md",
    ]


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--n-images", "0"], "argument --n-images: expected a positive integer"),
        (["--n-images", "many"], "argument --n-images: expected a positive integer"),
        (
            ["--n-validation", "0"],
            "argument --n-validation: expected a positive integer",
        ),
        (["--methods", "gradcam"], "argument --methods: invalid choice: 'gradcam'"),
        (["--seed", "-3"], "argument --seed: expected a non-negative integer"),
        (["--device", "tpu:9"], "argument --device: unknown device 'tpu:9'"),
        (["--batch-size", "0"], "argument --batch-size: expected a positive integer"),
        (["--bogus"], "unrecognized arguments: --bogus"),
    ],
)
def test_bad_options_exit_2_with_one_line_naming_the_flag(
    argv, message, tmp_path, capsys
):
    out = tmp_path / "out"
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(out), *argv])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert message in err[0]
    assert not out.exists()


def test_unwritable_output_folder(tmp_path, capsys):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    code = main(["demo", "--quick", "--out", str(blocker / "report")])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith(
        "captum-faithful demo: error: argument --out: cannot write to the output folder"
    )
    assert "report" in err[0]
    assert blocker.read_text() == "not a folder"
    # --debug: the traceback first, then the same line
    code = main(["demo", "--quick", "--out", str(blocker / "report"), "--debug"])
    assert code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0] == "Traceback (most recent call last):"
    assert any("NotADirectoryError" in line for line in err)
    assert err[-1].startswith("captum-faithful demo: error: argument --out: ")


def test_help_says_what_the_demo_does_and_where_the_cache_is(capsys, monkeypatch):
    monkeypatch.setenv(CACHE_ENV, "/somewhere/else/cache")
    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--help"])
    assert exit_info.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    assert "--quick" in text and "8 images instead of 100" in text
    assert "cached in /somewhere/else/cache" in text
    assert f"${CACHE_ENV}" in text
    assert "few minutes" not in text
