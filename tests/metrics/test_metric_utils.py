import warnings

import numpy as np
import pytest
import scipy.stats
import torch
from metric_reference import reference_baseline

from captum_faithful.metrics import mean_baseline, patch_mask, zero_baseline
from captum_faithful.metrics._utils import (
    average_ranks,
    feature_scores,
    pearson_correlation,
    prepare_metric_inputs,
    rank_features,
    resolve_feature_masks,
    spearman_correlation,
)


def test_rank_features_descending_with_index_tie_break():
    scores = torch.tensor([[0.5, 2.0, 0.5, -1.0, 2.0]], dtype=torch.float64)
    ranks = rank_features(scores)
    # order: feature 1, 4 (tie, lower index first), 0, 2 (tie), 3
    assert ranks.tolist() == [[2, 0, 3, 4, 1]]


def test_feature_scores_sum_the_broadcast_attributions():
    torch.manual_seed(0)
    x = torch.rand(2, 3, 4, 4)
    attr = torch.randn(2, 1, 4, 4)
    mask = patch_mask(x, 2)
    setup = prepare_metric_inputs(x, attr, "zero", mask, None, None)
    scores = feature_scores(
        setup.attributions, setup.inputs, setup.feature_ids, setup.n_features
    )
    expanded = attr.expand_as(x).double()
    for n in range(2):
        for f in range(4):
            region = mask[0].expand(3, 4, 4) == f
            assert abs(float(scores[n, f]) - float(expanded[n][region].sum())) < 1e-12


def test_default_features_pixel_for_images_element_otherwise():
    setup = prepare_metric_inputs(
        (torch.rand(2, 3, 5, 6), torch.rand(2, 7)),
        (torch.rand(2, 3, 5, 6), torch.rand(2, 7)),
        (0.0, 0.0),
        None,
        None,
        None,
    )
    assert setup.n_features == 30 + 7
    assert setup.feature_ids[0].shape == (1, 1, 5, 6)
    assert setup.feature_ids[1].flatten().tolist() == list(range(30, 37))


def test_feature_mask_ids_are_relabelled_in_id_order():
    x = torch.rand(1, 1, 2, 2)
    mask = torch.tensor([[[[40, 7], [7, 12]]]])
    ids, n_features = resolve_feature_masks(mask, (x,))
    assert n_features == 3
    assert ids[0].flatten().tolist() == [2, 0, 0, 1]
    with pytest.raises(ValueError, match="feature_mask"):
        per_sample = torch.tensor([[[0, 1]], [[0, 2]]]).view(2, 1, 1, 2)
        resolve_feature_masks(per_sample, (torch.rand(2, 1, 1, 2),))


def test_patch_mask_numbers_patches_row_by_row():
    mask = patch_mask(torch.zeros(1, 3, 5, 4), (2, 3))
    expected = torch.tensor(
        [[0, 0, 0, 1], [0, 0, 0, 1], [2, 2, 2, 3], [2, 2, 2, 3], [4, 4, 4, 5]]
    )
    assert torch.equal(mask[0, 0], expected)
    both = patch_mask((torch.zeros(1, 1, 4, 4), torch.zeros(1, 1, 2, 2)), 2)
    assert both[1].flatten().tolist() == [4, 4, 4, 4]
    with pytest.raises(ValueError, match="patch_size"):
        patch_mask(torch.zeros(1, 3, 4, 4), 0)
    with pytest.raises(ValueError, match="inputs"):
        patch_mask(torch.zeros(3, 4, 4), 2)


def test_baseline_presets():
    torch.manual_seed(1)
    x = torch.rand(2, 3, 4, 5)
    before = x.clone()
    mean = mean_baseline(x)
    for n in range(2):
        for c in range(3):
            assert torch.allclose(mean[n, c], x[n, c].mean().expand(4, 5))
    assert torch.equal(zero_baseline(x), torch.zeros_like(x))
    assert torch.equal(x, before)
    flat = torch.rand(2, 6)
    torch.testing.assert_close(
        mean_baseline(flat), flat.mean(1, keepdim=True).expand(2, 6)
    )


def test_correlations_match_scipy():
    torch.manual_seed(2)
    a = torch.randint(0, 4, (5, 30)).double()  # many ties
    b = torch.randn(5, 30)
    assert np.allclose(
        average_ranks(a).numpy(), scipy.stats.rankdata(a.numpy(), axis=1)
    )
    for n in range(5):
        assert (
            abs(
                float(spearman_correlation(a, b)[n])
                - scipy.stats.spearmanr(a[n], b[n])[0]
            )
            < 1e-12
        )
        assert (
            abs(
                float(pearson_correlation(a, b)[n])
                - scipy.stats.pearsonr(a[n], b[n])[0]
            )
            < 1e-12
        )
    assert torch.isnan(pearson_correlation(torch.full((1, 4), 0.1), b[:1, :4])).all()


def test_chunked_target_scores_scores_any_row_builder():
    from captum_faithful.metrics._utils import chunked_target_scores

    torch.manual_seed(3)
    weight = torch.randn(5, 4)

    def model(x, scale):
        return (x @ weight) * scale

    x = torch.rand(3, 5)
    scale = torch.tensor([[1.0], [2.0], [-1.0]])
    classes = torch.tensor([0, 3, 1])

    def path(samples, steps):  # straight line from 0 to x in 4 steps
        return (x[samples] * (steps.float() / 4).unsqueeze(1),)

    for chunk in (1, 4, 100):
        scores = chunked_target_scores(
            model, path, 3, 5, classes, (scale,), False, chunk
        )
        for n in range(3):
            for k in range(5):
                expected = model(x[n : n + 1] * k / 4, scale[n : n + 1])[0, classes[n]]
                assert abs(float(scores[n, k] - expected)) < 1e-6


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int64])
@pytest.mark.parametrize("baseline", ["zero", "mean", 3])
@pytest.mark.parametrize("per_sample_mask", [False, True])
def test_build_perturbed_inputs_equals_where(dtype, baseline, per_sample_mask):
    from captum_faithful.metrics._utils import build_perturbed_inputs

    torch.manual_seed(4)
    x = (torch.rand(3, 2, 4, 4) * 10).to(dtype)
    if dtype == torch.int64 and baseline == "mean":
        baseline = 5
    mask = torch.arange(16).view(1, 1, 4, 4) // 2
    if per_sample_mask:
        mask = torch.stack(
            [m.view(4, 4)[torch.randperm(4)] for m in mask.expand(3, 1, 4, 4)]
        )
        mask = mask.view(3, 1, 4, 4)
    setup = prepare_metric_inputs(
        x, torch.ones_like(x, dtype=torch.float32), baseline, mask, None, None
    )
    # the baseline from the slow reference (a preset) or filled by hand (a scalar),
    # not from the setup under test
    if isinstance(baseline, str):
        reference = reference_baseline(baseline, x)
    else:
        reference = torch.full_like(x, baseline)
    samples = torch.tensor([2, 0, 0, 1, 1, 1, 2])
    take = torch.rand(7, setup.n_features) > 0.5
    (rows,) = build_perturbed_inputs(setup, samples, take)
    assert rows.dtype == dtype and rows.shape == (7, 2, 4, 4)
    for r, n in enumerate(samples.tolist()):
        m = mask[n if per_sample_mask else 0]
        keep = take[r][m.expand(2, 4, 4)]
        assert 0 < int(keep.sum()) < keep.numel()  # both sources appear in the row
        assert torch.equal(rows[r][keep], x[n][keep])
        torch.testing.assert_close(
            rows[r][~keep], reference[n][~keep], atol=1e-6, rtol=0
        )


# ------------------------------------------------------ non-finite model outputs


class _Scaled(torch.nn.Module):
    """``small_cnn(x * scale) * scale`` with ``scale`` (N, 1) an additional forward
    argument: a NaN row makes that sample's activations and output NaN."""

    def __init__(self):
        super().__init__()
        from helpers import small_cnn

        self.body = small_cnn()

    def forward(self, x, scale):
        return self.body(x * scale.view(-1, 1, 1, 1)) * scale


def _nan_metric_calls():
    from captum_faithful.metrics import (
        activation_deviation,
        deletion_auc,
        faithfulness_correlation,
        insertion_activation_deviation,
        insertion_auc,
        parameter_randomization,
        path_monotonicity,
        saco,
    )

    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    a = torch.rand(3, 1, 8, 8, generator=torch.Generator().manual_seed(1))

    def kw(scale):
        return dict(additional_forward_args=(scale,), target=1)

    return {
        "insertion_auc": lambda m, s: insertion_auc(m, x, a, n_steps=4, **kw(s)),
        "deletion_auc": lambda m, s: deletion_auc(m, x, a, n_steps=4, **kw(s)),
        "saco": lambda m, s: saco(m, x, a, n_groups=4, **kw(s)),
        "faithfulness_correlation": lambda m, s: faithfulness_correlation(
            m, x, a, n_samples=8, generator=torch.Generator().manual_seed(0),
            correlation="spearman", **kw(s)),
        "path_monotonicity": lambda m, s: path_monotonicity(
            m, x, 0.0, n_steps=4, **kw(s)),
        "activation_deviation": lambda m, s: activation_deviation(
            m, "conv", x, x * 0.5, additional_forward_args=(s,)),
        "insertion_activation_deviation": lambda m, s: insertion_activation_deviation(
            m, "conv", x, a, n_steps=3, additional_forward_args=(s,)),
        "parameter_randomization": lambda m, s: parameter_randomization(
            lambda model, inputs, t: model.body(inputs) * s, m, x,
            generator=torch.Generator().manual_seed(0)),
    }  # fmt: skip


NAN_METRICS = (
    "insertion_auc", "deletion_auc", "saco", "faithfulness_correlation",
    "path_monotonicity", "activation_deviation", "insertion_activation_deviation",
    "parameter_randomization",
)  # fmt: skip


def _values(result):
    """The metric's per-sample results as one (N, k) tensor."""
    if isinstance(result, dict):
        return torch.stack([v.double() for v in result.values()], dim=1)
    return result.double().view(-1, 1)


@pytest.mark.parametrize("name", NAN_METRICS)
def test_nan_from_the_model_gives_nan_for_that_sample_and_one_warning(name):
    """When the model returns NaN for one sample (a NaN row of
    ``additional_forward_args``), the metric's result for that sample is NaN —
    never a finite score computed from NaN (SaCo's comparisons, ranks that sort
    NaN last) — with exactly one warning naming the metric and the sample; the
    other samples get what they get when every sample is finite."""
    call = _nan_metric_calls()[name]
    model = _Scaled()
    finite = _values(call(model, torch.ones(3, 1)))
    assert finite.isfinite().all()
    scale = torch.tensor([[1.0], [float("nan")], [1.0]])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = _values(call(model, scale))
    messages = [str(w.message) for w in caught if w.category is RuntimeWarning]
    assert len(messages) == 1, messages
    assert messages[0].startswith(f"{name}: ") and "samples [1]" in messages[0]
    assert result[1].isnan().all()
    torch.testing.assert_close(result[[0, 2]], finite[[0, 2]])


# --- a model with one score per sample, shape (N,) ------------------------------


def _one_score_model():
    """A linear score of 3x6x6 images, one number per sample: shape (N,)."""
    weight = torch.randn(3, 6, 6, generator=torch.Generator().manual_seed(5))
    return lambda x: (x * weight).flatten(1).sum(1)


@pytest.mark.parametrize("target", [None, 0])
def test_a_model_with_one_score_per_sample_is_that_score(target):
    """An output (N,) is one class (as `_arguments` documents): the metrics score
    the output itself, as the per-image reference loops do on its (N, 1) view."""
    from metric_reference import (
        reference_curves,
        reference_faithfulness_correlation,
        reference_saco,
    )

    from captum_faithful.metrics import (
        deletion_auc,
        faithfulness_correlation,
        insertion_auc,
        path_monotonicity,
        saco,
    )

    model = _one_score_model()
    column = lambda x: model(x).unsqueeze(1)  # noqa: E731 - the reference's view
    generator = torch.Generator().manual_seed(3)
    images = torch.rand(3, 3, 6, 6, generator=generator)
    attr = torch.randn(3, 3, 6, 6, generator=generator)
    zero = torch.zeros_like(images)
    common = {"target": target, "baselines": "zero", "apply_softmax": False}
    for metric, insertion in ((insertion_auc, True), (deletion_auc, False)):
        expected, _ = reference_curves(
            column, images, attr, zero, None, 6, insertion, False
        )
        value = metric(model, images, attr, n_steps=6, **common)
        torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    expected, _ = reference_saco(column, images, attr, zero, None, 4, False)
    value = saco(model, images, attr, n_groups=4, **common)
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    expected, _ = reference_faithfulness_correlation(
        column, images, attr, zero, None, 9, 10, 7, False
    )
    value = faithfulness_correlation(
        model,
        images,
        attr,
        subset_size=9,
        n_samples=10,
        generator=torch.Generator().manual_seed(7),
        **common,
    )
    torch.testing.assert_close(value.double(), expected, rtol=1e-5, atol=1e-6)
    # path monotonicity: Spearman of the step number and the score along the path
    value = path_monotonicity(
        model, images, 0.0, n_steps=5, target=target, apply_softmax=False
    )
    for n in range(3):
        scores = [float(model(images[n : n + 1] * k / 5)) for k in range(6)]
        rho = scipy.stats.spearmanr(range(6), scores)[0]
        assert value[n].item() == pytest.approx(rho)


def test_softmax_over_one_score_per_sample_is_refused():
    """The softmax of a single score is always 1: every curve would be flat."""
    from captum_faithful.metrics import (
        deletion_auc,
        faithfulness_correlation,
        insertion_auc,
        path_monotonicity,
        saco,
    )

    model = _one_score_model()
    images = torch.rand(2, 3, 6, 6)
    before = images.clone()
    for metric in (insertion_auc, deletion_auc, saco, faithfulness_correlation):
        with pytest.raises(
            ValueError, match=r"apply_softmax.*\(2,\).*apply_softmax=False"
        ):
            metric(model, images, images, baselines="zero", apply_softmax=True)
    with pytest.raises(ValueError, match=r"apply_softmax.*\(2,\).*apply_softmax=False"):
        path_monotonicity(model, images, 0.0)
    assert torch.equal(images, before)
