"""The ``distractor="digit"`` rendering, its cache key, and the gating protocols."""

import hashlib
import json
from dataclasses import asdict

import numpy as np
import pytest
import torch

from captum_faithful.attr import FeatureGatedTransMM
from captum_faithful.demo import data as data_module
from captum_faithful.demo import load_demo
from captum_faithful.demo.data import (
    COLUMNS,
    DISTRACTORS,
    N_CLASSES,
    _upsample,
    load_scans,
    make_blocks,
    render,
    split_scans,
)
from captum_faithful.demo.gating import PROTOCOLS, layer_sets, protocol_candidates
from captum_faithful.demo.models import (
    FULL_RECIPE,
    QUICK_RECIPE,
    RECIPE_VERSION,
    cache_folder,
)


@pytest.fixture(scope="module")
def renderings():
    return {d: make_blocks("test", seed=0, distractor=d) for d in DISTRACTORS}


def test_digit_distractor_is_another_class(renderings):
    digit = renderings["digit"]
    assert digit.distractor == "digit"
    assert digit.distractor_labels is not None
    assert not bool((digit.distractor_labels == digit.labels).any())
    assert set(digit.distractor_labels.tolist()) <= set(range(N_CLASSES))


def test_digit_distractor_class_is_spread_over_the_other_nine():
    # 1,437 training images: the distractor's class is uniform over the nine
    # classes other than the label, whatever the label
    train = make_blocks("train", seed=0, distractor="digit")
    shift = ((train.distractor_labels - train.labels) % N_CLASSES).numpy()
    counts = np.bincount(shift, minlength=N_CLASSES)
    assert counts[0] == 0
    expected = len(shift) / 9  # about 160, standard deviation about 12
    assert all(0.6 * expected < c < 1.4 * expected for c in counts[1:]), counts
    labels, others = train.labels.numpy(), train.distractor_labels.numpy()
    for label in range(N_CLASSES):
        seen = set(others[labels == label])
        assert seen == set(range(N_CLASSES)) - {label}, (label, seen)


def _ring(masks):
    """The pixels of each mask's block on its edge (hand-built: first and last row
    and column of the block)."""
    ring = torch.zeros_like(masks)
    for i, mask in enumerate(masks[:, 0]):
        rows, cols = torch.nonzero(mask, as_tuple=True)
        top, bottom, left, right = rows.min(), rows.max(), cols.min(), cols.max()
        ring[i, 0, top, left : right + 1] = True
        ring[i, 0, bottom, left : right + 1] = True
        ring[i, 0, top : bottom + 1, left] = True
        ring[i, 0, top : bottom + 1, right] = True
    return ring


def test_only_the_distractor_block_and_the_frame_differ(renderings):
    shuffled, digit = renderings["shuffled"], renderings["digit"]
    for name in ("labels", "masks", "distractor_masks", "ink"):
        assert torch.equal(getattr(shuffled, name), getattr(digit, name)), name
    changed = digit.distractor_masks | _ring(digit.masks)
    outside = ~changed.expand_as(digit.images)
    assert torch.equal(shuffled.images[outside], digit.images[outside])
    inside = digit.distractor_masks.expand_as(digit.images)
    assert not torch.equal(shuffled.images[inside], digit.images[inside])
    # the shuffled rendering records the class of the scan it shuffled
    assert shuffled.distractor == "shuffled"
    assert shuffled.distractor_labels is not None


def test_digit_distractor_is_a_whole_scan_of_its_class_and_the_evidence_framed(
    monkeypatch,
):
    # without pixel noise, the distractor block's ink density can be read back from
    # the image: (image - background) / (ink colour - background), the ink colour
    # being the frame's (full density on the evidence block's edge)
    monkeypatch.setattr(data_module, "NOISE_STD", 0.0)
    scans, labels = load_scans()
    index = split_scans(len(scans), 0)["validation"][:40]
    pool, pool_labels = scans[index], labels[index]
    blocks = render(pool, pool_labels, pool, [0, 5], pool_labels, distractor="digit")
    upsampled = _upsample(pool)[:, 0]  # (M, 16, 16)
    rings = _ring(blocks.masks)
    for i in range(len(index)):
        image = blocks.images[i].double()
        background = image[:, 0, 0]  # a corner: outside both blocks
        frame = image[:, rings[i, 0]]  # (3, 60): one colour all round
        assert float((frame - frame[:, :1]).abs().max()) < 1e-6
        colour_delta = frame[:, 0] - background
        assert float(colour_delta.abs().max()) > 0.3
        rows = torch.nonzero(blocks.distractor_masks[i, 0].any(1)).flatten()
        block = image[:, rows.min() : rows.max() + 1, COLUMNS]
        channel = int(colour_delta.abs().argmax())
        density = (block[channel] - background[channel]) / colour_delta[channel]
        errors = (upsampled.double() - density).abs().flatten(1).amax(1)
        match = int(errors.argmin())
        assert float(errors[match]) < 1e-4
        assert pool_labels[match] == int(blocks.distractor_labels[i])
        assert pool_labels[match] != pool_labels[i]


def test_same_seed_same_data():
    a = make_blocks("validation", seed=0, distractor="digit")
    b = make_blocks("validation", seed=0, distractor="digit")
    for name in ("images", "labels", "masks", "distractor_masks", "distractor_labels"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    other = make_blocks("validation", seed=0, rendering=1, distractor="digit")
    assert not torch.equal(other.distractor_labels, a.distractor_labels)


def test_default_cache_key_is_unchanged_and_the_digit_key_differs():
    for recipe in (QUICK_RECIPE, FULL_RECIPE):
        # the key as it was computed before the distractor existed
        blob = json.dumps(
            {"version": RECIPE_VERSION, "seed": 0, **asdict(recipe)}, sort_keys=True
        )
        old = hashlib.sha256(blob.encode()).hexdigest()[:12]
        assert recipe.key(0) == recipe.key(0, "shuffled") == old
        assert recipe.key(0, "digit") != old
        assert recipe.key(1, "digit") != recipe.key(0, "digit")
        assert cache_folder(recipe, 0, "digit") != cache_folder(recipe, 0)
    assert QUICK_RECIPE.key(0, "digit") != FULL_RECIPE.key(0, "digit")


def test_bad_distractor_arguments():
    with pytest.raises(ValueError, match="distractor"):
        load_demo(quick=True, distractor="noise")
    with pytest.raises(ValueError, match="distractor"):
        load_demo(quick=True, distractor=None)
    with pytest.raises(ValueError, match="distractor"):
        make_blocks("test", distractor="Digit")
    with pytest.raises(ValueError, match="distractor"):
        QUICK_RECIPE.key(0, "blank")
    scans, labels = load_scans()
    with pytest.raises(ValueError, match="pool_labels"):
        render(scans[:4], labels[:4], scans[:4], 0, distractor="digit")
    only_zeros = labels == 0
    with pytest.raises(ValueError, match="no scan of classes"):
        render(
            scans[:4],
            labels[:4],
            scans[only_zeros],
            0,
            labels[only_zeros],
            distractor="digit",
        )


def test_protocol_candidates_against_hand_built_lists():
    # the full recipe: SAEs at blocks 0-4
    sets, variants = protocol_candidates("thesis", [0, 1, 2, 3, 4])
    assert sets == [(1,), (2,), (3,), (1, 2, 3)]
    assert variants == ["combined"]
    sets, variants = protocol_candidates("all", [4, 3, 2, 1, 0])
    # every layer set of the demo's protocol (pinned by hand in test_gating.py)
    assert sets == layer_sets([0, 1, 2, 3, 4])
    assert variants == list(FeatureGatedTransMM.VARIANTS) and len(variants) == 3
    # the quick recipe: SAEs at blocks 0-2
    assert protocol_candidates("thesis", [0, 1, 2]) == ([(1,)], ["combined"])
    assert protocol_candidates("thesis", [2, 5, 6, 9]) == (
        [(5,), (6,), (5, 6)],
        ["combined"],
    )
    assert PROTOCOLS == ("all", "thesis")


def test_protocol_candidates_bad_arguments():
    with pytest.raises(ValueError, match="protocol"):
        protocol_candidates("restricted", [0, 1, 2])
    with pytest.raises(ValueError, match="at least one between"):
        protocol_candidates("thesis", [0, 1])


def test_demo_cli_passes_the_distractor_to_the_job(tmp_path, monkeypatch):
    from captum_faithful.cli import main
    from captum_faithful.demo import job

    seen = []

    class Outcome:
        files: dict = {}

    def fake_run(settings):
        seen.append(settings)
        return Outcome()

    monkeypatch.setattr(job, "run", fake_run)
    for argv, expected in (([], "shuffled"), (["--distractor", "digit"], "digit")):
        assert main(["demo", "--quick", "--out", str(tmp_path / "out"), *argv]) == 0
        assert seen[-1].distractor == expected


def test_demo_cli_refuses_an_unknown_distractor(tmp_path, capsys):
    from captum_faithful.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["demo", "--out", str(tmp_path / "out"), "--distractor", "noise"])
    assert exit_info.value.code == 2
    assert "--distractor" in capsys.readouterr().err


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_choose_gating_runs_stage_one_on_the_protocol_candidates(
    protocol, tmp_path, monkeypatch
):
    from captum_faithful.demo import gating
    from captum_faithful.studies import GatingConfiguration

    calls = []

    class Stage:
        def __init__(self, configuration):
            self.configuration = configuration

    def fake_select(model, saes, images, out, layers, kappas, c_maxs, variants, **kw):
        calls.append(
            dict(layers=layers, kappas=kappas, c_maxs=c_maxs, variants=variants)
        )
        return Stage(GatingConfiguration(tuple(layers[-1]), 0.5, 10.0, variants[-1]))

    monkeypatch.setattr(gating, "select_gating", fake_select)
    saes = {block: None for block in range(5)}
    choice = gating.choose_gating(
        torch.nn.Identity(), saes, torch.zeros(2, 3, 4, 4), tmp_path, protocol=protocol
    )
    first, second = calls
    if protocol == "thesis":
        assert first["layers"] == [(1,), (2,), (3,), (1, 2, 3)]
        assert first["variants"] == ["combined"]
    else:
        assert first["layers"] == layer_sets(range(5))
        assert first["variants"] == list(FeatureGatedTransMM.VARIANTS)
    assert first["kappas"] == [0.5] and first["c_maxs"] == [10.0]
    # stage 2: the kappa x c_max grid on stage 1's choice, whatever the protocol
    assert second["layers"] == [first["layers"][-1]]
    assert second["variants"] == [first["variants"][-1]]
    assert len(second["kappas"]) == len(second["c_maxs"]) == 3
    assert choice.n_images == 2
    with pytest.raises(ValueError, match="protocol"):
        gating.choose_gating(
            torch.nn.Identity(), saes, torch.zeros(2, 3, 4, 4), tmp_path, protocol="x"
        )
