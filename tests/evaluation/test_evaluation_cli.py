import sys
from functools import partial
from pathlib import Path

import pytest
from captum.attr import IntegratedGradients, Saliency

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import eval_fixtures as fx  # noqa: E402

from captum_faithful import cli, evaluate  # noqa: E402
from captum_faithful.evaluation import Results  # noqa: E402
from captum_faithful.evaluation.cli import load_config  # noqa: E402

KEY = ["index", "method", "metric", "value"]


def _rows(results):
    return [tuple(r) for r in results.table[KEY].itertuples(index=False)]


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
    assert _rows(Results.load(out)) == _rows(expected)
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


def test_import_paths_resolve_both_forms_and_errors_name_the_path():
    from captum.attr import Saliency

    from captum_faithful.evaluation.cli import import_object

    assert import_object("captum.attr:Saliency") is Saliency
    assert import_object("captum.attr.Saliency") is Saliency
    for path in ("no_such_module_x:f", "captum.attr:NoSuchClass", ""):
        with pytest.raises(ValueError, match="import path|cannot import"):
            import_object(path)
