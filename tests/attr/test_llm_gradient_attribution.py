"""UNI and LayerUNI as drop-ins for Captum's LLM pipeline.

Captum's ``LLMGradientAttribution`` accepts LayerUNI (a LayerIntegratedGradients),
replaces ``forward_func`` on a shallow copy by a wrapper returning the
log-probability of each target token (one score per sample), and calls
``attribute(input_ids, additional_forward_args=(inp, target_tokens, index))``.
"""

from __future__ import annotations

import copy
import decimal
import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from captum.attr import (
    IntegratedGradients,
    LayerIntegratedGradients,
    LLMAttributionResult,
    LLMGradientAttribution,
    TextTokenInput,
)
from helpers import ModelSnapshot, small_cnn
from torch import nn
from uni_reference import unlearned_copy

from captum_faithful import (
    LayerUnlearnedIntegratedGradients,
    UnlearnedIntegratedGradients,
)
from captum_faithful.attr._utils.unlearning import (
    binary_log_probs,
    distribution_logits,
    kl_divergence,
    log1mexp,
    unlearning_loss,
)

pytest.importorskip("transformers")
import tiny_lms  # noqa: E402

matplotlib.use("Agg")

PROMPT = "the cat sat on"
TARGET = "the mat"


@pytest.fixture(scope="module")
def gpt2():
    return tiny_lms.tiny_gpt2()


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_lms.word_tokenizer()


def prompt_and_target(tokenizer):
    prompt = torch.tensor([tokenizer.encode(PROMPT, add_special_tokens=False)])
    target = torch.tensor(tokenizer.encode(TARGET, add_special_tokens=False))
    return prompt, target


# ---------------------------------------------------------------- reference


def log_prob_with_embeddings(model, h, ids, token):
    """log p(token | ids) at the last position when ``wte`` returns ``h``."""
    handle = model.transformer.wte.register_forward_hook(lambda m, a, o: h)
    try:
        logits = model(ids).logits[:, -1]
    finally:
        handle.remove()
    return F.log_softmax(logits, dim=-1)[:, token]


def reference_token_attr(
    model, prompt, target, eta=1.0, steps=10, eps=0.25, mu=0.1, n_steps=15
):
    """Algorithm 1 by hand, per target token: unlearn -log p(token), match the
    binary KL on the prompt's embedding positions, right-Riemann IG; the
    per-prompt-token sums (Captum's ``token_attr``) and the baselines."""
    rows, bases = [], []
    n_prompt = prompt.shape[1]
    for k, token in enumerate(target.tolist()):
        ids = torch.cat([prompt, target[:k].unsqueeze(0)], dim=1)

        def loss_of(stepped, ids=ids, token=token):
            return -F.log_softmax(stepped(ids).logits[:, -1], dim=-1)[0, token]

        unlearned = unlearned_copy(model, loss_of, eta)
        with torch.no_grad():
            p_hat = F.softmax(unlearned(ids).logits[:, -1], dim=-1)[0, token]
            h = model.transformer.wte(ids)
        delta = torch.zeros_like(h)
        for _ in range(steps):
            delta.requires_grad_(True)
            s = log_prob_with_embeddings(model, h + delta, ids, token)[0]
            kl = p_hat * (p_hat.log() - s) + (1 - p_hat) * (
                torch.log1p(-p_hat) - torch.log1p(-s.exp())
            )
            (g,) = torch.autograd.grad(kl, delta)
            g[:, n_prompt:] = 0  # the appended target tokens stay
            delta = delta.detach() - mu * g
            delta = eps * delta / delta.norm()
        h_base = h + delta
        total = torch.zeros_like(h)
        for j in range(1, n_steps + 1):
            point = (h_base + j / n_steps * (h - h_base)).requires_grad_(True)
            out = log_prob_with_embeddings(model, point, ids, token).sum()
            total += torch.autograd.grad(out, point)[0] / n_steps
        rows.append((total * (h - h_base))[:, :n_prompt].sum(-1))
        bases.append(h_base)
    return torch.cat(rows), bases


# ---------------------------------------------------------------- pipeline


def test_captum_pipeline_returns_its_result_and_plots(gpt2, tokenizer):
    snapshot = ModelSnapshot.take(gpt2)
    method = LayerUnlearnedIntegratedGradients(gpt2, gpt2.transformer.wte)
    assert isinstance(method, LayerIntegratedGradients)
    llm_attr = LLMGradientAttribution(method, tokenizer)
    result = llm_attr.attribute(TextTokenInput(PROMPT, tokenizer), target=TARGET)
    assert isinstance(result, LLMAttributionResult)
    assert result.seq_attr.shape == (4,)
    assert result.token_attr.shape == (2, 4)
    assert torch.isfinite(result.seq_attr).all()
    assert torch.isfinite(result.token_attr).all()
    assert result.token_attr.abs().sum() > 0
    torch.testing.assert_close(result.seq_attr, result.token_attr.sum(0))
    assert result.output_tokens == ["the", "mat"]
    figure, axes = result.plot_token_attr(show=False)
    assert len(axes.get_yticklabels()) == 2
    matplotlib.pyplot.close(figure)
    snapshot.assert_same(gpt2)
    # the instance given to Captum keeps its own forward_func
    assert method.forward_func is gpt2


def test_skipped_prompt_tokens_drop_their_columns_only(gpt2, tokenizer):
    """With ``skip_tokens`` Captum attributes a shorter interpretable tensor; the
    model input, the learned baseline and the path are the same, so the other
    tokens keep their attributions."""
    llm_attr = LLMGradientAttribution(
        LayerUnlearnedIntegratedGradients(gpt2, gpt2.transformer.wte), tokenizer
    )
    full = llm_attr.attribute(TextTokenInput(PROMPT, tokenizer), target=TARGET)
    skipped = llm_attr.attribute(
        TextTokenInput(PROMPT, tokenizer, skip_tokens=["cat"]), target=TARGET
    )
    assert skipped.token_attr.shape == (2, 3)
    assert skipped.input_tokens == ["the", "sat", "on"]
    torch.testing.assert_close(
        skipped.token_attr, full.token_attr[:, [0, 2, 3]], atol=1e-6, rtol=1e-5
    )


def test_explicit_zero_baselines_equal_captum_layer_ig(gpt2, tokenizer):
    """Baselines 0 (Captum's default), n_steps=50, Gauss-Legendre: LayerUNI is
    Captum's LayerIntegratedGradients through the whole pipeline."""
    inp = TextTokenInput(PROMPT, tokenizer)
    ours = LLMGradientAttribution(
        LayerUnlearnedIntegratedGradients(gpt2, gpt2.transformer.wte), tokenizer
    ).attribute(inp, target=TARGET, baselines=0, n_steps=50, method="gausslegendre")
    captum = LLMGradientAttribution(
        LayerIntegratedGradients(gpt2, gpt2.transformer.wte), tokenizer
    ).attribute(inp, target=TARGET)
    torch.testing.assert_close(ours.token_attr, captum.token_attr, atol=1e-5, rtol=0)
    torch.testing.assert_close(ours.seq_attr, captum.seq_attr, atol=1e-5, rtol=0)


def test_learned_baselines_equal_hand_computation(gpt2, tokenizer):
    prompt, target = prompt_and_target(tokenizer)
    expected, _ = reference_token_attr(gpt2, prompt, target)
    result = LLMGradientAttribution(
        LayerUnlearnedIntegratedGradients(gpt2, gpt2.transformer.wte), tokenizer
    ).attribute(TextTokenInput(PROMPT, tokenizer), target=TARGET)
    torch.testing.assert_close(result.token_attr, expected, atol=1e-5, rtol=1e-4)


def test_token_attributions_sum_to_the_change_of_log_probability(gpt2, tokenizer):
    """Completeness per target token: each row of ``token_attr`` sums to
    s(h) - s(h') for the learned baseline h' of the copy Captum runs (the
    appended target tokens are not moved, so nothing is lost by dropping them)."""
    prompt, target = prompt_and_target(tokenizer)
    llm_attr = LLMGradientAttribution(
        LayerUnlearnedIntegratedGradients(gpt2, gpt2.transformer.wte), tokenizer
    )
    inp = TextTokenInput(PROMPT, tokenizer)
    result = llm_attr.attribute(inp, target=TARGET, n_steps=32, method="gausslegendre")
    for k, token in enumerate(target.tolist()):
        ids = torch.cat([prompt, target[:k].unsqueeze(0)], dim=1)
        # Captum attributes its interpretable tensor (token presence, all 1)
        h_base = llm_attr.attr_method.compute_baselines(
            inp.to_tensor(), additional_forward_args=(inp, target, k)
        )
        with torch.no_grad():
            h = gpt2.transformer.wte(ids)
            change = (
                log_prob_with_embeddings(gpt2, h, ids, token)
                - log_prob_with_embeddings(gpt2, h_base, ids, token)
            )[0]
        assert torch.equal(h_base[:, prompt.shape[1] :], h[:, prompt.shape[1] :])
        assert float((h_base - h).norm()) == pytest.approx(0.25, rel=1e-5)
        assert float(change.abs()) > 1e-3
        torch.testing.assert_close(
            result.token_attr[k].sum(), change, atol=1e-5, rtol=1e-4
        )


# ---------------------------------------------------------------- forward_func


def _classifier(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 4))


@pytest.mark.parametrize("layered", [False, True])
def test_forward_func_replaced_on_a_shallow_copy_is_used(layered):
    """Captum's pattern: copy the method, replace ``forward_func``. The copy uses
    the new function (doubling the logits doubles IG's attributions with
    explicit baselines; with learned ones the new function is the one called)
    and the original keeps the old one, and vice versa."""
    net = _classifier()
    x = torch.randn(3, 6)

    def build():
        if layered:
            return LayerUnlearnedIntegratedGradients(net, net[0])
        return UnlearnedIntegratedGradients(net)

    original = build()
    before = original.attribute(x, baselines=0.0, target=1)
    calls = []

    def doubled(inputs):
        calls.append(inputs.shape[0])
        return 2 * net(inputs)

    duplicate = copy.copy(original)
    duplicate.forward_func = doubled
    torch.testing.assert_close(
        duplicate.attribute(x, baselines=0.0, target=1), 2 * before
    )
    assert calls
    calls.clear()
    assert torch.equal(original.attribute(x, baselines=0.0, target=1), before)
    assert not calls
    # learned baselines: the replaced function is unlearned and matched
    learned = duplicate.attribute(x, target=1)
    assert calls
    reference = build()
    reference.forward_func = doubled
    torch.testing.assert_close(learned, reference.attribute(x, target=1))
    calls.clear()
    torch.testing.assert_close(
        original.attribute(x, target=1), build().attribute(x, target=1)
    )
    assert not calls
    # replacing on the original leaves the copy alone
    original.forward_func = lambda inputs: -net(inputs)
    torch.testing.assert_close(
        duplicate.attribute(x, baselines=0.0, target=1), 2 * before
    )


def test_model_resolved_from_the_forward_func_of_the_call():
    """Without a module at construction, learning the baselines fails; once
    ``forward_func`` is replaced by a module (Captum's wrapper is one), its
    parameters are unlearned."""
    net = _classifier()
    x = torch.randn(2, 6)
    uni = UnlearnedIntegratedGradients(lambda inputs: net(inputs))
    with pytest.raises(ValueError, match="no nn.Module"):
        uni.attribute(x)
    duplicate = copy.copy(uni)
    duplicate.forward_func = net
    torch.testing.assert_close(
        duplicate.attribute(x), UnlearnedIntegratedGradients(net).attribute(x)
    )
    with pytest.raises(ValueError, match="no nn.Module"):
        uni.attribute(x)


# ---------------------------------------------------------------- one score


def test_log1mexp_and_binary_distribution_by_hand():
    scores = torch.tensor(
        [-1e-30, -1e-8, -1e-3, -0.5, -math.log(2), -0.7, -5.0, -40.0],
        dtype=torch.float64,
    )
    decimal.getcontext().prec = 60
    expected = torch.tensor(
        [float((1 - decimal.Decimal(s).exp()).ln()) for s in scores.tolist()],
        dtype=torch.float64,
    )
    torch.testing.assert_close(log1mexp(scores), expected, rtol=1e-12, atol=0)
    binary = binary_log_probs(scores)
    assert binary.shape == (8, 2)
    torch.testing.assert_close(binary[:, 0], scores)
    torch.testing.assert_close(
        torch.logsumexp(binary, dim=1), torch.zeros(8, dtype=torch.float64)
    )
    # p = 1 in floating point: finite value and gradient (the clamp)
    zero = torch.zeros(1, requires_grad=True)
    value = log1mexp(zero)
    (grad,) = torch.autograd.grad(value.sum(), zero)
    assert torch.isfinite(value).all() and torch.isfinite(grad).all()
    assert float(value.detach()) == pytest.approx(
        math.log(torch.finfo(torch.float32).tiny)
    )
    # gradient of log(1 - e^s) is -e^s / (1 - e^s)
    s = torch.tensor([-0.3, -3.0], dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(log1mexp(s).sum(), s)
    torch.testing.assert_close(grad, -s.exp() / (1 - s.exp()))


def test_binary_kl_and_unlearning_loss_by_hand():
    p_hat, p = 0.3, 0.05
    log_target = torch.log_softmax(
        distribution_logits(torch.tensor([[math.log(p_hat)]], dtype=torch.float64)),
        dim=1,
    )
    kl = kl_divergence(
        log_target,
        distribution_logits(torch.tensor([[math.log(p)]], dtype=torch.float64)),
    )
    by_hand = p_hat * math.log(p_hat / p) + (1 - p_hat) * math.log(
        (1 - p_hat) / (1 - p)
    )
    assert float(kl) == pytest.approx(by_hand, rel=1e-12)
    scores = torch.tensor([[-0.2], [-3.0]])
    assert torch.equal(unlearning_loss(scores, torch.zeros(2, dtype=torch.long)),
                       torch.tensor([0.2, 3.0]))  # fmt: skip
    # several classes: unchanged (the log-odds against the target)
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    assert torch.equal(distribution_logits(logits), logits)
    expected = math.log(math.exp(1.0 - 2.0) + math.exp(0.5 - 2.0))
    assert float(unlearning_loss(logits, torch.tensor([1]))) == pytest.approx(expected)


def test_one_log_probability_learns_the_two_class_baseline():
    """For two classes, log p_c as the one score per sample gives the same
    unlearning step (-log p_c is the cross-entropy) and the same distribution
    (p_c, 1 - p_c) to match as the two logits with target c: same baselines."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(5, 7), nn.Tanh(), nn.Linear(7, 2))
    x = torch.randn(4, 5)
    target = torch.tensor([0, 1, 1, 0])

    def log_prob(inputs, classes):
        return torch.log_softmax(net(inputs), dim=1).gather(1, classes[:, None])[:, 0]

    one_score = UnlearnedIntegratedGradients(log_prob, model=net)
    got = one_score.compute_baselines(x, additional_forward_args=(target,))
    expected = UnlearnedIntegratedGradients(net).compute_baselines(x, target=target)
    torch.testing.assert_close(got, expected, atol=1e-6, rtol=1e-5)
    attributions, delta = one_score.attribute(
        x, additional_forward_args=(target,), n_steps=64, method="gausslegendre",
        return_convergence_delta=True,
    )  # fmt: skip
    with torch.no_grad():
        change = log_prob(x, target) - log_prob(got, target)
    torch.testing.assert_close(attributions.sum(1), change, atol=1e-5, rtol=1e-4)
    assert delta.abs().max() < 1e-5
    # Captum's IG of the same function from the same baselines
    captum = IntegratedGradients(log_prob).attribute(
        x, got, additional_forward_args=(target,), n_steps=64
    )
    torch.testing.assert_close(attributions, captum, atol=1e-6, rtol=1e-5)


def test_positive_single_score_is_refused_with_what_to_return():
    net = small_cnn(n_classes=1)
    images = torch.rand(2, 3, 8, 8)

    def score(inputs):
        return net(inputs)[:, 0].abs() + 1.0

    uni = UnlearnedIntegratedGradients(score, model=net)
    with pytest.raises(ValueError, match=r"log-probability \(<= 0\).*log_softmax"):
        uni.attribute(images)
    minus_inf = UnlearnedIntegratedGradients(
        lambda inputs: torch.full((inputs.shape[0],), -torch.inf), model=net
    )
    with pytest.raises(ValueError, match="returned non-finite values"):
        minus_inf.attribute(images)
    # explicit baselines: any score, as Captum's IG
    torch.testing.assert_close(
        uni.attribute(images, baselines=0.0),
        IntegratedGradients(score).attribute(
            images, baselines=0.0, n_steps=15, method="riemann_right"
        ),
    )
