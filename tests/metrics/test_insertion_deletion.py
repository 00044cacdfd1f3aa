import pytest
import torch
from helpers import CountingModel, ModelSnapshot, PixelSum, small_cnn
from metric_reference import blur_reference, reference_baseline, reference_curves

from captum_faithful.metrics import deletion_auc, insertion_auc, patch_mask
from captum_faithful.metrics._utils import feature_counts


def _attributions(x, shape=None):
    torch.manual_seed(2)
    return torch.randn(shape or x.shape)


@pytest.mark.parametrize("metric", ["insertion", "deletion"])
@pytest.mark.parametrize(
    "n_steps,baseline,chunk",
    [(1, "zero", None), (7, "blur", 5), (20, "mean", 1), (13, "zero", 1000)],
)
def test_matches_per_image_loop(cnn, images, metric, n_steps, baseline, chunk):
    attr = _attributions(images)
    fn = insertion_auc if metric == "insertion" else deletion_auc
    auc, curves = fn(
        cnn,
        images,
        attr,
        baselines=baseline,
        n_steps=n_steps,
        max_examples_per_batch=chunk,
        return_curves=True,
        apply_softmax=False,
    )
    ref_auc, ref_curves = reference_curves(
        cnn,
        images,
        attr,
        reference_baseline(baseline, images),
        None,
        n_steps,
        metric == "insertion",
        softmax=False,
    )
    assert curves.shape == (3, n_steps + 1)
    torch.testing.assert_close(curves.double(), ref_curves, atol=1e-5, rtol=0)
    torch.testing.assert_close(auc.double(), ref_auc, atol=1e-5, rtol=0)


@pytest.mark.parametrize("mask_kind", ["patch", "element", "per_sample"])
def test_feature_masks_match_loop(cnn, images, mask_kind):
    attr = _attributions(images)
    if mask_kind == "patch":
        mask = patch_mask(images, 4)
    elif mask_kind == "element":
        mask = torch.arange(images[0].numel()).view(1, 3, 12, 12)
    else:
        torch.manual_seed(3)
        # per-sample masks: random permutations of the same 36 ids, odd numbering
        base = torch.arange(144).view(12, 12) // 4
        mask = torch.stack([10 * base.view(-1)[torch.randperm(144)].view(12, 12)] * 3)
        mask = mask.unsqueeze(1)
    for fn, insertion in ((insertion_auc, True), (deletion_auc, False)):
        auc, curves = fn(
            cnn,
            images,
            attr,
            baselines="zero",
            feature_mask=mask,
            n_steps=9,
            return_curves=True,
            max_examples_per_batch=7,
        )
        ref_auc, ref_curves = reference_curves(
            cnn, images, attr, torch.zeros_like(images), mask, 9, insertion, True
        )
        torch.testing.assert_close(curves.double(), ref_curves, atol=1e-6, rtol=0)
        torch.testing.assert_close(auc.double(), ref_auc, atol=1e-6, rtol=0)


@pytest.mark.parametrize("kind", ["tensor", "callable", "scalar", "batch_tensor"])
def test_custom_baselines_match_loop(cnn, images, kind):
    attr = _attributions(images, (3, 1, 12, 12))
    torch.manual_seed(4)
    if kind == "tensor":
        baseline = torch.rand(1, 3, 1, 1)
        expected = baseline.expand_as(images)
    elif kind == "batch_tensor":
        baseline = torch.rand(3, 3, 12, 12)
        expected = baseline
    elif kind == "scalar":
        baseline = 0.5
        expected = torch.full_like(images, 0.5)
    else:

        def baseline(x):
            return 1.0 - x

        expected = 1.0 - images
    auc, curves = insertion_auc(
        cnn, images, attr, baselines=baseline, n_steps=6, return_curves=True
    )
    _, ref_curves = reference_curves(cnn, images, attr, expected, None, 6, True, True)
    torch.testing.assert_close(curves.double(), ref_curves, atol=1e-6, rtol=0)


def test_blur_preset_is_the_gaussian_blur(images):
    from captum_faithful.metrics import blur_baseline

    torch.testing.assert_close(blur_baseline(images), blur_reference(images))
    # blurring a constant image changes nothing (reflect padding, normalised kernel)
    const = torch.full((1, 2, 9, 9), 0.3)
    torch.testing.assert_close(blur_baseline(const), const)


def test_explicit_target_and_ties(cnn, images):
    # all-equal attributions: the order must be the feature index order
    attr = torch.zeros_like(images)
    target = [1, 4, 7]
    auc, curves = deletion_auc(
        cnn, images, attr, target=target, n_steps=5, return_curves=True
    )
    ref_auc, ref_curves = reference_curves(
        cnn, images, attr, torch.zeros_like(images), None, 5, False, True, target
    )
    torch.testing.assert_close(curves.double(), ref_curves, atol=1e-6, rtol=0)
    order = torch.arange(144)
    counts = feature_counts(144, 5)
    # point 2 removes exactly the first counts[2] pixels in raster order
    img = images.clone()
    img.view(3, 3, -1)[:, :, order[: counts[2]]] = 0
    out = torch.softmax(cnn(img), 1)[torch.arange(3), target]
    torch.testing.assert_close(curves[:, 2], out.double(), atol=1e-6, rtol=0)


def test_result_does_not_depend_on_chunk_size(cnn, images):
    attr = _attributions(images)
    results = [
        insertion_auc(cnn, images, attr, n_steps=30, max_examples_per_batch=c)
        for c in (1, 3, 31, 64, 10_000)
    ]
    for r in results[1:]:
        torch.testing.assert_close(r, results[0], atol=1e-6, rtol=0)


def test_tuple_inputs_and_additional_args():
    torch.manual_seed(5)
    w1, w2 = torch.randn(4, 3), torch.randn(6, 3)

    def model(a, b, shift):
        return a @ w1 + b @ w2 + shift

    a, b = torch.rand(2, 4), torch.rand(2, 6)
    shift = torch.randn(2, 3)
    attr = (torch.randn(2, 4), torch.randn(2, 6))
    auc, curves = insertion_auc(
        model,
        (a, b),
        attr,
        additional_forward_args=(shift,),
        baselines=(0.0, 0.0),
        n_steps=10,
        return_curves=True,
        apply_softmax=False,
        max_examples_per_batch=3,
    )
    # reference: 10 features, one per element, numbered a then b
    for n in range(2):
        scores = torch.cat([attr[0][n], attr[1][n]]).double()
        order = sorted(range(10), key=lambda f: (-float(scores[f]), f))
        cls = int(model(a[n : n + 1], b[n : n + 1], shift[n : n + 1]).argmax())
        for k in range(11):
            keep = torch.zeros(10, dtype=torch.bool)
            keep[order[:k]] = True
            x = torch.cat([a[n], b[n]]) * keep
            y = model(x[None, :4], x[None, 4:], shift[n : n + 1])[0, cls]
            assert abs(float(curves[n, k]) - float(y)) < 1e-5


def test_ideal_ordering_has_the_best_insertion_and_deletion_auc():
    torch.manual_seed(6)
    weight = torch.randn(1, 3, 8, 8)
    model = PixelSum(weight)
    x = torch.rand(4, 3, 8, 8)
    ideal = x * weight  # each pixel's exact contribution
    kwargs = dict(target=0, baselines="zero", apply_softmax=False, n_steps=16)
    best_ins, curves = insertion_auc(model, x, ideal, return_curves=True, **kwargs)
    best_del = deletion_auc(model, x, ideal, **kwargs)
    # closed form: the insertion curve is the running sum of the sorted contributions
    contrib = ideal.sum(1).flatten(1).sort(dim=1, descending=True).values
    cumsum = torch.cat([torch.zeros(4, 1), contrib.cumsum(1)], dim=1)
    counts = feature_counts(64, 16)
    torch.testing.assert_close(curves, cumsum[:, counts].double(), atol=1e-5, rtol=1e-5)
    for seed in range(5):
        torch.manual_seed(100 + seed)
        other = torch.randn_like(x)
        assert (insertion_auc(model, x, other, **kwargs) <= best_ins + 1e-5).all()
        assert (deletion_auc(model, x, other, **kwargs) >= best_del - 1e-5).all()
    # only the ordering matters: positive rescaling leaves the AUCs unchanged
    torch.testing.assert_close(insertion_auc(model, x, 7.5 * ideal, **kwargs), best_ins)
    torch.testing.assert_close(deletion_auc(model, x, ideal / 3.0, **kwargs), best_del)


@pytest.mark.parametrize("fn", [insertion_auc, deletion_auc])
@pytest.mark.parametrize(
    "change,error,name",
    [
        (dict(inputs=torch.full((2, 3, 8, 8), float("nan"))), ValueError, "inputs"),
        (
            dict(attributions=torch.full((2, 3, 8, 8), float("inf"))),
            ValueError,
            "attributions",
        ),
        (dict(attributions=torch.ones(2, 3, 8, 7)), ValueError, "attributions"),
        (dict(attributions=torch.ones(1, 3, 8, 8)), ValueError, "attributions"),
        (dict(baselines=torch.zeros(2, 3, 7, 8)), ValueError, "baselines"),
        (
            dict(baselines=torch.full((1, 3, 1, 1), float("nan"))),
            ValueError,
            "baselines",
        ),
        (dict(baselines="black"), ValueError, "baselines"),
        (dict(baselines=object()), TypeError, "baselines"),
        (
            dict(feature_mask=torch.zeros(2, 3, 8, 5, dtype=torch.long)),
            ValueError,
            "feature_mask",
        ),
        (dict(feature_mask=torch.zeros(1, 1, 8, 8)), TypeError, "feature_mask"),
        (dict(target=-1), ValueError, "target"),
        (dict(target=[1, 2, 3]), ValueError, "target"),
        (dict(target="cat"), TypeError, "target"),
        (dict(n_steps=0), ValueError, "n_steps"),
        (dict(n_steps=2.5), TypeError, "n_steps"),
        (dict(max_examples_per_batch=0), ValueError, "max_examples_per_batch"),
    ],
)
def test_bad_input_raises_before_any_forward(fn, change, error, name):
    model = CountingModel(small_cnn())
    kwargs = dict(inputs=torch.rand(2, 3, 8, 8), attributions=torch.rand(2, 3, 8, 8))
    kwargs.update(change)
    inputs, attributions = kwargs.pop("inputs"), kwargs.pop("attributions")
    with pytest.raises(error, match=name):
        fn(model, inputs, attributions, **kwargs)
    assert model.calls == 0


def test_target_above_the_class_count_fails_after_the_clean_pass_only():
    model = CountingModel(small_cnn())
    x = torch.rand(2, 3, 8, 8)
    with pytest.raises(ValueError, match="target"):
        insertion_auc(model, x, torch.rand_like(x), target=10, n_steps=5)
    # the number of classes is only known from the clean forward pass, which is
    # the first (and only) pass made before the error
    assert model.calls == 1


def test_user_tensors_and_model_untouched(cnn, images):
    attr = _attributions(images).requires_grad_()
    x = images.clone().requires_grad_()
    x_before, attr_before = x.detach().clone(), attr.detach().clone()
    snapshot = ModelSnapshot.take(cnn)
    deletion_auc(cnn, x, attr, baselines="blur", n_steps=4)
    snapshot.assert_same(cnn)
    assert torch.equal(x.detach(), x_before) and torch.equal(attr.detach(), attr_before)
    assert x.requires_grad and attr.requires_grad and x.grad is None


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(images):
    attr = _attributions(images)
    cpu = insertion_auc(small_cnn(), images, attr, n_steps=8)
    gpu = insertion_auc(small_cnn().cuda(), images.cuda(), attr.cuda(), n_steps=8)
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)


def test_more_steps_than_features_repeats_counts(cnn):
    torch.manual_seed(7)
    x, attr = torch.rand(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    mask = patch_mask(x, 2)  # 4 features, 10 steps: counts repeat
    for fn, insertion in ((insertion_auc, True), (deletion_auc, False)):
        auc, curves = fn(
            cnn,
            x,
            attr,
            baselines="zero",
            feature_mask=mask,
            n_steps=10,
            return_curves=True,
        )
        ref_auc, ref_curves = reference_curves(
            cnn, x, attr, torch.zeros_like(x), mask, 10, insertion, True
        )
        torch.testing.assert_close(curves.double(), ref_curves, atol=1e-6, rtol=0)
        torch.testing.assert_close(auc.double(), ref_auc, atol=1e-6, rtol=0)


def _round_half_to_even(numerator: int, denominator: int) -> int:
    """numerator / denominator rounded to the nearest integer, an exact half to the
    even neighbour; integer arithmetic only (no float, no ``round``)."""
    quotient, remainder = divmod(numerator, denominator)
    if 2 * remainder > denominator or (
        2 * remainder == denominator and quotient % 2 == 1
    ):
        quotient += 1
    return quotient


@pytest.mark.parametrize(
    "n_features,n_steps,expected",
    [
        # k F / n_steps = 2.5 (to 2) and 7.5 (to 8); half-up would give 3 at k = 1
        (10, 4, [0, 2, 5, 8, 10]),
        # 0.5 -> 0, 1.5 -> 2, 2.5 -> 2: half-up would give 1 and 3
        (1, 2, [0, 0, 1]),
        (5, 2, [0, 2, 5]),
        (3, 6, [0, 0, 1, 2, 2, 2, 3]),
    ],
)
def test_feature_counts_round_exact_halves_to_even(n_features, n_steps, expected):
    by_hand = [_round_half_to_even(k * n_features, n_steps) for k in range(n_steps + 1)]
    assert by_hand == expected
    assert feature_counts(n_features, n_steps) == expected


class CountRevealed(torch.nn.Module):
    """Logit 0 is the sum of the pixels: on an all-ones input over a zero baseline it
    is the number of features taken from the input."""

    def forward(self, x):
        total = x.flatten(1).sum(1)
        return torch.stack([total, torch.zeros_like(total)], dim=1)


def test_curves_count_features_with_exact_halves_rounded_to_even():
    # F = 10 pixels, n_steps = 4: the k = 1 and k = 3 points land on 2.5 and 7.5
    x = torch.ones(2, 1, 2, 5)
    attributions = torch.stack([torch.arange(10.0), -torch.arange(10.0)]).view(x.shape)
    counts = torch.tensor([_round_half_to_even(10 * k, 4) for k in range(5)])
    assert counts.tolist() == [0, 2, 5, 8, 10]
    kwargs = dict(
        target=0, baselines=0.0, n_steps=4, apply_softmax=False, return_curves=True
    )
    auc, curves = insertion_auc(CountRevealed(), x, attributions, **kwargs)
    torch.testing.assert_close(curves, counts.double().expand(2, 5), atol=0, rtol=0)
    # trapezoid rule by hand: (1 + 3.5 + 6.5 + 9) / 4 (half-up would give 5.25)
    torch.testing.assert_close(
        auc, torch.full((2,), 5.0, dtype=torch.float64), atol=0, rtol=0
    )
    auc, curves = deletion_auc(CountRevealed(), x, attributions, **kwargs)
    torch.testing.assert_close(
        curves, (10 - counts).double().expand(2, 5), atol=0, rtol=0
    )
    torch.testing.assert_close(
        auc, torch.full((2,), 5.0, dtype=torch.float64), atol=0, rtol=0
    )
