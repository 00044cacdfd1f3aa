"""UnlearnedIntegratedGradients against an independent per-sample Algorithm 1."""

from __future__ import annotations

import copy

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients, NoiseTunnel
from captum.metrics import infidelity, sensitivity_max
from helpers import ModelSnapshot, small_cnn
from torch import nn
from uni_reference import paper_epsilon, reference_baselines, reference_unlearned_probs

from captum_faithful import (
    LayerUnlearnedIntegratedGradients,
    UnlearnedIntegratedGradients,
)
from captum_faithful.attr._utils.unlearning import (
    ParametrizedForward,
    buffer_copies,
    unlearned_log_probs,
    unlearned_parameters,
)

matplotlib.use("Agg")


# ---------------------------------------------------------------- reference
# reference_baselines / reference_unlearned_probs (Algorithm 1, one sample at a time)
# live in tests/uni_reference.py, shared with the metric tests.


def kl_to(model, p_hat, x):
    with torch.no_grad():
        q = F.log_softmax(model(x), dim=1)
    return (p_hat * (p_hat.log() - q)).sum(dim=1)


# ---------------------------------------------------------------- models


class TwoInputNet(nn.Module):
    """Image and vector inputs plus a per-sample scale passed as an extra arg."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.vec = nn.Linear(5, 8)
        self.head = nn.Linear(4 * 4 + 8, 4)

    def forward(self, image, vector, scale=None):
        a = F.adaptive_avg_pool2d(F.relu(self.conv(image)), 2).flatten(1)
        b = torch.tanh(self.vec(vector))
        out = self.head(torch.cat([a, b], dim=1))
        return out if scale is None else out * scale.unsqueeze(1)


class CheckingNet(nn.Module):
    """A value check in forward is data-dependent control flow: vmap cannot run it."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn(n_classes=5, seed=3)

    def forward(self, x):
        if not torch.isfinite(x).all():
            raise ValueError("non-finite input")
        return self.body(x)


class BatchNormNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 6, 3, padding=1)
        self.bn = nn.BatchNorm2d(6)
        self.fc = nn.Linear(6, 4)

    def forward(self, x):
        return self.fc(F.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class DictOutput(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return {"logits": self.model(x), "hidden": x}


class FailingNet(nn.Module):
    """Raises in one phase of UNI (recognised by batch size and requires_grad)."""

    def __init__(self, phase):
        super().__init__()
        self.body = small_cnn(seed=5)
        self.body[3].register_forward_hook(lambda *args: None)
        self.phase = phase

    def forward(self, x):
        phase = {
            (4, False): "target",
            (1, True): "unlearning",
            (4, True): "matching",
            (60, True): "integral",
        }.get((x.shape[0], torch.is_grad_enabled()))
        if phase == self.phase:
            raise RuntimeError("boom")
        return self.body(x)


@pytest.fixture
def images():
    return torch.randn(4, 3, 16, 16)


# ---------------------------------------------------------------- Algorithm 1


def test_baselines_equal_reference_loop(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    targets = cnn(images).argmax(1)
    (expected,) = reference_baselines(cnn, images, targets)
    got = uni.compute_baselines(images)
    assert got.shape == images.shape
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_baselines_equal_reference_with_explicit_hyperparameters(cnn, images):
    uni = UnlearnedIntegratedGradients(
        cnn, unlearning_step=0.5, pgd_steps=4, epsilon=0.7, pgd_step_size=0.3
    )
    targets = torch.tensor([0, 3, 3, 9])
    (expected,) = reference_baselines(
        cnn, images, targets, eta=0.5, steps=4, eps=0.7, mu=0.3
    )
    got = uni.compute_baselines(images, target=targets)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_tuple_inputs_and_additional_args_equal_reference():
    torch.manual_seed(1)
    model = TwoInputNet().eval()
    image, vector = torch.randn(3, 3, 4, 4), torch.randn(3, 5)
    scale = torch.tensor([1.0, 2.0, 0.5])
    uni = UnlearnedIntegratedGradients(model)
    targets = model(image, vector, scale).argmax(1)
    expected = reference_baselines(model, (image, vector), targets, extra=(scale,))
    got = uni.compute_baselines((image, vector), additional_forward_args=scale)
    assert isinstance(got, tuple) and len(got) == 2
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-4, rtol=0)
    # the L2 ball is joint over both tensors
    dist = torch.sqrt(
        (got[0] - image).flatten(1).pow(2).sum(1)
        + (got[1] - vector).flatten(1).pow(2).sum(1)
    )
    # the default radius counts the elements of both: 3 * 4 * 4 + 5
    eps = paper_epsilon(3 * 4 * 4 + 5)
    assert uni.resolved_epsilon((image, vector)) == pytest.approx(eps, rel=1e-12)
    torch.testing.assert_close(dist, torch.full((3,), eps), atol=1e-6, rtol=0)
    attributions = uni.attribute((image, vector), additional_forward_args=scale)
    assert [a.shape for a in attributions] == [image.shape, vector.shape]


def test_baselines_at_distance_epsilon(cnn, images):
    for eps in (0.25, 2.0):
        baselines = UnlearnedIntegratedGradients(cnn, epsilon=eps).compute_baselines(
            images
        )
        dist = (baselines - images).flatten(1).norm(dim=1)
        torch.testing.assert_close(dist, torch.full((4,), eps), atol=1e-5, rtol=0)


def test_default_epsilon_is_the_papers_size_per_element():
    """epsilon=None: 0.25 at 3x224x224 exactly (the paper's setting), and
    0.25 * sqrt(d / 150528) for d elements per sample; the batch size and the
    values do not matter, only the per-sample shape."""
    uni = UnlearnedIntegratedGradients(small_cnn())
    assert uni.resolved_epsilon(torch.zeros(1, 3, 224, 224)) == 0.25
    assert uni.resolved_epsilon(torch.zeros(5, 3, 224, 224)) == 0.25
    # 3072 / 150528 = 1 / 49
    assert uni.resolved_epsilon(torch.rand(2, 3, 32, 32)) == pytest.approx(
        0.25 / 7, rel=1e-12
    )
    assert uni.resolved_epsilon(torch.rand(2, 1, 28, 28)) == pytest.approx(
        0.25 * (784 / 150528) ** 0.5, rel=1e-12
    )
    assert uni.resolved_epsilon(
        (torch.rand(3, 3, 16, 16), torch.rand(3, 5))
    ) == pytest.approx(0.25 * ((768 + 5) / 150528) ** 0.5, rel=1e-12)


@pytest.mark.parametrize("size", [8, 32])
def test_default_baselines_lie_at_the_resolved_epsilon(size):
    """The learned baseline's L2 distance from its input is the resolved radius,
    per sample: 0.25 / 7 at 3x32x32, 0.25 / 28 at 3x8x8."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2),
        nn.Flatten(), nn.Linear(16, 5),
    ).eval()  # fmt: skip
    x = torch.rand(3, 3, size, size)
    uni = UnlearnedIntegratedGradients(model)
    expected = 0.25 * (3 * size * size / (3 * 224 * 224)) ** 0.5
    dist = (uni.compute_baselines(x) - x).flatten(1).norm(dim=1)
    torch.testing.assert_close(dist, torch.full((3,), expected), atol=1e-6, rtol=0)
    # and they are Algorithm 1's baselines at that radius
    (reference,) = reference_baselines(model, x, model(x).argmax(1), eps=expected)
    torch.testing.assert_close(uni.compute_baselines(x), reference, atol=1e-4, rtol=0)


def test_default_epsilon_at_imagenet_size_is_025():
    """At the paper's 3x224x224 the default baseline is 0.25 away, as before."""
    model = nn.Sequential(
        nn.Conv2d(3, 2, 7, stride=8), nn.ReLU(), nn.AdaptiveAvgPool2d(1),
        nn.Flatten(), nn.Linear(2, 3),
    ).eval()  # fmt: skip
    x = torch.rand(2, 3, 224, 224)
    dist = (UnlearnedIntegratedGradients(model).compute_baselines(x) - x).flatten(1)
    torch.testing.assert_close(
        dist.norm(dim=1), torch.full((2,), 0.25), atol=1e-5, rtol=0
    )


def test_explicit_epsilon_is_used_at_every_input_size(cnn):
    """A number is the radius as given, whatever the input's size."""
    for eps in (0.25, 0.7):
        uni = UnlearnedIntegratedGradients(cnn, epsilon=eps)
        assert uni.epsilon == eps
        for shape in ((2, 3, 16, 16), (2, 3, 224, 224)):
            assert uni.resolved_epsilon(torch.rand(shape)) == eps
        x = torch.rand(2, 3, 32, 32)
        dist = (uni.compute_baselines(x) - x).flatten(1).norm(dim=1)
        torch.testing.assert_close(dist, torch.full((2,), eps), atol=1e-5, rtol=0)


def test_resolved_epsilon_checks_the_inputs(cnn):
    uni = UnlearnedIntegratedGradients(cnn)
    with pytest.raises(TypeError, match="inputs"):
        uni.resolved_epsilon([torch.rand(1, 3, 8, 8)])
    with pytest.raises(ValueError, match="inputs"):
        uni.resolved_epsilon(torch.rand(0, 3, 8, 8))


def test_kl_to_unlearned_distribution_is_lower_at_baseline(cnn, images):
    targets = cnn(images).argmax(1)
    baselines = UnlearnedIntegratedGradients(cnn).compute_baselines(images)
    for i in range(images.shape[0]):
        p_hat = reference_unlearned_probs(cnn, (images[i : i + 1],), targets[i])
        at_input = kl_to(cnn, p_hat, images[i : i + 1])
        at_baseline = kl_to(cnn, p_hat, baselines[i : i + 1])
        assert at_baseline.item() < at_input.item()


def test_pgd_steps_zero_gives_the_input_and_zero_attributions(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn, pgd_steps=0)
    assert torch.equal(uni.compute_baselines(images), images)
    assert torch.equal(uni.attribute(images), torch.zeros_like(images))


# ---------------------------------------------------------------- path integral


@pytest.mark.parametrize(
    ("n_steps", "method", "multiply"),
    [
        (15, "riemann_right", True),
        (2, "riemann_right", True),
        (5, "riemann_left", True),
        (7, "gausslegendre", True),
        (6, "riemann_trapezoid", False),
    ],
)
def test_attributions_equal_captum_ig_on_learned_baseline(
    cnn, images, n_steps, method, multiply
):
    uni = UnlearnedIntegratedGradients(cnn, multiply_by_inputs=multiply)
    baselines = uni.compute_baselines(images)
    targets = cnn(images).argmax(1)
    expected = IntegratedGradients(cnn, multiply_by_inputs=multiply).attribute(
        images, baselines=baselines, target=targets, n_steps=n_steps, method=method
    )
    got = uni.attribute(images, n_steps=n_steps, method=method)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_single_step_is_gradient_at_input_times_difference(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    baselines = uni.compute_baselines(images, target=2)
    x = images.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(cnn(x)[:, 2].sum(), x)
    got = uni.attribute(images, target=2, n_steps=1)
    torch.testing.assert_close(got, grad * (images - baselines), atol=1e-6, rtol=1e-5)


def _gradient_at(model, baselines, images, alpha, target):
    """∇f_target at baselines + alpha (images - baselines), by autograd."""
    point = (baselines + alpha * (images - baselines)).requires_grad_(True)
    (grad,) = torch.autograd.grad(model(point)[:, target].sum(), point)
    return grad


@pytest.mark.parametrize(
    ("method", "alpha"),
    [
        ("riemann_left", 0.0),
        ("riemann_middle", 0.5),
        ("riemann_right", 1.0),
        ("gausslegendre", 0.5),  # one Gauss-Legendre node: the midpoint, weight 1
    ],
)
@pytest.mark.parametrize("multiply", [True, False])
def test_single_step_is_one_gradient_at_the_rule_point(
    cnn, images, method, alpha, multiply
):
    # explicit baselines far from the inputs: the gradient at α = 0, 1/2 and 1 differ
    baselines = torch.rand(4, 3, 16, 16) * 4 - 2
    gradients = {a: _gradient_at(cnn, baselines, images, a, 2) for a in (0, 0.5, 1)}
    assert not torch.allclose(gradients[0], gradients[1], atol=1e-3)
    assert not torch.allclose(gradients[0], gradients[0.5], atol=1e-3)
    assert not torch.allclose(gradients[0.5], gradients[1], atol=1e-3)
    expected = gradients[alpha] * ((images - baselines) if multiply else 1.0)
    uni = UnlearnedIntegratedGradients(cnn, multiply_by_inputs=multiply)
    got = uni.attribute(images, baselines=baselines, target=2, n_steps=1, method=method)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    # the learned baselines take the same single point of the path
    learned = uni.compute_baselines(images, target=2)
    grad = _gradient_at(cnn, learned, images, alpha, 2)
    got = uni.attribute(images, target=2, n_steps=1, method=method)
    expected = grad * ((images - learned) if multiply else 1.0)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_trapezoid_rule_needs_two_steps(cnn, images):
    with pytest.raises(ValueError, match="n_steps"):
        UnlearnedIntegratedGradients(cnn).attribute(
            images, n_steps=1, method="riemann_trapezoid"
        )


def test_completeness_within_five_percent_at_400_steps(cnn):
    images = torch.randn(3, 3, 16, 16) * 3
    uni = UnlearnedIntegratedGradients(cnn, epsilon=3.0)
    targets = cnn(images).argmax(1)
    attributions, delta = uni.attribute(
        images, n_steps=400, return_convergence_delta=True
    )
    baselines = uni.compute_baselines(images)
    rows = torch.arange(3)
    with torch.no_grad():
        gap = cnn(images)[rows, targets] - cnn(baselines)[rows, targets]
    total = attributions.flatten(1).sum(1)
    assert bool(((total - gap).abs() <= 0.05 * gap.abs()).all())
    torch.testing.assert_close(delta, total - gap, atol=1e-5, rtol=1e-4)
    captum_delta = IntegratedGradients(cnn).compute_convergence_delta(
        attributions, baselines, images, target=targets
    )
    torch.testing.assert_close(delta, captum_delta, atol=1e-5, rtol=1e-4)


def test_explicit_baselines_are_used_as_given(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    ig = IntegratedGradients(cnn)
    for baselines in (0.5, torch.rand(1, 3, 16, 16), torch.rand(4, 3, 16, 16)):
        got, delta = uni.attribute(
            images, baselines=baselines, target=1, return_convergence_delta=True
        )
        expected, expected_delta = ig.attribute(
            images,
            baselines=baselines,
            target=1,
            n_steps=15,
            method="riemann_right",
            return_convergence_delta=True,
        )
        torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(delta, expected_delta, atol=1e-5, rtol=1e-4)


def test_internal_batch_size_gives_same_attributions(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    full = uni.attribute(images, n_steps=9)
    tiny = uni.attribute(images, n_steps=9, internal_batch_size=3)
    chunked = uni.attribute(images, n_steps=9, internal_batch_size=8)
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(tiny, full, atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("learned", [True, False])
def test_internal_batch_size_below_the_batch_bounds_every_forward(cnn, learned):
    """With fewer rows per pass than samples, the batch is explained that many
    samples at a time: no forward (baseline matching, path, completeness gap) sees
    more than internal_batch_size rows, where Captum's chunking would still put one
    path step of all 5 samples in a pass; attributions, deltas and the order of the
    samples are those of the whole batch, for learned and given baselines and with
    a per-sample additional argument."""
    from memory import LargestBatch

    class Shifted(nn.Module):
        def __init__(self):
            super().__init__()
            self.net = cnn

        def forward(self, x, shift):
            return self.net(x + shift.view(-1, 1, 1, 1))

    model = Shifted()
    x = torch.randn(5, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    shift = torch.linspace(-0.5, 0.5, 5)
    target = torch.tensor([0, 1, 2, 1, 0])
    baselines = None if learned else 0.1 * torch.ones(1, 3, 1, 1)
    uni = UnlearnedIntegratedGradients(model, unlearning_batch_size=1)
    keywords = dict(
        baselines=baselines, target=target, additional_forward_args=(shift,),
        n_steps=6, return_convergence_delta=True,
    )  # fmt: skip
    whole, whole_delta = uni.attribute(x, **keywords)
    with LargestBatch(cnn) as probe:
        chunked, delta = uni.attribute(x, internal_batch_size=2, **keywords)
    assert probe.largest <= 2
    torch.testing.assert_close(chunked, whole, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(delta, whole_delta, atol=1e-6, rtol=1e-5)
    alone = uni.attribute(
        x[3:4], baselines=baselines, target=target[3:4],
        additional_forward_args=(shift[3:4],), n_steps=6,
    )  # fmt: skip
    torch.testing.assert_close(chunked[3:4], alone, atol=1e-6, rtol=1e-5)


# ---------------------------------------------------------------- batching, vmap


def test_batched_equals_one_by_one(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    batched, delta = uni.attribute(images, return_convergence_delta=True)
    for i in range(images.shape[0]):
        single, single_delta = uni.attribute(
            images[i : i + 1], return_convergence_delta=True
        )
        torch.testing.assert_close(single, batched[i : i + 1], atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(single_delta, delta[i : i + 1], atol=1e-6, rtol=0)


def _log_probs(model, inputs, targets, mode, chunk, extra=None):
    return unlearned_log_probs(
        ParametrizedForward(model, model),
        unlearned_parameters(model),
        buffer_copies(model),
        inputs,
        targets,
        extra,
        1.0,
        chunk,
        mode,
    )


def test_vmap_path_equals_loop_path(cnn, images):
    targets = torch.tensor([1, 2, 3, 4])
    loop = _log_probs(cnn, (images,), targets, "loop", 4)
    for chunk in (1, 3, 4):
        vectorised = _log_probs(cnn, (images,), targets, "vmap", chunk)
        torch.testing.assert_close(vectorised, loop, atol=1e-5, rtol=1e-5)
    for i in range(4):
        expected = reference_unlearned_probs(cnn, (images[i : i + 1],), targets[i])
        torch.testing.assert_close(loop[i].exp(), expected[0], atol=1e-5, rtol=1e-5)


def test_vmap_path_equals_loop_path_with_tuple_and_extra_args():
    torch.manual_seed(2)
    model = TwoInputNet().eval()
    inputs = (torch.randn(5, 3, 4, 4), torch.randn(5, 5))
    extra = (torch.rand(5) + 0.5,)
    targets = torch.tensor([0, 1, 2, 3, 0])
    loop = _log_probs(model, inputs, targets, "loop", 5, extra)
    vectorised = _log_probs(model, inputs, targets, "vmap", 2, extra)
    torch.testing.assert_close(vectorised, loop, atol=1e-5, rtol=1e-5)


def test_unlearning_batch_size_does_not_change_the_result(cnn, images):
    full = UnlearnedIntegratedGradients(cnn).attribute(images)
    chunked = UnlearnedIntegratedGradients(cnn, unlearning_batch_size=1).attribute(
        images
    )
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-5)


def test_data_dependent_control_flow_falls_back_to_the_loop():
    model = CheckingNet().eval()
    images = torch.randn(3, 3, 8, 8)
    targets = model(images).argmax(1)
    with pytest.raises(RuntimeError, match="data-dependent control flow"):
        _log_probs(model, (images,), targets, "vmap", 3)
    auto = _log_probs(model, (images,), targets, "auto", 3)
    loop = _log_probs(model, (images,), targets, "loop", 3)
    torch.testing.assert_close(auto, loop, atol=0, rtol=0)
    (expected,) = reference_baselines(model, images, targets)
    got = UnlearnedIntegratedGradients(model).compute_baselines(images)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_batchnorm_in_train_mode_uses_copies_of_the_buffers():
    torch.manual_seed(3)
    model = BatchNormNet().train()
    images = torch.randn(4, 3, 8, 8)
    snapshot = ModelSnapshot.take(model)
    targets = torch.tensor([0, 1, 2, 3])
    # vmap refuses the in-place update of the (unbatched) running statistics
    with pytest.raises(RuntimeError, match="running_mean or running_var"):
        _log_probs(model, (images,), targets, "vmap", 4)
    auto = _log_probs(model, (images,), targets, "auto", 4)
    loop = _log_probs(model, (images,), targets, "loop", 4)
    torch.testing.assert_close(auto, loop, atol=0, rtol=0)
    attributions = UnlearnedIntegratedGradients(model).attribute(images, target=targets)
    assert torch.isfinite(attributions).all()
    snapshot.assert_same(model)


# ---------------------------------------------------------------- model safety


def test_model_untouched_after_success(images):
    model = small_cnn(seed=1)
    model[0].weight.requires_grad_(False)
    model[3].train()
    model[0].register_forward_hook(lambda *args: None)
    snapshot = ModelSnapshot.take(model)
    uni = UnlearnedIntegratedGradients(model)
    uni.attribute(images, return_convergence_delta=True)
    uni.attribute(images, baselines=0.0, internal_batch_size=8)
    snapshot.assert_same(model)
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("phase", ["target", "unlearning", "matching", "integral"])
def test_model_untouched_after_exception_in_forward(images, phase):
    model = FailingNet(phase).eval()
    model.body[0].requires_grad_(False)
    snapshot = ModelSnapshot.take(model)
    with pytest.raises(RuntimeError, match="boom"):
        UnlearnedIntegratedGradients(model, unlearning_batch_size=2).attribute(images)
    snapshot.assert_same(model)
    assert all(p.grad is None for p in model.parameters())


def test_user_inputs_not_modified(cnn, images):
    x = images.clone().requires_grad_(True)
    UnlearnedIntegratedGradients(cnn).attribute(x)
    assert x.requires_grad and x.grad is None
    assert torch.equal(x.detach(), images)


def test_only_trainable_parameters_are_unlearned(images):
    model = small_cnn(seed=2)
    model[0].requires_grad_(False)
    targets = model(images).argmax(1)
    (expected,) = reference_baselines(model, images, targets)
    got = UnlearnedIntegratedGradients(model).compute_baselines(images)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=0)


def test_frozen_model_unlearns_all_parameters(cnn, images):
    trainable = UnlearnedIntegratedGradients(cnn).compute_baselines(images)
    cnn.requires_grad_(False)
    frozen = UnlearnedIntegratedGradients(cnn).compute_baselines(images)
    torch.testing.assert_close(frozen, trainable, atol=1e-6, rtol=0)
    assert not any(p.requires_grad for p in cnn.parameters())


def test_model_output_mapping_is_reduced_to_logits(cnn, images):
    wrapped = DictOutput(cnn)
    expected = UnlearnedIntegratedGradients(cnn).attribute(images)
    got = UnlearnedIntegratedGradients(wrapped).attribute(images)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


def test_forward_function_with_model_argument(cnn, images):
    def forward(x):
        return cnn(x * 2.0)

    uni = UnlearnedIntegratedGradients(forward, model=cnn)
    targets = forward(images).argmax(1)
    expected = IntegratedGradients(forward).attribute(
        images,
        baselines=uni.compute_baselines(images),
        target=targets,
        n_steps=15,
        method="riemann_right",
    )
    torch.testing.assert_close(uni.attribute(images), expected, atol=1e-6, rtol=1e-5)
    (reference,) = reference_baselines(_Doubling(cnn), images, targets)
    torch.testing.assert_close(
        uni.compute_baselines(images), reference, atol=1e-4, rtol=0
    )


class _Doubling(nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x * 2.0)


# ---------------------------------------------------------------- targets


def test_every_captum_target_form_gives_the_same_result(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    expected = uni.attribute(images, target=torch.tensor([3, 3, 3, 3]))
    for target in (3, (3,), torch.tensor(3), torch.tensor([3]), [3, 3, 3, 3]):
        torch.testing.assert_close(
            uni.attribute(images, target=target), expected, atol=0, rtol=0
        )
    per_sample = uni.attribute(images, target=[0, 1, 2, 3])
    torch.testing.assert_close(
        uni.attribute(images, target=[(0,), (1,), (2,), (3,)]), per_sample
    )
    torch.testing.assert_close(
        uni.attribute(images, target=torch.tensor([0, 1, 2, 3])), per_sample
    )


def test_target_none_explains_the_predicted_class(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    predicted = cnn(images).argmax(1)
    torch.testing.assert_close(
        uni.attribute(images), uni.attribute(images, target=predicted)
    )


# ---------------------------------------------------------------- Captum drop-in


def test_works_under_no_grad(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    expected = uni.attribute(images)
    with torch.no_grad():
        got = uni.attribute(images)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_noise_tunnel(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    expected = uni.attribute(images, target=2)
    nt = NoiseTunnel(uni)
    got = nt.attribute(images, nt_type="smoothgrad", nt_samples=3, stdevs=0.0, target=2)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    noisy, delta = nt.attribute(
        images,
        nt_type="smoothgrad_sq",
        nt_samples=2,
        stdevs=0.1,
        target=2,
        return_convergence_delta=True,
    )
    assert noisy.shape == images.shape and delta.shape == (8,)
    assert torch.isfinite(noisy).all() and (noisy >= 0).all()


def test_captum_infidelity_with_uni_attributions(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    attributions = uni.attribute(images, target=4)
    noise = torch.randn(images.shape, generator=torch.Generator().manual_seed(0))

    def perturb(inputs):
        return noise * 0.1, inputs - noise * 0.1

    got = infidelity(
        cnn, perturb, images, attributions, target=4, n_perturb_samples=1,
        normalize=False,
    )  # fmt: skip
    with torch.no_grad():
        change = cnn(images)[:, 4] - cnn(images - noise * 0.1)[:, 4]
    dot = (noise * 0.1 * attributions).flatten(1).sum(1)
    torch.testing.assert_close(got, (dot - change) ** 2, atol=1e-5, rtol=1e-4)


def test_captum_sensitivity_max_calls_uni_under_no_grad(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    x = images[:2]
    n_perturb = 3
    noise = 0.05 * torch.randn(2 * n_perturb, *x.shape[1:])
    calls = []

    def explain(inputs, target):
        # what Captum hands over (a 1-tuple for the clean inputs), and whether it
        # disabled autograd for the call
        (tensor,) = inputs if isinstance(inputs, tuple) else (inputs,)
        calls.append((torch.is_grad_enabled(), tensor.clone()))
        return uni.attribute(inputs, target=target)

    def perturb(inputs):  # deterministic: x_i + noise[i * n_perturb + j]
        return inputs + noise

    sens = sensitivity_max(
        explain, x, perturb_func=perturb, target=1, n_perturb_samples=n_perturb
    )
    # sensitivity_max explains the clean inputs and one batch of perturbed ones,
    # both under torch.no_grad() (so UNI must enable autograd itself)
    assert len(calls) == 2
    assert [enabled for enabled, _ in calls] == [False, False]
    torch.testing.assert_close(calls[0][1], x, atol=0, rtol=0)
    expected_perturbed = x.repeat_interleave(n_perturb, dim=0) + noise
    torch.testing.assert_close(calls[1][1], expected_perturbed, atol=0, rtol=0)
    # independent value: every explanation computed with autograd on, one sample at
    # a time; max_j ‖a(x_i + δ_ij) − a(x_i)‖_F / ‖a(x_i)‖_F
    assert torch.is_grad_enabled()
    expected = []
    for i in range(2):
        clean = uni.attribute(x[i : i + 1], target=1)
        ratios = []
        for j in range(n_perturb):
            moved = expected_perturbed[i * n_perturb + j : i * n_perturb + j + 1]
            diff = uni.attribute(moved, target=1) - clean
            ratios.append(float(diff.norm() / clean.norm()))
        expected.append(max(ratios))
    assert min(expected) > 0.01  # the noise moves the explanation measurably
    torch.testing.assert_close(sens, torch.tensor(expected), atol=1e-5, rtol=1e-4)


def test_visualize_image_attr(cnn, images):
    from captum.attr import visualization as viz

    attributions = UnlearnedIntegratedGradients(cnn).attribute(images[:1])
    figure, axis = viz.visualize_image_attr(
        attributions[0].permute(1, 2, 0).numpy(),
        images[0].permute(1, 2, 0).numpy(),
        method="blended_heat_map",
        sign="all",
        show_colorbar=True,
        use_pyplot=False,
    )
    assert len(figure.axes) == 2 and axis in figure.axes


# ---------------------------------------------------------------- bad input


def test_bad_inputs_raise_clear_errors(cnn, images):
    uni = UnlearnedIntegratedGradients(cnn)
    bad = images.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="inputs"):
        uni.attribute(bad)
    bad[0, 0, 0, 0] = float("inf")
    with pytest.raises(ValueError, match="inputs"):
        uni.compute_baselines(bad)
    with pytest.raises(ValueError, match="n_steps"):
        uni.attribute(images, n_steps=0)
    with pytest.raises(TypeError, match="n_steps"):
        uni.attribute(images, n_steps=2.5)
    with pytest.raises(ValueError, match="method"):
        uni.attribute(images, method="simpson")
    with pytest.raises(ValueError, match="target"):
        uni.attribute(images, target=10)
    with pytest.raises(ValueError, match="target"):
        uni.attribute(images, target=[0, 1, 2, -1])
    with pytest.raises(ValueError, match="target"):
        uni.attribute(images, target=[0, 1])
    with pytest.raises(ValueError, match="target"):
        uni.attribute(images, target=(1, 2))
    with pytest.raises(ValueError, match="baselines"):
        uni.attribute(images, baselines=torch.zeros(2, 3, 16, 16))
    with pytest.raises(ValueError, match="baselines"):
        uni.attribute(images, baselines=torch.full((1, 3, 16, 16), float("nan")))
    with pytest.raises(TypeError, match="inputs"):
        uni.attribute(images.long())
    with pytest.raises(TypeError, match="inputs"):
        uni.attribute([images])
    with pytest.raises(ValueError, match="additional_forward_args"):
        UnlearnedIntegratedGradients(TwoInputNet()).attribute(
            (images[:, :, :4, :4], torch.randn(4, 5)),
            additional_forward_args=torch.ones(3),
        )
    with pytest.raises(ValueError, match="internal_batch_size"):
        uni.attribute(images, internal_batch_size=0)


@pytest.mark.parametrize(
    ("kwargs", "name"),
    [
        ({"epsilon": 0.0}, "epsilon"),
        ({"epsilon": -1.0}, "epsilon"),
        ({"pgd_steps": -1}, "pgd_steps"),
        ({"pgd_step_size": 0.0}, "pgd_step_size"),
        ({"pgd_step_size": float("inf")}, "pgd_step_size"),
        ({"epsilon": float("nan")}, "epsilon"),
        ({"unlearning_step": 0.0}, "unlearning_step"),
        ({"unlearning_batch_size": 0}, "unlearning_batch_size"),
    ],
)
def test_bad_hyperparameters_raise(cnn, kwargs, name):
    with pytest.raises(ValueError, match=name):
        UnlearnedIntegratedGradients(cnn, **kwargs)


@pytest.mark.parametrize("bad", ["0.25", True, [0.25]])
def test_epsilon_that_is_no_number_is_refused(cnn, bad):
    with pytest.raises(TypeError, match="`epsilon` must be a real number"):
        UnlearnedIntegratedGradients(cnn, epsilon=bad)


@pytest.mark.parametrize("bad", [None, 3, "cnn"])
def test_a_forward_func_that_is_not_callable_is_refused_at_construction(cnn, bad):
    from captum_faithful.attr import LayerUnlearnedIntegratedGradients

    name = type(bad).__name__
    with pytest.raises(TypeError, match=rf"`forward_func`.*callable.*{name}"):
        UnlearnedIntegratedGradients(bad)
    with pytest.raises(TypeError, match=rf"`forward_func`.*callable.*{name}"):
        UnlearnedIntegratedGradients(bad, model=cnn)
    with pytest.raises(TypeError, match=rf"`forward_func`.*callable.*{name}"):
        LayerUnlearnedIntegratedGradients(bad, cnn[0], model=cnn)


def test_parameters_are_needed_only_to_learn_baselines(cnn, images):
    """Explicit baselines are used as given, so a forward function without
    parameters works, as with Captum's IntegratedGradients; learning baselines
    asks for the module that holds the parameters."""
    x = images[:2]
    explicit = UnlearnedIntegratedGradients(lambda t: cnn(t)).attribute(
        x, baselines=0.0, target=1
    )
    assert torch.equal(
        explicit, UnlearnedIntegratedGradients(cnn).attribute(x, 0.0, target=1)
    )
    UnlearnedIntegratedGradients(nn.Flatten()).attribute(x, baselines=0.0, target=1)
    for uni in (
        UnlearnedIntegratedGradients(lambda t: cnn(t)),
        UnlearnedIntegratedGradients(nn.Flatten()),
        UnlearnedIntegratedGradients(lambda t: cnn(t), model=nn.ReLU()),
    ):
        with pytest.raises(ValueError, match="`model=`.*`baselines`"):
            uni.attribute(x)
    with pytest.raises(TypeError, match="model"):
        UnlearnedIntegratedGradients(cnn, model="cnn")


def test_learned_baselines_need_a_log_probability_when_one_score_per_sample(images):
    """One score per sample is unlearned as a log-probability; a positive score
    is none, so learning the baselines refuses it and says what to return."""
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 1), nn.Flatten(0))
    assert (model(images) > 0).any()
    with pytest.raises(
        ValueError, match="one score per sample as a finite log-prob.*log_"
    ):
        UnlearnedIntegratedGradients(model).attribute(images)
    # explicit baselines: one score per sample is what Captum's IG explains
    uni = UnlearnedIntegratedGradients(model).attribute(images, baselines=0.0)
    expected = IntegratedGradients(model).attribute(
        images, baselines=0.0, n_steps=15, method="riemann_right"
    )
    torch.testing.assert_close(uni, expected)


def test_captum_attribution_interface(cnn):
    uni = UnlearnedIntegratedGradients(cnn, multiply_by_inputs=False)
    assert uni.has_convergence_delta()
    assert not uni.multiplies_by_inputs
    assert UnlearnedIntegratedGradients(cnn).multiplies_by_inputs
    assert uni.forward_func is cnn
    # epsilon None: the paper's 0.25 scaled to each call's input size
    assert (uni.unlearning_step, uni.pgd_steps, uni.epsilon) == (1.0, 10, None)
    assert (uni.pgd_step_size, uni.unlearning_batch_size) == (0.1, None)
    assert hasattr(uni.attribute, "__wrapped__")  # @log_usage, used by NoiseTunnel


# ------------------------------------------------------ non-finite model outputs


class ScaledNet(nn.Module):
    """``small_cnn(x) * scale``: a NaN in ``scale`` (an additional forward
    argument, one row per sample) makes the output of that sample NaN."""

    def __init__(self):
        super().__init__()
        self.body = small_cnn(seed=5)

    def forward(self, x, scale):
        return self.body(x) * scale


NAN_CALLS = {
    "attribute": lambda net, x, scale: UnlearnedIntegratedGradients(net).attribute(
        x, additional_forward_args=(scale,)
    ),
    "compute_baselines": lambda net, x, scale: UnlearnedIntegratedGradients(
        net
    ).compute_baselines(x, additional_forward_args=(scale,)),
    "explicit baselines": lambda net, x, scale: UnlearnedIntegratedGradients(
        net
    ).attribute(x, baselines=0.0, additional_forward_args=(scale,)),
    "layer": lambda net, x, scale: LayerUnlearnedIntegratedGradients(
        net, net.body[3]
    ).attribute(x, additional_forward_args=(scale,)),
}


@pytest.mark.parametrize("call", list(NAN_CALLS))
def test_nan_from_the_model_is_refused_at_the_first_forward(call, images):
    """A forward that returns NaN for one sample (here through a NaN
    ``additional_forward_args``) stops the method with a ValueError naming it and
    the sample, where it would have returned NaN attributions; the model comes
    back untouched."""
    net = ScaledNet()
    scale = torch.ones(4, 1)
    scale[2] = float("nan")
    snapshot = ModelSnapshot.take(net)
    name = "Layer" * (call == "layer") + "UnlearnedIntegratedGradients"
    with pytest.raises(
        ValueError, match=rf"^{name}: the model returned non-finite .*samples \[2\]"
    ):
        NAN_CALLS[call](net, images, scale)
    snapshot.assert_same(net)
    # the same call on finite arguments runs
    assert NAN_CALLS[call](net, images, torch.ones(4, 1)).isfinite().all()


def test_nan_weights_are_refused_at_the_first_forward(cnn, images):
    broken = copy.deepcopy(cnn)
    with torch.no_grad():
        broken[-1].bias[3] = float("nan")
    with pytest.raises(ValueError, match=r"returned non-finite .*\[0, 1, 2, 3\]"):
        UnlearnedIntegratedGradients(broken).attribute(images, target=0)


def test_a_huge_unlearning_step_is_named(cnn, images):
    """``unlearning_step=1e30`` moves the parameters so far that the unlearned
    model returns NaN: the error names ``unlearning_step`` and its value instead
    of NaN attributions, and the model is untouched."""
    snapshot = ModelSnapshot.take(cnn)
    uni = UnlearnedIntegratedGradients(cnn, unlearning_step=1e30)
    with pytest.raises(ValueError, match=r"`unlearning_step`=1e\+30 .*smaller"):
        uni.attribute(images, target=0)
    snapshot.assert_same(cnn)
    # what the message says: the unlearned forward itself is non-finite
    params = unlearned_parameters(cnn)
    log_probs = unlearned_log_probs(
        ParametrizedForward(cnn, cnn), params, {}, (images,), torch.zeros(4).long(),
        None, 1e30, 4,
    )  # fmt: skip
    assert not log_probs.isfinite().all()
    assert (
        UnlearnedIntegratedGradients(cnn).attribute(images, target=0).isfinite().all()
    )
