"""LayerUnlearnedIntegratedGradients on a tiny BERT classifier with padding."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerIntegratedGradients
from helpers import ModelSnapshot, fails_after, small_cnn
from torch import nn
from uni_reference import unlearned_copy

from captum_faithful import (
    LayerUnlearnedIntegratedGradients,
    UnlearnedIntegratedGradients,
)

transformers = pytest.importorskip("transformers")

PAD = 0


@pytest.fixture
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(
        vocab_size=40,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=32,
        max_position_embeddings=16,
        num_labels=3,
        pad_token_id=PAD,
    )
    return transformers.BertForSequenceClassification(config).eval()


@pytest.fixture
def batch():
    generator = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 40, (3, 8), generator=generator)
    mask = torch.ones(3, 8, dtype=torch.long)
    ids[1, 5:], mask[1, 5:] = PAD, 0
    ids[2, 3:], mask[2, 3:] = PAD, 0
    return ids, mask


def forward_of(model):
    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask)

    return forward


# ---------------------------------------------------------------- reference


def logits_with_embeddings(model, h, ids, mask):
    """Logits when the embedding layer returns ``h`` (the test's own hook)."""
    handle = model.bert.embeddings.register_forward_hook(lambda m, a, o: h)
    try:
        return model(input_ids=ids, attention_mask=mask).logits
    finally:
        handle.remove()


def reference_layer_uni(
    model, ids, mask, targets, eta=1.0, steps=10, eps=0.25, mu=0.1, n_steps=15
):
    """Algorithm 1 on the embedding output, one sample at a time, right Riemann IG."""
    baselines, attributions = [], []
    for i in range(ids.shape[0]):
        idi, mi, ci = ids[i : i + 1], mask[i : i + 1], targets[i : i + 1]

        def loss_of(stepped, idi=idi, mi=mi, ci=ci):
            return F.cross_entropy(stepped(input_ids=idi, attention_mask=mi).logits, ci)

        unlearned = unlearned_copy(model, loss_of, eta)
        with torch.no_grad():
            p_hat = F.softmax(unlearned(input_ids=idi, attention_mask=mi).logits, 1)
            h = model.bert.embeddings(input_ids=idi)
        delta = torch.zeros_like(h)
        for _ in range(steps):
            delta.requires_grad_(True)
            q = F.log_softmax(logits_with_embeddings(model, h + delta, idi, mi), 1)
            kl = (p_hat * (p_hat.log() - q)).sum()
            (g,) = torch.autograd.grad(kl, delta)
            delta = delta.detach() - mu * g
            delta = eps * delta / delta.norm()
        h_base = h + delta
        total = torch.zeros_like(h)
        for k in range(1, n_steps + 1):
            point = (h_base + k / n_steps * (h - h_base)).requires_grad_(True)
            out = logits_with_embeddings(model, point, idi, mi)[0, ci[0]]
            total += torch.autograd.grad(out, point)[0] / n_steps
        baselines.append(h_base)
        attributions.append(total * (h - h_base))
    return torch.cat(baselines), torch.cat(attributions)


# ---------------------------------------------------------------- tests


def test_equals_independent_computation_with_padding(bert, batch):
    ids, mask = batch
    uni = LayerUnlearnedIntegratedGradients(
        forward_of(bert), bert.bert.embeddings, model=bert
    )
    targets = bert(input_ids=ids, attention_mask=mask).logits.argmax(1)
    expected_base, expected_attr = reference_layer_uni(bert, ids, mask, targets)
    got_base = uni.compute_baselines(ids, additional_forward_args=(mask,))
    torch.testing.assert_close(got_base, expected_base, atol=1e-4, rtol=0)
    got_attr, delta = uni.attribute(
        ids, additional_forward_args=(mask,), return_convergence_delta=True
    )
    assert got_attr.shape == (3, 8, 16)
    torch.testing.assert_close(got_attr, expected_attr, atol=1e-4, rtol=1e-3)
    with torch.no_grad():
        h = bert.bert.embeddings(input_ids=ids)
        rows = torch.arange(3)
        gap = (
            logits_with_embeddings(bert, h, ids, mask)[rows, targets]
            - logits_with_embeddings(bert, expected_base, ids, mask)[rows, targets]
        )
    torch.testing.assert_close(
        delta, expected_attr.flatten(1).sum(1) - gap, atol=1e-4, rtol=1e-3
    )


def test_layer_baseline_at_distance_epsilon_over_the_whole_layer(bert, batch):
    ids, mask = batch
    for eps in (0.25, 1.5):
        uni = LayerUnlearnedIntegratedGradients(
            forward_of(bert), bert.bert.embeddings, model=bert, epsilon=eps
        )
        base = uni.compute_baselines(ids, target=1, additional_forward_args=(mask,))
        with torch.no_grad():
            h = bert.bert.embeddings(input_ids=ids)
        dist = (base - h).flatten(1).norm(dim=1)
        torch.testing.assert_close(dist, torch.full((3,), eps), atol=1e-5, rtol=0)


def test_padding_through_the_attention_mask(bert, batch):
    """Padded positions get zero attribution; real tokens match the unpadded run."""
    ids, mask = batch
    uni = LayerUnlearnedIntegratedGradients(
        forward_of(bert), bert.bert.embeddings, model=bert
    )
    padded = uni.attribute(ids, target=2, additional_forward_args=(mask,))
    for i, length in ((1, 5), (2, 3)):
        assert torch.equal(padded[i, length:], torch.zeros_like(padded[i, length:]))
        alone = uni.attribute(
            ids[i : i + 1, :length],
            target=2,
            additional_forward_args=(mask[i : i + 1, :length],),
        )
        torch.testing.assert_close(alone[0], padded[i, :length], atol=1e-4, rtol=1e-3)


def test_explicit_baselines_equal_captum_layer_ig(bert, batch):
    ids, mask = batch
    forward = forward_of(bert)
    reference = torch.full_like(ids, PAD)
    uni = LayerUnlearnedIntegratedGradients(forward, bert.bert.embeddings, model=bert)
    got, delta = uni.attribute(
        ids,
        baselines=reference,
        target=[0, 1, 2],
        additional_forward_args=(mask,),
        return_convergence_delta=True,
    )

    def logits(input_ids, attention_mask):
        return forward(input_ids, attention_mask).logits

    expected, expected_delta = LayerIntegratedGradients(
        logits, bert.bert.embeddings
    ).attribute(
        ids,
        baselines=reference,
        target=[0, 1, 2],
        additional_forward_args=(mask,),
        n_steps=15,
        method="riemann_right",
        return_convergence_delta=True,
    )
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(delta, expected_delta, atol=1e-4, rtol=1e-3)


def test_internal_batch_size_and_one_by_one(bert, batch):
    ids, mask = batch
    uni = LayerUnlearnedIntegratedGradients(
        forward_of(bert), bert.bert.embeddings, model=bert
    )
    full = uni.attribute(ids, additional_forward_args=(mask,), n_steps=6)
    chunked = uni.attribute(
        ids, additional_forward_args=(mask,), n_steps=6, internal_batch_size=6
    )
    torch.testing.assert_close(chunked, full, atol=1e-6, rtol=1e-5)
    single = uni.attribute(ids[:1], additional_forward_args=(mask[:1],), n_steps=6)
    torch.testing.assert_close(single, full[:1], atol=1e-5, rtol=1e-4)


def test_model_untouched(bert, batch):
    ids, mask = batch
    bert.bert.encoder.layer[0].train()
    bert.bert.embeddings.word_embeddings.requires_grad_(False)
    snapshot = ModelSnapshot.take(bert)
    uni = LayerUnlearnedIntegratedGradients(
        forward_of(bert), bert.bert.embeddings, model=bert
    )
    torch.manual_seed(0)
    attributions = uni.attribute(ids, additional_forward_args=(mask,))
    assert torch.isfinite(attributions).all()
    snapshot.assert_same(bert)


def test_model_untouched_after_exception(batch):
    model = small_cnn()
    calls = []

    def forward(x):
        calls.append(x.shape[0])
        if len(calls) > 3:
            raise RuntimeError("boom")
        return model(x)

    snapshot = ModelSnapshot.take(model)
    uni = LayerUnlearnedIntegratedGradients(forward, model[3], model=model)
    with pytest.raises(RuntimeError, match="boom"):
        uni.attribute(torch.randn(2, 3, 8, 8))
    snapshot.assert_same(model)


def test_layer_default_epsilon_is_025_at_any_layer_size():
    """The layer method keeps the paper's 0.25 (a layer's values are no [0, 1]
    pixels), not the input method's size-scaled default, and refuses None."""
    model = small_cnn()
    images = torch.randn(2, 3, 16, 16)
    uni = LayerUnlearnedIntegratedGradients(model, model[3])
    assert uni.epsilon == 0.25
    assert uni.resolved_epsilon(images) == 0.25
    with torch.no_grad():
        h = model[:4](images)  # 16 x 8 x 8 values per sample
    dist = (uni.compute_baselines(images) - h).flatten(1).norm(dim=1)
    torch.testing.assert_close(dist, torch.full((2,), 0.25), atol=1e-6, rtol=0)
    with pytest.raises(TypeError, match="`epsilon` must be a real number"):
        LayerUnlearnedIntegratedGradients(model, model[3], epsilon=None)


def test_conv_layer_of_a_cnn_matches_the_completeness_gap():
    model = small_cnn()
    images = torch.randn(3, 3, 16, 16)
    uni = LayerUnlearnedIntegratedGradients(model, model[3], epsilon=2.0)
    attributions, delta = uni.attribute(
        images, n_steps=200, return_convergence_delta=True
    )
    assert attributions.shape == (3, 16, 8, 8)
    base = uni.compute_baselines(images)
    with torch.no_grad():
        h = model[:4](images)
    dist = (base - h).flatten(1).norm(dim=1)
    torch.testing.assert_close(dist, torch.full((3,), 2.0), atol=1e-5, rtol=0)
    targets = model(images).argmax(1)
    with torch.no_grad():
        tail = model[4:]
        rows = torch.arange(3)
        gap = tail(h)[rows, targets] - tail(base)[rows, targets]
    total = attributions.flatten(1).sum(1)
    torch.testing.assert_close(delta, total - gap, atol=1e-5, rtol=1e-4)
    assert bool(((total - gap).abs() <= 0.05 * gap.abs()).all())


def test_works_under_no_grad(bert, batch):
    ids, mask = batch
    uni = LayerUnlearnedIntegratedGradients(
        forward_of(bert), bert.bert.embeddings, model=bert
    )
    expected = uni.attribute(ids, additional_forward_args=(mask,), n_steps=3)
    with torch.no_grad():
        got = uni.attribute(ids, additional_forward_args=(mask,), n_steps=3)
    torch.testing.assert_close(got, expected, atol=0, rtol=0)


def test_bad_input(bert, batch):
    ids, mask = batch
    forward = forward_of(bert)
    with pytest.raises(TypeError, match="layer"):
        LayerUnlearnedIntegratedGradients(forward, "embeddings", model=bert)
    with pytest.raises(ValueError, match="model="):
        LayerUnlearnedIntegratedGradients(forward, bert.bert.embeddings).attribute(
            ids, additional_forward_args=(mask,)
        )
    with pytest.raises(ValueError, match="epsilon"):
        LayerUnlearnedIntegratedGradients(
            forward, bert.bert.embeddings, model=bert, epsilon=0
        )
    uni = LayerUnlearnedIntegratedGradients(forward, bert.bert.embeddings, model=bert)
    with pytest.raises(ValueError, match="target"):
        uni.attribute(ids, target=3, additional_forward_args=(mask,))
    with pytest.raises(ValueError, match="n_steps"):
        uni.attribute(ids, additional_forward_args=(mask,), n_steps=0)
    with pytest.raises(ValueError, match="additional_forward_args"):
        uni.attribute(ids, additional_forward_args=(mask[:2],))
    with pytest.raises(ValueError, match="baselines"):
        uni.attribute(ids, baselines=torch.zeros(3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="once"):
        LayerUnlearnedIntegratedGradients(
            forward, torch.nn.Linear(2, 2), model=bert
        ).attribute(ids, additional_forward_args=(mask,))


class _Split(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.a = torch.nn.Linear(6, 4)
        self.b = torch.nn.Linear(6, 3)

    def forward(self, x):
        return torch.tanh(self.a(x)), torch.relu(self.b(x))


class _TupleLayerNet(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.split = _Split()
        self.head = torch.nn.Linear(7, 5)

    def forward(self, x):
        a, b = self.split(x)
        return self.head(torch.cat([a, b], dim=1))


def test_tuple_layer_output_is_perturbed_jointly():
    torch.manual_seed(4)
    model = _TupleLayerNet()
    x = torch.randn(4, 6)
    uni = LayerUnlearnedIntegratedGradients(model, model.split, epsilon=0.5)
    attributions, delta = uni.attribute(x, n_steps=300, return_convergence_delta=True)
    assert isinstance(attributions, tuple)
    assert [a.shape for a in attributions] == [(4, 4), (4, 3)]
    base_a, base_b = uni.compute_baselines(x)
    with torch.no_grad():
        a, b = model.split(x)
        dist = torch.sqrt((base_a - a).pow(2).sum(1) + (base_b - b).pow(2).sum(1))
        targets = model(x).argmax(1)
        rows = torch.arange(4)
        gap = (
            model.head(torch.cat([a, b], 1))[rows, targets]
            - model.head(torch.cat([base_a, base_b], 1))[rows, targets]
        )
    torch.testing.assert_close(dist, torch.full((4,), 0.5), atol=1e-5, rtol=0)
    total = attributions[0].sum(1) + attributions[1].sum(1)
    torch.testing.assert_close(delta, total - gap, atol=1e-5, rtol=1e-4)
    # the head is linear in the layer output: the path integral is exact
    torch.testing.assert_close(total, gap, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize(
    ("method", "alpha"),
    [("riemann_left", 0.0), ("riemann_middle", 0.5), ("riemann_right", 1.0)],
)
def test_single_step_is_one_layer_gradient_at_the_rule_point(method, alpha):
    model = small_cnn()
    images = torch.randn(3, 3, 16, 16)
    uni = LayerUnlearnedIntegratedGradients(model, model[3], epsilon=4.0)
    base = uni.compute_baselines(images, target=7)
    with torch.no_grad():
        h = model[:4](images)

    def gradient_at(a):
        # the tail after the layer, differentiated by autograd at h' + a (h - h')
        point = (base + a * (h - base)).requires_grad_(True)
        (grad,) = torch.autograd.grad(model[4:](point)[:, 7].sum(), point)
        return grad

    assert not torch.allclose(gradient_at(0.0), gradient_at(1.0), atol=1e-3)
    assert not torch.allclose(gradient_at(0.5), gradient_at(1.0), atol=1e-3)
    got = uni.attribute(images, target=7, n_steps=1, method=method)
    expected = gradient_at(alpha) * (h - base)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)


# ------------------------------------------- lists of layers, layer inputs, Captum


class _TwoBranches(nn.Module):
    """Two independent layers ``a`` and ``b`` combined multiplicatively."""

    def __init__(self, additive: bool = False) -> None:
        super().__init__()
        torch.manual_seed(5)
        self.additive = additive
        self.a = nn.Linear(3, 4)
        self.b = nn.Linear(3, 4)
        self.head = nn.Linear(4, 3)

    def combine(self, ha, hb):
        if self.additive:
            return self.head(torch.tanh(ha)) + self.head(torch.tanh(hb))
        return self.head(torch.tanh(ha) * torch.tanh(hb))

    def forward(self, x1, x2):
        return self.combine(self.a(x1), self.b(x2))


def _joint_ig(model, ha, hb, base_a, base_b, target, n_steps):
    """Right-Riemann IG of ``model.combine`` on the joint path, by hand."""
    total_a, total_b = torch.zeros_like(ha), torch.zeros_like(hb)
    rows = torch.arange(ha.shape[0])
    for k in range(1, n_steps + 1):
        pa = (base_a + k / n_steps * (ha - base_a)).requires_grad_(True)
        pb = (base_b + k / n_steps * (hb - base_b)).requires_grad_(True)
        out = model.combine(pa, pb)[rows, target].sum()
        ga, gb = torch.autograd.grad(out, (pa, pb))
        total_a += ga / n_steps
        total_b += gb / n_steps
    return total_a * (ha - base_a), total_b * (hb - base_b)


@pytest.mark.filterwarnings("ignore:Multiple layers provided")
def test_list_of_layers_is_one_joint_path_as_in_captum():
    model = _TwoBranches()
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    b1, b2 = torch.randn(1, 3), torch.randn(1, 3)
    target = torch.tensor([0, 2, 1, 2])
    uni = LayerUnlearnedIntegratedGradients(model, [model.a, model.b])
    got = uni.attribute((x1, x2), baselines=(b1, b2), target=target, n_steps=20)
    assert isinstance(got, list) and len(got) == 2
    with torch.no_grad():
        ha, hb, base_a, base_b = model.a(x1), model.b(x2), model.a(b1), model.b(b2)
    expected = _joint_ig(model, ha, hb, base_a, base_b, target, 20)
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    # Captum's LayerIntegratedGradients agrees on the same rule
    captum = LayerIntegratedGradients(model, [model.a, model.b]).attribute(
        (x1, x2), (b1, b2), target=target, n_steps=20, method="riemann_right"
    )
    for g, c in zip(got, captum, strict=True):
        torch.testing.assert_close(g, c, atol=1e-6, rtol=1e-5)


def test_list_of_independent_additive_layers_equals_single_layer_calls():
    model = _TwoBranches(additive=True)
    x1, x2 = torch.randn(3, 3), torch.randn(3, 3)
    baselines = (torch.zeros(1, 3), torch.ones(1, 3))
    both = LayerUnlearnedIntegratedGradients(model, [model.a, model.b]).attribute(
        (x1, x2), baselines, target=1
    )
    for layer, got in zip((model.a, model.b), both, strict=True):
        alone = LayerUnlearnedIntegratedGradients(model, layer).attribute(
            (x1, x2), baselines, target=1
        )
        torch.testing.assert_close(got, alone, atol=1e-6, rtol=1e-5)


def test_learned_baselines_of_a_list_share_one_ball_and_are_complete():
    model = _TwoBranches()
    x1, x2 = torch.randn(4, 3), torch.randn(4, 3)
    snapshot = ModelSnapshot.take(model)
    uni = LayerUnlearnedIntegratedGradients(model, [model.a, model.b], epsilon=0.4)
    base_a, base_b = uni.compute_baselines((x1, x2))
    with torch.no_grad():
        ha, hb = model.a(x1), model.b(x2)
        targets = model(x1, x2).argmax(1)
        rows = torch.arange(4)
        gap = (
            model.combine(ha, hb)[rows, targets]
            - model.combine(base_a, base_b)[rows, targets]
        )
    distance = torch.sqrt((base_a - ha).pow(2).sum(1) + (base_b - hb).pow(2).sum(1))
    torch.testing.assert_close(distance, torch.full((4,), 0.4), atol=1e-6, rtol=0)
    # both layers moved: one joint delta, not one layer only
    assert ((base_a - ha).norm(dim=1) > 1e-3).all()
    assert ((base_b - hb).norm(dim=1) > 1e-3).all()
    (att_a, att_b), delta = uni.attribute(
        (x1, x2), n_steps=64, method="gausslegendre", return_convergence_delta=True
    )
    total = att_a.sum(1) + att_b.sum(1)
    torch.testing.assert_close(total, gap, atol=1e-5, rtol=1e-4)
    assert delta.abs().max() < 1e-5
    # with the learned baselines given in layer space, by hand
    expected = _joint_ig(model, ha, hb, base_a, base_b, targets, 15)
    got = uni.attribute((x1, x2))
    for g, e in zip(got, expected, strict=True):
        torch.testing.assert_close(g, e, atol=1e-6, rtol=1e-5)
    snapshot.assert_same(model)


def _chain():
    torch.manual_seed(6)
    return nn.Sequential(
        nn.Linear(5, 6), nn.Tanh(), nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)
    )


def test_attribute_to_layer_input_equals_the_previous_module_output():
    model = _chain()
    x = torch.randn(4, 5)
    on_input = LayerUnlearnedIntegratedGradients(model, model[2])
    on_output = LayerUnlearnedIntegratedGradients(model, model[1])
    kwargs = {"attribute_to_layer_input": True}
    torch.testing.assert_close(
        on_input.compute_baselines(x, **kwargs), on_output.compute_baselines(x)
    )
    torch.testing.assert_close(on_input.attribute(x, **kwargs), on_output.attribute(x))
    explicit = on_input.attribute(x, baselines=0.5, target=2, **kwargs)
    torch.testing.assert_close(
        explicit, on_output.attribute(x, baselines=0.5, target=2)
    )
    # and the output is what Captum's LayerIntegratedGradients gives there
    captum = LayerIntegratedGradients(model, model[2]).attribute(
        x, 0.5, target=2, n_steps=15, method="riemann_right", **kwargs
    )
    torch.testing.assert_close(explicit, captum, atol=1e-6, rtol=1e-5)
    listed = LayerUnlearnedIntegratedGradients(model, [model[2]])
    got = listed.attribute(x, baselines=0.5, target=2, **kwargs)
    assert isinstance(got, list) and len(got) == 1
    torch.testing.assert_close(got[0], explicit)


class _TwoInputLayer(nn.Module):
    def forward(self, u, v):
        return torch.tanh(u) * v


class _UsesTwoInputLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(7)
        self.u = nn.Linear(4, 5)
        self.v = nn.Linear(4, 5)
        self.mix = _TwoInputLayer()
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(self.mix(self.u(x), self.v(x)))


def test_layer_with_several_inputs_gives_a_tuple():
    model = _UsesTwoInputLayer()
    x = torch.randn(3, 4)
    uni = LayerUnlearnedIntegratedGradients(model, model.mix, epsilon=0.3)
    (att_u, att_v), delta = uni.attribute(
        x, attribute_to_layer_input=True, n_steps=64, method="gausslegendre",
        return_convergence_delta=True,
    )  # fmt: skip
    assert att_u.shape == att_v.shape == (3, 5)
    assert delta.abs().max() < 1e-5
    base_u, base_v = uni.compute_baselines(x, attribute_to_layer_input=True)
    with torch.no_grad():
        u, v = model.u(x), model.v(x)
        targets = model(x).argmax(1)
        rows = torch.arange(3)
        gap = (
            model.head(model.mix(u, v))[rows, targets]
            - model.head(model.mix(base_u, base_v))[rows, targets]
        )
    distance = torch.sqrt((base_u - u).pow(2).sum(1) + (base_v - v).pow(2).sum(1))
    torch.testing.assert_close(distance, torch.full((3,), 0.3), atol=1e-6, rtol=0)
    torch.testing.assert_close(att_u.sum(1) + att_v.sum(1), gap, atol=1e-5, rtol=1e-4)


class _UnusedLayer(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(8)
        self.lin0 = nn.Linear(3, 4)
        self.side = nn.ReLU()
        self.lin1 = nn.Linear(4, 2)

    def forward(self, x):
        h = self.lin0(x)
        self.side(h)  # runs, but the output does not depend on it
        return self.lin1(torch.tanh(h))


def test_grad_kwargs_materialize_the_gradient_of_an_unused_layer():
    model = _UnusedLayer()
    x = torch.randn(2, 3)
    uni = LayerUnlearnedIntegratedGradients(model, [model.lin0, model.side])
    with pytest.raises(RuntimeError, match="not have been used"):
        uni.attribute(x, baselines=0.0, target=0)
    kwargs = {"grad_kwargs": {"materialize_grads": True}}
    lin0, side = uni.attribute(x, baselines=0.0, target=0, **kwargs)
    assert torch.equal(side, torch.zeros(2, 4))
    alone = LayerUnlearnedIntegratedGradients(model, model.lin0)
    torch.testing.assert_close(lin0, alone.attribute(x, baselines=0.0, target=0))
    # learned: the unused layer does not move the KL, the used one takes the ball
    lin0, side = uni.attribute(x, **kwargs)
    assert torch.isfinite(lin0).all() and torch.equal(side, torch.zeros(2, 4))


def test_layer_list_and_layer_input_arguments_are_checked():
    model = _chain()
    x = torch.randn(2, 5)
    with pytest.raises(TypeError, match="non-empty list of nn.Modules"):
        LayerUnlearnedIntegratedGradients(model, [])
    with pytest.raises(TypeError, match="non-empty list of nn.Modules"):
        LayerUnlearnedIntegratedGradients(model, [model[0], "head"])
    uni = LayerUnlearnedIntegratedGradients(model, model[2])
    with pytest.raises(TypeError, match="attribute_to_layer_input"):
        uni.attribute(x, attribute_to_layer_input="yes")
    with pytest.raises(TypeError, match="grad_kwargs"):
        uni.attribute(x, grad_kwargs=[("materialize_grads", True)])
    embedding = nn.Sequential(nn.Embedding(10, 4), nn.Flatten(), nn.Linear(12, 3))
    on_ids = LayerUnlearnedIntegratedGradients(embedding, embedding[0])
    with pytest.raises(TypeError, match=r"`layer` takes.*floating point"):
        on_ids.attribute(torch.tensor([[1, 2, 3]]), attribute_to_layer_input=True)
    model_twice = nn.Sequential(model[0], model[1], model[1], nn.Linear(6, 2))
    twice = LayerUnlearnedIntegratedGradients(model_twice, [model[0], model[1]])
    with pytest.raises(ValueError, match=r"`layer\[1\]` must run exactly once"):
        twice.attribute(x)


def test_model_untouched_with_layer_lists_and_inputs_also_after_exception():
    model = _TwoBranches()
    x1, x2 = torch.randn(3, 3), torch.randn(3, 3)
    model.a.train()
    model.b.requires_grad_(False)
    snapshot = ModelSnapshot.take(model)
    uni = LayerUnlearnedIntegratedGradients(model, [model.a, model.b])
    uni.attribute((x1, x2))
    uni.attribute((x1, x2), attribute_to_layer_input=True)
    snapshot.assert_same(model)
    failing = LayerUnlearnedIntegratedGradients(
        fails_after(model, 4), [model.a, model.b], model=model
    )
    for layer_input in (False, True):
        with pytest.raises(RuntimeError, match="boom"):
            failing.attribute((x1, x2), attribute_to_layer_input=layer_input)
        snapshot.assert_same(model)


def test_is_captum_layer_integrated_gradients_without_its_internals():
    model = _chain()
    uni = LayerUnlearnedIntegratedGradients(model, model[2], multiply_by_inputs=False)
    assert isinstance(uni, LayerIntegratedGradients)
    assert type(uni).__mro__[1] is UnlearnedIntegratedGradients
    assert not hasattr(uni, "ig")
    assert uni.multiplies_by_inputs is False
    assert uni.has_convergence_delta()
    assert uni.layer is model[2]
