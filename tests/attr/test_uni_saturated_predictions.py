"""UNI on confident predictions: the unlearning step and the baselines do not
underflow in float32."""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from captum_faithful import UnlearnedIntegratedGradients
from captum_faithful.attr._utils.unlearning import (
    ParametrizedForward,
    buffer_copies,
    unlearned_log_probs,
    unlearned_parameters,
)


def model_with_margin(margin, seed=0, n=1):
    """A small MLP whose last layer is scaled so that the smallest logit margin
    (top class minus runner-up) over the ``n`` inputs is ``margin``."""
    torch.manual_seed(seed)
    model = nn.Sequential(
        nn.Flatten(), nn.Linear(12, 16), nn.Tanh(), nn.Linear(16, 4)
    ).eval()
    x = torch.rand(n, 3, 2, 2)
    with torch.no_grad():
        top = model(x).topk(2, dim=1).values
        scale = margin / (top[:, 0] - top[:, 1]).min()
        model[3].weight.mul_(scale)
        model[3].bias.mul_(scale)
    return model, x


def float64_unlearned_log_probs(model, x, classes, step=1.0):
    """Algorithm 1's unlearning step in float64 with autograd's cross-entropy
    gradient, one sample at a time (exact while exp(-margin) >> 1e-16)."""
    rows = []
    for i in range(x.shape[0]):
        double = copy.deepcopy(model).double()
        xi = x[i : i + 1].double()
        loss = F.cross_entropy(double(xi), classes[i : i + 1])
        grads = torch.autograd.grad(loss, list(double.parameters()))
        norm = torch.sqrt(sum(g.pow(2).sum() for g in grads))
        with torch.no_grad():
            for param, grad in zip(double.parameters(), grads, strict=True):
                param.add_(step * grad / norm)
            rows.append(torch.log_softmax(double(xi), dim=1)[0])
    return torch.stack(rows)


@pytest.mark.parametrize("margin", [10.0, 17.0, 20.0])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_unlearning_step_equals_float64_on_confident_predictions(margin, seed):
    """From a margin of ~17 the float32 softmax of the top class rounds to 1, so
    the cross-entropy gradient lost its target component and pointed elsewhere
    (log-probabilities off by 18 to 140 at margin 17); the log-odds gradient has
    the same direction without the cancellation (measured: <= 2e-5 off)."""
    model, x = model_with_margin(margin, seed)
    classes = model(x).argmax(dim=1)
    got = unlearned_log_probs(
        ParametrizedForward(model, model),
        unlearned_parameters(model),
        buffer_copies(model),
        (x,),
        classes,
        None,
        1.0,
        1,
    )
    expected = float64_unlearned_log_probs(model, x, classes)
    torch.testing.assert_close(got.double(), expected, atol=1e-4, rtol=0)


@pytest.mark.parametrize("margin", [60.0, 100.0, 200.0])
def test_saturated_predictions_get_a_baseline_at_epsilon(margin):
    """Past a margin of ~50 the float32 gradient norm underflowed to 0: nothing was
    unlearned, the baseline equalled the input and the attributions were all zero,
    silently."""
    model, x = model_with_margin(margin, n=3)
    uni = UnlearnedIntegratedGradients(model, epsilon=0.25)
    baselines = uni.compute_baselines(x)
    distances = (baselines - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(distances, torch.full((3,), 0.25), atol=1e-5, rtol=0)
    attributions = uni.attribute(x)
    assert (attributions.flatten(1).abs().sum(dim=1) > 0).all()


def test_a_baseline_that_cannot_move_is_reported():
    """With a tiny unlearning step on logits ~300 apart, the unlearned and original
    predictions agree in float32 and the KL gradient is exactly zero: UNI says
    which samples got the input as their baseline."""
    model, x = model_with_margin(300.0, n=3)
    uni = UnlearnedIntegratedGradients(model, unlearning_step=1e-3)
    with pytest.warns(UserWarning, match=r"samples \[0, 1, 2\] equals the input"):
        baselines = uni.compute_baselines(x)
    assert torch.equal(baselines, x)
