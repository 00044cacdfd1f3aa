"""A resumed evaluation reproduces the uninterrupted run exactly, also when an
explainer or a metric draws from its own ``torch.Generator``."""

import functools

import eval_fixtures as fx
import torch

from captum_faithful import evaluate
from captum_faithful.metrics import faithfulness_correlation


def random_map(inputs, target, generator=None):
    """An explainer whose attributions are drawn from ``generator``."""
    return torch.rand(inputs.shape, generator=generator)


def _run(out, resume=True):
    """Fresh generator objects, as a new process would build them."""
    model = fx.model()
    return evaluate(
        model,
        fx.loader(),
        {
            "random": functools.partial(
                random_map, generator=torch.Generator().manual_seed(0)
            ),
            "noisy_again": random_map,
        },
        {
            "correlation": functools.partial(
                faithfulness_correlation,
                n_samples=6,
                generator=torch.Generator().manual_seed(0),
            ),
            "mass": fx.attribution_mass,
        },
        out=out,
        resume=resume,
        show_progress=False,
    )


def test_resume_after_any_batch_reproduces_the_uninterrupted_run(tmp_path):
    """Batches 1..4 are deleted (as if the run had been killed after batch 0) and
    the run resumed with new generator objects: every row equals the uninterrupted
    run's. Before, 4 of the 5 batches repeated batch 0's draws."""
    reference = fx.rows(_run(tmp_path / "reference"), sort=True)
    for kept in ([0], [0, 2], [3]):
        out = tmp_path / f"kept-{len(kept)}-{kept[0]}"
        _run(out)
        for path in (out / "batches").iterdir():
            if int(path.name[6:14]) not in kept:
                path.unlink()
        (out / "results.parquet").unlink()
        assert fx.rows(_run(out), sort=True) == reference


def draw(forward_func, inputs, attributions, target=None, generator=None):
    """A metric that returns its generator's draws."""
    return torch.rand(inputs.shape[0], generator=generator)


def test_batches_draw_differently_and_methods_share_a_metric_draw(tmp_path):
    """The derived generators differ from batch to batch and from explainer to
    explainer (no repeated draws), and a metric scores every method of a batch with
    the same draws."""
    model = fx.model()
    table = evaluate(
        model,
        fx.loader(),
        {"a": random_map, "b": random_map},
        {"draw": draw, "mass": fx.attribution_mass},
        out=tmp_path,
        show_progress=False,
    ).table
    values = table.set_index(["metric", "method", "index"]).sort_index()["value"]
    assert values.loc["draw", "a"].tolist() == values.loc["draw", "b"].tolist()
    batches = values.loc["draw", "a"].values.reshape(-1)
    assert len(set(batches[:4].tolist()) & set(batches[4:8].tolist())) == 0
    assert (values.loc["mass", "a"].values != values.loc["mass", "b"].values).all()
