"""UNI in IntegratedGradients' place: with explicit baselines it is Captum's IG.

The toy models are the ones of Captum's own Integrated Gradients tests, shipped with
Captum in ``captum.testing`` (Captum >= 0.8): parameter-free ReLU models of one or
two inputs, models with additional forward arguments (tensors, ints, lists), a
multi-layer model explained in batches, and sigmoid / softmax classifiers. Where
Captum's tests pass no baselines (zeros for IG), UNI gets zeros: UNI's own default
learns the baselines. The reference is Captum's IntegratedGradients itself, at the
same points and weights, plus the closed-form values of the IG paper's example.
"""

import pytest
import torch
from captum.attr import IntegratedGradients, NoiseTunnel
from captum.testing.helpers.basic_models import (
    BasicModel,
    BasicModel2,
    BasicModel3,
    BasicModel4_MultiArgs,
    BasicModel5_MultiArgs,
    BasicModel6_MultiTensor,
    BasicModel_MultiLayer,
)
from captum.testing.helpers.classification_models import SigmoidModel, SoftmaxModel

from captum_faithful import UnlearnedIntegratedGradients

METHODS = ("riemann_right", "riemann_left", "riemann_middle", "riemann_trapezoid",
           "gausslegendre")  # fmt: skip


def _multilayer_inputs():
    return (
        torch.tensor([[1.5, 2.1, 1.9], [0.5, 0.0, 0.7], [1.5, 2.1, 1.1]]),
        torch.tensor([[0.3, 1.9, 2.4], [0.5, 0.6, 2.1], [1.2, 2.1, 0.2]]),
    )


def _pair():
    return (
        torch.tensor([[1.5, 2.0, 34.3], [3.4, 1.2, 2.0]]),
        torch.tensor([[3.0, 3.5, 23.2], [2.3, 1.2, 0.3]]),
    )


#: name -> (model, inputs, baselines, additional_forward_args, target)
CASES = {
    "univariable": lambda: (BasicModel(), torch.tensor([1.0]), torch.tensor([0.0]),
                            None, None),
    "univariable_scalar_baseline": lambda: (BasicModel(), torch.tensor([-1.0]),
                                            0.00001, None, None),
    "two_inputs": lambda: (BasicModel2(), (torch.tensor([3.0]), torch.tensor([1.0])),
                           (torch.tensor([0.0]), torch.tensor([0.0])), None, None),
    "tensor_argument": lambda: (
        BasicModel4_MultiArgs(),
        (torch.tensor([[1.5, 2.0, 34.3]]), torch.tensor([[3.0, 3.5, 23.2]])),
        (0.0, torch.zeros((1, 3))), torch.arange(1.0, 4.0).reshape(1, 3), None),
    "tensor_and_int_arguments": lambda: (
        BasicModel4_MultiArgs(), _pair(), (torch.zeros((2, 3)), 0.0),
        (torch.arange(1.0, 7.0).reshape(2, 3), 1), None),
    "list_and_int_arguments": lambda: (
        BasicModel5_MultiArgs(), _pair(), (torch.zeros((1, 3)), 0.00001),
        ([2, 3], 1), None),
    "two_tensors_zero_baselines": lambda: (
        BasicModel6_MultiTensor(),
        (torch.tensor([[1.5, 2.0, 3.3]]), torch.tensor([[3.0, 3.5, 2.2]])),
        (0.0, 0.0), None, None),
    "batched_tuple": lambda: (BasicModel_MultiLayer(), _multilayer_inputs(),
                              (0.0, 0.0), None, 0),
    "sigmoid": lambda: (SigmoidModel(20, 5, 1), torch.arange(0.0, 20.0).unsqueeze(0),
                        0.0, None, torch.tensor(0)),
    "softmax_batch": lambda: (SoftmaxModel(40, 20, 10),
                              torch.arange(0.0, 120.0).reshape(3, 40),
                              torch.zeros(1, 40), None, torch.tensor([5, 5, 2])),
}  # fmt: skip


def _as_tuple(value):
    return value if isinstance(value, tuple) else (value,)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_uni_with_baselines_is_captum_integrated_gradients(case, method):
    """Attributions equal Captum IG's at the same points and weights; the delta
    equals both IG's delta and Captum's ``compute_convergence_delta`` of UNI's
    attributions exactly, as Captum's tests require of IG."""
    torch.manual_seed(0)
    model, inputs, baselines, args, target = CASES[case]()
    keywords = dict(
        baselines=baselines,
        target=target,
        additional_forward_args=args,
        n_steps=50,
        method=method,
        return_convergence_delta=True,
    )
    for multiply_by_inputs in (True, False):
        uni = UnlearnedIntegratedGradients(model, multiply_by_inputs=multiply_by_inputs)
        ig = IntegratedGradients(model, multiply_by_inputs=multiply_by_inputs)
        assert uni.multiplies_by_inputs is multiply_by_inputs
        attributions, delta = uni.attribute(inputs, **keywords)
        expected, expected_delta = ig.attribute(inputs, **keywords)
        assert type(attributions) is type(inputs)
        for a, e in zip(_as_tuple(attributions), _as_tuple(expected), strict=True):
            assert a.shape == e.shape
            torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
        n_examples = _as_tuple(inputs)[0].shape[0]
        assert delta.shape == (n_examples,)
        if multiply_by_inputs:
            torch.testing.assert_close(delta, expected_delta, rtol=1e-5, atol=1e-6)
            external = uni.compute_convergence_delta(
                attributions, baselines, inputs, target=target,
                additional_forward_args=args,
            )  # fmt: skip
            assert torch.equal(delta, external)


def test_ig_paper_example_in_closed_form():
    """f(x1, x2) = ReLU(ReLU(x1) - 1 - ReLU(x2)) from (0, 0) to (3, 1): the path
    crosses the kink at t = 1/2, so IG gives (1.5, -0.5); the right Riemann sum with
    an even number of steps lands on it exactly. BasicModel3 is the same function
    written differently: implementation invariance."""
    inputs = (torch.tensor([3.0]), torch.tensor([1.0]))
    for model in (BasicModel2(), BasicModel3()):
        first, second = UnlearnedIntegratedGradients(model).attribute(
            inputs, baselines=(0.0, 0.0), n_steps=50
        )
        assert first.item() == pytest.approx(1.5, abs=1e-6)
        assert second.item() == pytest.approx(-0.5, abs=1e-6)


def test_forward_method_and_function_without_parameters():
    """IG takes any callable; so does UNI with explicit baselines."""
    model = SoftmaxModel(40, 20, 10)
    x = torch.arange(0.0, 40.0).unsqueeze(0)
    expected = IntegratedGradients(model).attribute(
        x, 0.0, target=5, n_steps=30, method="riemann_trapezoid"
    )
    for forward in (model.forward, lambda t: model(t)):
        uni = UnlearnedIntegratedGradients(forward)
        got = uni.attribute(x, 0.0, target=5, n_steps=30, method="riemann_trapezoid")
        torch.testing.assert_close(got, expected)


@pytest.mark.parametrize("internal_batch_size", [None, 3, 10, 20])
def test_internal_batch_size_and_one_sample_at_a_time(internal_batch_size):
    """Path points in chunks of ``internal_batch_size`` give the attributions of
    the whole batch, which equal those of every sample explained alone."""
    model = BasicModel_MultiLayer()
    x = torch.tensor([[1.5, 2.0, 1.3], [0.5, 0.1, 2.3], [1.5, 2.0, 1.3]])
    uni = UnlearnedIntegratedGradients(model)
    keywords = dict(target=0, n_steps=40, method="gausslegendre")
    whole, delta = uni.attribute(
        x, torch.zeros_like(x), return_convergence_delta=True, **keywords
    )
    batched, batched_delta = uni.attribute(
        x, torch.zeros_like(x), internal_batch_size=internal_batch_size,
        return_convergence_delta=True, **keywords,
    )  # fmt: skip
    torch.testing.assert_close(batched, whole)
    torch.testing.assert_close(batched_delta, delta)
    expected = IntegratedGradients(model).attribute(
        x, internal_batch_size=internal_batch_size, **keywords
    )
    torch.testing.assert_close(batched, expected)
    for i in range(3):
        alone = uni.attribute(x[i : i + 1], torch.zeros(1, 3), **keywords)
        torch.testing.assert_close(alone, whole[i : i + 1])


@pytest.mark.parametrize("nt_type", ["smoothgrad", "smoothgrad_sq", "vargrad"])
@pytest.mark.parametrize("nt_samples_batch_size", [None, 1, 3])
def test_noise_tunnel_of_uni_is_noise_tunnel_of_ig(nt_type, nt_samples_batch_size):
    """NoiseTunnel draws the same noise for both (same seed), then UNI and IG see
    the same noisy inputs: equal attributions, deltas of shape (N * nt_samples,)."""
    model = BasicModel_MultiLayer()
    inputs = _multilayer_inputs()
    results = []
    for method in (UnlearnedIntegratedGradients(model), IntegratedGradients(model)):
        torch.manual_seed(7)
        results.append(
            NoiseTunnel(method).attribute(
                inputs,
                nt_type=nt_type,
                nt_samples=5,
                nt_samples_batch_size=nt_samples_batch_size,
                stdevs=0.1,
                baselines=(0.0, 0.0),
                target=0,
                n_steps=30,
                method="riemann_middle",
                return_convergence_delta=True,
            )
        )
    (uni, uni_delta), (ig, ig_delta) = results
    assert uni_delta.shape == (3 * 5,)
    for a, e in zip(uni, ig, strict=True):
        torch.testing.assert_close(a, e, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(uni_delta, ig_delta, rtol=1e-5, atol=1e-6)


def test_classifier_completeness():
    """IG's completeness on Captum's classifiers: the attributions sum to the change
    of the target output, up to the discretisation (|delta| < 0.005 at 200 steps)."""
    torch.manual_seed(0)
    for model, x, target in (
        (SigmoidModel(20, 5, 1), torch.arange(0.0, 20.0).unsqueeze(0), 0),
        (SoftmaxModel(40, 20, 10), torch.arange(0.0, 40.0).unsqueeze(0), 5),
    ):
        _, delta = UnlearnedIntegratedGradients(model.forward).attribute(
            x, 0.0, target=target, n_steps=200, method="gausslegendre",
            return_convergence_delta=True,
        )  # fmt: skip
        assert delta.abs().max() < 0.005


def test_attribute_future_is_not_implemented():
    with pytest.raises(NotImplementedError, match="attribute_future"):
        UnlearnedIntegratedGradients(BasicModel2()).attribute_future()
