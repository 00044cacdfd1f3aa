import itertools

import pytest
import torch
from helpers import CountingModel, PixelSum, small_cnn
from metric_reference import reference_baseline, reference_saco

from captum_faithful.metrics import patch_mask, saco
from captum_faithful.metrics._core.saco import rank_groups, saco_from_groups


@pytest.mark.parametrize(
    "n_groups,baseline,mask,chunk",
    [
        (2, "mean", None, None),
        (7, "zero", None, 4),
        (10, "blur", "patch", 1),
        (5, "mean", "element", 1000),
    ],
)
def test_matches_per_image_loop(cnn, images, n_groups, baseline, mask, chunk):
    torch.manual_seed(2)
    attr = torch.randn_like(images)
    if mask == "patch":
        mask = patch_mask(images, 3)
    elif mask == "element":
        mask = torch.arange(images[0].numel()).view(1, 3, 12, 12)
    value = saco(
        cnn,
        images,
        attr,
        baselines=baseline,
        feature_mask=mask,
        n_groups=n_groups,
        apply_softmax=False,
        max_examples_per_batch=chunk,
    )
    expected, _ = reference_saco(
        cnn,
        images,
        attr,
        reference_baseline(baseline, images),
        mask,
        n_groups,
        softmax=False,
    )
    torch.testing.assert_close(value, expected, atol=1e-6, rtol=0)


def test_pair_weights_match_brute_force():
    torch.manual_seed(3)
    s = torch.randn(4, 6).double()
    deltas = torch.randn(4, 6).double()
    deltas[0, 1] = deltas[0, 3]  # a tie counts as agreement (Δ_i >= Δ_j)
    got = saco_from_groups(s, deltas)
    for n in range(4):
        pairs = []
        for i, j in itertools.combinations(range(6), 2):
            d = float(s[n, i] - s[n, j])
            pairs.append(d if deltas[n, i] >= deltas[n, j] else -d)
        expected = sum(pairs) / sum(abs(p) for p in pairs)
        assert abs(float(got[n]) - expected) < 1e-12
    # all groups with the same attribution sum: NaN
    assert torch.isnan(saco_from_groups(torch.ones(1, 4), torch.randn(1, 4))).all()


def test_rank_groups_are_consecutive_and_balanced():
    groups = rank_groups(23, 5, torch.device("cpu"))
    assert groups.tolist() == sorted(groups.tolist())
    sizes = torch.bincount(groups).tolist()
    assert sizes == [5, 5, 5, 4, 4]


def test_aligned_and_reversed_attributions_give_plus_and_minus_one():
    torch.manual_seed(4)
    weight = torch.randn(1, 3, 8, 8)
    model = PixelSum(weight, second=-1.0)
    x = torch.rand(5, 3, 8, 8)
    contributions = x * weight
    kwargs = dict(target=0, baselines="zero", apply_softmax=False, n_groups=8)
    aligned = saco(model, x, contributions, **kwargs)
    reversed_ = saco(model, x, -contributions, **kwargs)
    torch.testing.assert_close(aligned, torch.ones(5, dtype=torch.float64))
    torch.testing.assert_close(reversed_, -torch.ones(5, dtype=torch.float64))
    # scale invariance: a positive factor changes neither the order nor the ratio
    torch.testing.assert_close(saco(model, x, 1e3 * contributions, **kwargs), aligned)
    torch.manual_seed(5)
    random_attr = torch.randn_like(x)
    base = saco(model, x, random_attr, **kwargs)
    torch.testing.assert_close(saco(model, x, 0.01 * random_attr, **kwargs), base)
    assert (base.abs() < 1).all()


def test_constant_attributions_give_nan(cnn, images):
    assert torch.isnan(saco(cnn, images, torch.ones_like(images), n_groups=4)).all()


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(n_groups=1), ValueError, "n_groups"),
        (dict(n_groups=65), ValueError, "n_groups"),
        (
            dict(n_groups=5, feature_mask=patch_mask(torch.zeros(1, 3, 8, 8), 4)),
            ValueError,
            "n_groups",
        ),
        (dict(n_groups="4"), TypeError, "n_groups"),
        (dict(baselines="gray"), ValueError, "baselines"),
        (dict(apply_softmax="yes"), TypeError, "apply_softmax"),
        (
            dict(attributions=torch.full((2, 1, 8, 8), float("nan"))),
            ValueError,
            "attributions",
        ),
        (
            dict(feature_mask=torch.zeros(3, 1, 8, 8, dtype=torch.long)),
            ValueError,
            "feature_mask",
        ),
    ],
)
def test_bad_input_raises_before_any_forward(kwargs, error, name):
    model = CountingModel(small_cnn())
    x = torch.rand(2, 3, 8, 8)
    attributions = kwargs.pop("attributions", torch.rand(2, 1, 8, 8))
    with pytest.raises(error, match=name):
        saco(model, x, attributions, **kwargs)
    assert model.calls == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(images):
    attr = torch.randn_like(images)
    cpu = saco(small_cnn(), images, attr, n_groups=4)
    gpu = saco(small_cnn().cuda(), images.cuda(), attr.cuda(), n_groups=4)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int64])
def test_integer_images_take_the_rounded_mean_as_baseline(cnn, dtype):
    """Integer pixels (e.g. uint8 0..255): the default "mean" baseline is each
    channel's mean rounded to the pixels' dtype, so the perturbed copies stay
    integer images; the result equals the per-image loop with that baseline."""
    from captum_faithful.metrics import mean_baseline

    generator = torch.Generator().manual_seed(4)
    images = torch.randint(0, 256, (2, 3, 12, 12), generator=generator).to(dtype)
    before = images.clone()
    attr = torch.randn(2, 3, 12, 12, generator=generator)
    model = lambda x: cnn(x.float() / 255)  # noqa: E731 - the model casts itself
    expected_baseline = (
        images.double().mean(dim=(2, 3), keepdim=True).round().expand_as(images)
    )
    baseline = mean_baseline(images)
    assert baseline.dtype == dtype
    assert torch.equal(baseline.double(), expected_baseline)
    value = saco(model, images, attr, n_groups=4)
    expected, _ = reference_saco(
        model, images, attr, expected_baseline.to(dtype), None, 4, True
    )
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(images, before)
