"""evaluate's progress bar names what it evaluates."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import eval_fixtures as fx  # noqa: E402

from captum_faithful.evaluation import evaluate  # noqa: E402


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
