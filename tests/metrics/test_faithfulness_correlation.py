import pytest
import torch
from captum.attr import InputXGradient
from helpers import CountingModel, small_cnn
from metric_reference import (
    reference_baseline,
    reference_faithfulness_correlation,
)

from captum_faithful.metrics import faithfulness_correlation, patch_mask
from captum_faithful.metrics._core.faithfulness_correlation import (
    random_feature_subsets,
    smallest_k_members,
)


@pytest.mark.parametrize(
    "baseline,mask,size,count,chunk",
    [
        ("zero", None, 0.25, 36, None),
        ("mean", "patch", 3, 3, 7),
        ("blur", "element", 0.1, 43, 1),
    ],
)
def test_matches_per_image_loop(cnn, images, baseline, mask, size, count, chunk):
    torch.manual_seed(2)
    attr = torch.randn_like(images)
    if mask == "patch":
        mask = patch_mask(images, 4)
    elif mask == "element":
        mask = torch.arange(images[0].numel()).view(1, 3, 12, 12)
    pearson_ref, spearman_ref = reference_faithfulness_correlation(
        cnn,
        images,
        attr,
        reference_baseline(baseline, images),
        mask,
        count,
        n_samples=12,
        seed=7,
        softmax=True,
    )
    for correlation, expected in (("pearson", pearson_ref), ("spearman", spearman_ref)):
        value = faithfulness_correlation(
            cnn,
            images,
            attr,
            baselines=baseline,
            feature_mask=mask,
            subset_size=size,
            n_samples=12,
            correlation=correlation,
            apply_softmax=True,
            max_examples_per_batch=chunk,
            generator=torch.Generator().manual_seed(7),
        )
        # float32 logits of batched and single-image forwards differ by ~1e-7;
        # a correlation over small score drops amplifies that to ~1e-5
        torch.testing.assert_close(value, expected, atol=3e-5, rtol=0)


def test_input_x_gradient_on_a_linear_model_correlates_perfectly():
    torch.manual_seed(3)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 5))
    x = torch.randn(4, 3, 8, 8)
    target = torch.tensor([0, 3, 1, 4])
    attr = InputXGradient(model).attribute(x.requires_grad_(), target=target)
    x = x.detach()
    value = faithfulness_correlation(
        model, x, attr, target=target, baselines="zero", apply_softmax=False
    )
    torch.testing.assert_close(value, torch.ones(4, dtype=torch.float64))
    # a wrong attribution (reversed sign) correlates at -1, a random one in between
    value = faithfulness_correlation(
        model, x, -attr, target=target, baselines="zero", apply_softmax=False
    )
    torch.testing.assert_close(value, -torch.ones(4, dtype=torch.float64))
    random = faithfulness_correlation(model, x, torch.randn_like(x), target=target)
    assert (random.abs() < 0.9).all()


def test_same_generator_seed_same_value_and_chunk_independence(cnn, images):
    attr = torch.randn_like(images)
    values = [
        faithfulness_correlation(
            cnn,
            images,
            attr,
            n_samples=20,
            max_examples_per_batch=c,
            generator=torch.Generator().manual_seed(0),
        )
        for c in (1, 9, None, 500)
    ]
    for v in values[1:]:
        torch.testing.assert_close(v, values[0], atol=1e-5, rtol=0)
    other = faithfulness_correlation(
        cnn, images, attr, n_samples=20, generator=torch.Generator().manual_seed(1)
    )
    assert not torch.allclose(other, values[0])


def test_smallest_k_members_exact_size_and_ties_go_to_the_lower_index():
    torch.manual_seed(3)
    keys = (torch.rand(50, 10) * 4).floor() / 4  # values in {0, .25, .5, .75}
    members = smallest_k_members(keys, 4)
    smallest = keys.argsort(dim=1, stable=True)[:, :4]
    expected = torch.zeros(50, 10, dtype=torch.bool).scatter_(1, smallest, True)
    assert torch.equal(members, expected)
    distinct = torch.rand(30, 100)
    members = smallest_k_members(distinct, 25)
    assert (members.sum(1) == 25).all()
    kept_max = torch.where(members, distinct, -1.0).max(1).values
    dropped_min = torch.where(members, 2.0, distinct).min(1).values
    assert (kept_max < dropped_min).all()


def test_value_does_not_depend_on_the_batch(cnn):
    """The same image alone and inside a batch of 16, from the same seed, gets the
    same subsets, hence the same value (subsets drawn example after example made
    them differ by up to 0.73)."""
    torch.manual_seed(4)
    batch = torch.rand(16, 3, 12, 12)
    attr = torch.randn_like(batch)

    def score(x, a):
        return faithfulness_correlation(
            cnn, x, a, n_samples=30, generator=torch.Generator().manual_seed(0)
        )

    together = score(batch, attr)
    for n in (0, 3, 15):
        alone = score(batch[n : n + 1], attr[n : n + 1])
        torch.testing.assert_close(alone[0], together[n], atol=1e-6, rtol=0)


def test_random_subsets_are_uniform_enough():
    members = random_feature_subsets(2, 4000, 8, 2, torch.Generator().manual_seed(0))
    assert (members.sum(-1) == 2).all()
    frequency = members.float().mean(dim=(0, 1))  # each feature: 2/8 = 0.25
    assert (frequency - 0.25).abs().max() < 0.02


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(subset_size=0.0), ValueError, "subset_size"),
        (dict(subset_size=1.5), ValueError, "subset_size"),
        (dict(subset_size=65), ValueError, "subset_size"),
        (dict(subset_size="half"), TypeError, "subset_size"),
        (dict(n_samples=1), ValueError, "n_samples"),
        (dict(correlation="kendall"), ValueError, "correlation"),
        (dict(generator=0), TypeError, "generator"),
        (dict(baselines=torch.zeros(2, 2, 8, 8)), ValueError, "baselines"),
        (dict(inputs=torch.full((2, 3, 8, 8), float("inf"))), ValueError, "inputs"),
        (dict(target=torch.tensor([0.5, 1.0])), TypeError, "target"),
    ],
)
def test_bad_input_raises_before_any_forward(kwargs, error, name):
    model = CountingModel(small_cnn())
    x = kwargs.pop("inputs", torch.rand(2, 3, 8, 8))
    with pytest.raises(error, match=name):
        faithfulness_correlation(model, x, torch.rand(2, 1, 8, 8), **kwargs)
    assert model.calls == 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_runs_on_cuda(images):
    attr = torch.randn_like(images)
    cpu = faithfulness_correlation(
        small_cnn(), images, attr, generator=torch.Generator().manual_seed(0)
    )
    gpu = faithfulness_correlation(
        small_cnn().cuda(),
        images.cuda(),
        attr.cuda(),
        generator=torch.Generator().manual_seed(0),
    )
    assert gpu.device.type == "cuda"
    torch.testing.assert_close(gpu.cpu(), cpu, atol=1e-5, rtol=0)
