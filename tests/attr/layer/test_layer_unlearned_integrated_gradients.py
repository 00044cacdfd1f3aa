"""LayerUnlearnedIntegratedGradients on a tiny BERT classifier with padding."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from captum.attr import LayerIntegratedGradients
from helpers import ModelSnapshot, small_cnn

from captum_faithful import LayerUnlearnedIntegratedGradients

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
        unlearned = copy.deepcopy(model)
        params = [p for p in unlearned.parameters() if p.requires_grad]
        loss = F.cross_entropy(unlearned(input_ids=idi, attention_mask=mi).logits, ci)
        grads = torch.autograd.grad(loss, params, allow_unused=True)
        grads = [
            torch.zeros_like(p) if g is None else g
            for p, g in zip(params, grads, strict=True)
        ]
        norm = torch.sqrt(sum((g**2).sum() for g in grads))
        with torch.no_grad():
            for p, g in zip(params, grads, strict=True):
                p.add_(eta * g / norm)
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
