"""path_monotonicity against scipy's Spearman correlation and closed forms."""

from __future__ import annotations

import pytest
import torch
from metric_reference import reference_baseline
from torch import nn
from uni_reference import reference_baselines

from captum_faithful import UnlearnedIntegratedGradients
from captum_faithful.metrics import path_monotonicity

stats = pytest.importorskip("scipy.stats")


class LinearScore(nn.Module):
    """Two logits: (w·x, 0); class 0's probability is increasing in w·x."""

    def __init__(self, w):
        super().__init__()
        self.w = nn.Parameter(w)

    def forward(self, x):
        score = (x.flatten(1) * self.w).sum(1)
        return torch.stack([score, torch.zeros_like(score)], dim=1)


def reference(model, x, baseline, target, n_steps, softmax):
    scores = []
    for k in range(n_steps + 1):
        with torch.no_grad():
            out = model(baseline + k / n_steps * (x - baseline))
        if softmax:
            out = out.softmax(1)
        scores.append(out[torch.arange(x.shape[0]), target])
    scores = torch.stack(scores, 1).double().numpy()
    return torch.tensor(
        [stats.spearmanr(range(n_steps + 1), row).statistic for row in scores],
        dtype=torch.float64,
    )


@pytest.mark.parametrize("softmax", [True, False])
def test_equals_scipy_spearman(cnn, softmax):
    x = torch.randn(5, 3, 16, 16) * 2
    baseline = torch.randn(5, 3, 16, 16)
    target = torch.tensor([0, 1, 2, 3, 4])
    got = path_monotonicity(
        cnn, x, baseline, target=target, n_steps=12, apply_softmax=softmax
    )
    expected = reference(cnn, x, baseline, target, 12, softmax)
    assert got.shape == (5,)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_target_none_and_scalar_baseline(cnn):
    x = torch.randn(3, 3, 16, 16)
    predicted = cnn(x).argmax(1)
    got = path_monotonicity(cnn, x, 0.0)
    expected = reference(cnn, x, torch.zeros_like(x), predicted, 15, True)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_closed_forms_increasing_decreasing_and_constant():
    model = LinearScore(torch.ones(4))
    x = torch.tensor([[1.0, 1.0, 1.0, 1.0], [-1.0, -1.0, -1.0, -1.0]])
    got = path_monotonicity(model, x, 0.0, target=0, n_steps=7)
    torch.testing.assert_close(got, torch.tensor([1.0, -1.0], dtype=torch.float64))
    flat = path_monotonicity(model, x, x, target=0, n_steps=7)
    assert torch.isnan(flat).all()


def test_ties_share_their_average_rank():
    # scores rise, then saturate at exactly 1.0 after softmax of a huge logit
    model = LinearScore(torch.ones(1))
    x = torch.tensor([[1000.0]])
    got = path_monotonicity(model, x, -1.0, target=0, n_steps=10)
    with torch.no_grad():
        points = -1.0 + torch.arange(11.0).view(-1, 1) / 10 * 1001.0
        out = model(points).softmax(1)[:, 0]
    expected = stats.spearmanr(range(11), out.double().numpy()).statistic
    assert got.item() == pytest.approx(expected, abs=1e-12)
    assert 0 < got.item() < 1


def test_tuple_inputs_additional_args_and_callable_baselines():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 3)
            self.b = nn.Linear(2, 3)

        def forward(self, u, v, scale):
            return (self.a(u) + self.b(v)) * scale.unsqueeze(1)

    torch.manual_seed(0)
    model = TwoInputs()
    u, v, scale = torch.randn(4, 4), torch.randn(4, 2), torch.rand(4) + 0.5
    got = path_monotonicity(
        model,
        (u, v),
        (lambda x: x * 0, 1.0),
        target=[0, 1, 2, 0],
        additional_forward_args=(scale,),
        n_steps=5,
    )

    def single(x):
        return model(x[:, :4], x[:, 4:], scale)

    joined = torch.cat([u, v], 1)
    base = torch.cat([torch.zeros(4, 4), torch.ones(4, 2)], 1)
    expected = reference(single, joined, base, torch.tensor([0, 1, 2, 0]), 5, True)
    torch.testing.assert_close(got, expected, atol=1e-10, rtol=0)


def test_uni_baselines_through_compute_baselines(cnn):
    x = torch.randn(2, 3, 16, 16)
    # a long learned path (epsilon 8) and classes whose score is not monotone on it,
    # so that the value depends on where the path starts
    uni = UnlearnedIntegratedGradients(cnn, epsilon=8.0)
    target = torch.tensor([0, 4])
    got = path_monotonicity(cnn, x, uni.compute_baselines, target=target, n_steps=40)
    # independent: Algorithm 1 run one sample at a time by the reference loop (for
    # the predicted class, as compute_baselines(x) does), then scipy's Spearman
    predicted = cnn(x).argmax(1)
    (baselines,) = reference_baselines(cnn, x, predicted, eps=8.0)
    expected = reference(cnn, x, baselines, target, 40, True)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)
    # the check has teeth: a start at the same distance in a random direction
    direction = torch.randn_like(x)
    elsewhere = x + 8.0 * direction / direction.flatten(1).norm(dim=1).view(2, 1, 1, 1)
    assert (reference(cnn, x, elsewhere, target, 40, True) - expected).abs().max() > 0.1


def test_runs_without_gradients_and_leaves_model_alone(cnn):
    x = torch.randn(2, 3, 16, 16, requires_grad=True)
    path_monotonicity(cnn, x, 0.0)
    assert x.grad is None and all(p.grad is None for p in cnn.parameters())


def test_bad_input(cnn):
    x = torch.randn(2, 3, 16, 16)
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="inputs"):
        path_monotonicity(cnn, bad, 0.0)
    with pytest.raises(ValueError, match="baselines"):
        path_monotonicity(cnn, x, float("inf"))
    with pytest.raises(ValueError, match="baselines"):
        path_monotonicity(cnn, x, torch.zeros(3, 3, 16, 16))
    with pytest.raises(ValueError, match="n_steps"):
        path_monotonicity(cnn, x, 0.0, n_steps=0)
    with pytest.raises(ValueError, match="target"):
        path_monotonicity(cnn, x, 0.0, target=10)
    with pytest.raises(TypeError, match="inputs"):
        path_monotonicity(cnn, x.numpy(), 0.0)
    with pytest.raises(ValueError, match="baselines"):
        path_monotonicity(cnn, x, "black")
    with pytest.raises(ValueError, match="max_examples_per_batch"):
        path_monotonicity(cnn, x, 0.0, max_examples_per_batch=0)


@pytest.mark.parametrize("preset", ["zero", "mean", "blur"])
def test_presets_and_chunking_equal_the_reference(cnn, preset):
    x = torch.rand(3, 3, 16, 16)
    predicted = cnn(x).argmax(1)
    # the preset's image from the slow reference (the blur: a full 11x11 kernel on a
    # reflect-padded image), not from the package's baseline functions. Spearman
    # only sees ranks: with 100 steps a blur of sigma 4.9 instead of 5 already
    # changes the value (measured: 0.4818 vs 0.4789 on the first image)
    expected = reference(cnn, x, reference_baseline(preset, x), predicted, 100, True)
    for chunk in (None, 1, 7, 64):
        got = path_monotonicity(
            cnn, x, preset, n_steps=100, max_examples_per_batch=chunk
        )
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=0)


def test_no_forward_exceeds_max_examples_per_batch(cnn):
    """The clean pass that fixes the predicted class is chunked like the path: memory
    is bounded by the chunk, not by the batch (it once forwarded all 8 images at
    once); an additional argument with a batch dimension follows its samples."""
    from memory import LargestBatch

    class Shifted(nn.Module):
        def __init__(self, model):
            super().__init__()
            self.model = model

        def forward(self, x, shift):
            return self.model(x + shift.view(-1, 1, 1, 1))

    model = Shifted(cnn)
    x, shift = torch.rand(8, 3, 16, 16), torch.linspace(-0.5, 0.5, 8)
    expected = path_monotonicity(
        model, x, 0.0, additional_forward_args=(shift,), n_steps=4,
        max_examples_per_batch=64,
    )  # fmt: skip
    with LargestBatch(cnn) as probe:
        got = path_monotonicity(
            model, x, 0.0, additional_forward_args=(shift,), n_steps=4,
            max_examples_per_batch=3,
        )  # fmt: skip
    assert probe.largest == 3
    torch.testing.assert_close(got, expected, atol=1e-12, rtol=0)
