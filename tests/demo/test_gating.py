"""The demo's gating protocol: its layer sets, and the two stages on a small ViT."""

import gating_fixtures as fx
import pytest

from captum_faithful.demo.gating import (
    C_MAXS,
    KAPPAS,
    STAGE_ONE_C_MAX,
    STAGE_ONE_KAPPA,
    choose_gating,
    layer_sets,
)


def test_layer_sets_are_singles_adjacent_runs_of_three_and_all():
    assert layer_sets([4, 0, 2, 1, 3]) == [
        (0,),
        (1,),
        (2,),
        (3,),
        (4,),
        (0, 1, 2),
        (1, 2, 3),
        (2, 3, 4),
        (0, 1, 2, 3, 4),
    ]
    # three blocks: the run of three is all of them, listed once
    assert layer_sets([0, 1, 2]) == [(0,), (1,), (2,), (0, 1, 2)]
    # runs must be adjacent blocks
    assert layer_sets([0, 1, 3]) == [(0,), (1,), (3,), (0, 1, 3)]
    assert layer_sets([2]) == [(2,)]


@pytest.mark.slow
def test_two_stages_choose_on_the_validation_images(tmp_path):
    model, saes = fx.vit(), fx.saes()
    choice = choose_gating(model, saes, fx.images(4), out=tmp_path, batch_size=4)
    first, second = choice.stages
    table1 = first.table.set_index("method")
    # stage 1: every layer set x every variant at the starting point
    gated1 = table1.drop(index="transmm")
    assert len(gated1) == len(layer_sets([0, 1])) * 3
    assert set(gated1["kappa"]) == {STAGE_ONE_KAPPA}
    assert set(gated1["c_max"]) == {STAGE_ONE_C_MAX}
    best1 = gated1["mean"].idxmax()
    assert first.configuration.name == best1
    # stage 2: kappa x c_max on stage 1's layers and variant
    gated2 = second.table.set_index("method").drop(index="transmm")
    assert len(gated2) == len(KAPPAS) * len(C_MAXS)
    assert set(gated2["layers"]) == {first.configuration.layers}
    assert set(gated2["variant"]) == {first.configuration.variant}
    assert choice.configuration == second.configuration
    assert choice.configuration.name == gated2["mean"].idxmax()
    assert choice.score == pytest.approx(gated2["mean"].max())
    assert choice.n_images == 4
    # the joined table: TransMM once, the chosen row marked once
    table = choice.table()
    assert list(table["method"]).count("transmm") == 1
    assert len(table) == 1 + len(gated1) + len(gated2)
    assert table["chosen"].sum() == 1
    assert table.loc[table["chosen"], "stage"].item() == 2
