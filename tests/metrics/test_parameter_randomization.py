import copy

import pytest
import torch
from captum.attr import InputXGradient
from helpers import ModelSnapshot, small_cnn

from captum_faithful.metrics import parameter_randomization
from captum_faithful.metrics._core.parameter_randomization import (
    parameterised_layers,
)


def gradient_x_input(model, x, target):
    return InputXGradient(model).attribute(x.clone().requires_grad_(), target=target)


def test_weight_blind_explanation_stays_identical_and_gradients_drop(cnn):
    torch.manual_seed(1)
    x = torch.rand(4, 3, 12, 12)
    snapshot = ModelSnapshot.take(cnn)
    blind = parameter_randomization(lambda m, inp, t: 2.0 * inp, cnn, x, target=0)
    snapshot.assert_same(cnn)
    assert list(blind) == ["7", "3", "0"]  # Linear, Conv, Conv: top-down
    for value in blind.values():
        torch.testing.assert_close(value, torch.ones(4, dtype=torch.float64))

    generator = torch.Generator().manual_seed(0)
    sensitive = parameter_randomization(
        gradient_x_input, cnn, x, target=0, generator=generator
    )
    snapshot.assert_same(cnn)
    last = sensitive["0"]  # every layer randomised
    assert (last < 0.5).all(), last
    assert all(v.shape == (4,) for v in sensitive.values())


def test_matches_manual_cascade(cnn):
    torch.manual_seed(2)
    x = torch.rand(2, 3, 8, 8)
    result = parameter_randomization(
        gradient_x_input,
        cnn,
        x,
        target=1,
        order="bottom_up",
        similarity="pearson",
        generator=torch.Generator().manual_seed(5),
    )
    # the same cascade by hand on an independent copy
    manual = copy.deepcopy(cnn)
    original = gradient_x_input(manual, x, 1).detach().flatten(1).double()
    generator = torch.Generator().manual_seed(5)
    for name in ("0", "3", "7"):
        layer = dict(manual.named_modules())[name]
        with torch.no_grad():
            for param in layer.parameters(recurse=False):
                values = param.double()
                sigma = float(values.std())
                noise = torch.randn(
                    param.shape, generator=generator, dtype=torch.float64
                )
                param.copy_((sigma * noise).float())
        new = gradient_x_input(manual, x, 1).detach().flatten(1).double()
        for n in range(2):
            expected = torch.corrcoef(torch.stack([original[n], new[n]]))[0, 1]
            assert abs(float(result[name][n]) - float(expected)) < 1e-9


def test_model_untouched_when_explain_raises(cnn):
    snapshot = ModelSnapshot.take(cnn)
    calls = []

    def explain(model, x, target):
        calls.append(model)
        if len(calls) == 2:
            raise RuntimeError("boom")
        return x

    with pytest.raises(RuntimeError, match="boom"):
        parameter_randomization(explain, cnn, torch.rand(2, 3, 8, 8))
    snapshot.assert_same(cnn)
    assert all(m is not cnn for m in calls)


def test_parameterised_layers_in_definition_order():
    model = small_cnn()
    assert [name for name, _ in parameterised_layers(model)] == ["0", "3", "7"]


@pytest.mark.parametrize(
    "kwargs,error,name",
    [
        (dict(explain=None), TypeError, "explain"),
        (dict(model=lambda x: x), TypeError, "model"),
        (dict(order="sideways"), ValueError, "order"),
        (dict(similarity="ssim"), ValueError, "similarity"),
        (dict(inputs=torch.full((2, 3, 8, 8), float("nan"))), ValueError, "inputs"),
        (dict(model=torch.nn.ReLU()), ValueError, "model"),
    ],
)
def test_bad_input(kwargs, error, name):
    calls = []

    def explain(model, x, target):
        calls.append(1)
        return x

    args = dict(explain=explain, model=small_cnn(), inputs=torch.rand(2, 3, 8, 8))
    args.update(kwargs)
    with pytest.raises(error, match=name):
        parameter_randomization(**args)
    assert not calls


def test_cosine_similarity_against_scipy_and_its_zero_convention():
    """One cosine for the package (parameter_randomization, activation_deviation):
    scipy's value for non-zero vectors; cos(a, a) = 1 also for a zero vector; a
    zero vector against a non-zero one, 0."""
    from scipy.spatial.distance import cosine as cosine_distance

    from captum_faithful.metrics._utils import cosine_similarity

    a = torch.randn(5, 7, dtype=torch.float64)
    b = torch.randn(5, 7, dtype=torch.float64)
    got = cosine_similarity(a, b)
    for n in range(5):
        assert abs(float(got[n]) - (1 - cosine_distance(a[n], b[n]))) < 1e-12
    zero = torch.zeros(7)
    tiny = torch.full((7,), 1e-200, dtype=torch.float64)
    pairs = torch.stack([zero, zero, a[0].float(), zero]).double()
    others = torch.stack([zero, a[1].float(), zero, zero]).double()
    assert cosine_similarity(pairs, others).tolist() == [1.0, 0.0, 0.0, 1.0]
    assert float(cosine_similarity(tiny, tiny)) == pytest.approx(1.0)
