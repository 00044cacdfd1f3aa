"""select_gating: the best row of its own table, checked against a direct computation;
resumable; sharded over two gloo ranks; clear errors for bad grids."""

import json
import math
import subprocess
import sys
from itertools import product
from pathlib import Path

import gating_fixtures as fx
import numpy as np
import pytest
import torch
from helpers import child_env, free_port

from captum_faithful import (
    FeatureGatedTransMM,
    GatingConfiguration,
    Results,
    TransMM,
    select_gating,
)
from captum_faithful.metrics import deletion_auc, patch_mask, saco
from captum_faithful.studies._gating import _selection

WORKER = Path(__file__).resolve().parent / "gating_worker.py"


@pytest.fixture(scope="module")
def setup():
    return fx.vit(), fx.saes(), fx.images()


def _direct_means(model, saes, x, grid, metric):
    """Mean metric per configuration, computed without evaluate or select_gating:
    each explainer built by hand, the predicted class as target, patch features."""
    with torch.no_grad():
        target = model(x).logits.argmax(1)
    mask = patch_mask(x, fx.PATCH)
    means = {}
    explainers = {"transmm": TransMM(model)}
    for layers, variant, kappa, c_max in grid:
        explainers[(layers, variant, kappa, c_max)] = FeatureGatedTransMM(
            model,
            {layer: saes[layer] for layer in layers},
            kappa=kappa,
            c_max=c_max,
            variant=variant,
        )
    for key, explainer in explainers.items():
        values = metric(
            model,
            x,
            explainer.attribute(x, target=target),
            target=target,
            feature_mask=mask,
        )
        means[key] = float(np.nanmean(values.numpy()))
    return means


def test_chooses_the_best_row_of_its_table(setup, tmp_path):
    model, saes, x = setup
    layers = [(0,), (1,), (0, 1)]
    variants = ["combined", "activation"]
    kappas = [0.5, 2.0]
    c_maxs = [3.0, 20.0]
    selection = select_gating(
        model,
        saes,
        x,
        out=tmp_path / "run",
        metric="saco",
        layers=[0, 1, (1, 0)],
        kappas=kappas,
        c_maxs=c_maxs,
        variants=variants,
        batch_size=4,
    )
    grid = list(product(layers, variants, kappas, c_maxs))
    direct = _direct_means(model, saes, x, grid, saco)

    table = selection.table
    assert list(table["method"])[0] == "transmm"
    assert len(table) == 1 + len(grid)
    assert table["n"].iloc[0] == len(x)
    np.testing.assert_allclose(table["mean"].iloc[0], direct["transmm"], rtol=1e-6)
    for row, key in zip(table.iloc[1:].itertuples(), grid, strict=True):
        assert (row.layers, row.variant, row.kappa, row.c_max) == key
        np.testing.assert_allclose(row.mean, direct[key], rtol=1e-6)
    gated = [direct[key] for key in grid]
    assert max(gated) - min(gated) > 0.05, "the grid must spread the scores"
    best = grid[int(np.argmax(gated))]  # the first of equal maxima, in grid order
    layers_best, variant_best, kappa_best, c_max_best = best
    assert selection.configuration == GatingConfiguration(
        layers_best, kappa_best, c_max_best, variant_best
    )
    assert selection.score == pytest.approx(max(gated), rel=1e-5)
    assert selection.baseline_score == pytest.approx(direct["transmm"], rel=1e-5)
    assert table["chosen"].sum() == 1
    assert table.loc[table["chosen"], "method"].item() == selection.configuration.name
    expected = 100 * (max(gated) - direct["transmm"]) / abs(direct["transmm"])
    assert selection.improvement == pytest.approx(expected, rel=1e-5)
    # the chosen explainer is that configuration
    explainer = selection.explainer(model, saes)
    assert sorted(explainer.saes) == list(best[0])
    assert (explainer.kappa, explainer.c_max, explainer.variant) == (
        best[2],
        best[3],
        best[1],
    )


def test_lower_is_better_chooses_the_smallest_mean(setup, tmp_path):
    model, saes, x = setup
    kappas, c_maxs = [0.3, 3.0], [2.0, 50.0]
    selection = select_gating(
        model,
        saes,
        x,
        out=tmp_path / "run",
        metric="deletion_auc",
        layers=[0],
        kappas=kappas,
        c_maxs=c_maxs,
        variants=["combined", "gradient"],
    )
    grid = list(product([(0,)], ["combined", "gradient"], kappas, c_maxs))
    direct = _direct_means(model, saes, x, grid, deletion_auc)
    gated = [direct[key] for key in grid]
    assert max(gated) - min(gated) > 1e-3
    best = grid[int(np.argmin(gated))]
    configuration = selection.configuration
    assert (configuration.layers, configuration.variant) == best[:2]
    assert (configuration.kappa, configuration.c_max) == best[2:]
    assert not selection.higher_is_better
    improvement = 100 * (direct["transmm"] - min(gated)) / abs(direct["transmm"])
    assert selection.improvement == pytest.approx(improvement, rel=1e-5)


def test_resumes_from_its_folder_without_recomputing(setup, tmp_path):
    model, saes, x = setup
    calls = []

    def spread(forward_func, inputs, attributions, target=None):
        calls.append(len(inputs))
        flat = attributions.sum(1).flatten(1)
        return flat.std(1) / flat.abs().mean(1).clamp(min=1e-12)

    kwargs = dict(
        out=tmp_path / "run",
        metric=spread,
        higher_is_better=True,
        layers=[0],
        kappas=[1.0],
        c_maxs=[2.0, 10.0],
        batch_size=3,
    )
    first = select_gating(model, saes, x, **kwargs)
    assert sum(calls) == 3 * len(x)  # TransMM and two configurations
    again = select_gating(model, saes, x, **kwargs)
    assert sum(calls) == 3 * len(x)  # nothing recomputed
    assert again.configuration == first.configuration
    assert again.table.drop(columns="seconds").equals(
        first.table.drop(columns="seconds")
    )
    # other SAE weights are another run: refused instead of mixed
    other = {0: fx.saes()[1].__class__(saes[0].cfg)}
    other[0].load_state_dict({k: v + 1 for k, v in saes[0].state_dict().items()})
    with pytest.raises(ValueError, match="other settings"):
        select_gating(model, other, x, **kwargs)


def _results(means):
    """A Results table whose methods have the given per-image values."""
    import pandas as pd

    rows = [
        (index, method, "m", value, 0.01)
        for method, values in means.items()
        for index, value in enumerate(values)
    ]
    table = pd.DataFrame(
        rows, columns=["index", "method", "metric", "value", "seconds"]
    )
    return Results(table, {"settings": {"methods": list(means), "metrics": ["m"]}})


def test_ties_go_to_the_first_in_grid_order_and_nan_rows_are_never_chosen():
    grid = [
        GatingConfiguration((0,), k, 10.0, "combined") for k in (0.1, 0.5, 1.0, 2.0)
    ]
    nan = math.nan
    means = {
        "transmm": [0.5, 0.5],
        grid[0].name: [nan, nan],  # NaN everywhere: no mean, never chosen
        grid[1].name: [0.6, nan],  # mean over the one non-NaN value: 0.6
        grid[2].name: [0.7, 0.5],  # 0.6 as well: the tie goes to grid[1]
        grid[3].name: [0.2, 0.3],
    }
    selection = _selection(_results(means), grid, "m", True)
    assert selection.configuration == grid[1]
    assert selection.score == pytest.approx(0.6)
    assert math.isnan(selection.table["mean"].iloc[1])
    assert list(selection.table["n"]) == [2, 0, 1, 2, 2]
    assert selection.improvement == pytest.approx(20.0)
    lowest = _selection(_results(means), grid, "m", False)
    assert lowest.configuration == grid[3]
    assert lowest.improvement == pytest.approx(100 * (0.5 - 0.25) / 0.5)
    with pytest.raises(ValueError, match="NaN on every validation image"):
        _selection(
            _results({"transmm": [0.5], grid[0].name: [nan]}), grid[:1], "m", True
        )


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(layers=[]), ValueError, "`layers` must not be empty"),
        (dict(kappas=[]), ValueError, "`kappas` must not be empty"),
        (dict(c_maxs=[]), ValueError, "`c_maxs` must not be empty"),
        (dict(variants=[]), ValueError, "`variants` must not be empty"),
        (dict(kappas=[0.5, 0.0]), ValueError, r"`kappas\[1\]` must be > 0"),
        (dict(kappas=[-1.0]), ValueError, r"`kappas\[0\]` must be > 0"),
        (dict(kappas=[math.inf]), ValueError, r"`kappas\[0\]` must be finite"),
        (dict(kappas=["0.5"]), TypeError, r"`kappas\[0\]` must be a real number"),
        (dict(c_maxs=[0.5]), ValueError, r"`c_maxs\[0\]` must be >= 1"),
        (dict(c_maxs=[10.0, 10]), ValueError, "`c_maxs` holds 10 twice"),
        (
            dict(layers=[0, 2]),
            ValueError,
            r"`layers\[1\]` = 2 names blocks \[2\] without an SAE",
        ),
        (dict(layers=[(0, 2)]), ValueError, r"blocks \[2\] without an SAE"),
        (dict(layers=[()]), TypeError, r"`layers\[0\]` must be a block index"),
        (dict(layers=[0, (0,)]), ValueError, "`layers` holds"),
        (dict(layers=0), TypeError, "`layers` must be a list"),
        (
            dict(variants=["combined", "both"]),
            ValueError,
            r"`variants\[1\]` must be one of",
        ),
        (dict(variants="combined"), TypeError, "`variants` must be a list"),
        (dict(metric="pixel_flipping"), ValueError, "`metric` must be one of"),
        (dict(metric=3), TypeError, "`metric` must be one of"),
        (dict(metric=lambda *a, **k: None), ValueError, "needs `higher_is_better`"),
        (dict(metric="saco", higher_is_better=False), ValueError, "contradicts"),
        (dict(saes={}), TypeError, "`saes` must be a non-empty mapping"),
        (dict(data=torch.rand(2, 3, 16)), ValueError, r"images \(N, C, H, W\)"),
        (dict(data=[1, 2]), TypeError, "`data` must be a DataLoader"),
    ],
)
def test_bad_grids_fail_early_with_a_clear_message(
    setup, tmp_path, kwargs, error, message
):
    model, saes, x = setup
    arguments = dict(
        model=model,
        saes=saes,
        data=x,
        out=tmp_path / "run",
        layers=[0, 1],
        kappas=[0.5],
        c_maxs=[10.0],
    )
    arguments.update(kwargs)
    with pytest.raises(error, match=message):
        select_gating(**arguments)
    assert not (tmp_path / "run").exists()  # nothing computed or written


@pytest.mark.slow
def test_two_gloo_ranks_choose_what_one_process_chooses(tmp_path):
    model, saes, x = fx.vit(), fx.saes(), fx.images()
    single = select_gating(model, saes, x, out=tmp_path / "single", **fx.grid())
    port = str(free_port())
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                str(WORKER),
                str(tmp_path / "sharded"),
                str(tmp_path / f"rank{rank}.json"),
            ],
            env=child_env(
                OMP_NUM_THREADS="1",
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE="2",
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(2)
    ]
    outputs = [p.communicate(timeout=300)[0].decode() for p in procs]
    for p, output in zip(procs, outputs, strict=True):
        assert p.returncode == 0, output
    reports = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    # each rank explained its own contiguous half of the batches
    assert reports[0]["seen"] == [0, 1, 2] and reports[1]["seen"] == [3, 4, 5]
    for report in reports:
        assert report["chosen"] == single.configuration.name
        np.testing.assert_allclose(report["means"], list(single.table["mean"]))
