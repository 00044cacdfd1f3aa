import re
from functools import partial
from pathlib import Path

import eval_fixtures as fx
import pytest
from captum.attr import IntegratedGradients, Saliency

from captum_faithful import cli, evaluate
from captum_faithful.evaluation import Results, _settings
from captum_faithful.evaluation.cli import OPTIONAL, REQUIRED, load_config

HERE = Path(__file__).resolve().parent


def _direct(out):
    model = fx.model()
    return evaluate(
        model,
        fx.loader(),
        {
            "saliency": Saliency(model),
            "ig": partial(IntegratedGradients(model).attribute, n_steps=8),
        },
        {
            "drop": partial(fx.top_feature_drop, fraction=0.5),
            "mass": fx.attribution_mass,
        },
        out=out,
        show_progress=False,
    )


def test_evaluate_subcommand_is_registered():
    assert "captum_faithful.evaluation.cli" in cli.SUBCOMMAND_MODULES
    _, commands = cli.build_parser()
    assert "evaluate" in commands


@pytest.mark.parametrize("config", ["eval_config.py", "eval_config.yaml"])
def test_config_runs_like_the_direct_call(tmp_path, capsys, config):
    expected = _direct(tmp_path / "direct")
    out = tmp_path / "cli"
    code = cli.main(
        ["evaluate", str(HERE / config), "--out", str(out), "--no-progress"]
    )
    assert code == 0
    assert fx.rows(Results.load(out)) == fx.rows(expected)
    printed = capsys.readouterr().out
    assert "| method | drop | mass | s/sample |" in printed
    assert (out / "summary.md").read_text() == printed


def test_load_config_builds_model_and_objects():
    config = load_config(HERE / "eval_config.yaml")
    assert not config["model"].training
    assert len(config["dataset"]) == fx.N_SAMPLES
    assert isinstance(config["explainers"]["saliency"], Saliency)
    assert config["explainers"]["ig"].keywords == {"n_steps": 8}
    assert config["metrics"]["drop"].keywords == {"fraction": 0.5}
    assert config["batch_size"] == 4 and config["seed"] == 0


def test_bad_configs_are_refused(tmp_path):
    missing = tmp_path / "missing.yaml"
    missing.write_text("model: eval_fixtures:model\n")
    with pytest.raises(ValueError, match=r"lacks the keys \['dataset', 'explainers'"):
        load_config(missing)
    unknown = tmp_path / "unknown.py"
    unknown.write_text((HERE / "eval_config.py").read_text() + "\nbatchsize = 3\n")
    config = load_config(unknown)  # a Python module may define helper names
    assert config["batch_size"] == 4
    typo = tmp_path / "typo.yaml"
    typo.write_text((HERE / "eval_config.yaml").read_text() + "batchsize: 3\n")
    typo.with_suffix(".txt").write_text("model: x\n")
    with pytest.raises(ValueError, match=r"unknown keys \['batchsize'\]"):
        load_config(typo)
    bad_path = tmp_path / "bad.yaml"
    bad_path.write_text(
        (HERE / "eval_config.yaml")
        .read_text()
        .replace("eval_fixtures:attribution_mass", "eval_fixtures:no_such_metric")
    )
    with pytest.raises(ValueError, match="no attribute 'no_such_metric'"):
        load_config(bad_path)
    with pytest.raises(ValueError, match=r"\.py or \.yaml"):
        load_config(typo.with_suffix(".txt"))


# --- the command line a user meets: --help and one-line errors ---------------------


def _run_cli(argv, capsys):
    """(exit status, stdout, stderr lines) of ``captum-faithful`` with ``argv``."""
    try:
        code = cli.main(argv)
    except SystemExit as exit_info:  # argparse's own errors
        code = exit_info.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err.strip().splitlines()


def _help_configs(capsys, folder):
    """Write the two configs printed by ``evaluate --help`` into ``folder``."""
    code, printed, _ = _run_cli(["evaluate", "--help"], capsys)
    assert code == 0
    written = {}
    for name, body in re.findall(
        r"\n {4}# (eval_config\.\w+)\n((?: {4}.*\n|\n)+)", printed
    ):
        text = "\n".join(line[4:] for line in body.splitlines()).strip() + "\n"
        (folder / name).write_text(text)
        written[name] = folder / name
    return printed, written


def test_help_shows_the_config_format_and_the_torchrun_command(capsys, tmp_path):
    printed, written = _help_configs(capsys, tmp_path)
    for key in (*REQUIRED, *OPTIONAL):
        assert re.search(rf"^  {key} +(yes|no) ", printed, flags=re.M), key
    assert "torchrun --nproc_per_node 4 -m captum_faithful.cli evaluate" in printed
    assert sorted(written) == ["eval_config.py", "eval_config.yaml"]
    # every key of the format appears in the complete YAML example
    yaml_keys = {
        line.split(":")[0]
        for line in written["eval_config.yaml"].read_text().split("\n")
        if line and not line.startswith((" ", "#"))
    }
    assert set(REQUIRED) | {"out", "batch_size", "target", "seed"} <= yaml_keys


def test_help_examples_run_as_printed_and_describe_the_same_run(capsys, tmp_path):
    """The Python example runs through the CLI; the YAML example builds the same
    model, explainers and metrics (same run fingerprint), so it would resume the
    Python run rather than refuse it."""
    _, written = _help_configs(capsys, tmp_path)
    out = tmp_path / "run"
    code, printed, err = _run_cli(
        [
            "evaluate",
            str(written["eval_config.py"]),
            "--out",
            str(out),
            "--no-progress",
        ],
        capsys,
    )
    assert code == 0, err
    results = Results.load(out)
    assert set(results.table["method"]) == {"saliency", "ig", "uni"}
    assert set(results.table["metric"]) == {"insertion", "deletion", "saco"}
    assert len(results.table) == 16 * 3 * 3
    assert (out / "summary.md").read_text() == printed
    fingerprints = []
    for name in ("eval_config.py", "eval_config.yaml"):
        config = load_config(written[name])
        fingerprints.append(
            {
                "model": _settings.describe_model(config["model"]),
                "explainers": _settings.describe(config["explainers"]),
                "metrics": _settings.describe(config["metrics"]),
                "options": {k: config[k] for k in OPTIONAL},
            }
        )
    assert fingerprints[0]["model"] == fingerprints[1]["model"]
    assert fingerprints[0]["metrics"] == fingerprints[1]["metrics"]
    assert fingerprints[0]["options"] == fingerprints[1]["options"]
    assert fingerprints[0]["explainers"].keys() == fingerprints[1]["explainers"].keys()


def _config_with(tmp_path, old, new):
    text = (HERE / "eval_config.yaml").read_text()
    assert old in text
    path = tmp_path / "edited.yaml"
    path.write_text(text.replace(old, new))
    return path


USAGE_ERRORS = {
    "missing config file": (
        lambda tmp: ["evaluate", str(tmp / "nowhere.yaml")],
        ["argument CONFIG", "nowhere.yaml"],
    ),
    "config lacks keys": (
        lambda tmp: ["evaluate", str(_config_with(tmp, "metrics:", "metricz:"))],
        ["argument CONFIG", "lacks the keys ['metrics']"],
    ),
    "config names a missing object": (
        lambda tmp: [
            "evaluate",
            str(_config_with(tmp, "eval_fixtures:model", "eval_fixtures:no_model")),
        ],
        ["argument CONFIG", "no_model"],
    ),
    "config value out of range": (
        lambda tmp: [
            "evaluate",
            str(_config_with(tmp, "target: predicted", "target: labels")),
        ],
        ["argument CONFIG", "`target`", "'labels'"],
    ),
    "config keyword the metric does not take": (
        lambda tmp: [
            "evaluate",
            str(_config_with(tmp, "{fraction: 0.5}", "{fractoin: 0.5}")),
        ],
        ["argument CONFIG", "metrics['drop']", "fractoin"],
    ),
    "unknown key in an explainer spec": (
        lambda tmp: [
            "evaluate",
            str(
                _config_with(
                    tmp,
                    "saliency: captum.attr.Saliency",
                    "saliency: {class: captum.attr.Saliency, bogus: 1}",
                )
            ),
        ],
        ["argument CONFIG", "explainers['saliency']", "'bogus'", "'init'"],
    ),
    "class and function in one explainer spec": (
        lambda tmp: [
            "evaluate",
            str(
                _config_with(
                    tmp,
                    "saliency: captum.attr.Saliency",
                    "saliency: {class: captum.attr.Saliency, function: x:y}",
                )
            ),
        ],
        ["argument CONFIG", "explainers['saliency']", "'function'"],
    ),
    "unknown key in a metric spec": (
        lambda tmp: [
            "evaluate",
            str(_config_with(tmp, "kwargs: {fraction: 0.5}", "kwarg: {fraction: 0.5}")),
        ],
        ["argument CONFIG", "metrics['drop']", "'kwarg'", "'kwargs'"],
    ),
    "unknown key in a factory spec": (
        lambda tmp: [
            "evaluate",
            str(_config_with(tmp, "kwargs: {n: 18}", "kwargs: {n: 18}, n: 3")),
        ],
        ["argument CONFIG", "'dataset'", "'n'"],
    ),
    "keywords of a spec that are not a mapping": (
        lambda tmp: [
            "evaluate",
            str(_config_with(tmp, "attribute: {n_steps: 8}", "attribute: 8")),
        ],
        ["argument CONFIG", "explainers['ig']", "'attribute'", "8"],
    ),
    "unparsable YAML": (
        lambda tmp: [
            "evaluate",
            str(_config_with(tmp, "batch_size: 4", "batch_size: [4")),
        ],
        ["argument CONFIG", "edited.yaml"],
    ),
    "no run folder": (
        lambda tmp: [
            "evaluate",
            str(_config_with(tmp, "out: runs/eval-config-example", "")),
        ],
        ["argument --out", "no run folder"],
    ),
    "run folder is a file": (
        lambda tmp: [
            "evaluate",
            str(HERE / "eval_config.yaml"),
            "--out",
            str(_a_file(tmp)),
        ],
        ["argument --out", "not a folder"],
    ),
    "bad --batch-size": (
        lambda tmp: ["evaluate", str(HERE / "eval_config.yaml"), "--batch-size", "0"],
        ["argument --batch-size", "positive integer"],
    ),
    "bad --device": (
        lambda tmp: ["evaluate", str(HERE / "eval_config.yaml"), "--device", "tpu:9"],
        ["argument --device", "tpu:9"],
    ),
    "unknown option": (
        lambda tmp: ["evaluate", str(HERE / "eval_config.yaml"), "--resume"],
        ["unrecognized arguments: --resume"],
    ),
    "no config": (lambda tmp: ["evaluate"], ["required: CONFIG"]),
}


def _a_file(tmp_path):
    path = tmp_path / "a_file"
    path.write_text("not a folder")
    return path


@pytest.mark.parametrize("case", sorted(USAGE_ERRORS))
def test_usage_errors_exit_2_with_one_line_naming_the_flag(
    case, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)  # the configs' relative `out` would land here
    make_argv, expected = USAGE_ERRORS[case]
    argv = make_argv(tmp_path)
    code, printed, err = _run_cli(argv, capsys)
    assert code == 2
    assert printed == ""
    assert len(err) == 1, err
    assert err[0].startswith(
        ("captum-faithful evaluate: error: ", "captum-faithful: error: ")
    )
    for fragment in expected:
        assert fragment in err[0], (fragment, err[0])
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize(
    "case", ["missing config file", "config lacks keys", "run folder is a file"]
)
def test_debug_shows_the_traceback_of_a_usage_error(case, tmp_path, capsys):
    make_argv, expected = USAGE_ERRORS[case]
    code, _, err = _run_cli([*make_argv(tmp_path), "--debug"], capsys)
    assert code == 2
    assert err[0] == "Traceback (most recent call last):"
    assert "UsageError" in "\n".join(err)
    last = err[-1]
    assert last.startswith("captum-faithful evaluate: error: ")
    assert all(fragment in last for fragment in expected)


def test_a_run_folder_with_other_settings_names_out_and_no_resume(tmp_path, capsys):
    out = tmp_path / "run"
    config = HERE / "eval_config.yaml"
    assert (
        _run_cli(["evaluate", str(config), "--out", str(out), "--no-progress"], capsys)[
            0
        ]
        == 0
    )
    rows = fx.rows(Results.load(out))
    changed = _config_with(tmp_path, "{n_steps: 8}", "{n_steps: 4}")
    code, printed, err = _run_cli(
        ["evaluate", str(changed), "--out", str(out), "--no-progress"], capsys
    )
    assert code == 2 and printed == "" and len(err) == 1
    assert "argument --out" in err[0] and "--no-resume" in err[0]
    assert "explainers['ig'] changed" in err[0]
    assert "resume=False" not in err[0]
    assert fx.rows(Results.load(out)) == rows  # the recorded run is untouched
    # the flag the message names does what it says
    code, _, _ = _run_cli(
        ["evaluate", str(changed), "--out", str(out), "--no-progress", "--no-resume"],
        capsys,
    )
    assert code == 0
    assert len(Results.load(out).table) == len(rows)


def test_a_failure_during_the_run_is_one_line_and_debug_shows_it(tmp_path, capsys):
    config = _config_with(
        tmp_path, "eval_fixtures:attribution_mass", "eval_fixtures:failing_metric"
    )
    argv = ["evaluate", str(config), "--out", str(tmp_path / "run"), "--no-progress"]
    code, printed, err = _run_cli(argv, capsys)
    assert code == 1 and printed == ""
    assert len(err) == 1
    assert err[0] == (
        "captum-faithful evaluate: error: RuntimeError: the metric failed on purpose "
        "(run again with --debug for the traceback)"
    )
    code, _, err = _run_cli([*argv, "--debug"], capsys)
    assert code == 1
    assert err[0] == "Traceback (most recent call last):"
    assert any("def failing_metric" in line or "failing_metric" in line for line in err)
    assert err[-1] == (
        "captum-faithful evaluate: error: RuntimeError: the metric failed on purpose"
    )


def test_import_paths_resolve_both_forms_and_errors_name_the_path():
    from captum.attr import Saliency

    from captum_faithful.evaluation.cli import import_object

    assert import_object("captum.attr:Saliency") is Saliency
    assert import_object("captum.attr.Saliency") is Saliency
    for path in ("no_such_module_x:f", "captum.attr:NoSuchClass", ""):
        with pytest.raises(ValueError, match="import path|cannot import"):
            import_object(path)


def test_a_config_device_without_cuda_exits_2_naming_the_key(
    tmp_path, capsys, monkeypatch
):
    """The config's `device` gets the check of --device (it used to pass, and the
    run failed with torch's error, exit 1)."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 0)
    monkeypatch.chdir(tmp_path)
    config = _config_with(
        tmp_path, "target: predicted", "target: predicted\ndevice: cuda"
    )
    code, printed, err = _run_cli(["evaluate", str(config)], capsys)
    assert code == 2 and printed == "" and len(err) == 1, err
    assert "argument CONFIG" in err[0] and "`device`" in err[0], err[0]
    assert "CUDA is not available" in err[0], err[0]
    assert not (tmp_path / "runs").exists()
    code, _, err = _run_cli(["evaluate", str(config), "--device", "cuda"], capsys)
    assert code == 2 and "argument --device" in err[0], err
