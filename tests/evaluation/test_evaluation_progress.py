"""evaluate's progress bar names what it evaluates."""

import eval_fixtures as fx

from captum_faithful.evaluation import evaluate


def test_progress_bar_names_the_method(tmp_path, capsys):
    model = fx.model()
    explainers = fx.run_explainers(model)
    name = next(iter(explainers))
    evaluate(
        model,
        fx.loader(),
        {name: explainers[name]},
        {"mass": fx.attribution_mass},
        out=tmp_path / "one",
        show_progress=True,
    )
    err = capsys.readouterr().err
    assert f"evaluate {name}:" in err
    evaluate(
        model,
        fx.loader(),
        explainers,
        {"mass": fx.attribution_mass},
        out=tmp_path / "all",
        show_progress=True,
    )
    assert f"evaluate {len(explainers)} methods:" in capsys.readouterr().err
    evaluate(
        model,
        fx.loader(),
        explainers,
        {"mass": fx.attribution_mass},
        out=tmp_path / "quiet",
        show_progress=False,
    )
    assert "evaluate" not in capsys.readouterr().err
