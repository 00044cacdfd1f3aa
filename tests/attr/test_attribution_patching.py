import patching_reference as ref
import pytest
import tiny_lms
import torch
from helpers import ModelSnapshot
from uni_reference import reference_unlearned_probs

from captum_faithful import AttributionPatching, activation_patching
from captum_faithful.lm import LMAdapter, register_adapter
from captum_faithful.lm import _registry as registry_module

FAMILIES = sorted(tiny_lms.BUILDERS)
N, T = 2, 5


def prompts(n=N, t=T, seed=0, vocab=tiny_lms.VOCAB):
    return torch.randint(
        0, vocab, (n, t), generator=torch.Generator().manual_seed(seed)
    )


def top_tokens(model, family, ids):
    with torch.no_grad():
        return ref.run(model, family, ids)[:, -1].argmax(1)


def seeded(seed=1):
    return torch.Generator().manual_seed(seed)


@pytest.fixture(params=FAMILIES)
def family_model(request):
    return request.param, tiny_lms.BUILDERS[request.param]()


@pytest.fixture
def linear_lm(monkeypatch):
    """LinearLM made known through register_adapter (registry restored after)."""
    monkeypatch.setattr(registry_module, "_REGISTRY", [])
    register_adapter(
        ref.LinearLM, lambda m: LMAdapter(m, m.tok, m.layers, family="linear")
    )
    return ref.LinearLM()


def test_activation_patching_equals_a_loop_of_hooked_forwards(family_model):
    family, model = family_model
    ids, corrupted = prompts(), prompts(seed=5)
    tokens = top_tokens(model, family, ids)
    embedded_corruption = ref.clean_embeddings(model, family, corrupted)
    # 7 rows per forward: chunks cut across prompts and sites
    got = activation_patching(model, ids, corrupted, chunk_size=7)
    expected = ref.activation_patching_loop(
        model, family, ids, embedded_corruption, tokens
    )
    assert got.shape == (N, tiny_lms.LAYERS + 1, T)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert expected.abs().max() > 1e-3
    noise = AttributionPatching(model).compute_baselines(
        ids, "random", generator=seeded()
    )
    torch.testing.assert_close(
        activation_patching(model, ids, noise),
        ref.activation_patching_loop(model, family, ids, noise, tokens),
        rtol=1e-5,
        atol=1e-6,
    )


def test_attribution_patching_equals_first_order_formula_by_hand(family_model):
    family, model = family_model
    ids = prompts()
    patching = AttributionPatching(model)
    baseline = patching.compute_baselines(ids, "random", generator=seeded())
    tokens = top_tokens(model, family, ids)
    got = patching.attribute(ids, baselines=baseline)
    expected = ref.attribution_patching_by_hand(model, family, ids, baseline, tokens)
    assert got.shape == (N, tiny_lms.LAYERS + 1, T)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
    assert expected.abs().max() > 1e-3


def test_ig_patching_equals_a_path_loop_by_hand(family_model):
    family, model = family_model
    ids = prompts()
    patching = AttributionPatching(model)
    baseline = patching.compute_baselines(ids, "zero")
    tokens = top_tokens(model, family, ids)
    left = ref.attribution_patching_by_hand(
        model, family, ids, baseline, tokens, [k / 4 for k in range(4)], [0.25] * 4
    )
    torch.testing.assert_close(
        patching.attribute(ids, baselines=baseline, n_steps=4, internal_batch_size=3),
        left,
        rtol=1e-5,
        atol=1e-6,
    )
    right = ref.attribution_patching_by_hand(
        model, family, ids, baseline, tokens, [1 / 3, 2 / 3, 1.0], [1 / 3] * 3
    )
    torch.testing.assert_close(
        patching.attribute(ids, "zero", n_steps=3, method="riemann_right"),
        right,
        rtol=1e-5,
        atol=1e-6,
    )
    # the first point of the left rule is the baseline: n_steps=1 is plain patching
    first_order = ref.attribution_patching_by_hand(model, family, ids, baseline, tokens)
    assert not torch.allclose(left, first_order, atol=1e-4)


@pytest.mark.parametrize("n_steps", [1, 16])
def test_linear_model_attribution_equals_activation_patching(linear_lm, n_steps):
    ids = prompts(vocab=12)
    patching = AttributionPatching(linear_lm, pgd_steps=3)
    for baselines in ("zero", "random", prompts(seed=3, vocab=12), "unlearned"):
        x_prime = patching.compute_baselines(ids, baselines, generator=seeded())
        exact = activation_patching(linear_lm, ids, x_prime)
        approx = patching.attribute(ids, baselines=x_prime, n_steps=n_steps)
        torch.testing.assert_close(approx, exact, rtol=1e-4, atol=1e-5)
        assert exact.abs().max() > 1e-2
    # against the closed form at the last site: patching token t < T - 1 of the
    # final residual stream cannot move the last position's logit; token T - 1
    # moves it by the unembedding row of the explained token times the change
    with torch.no_grad():
        tokens = linear_lm(ids)[:, -1].argmax(1)
        x_prime = patching.compute_baselines(ids, "zero")
        clean = ref.linear_lm_site_values(linear_lm, linear_lm.tok(ids))[-1]
        base = ref.linear_lm_site_values(linear_lm, x_prime)[-1]
        expected = torch.zeros(N, T)
        expected[:, -1] = (
            (clean - base)[:, -1] * linear_lm.unembed.weight[tokens]
        ).sum(-1)
    torch.testing.assert_close(
        activation_patching(linear_lm, ids, x_prime)[:, -1],
        expected,
        rtol=1e-4,
        atol=1e-5,
    )


def test_embedding_module_without_a_matrix(linear_lm):
    model = ref.LinearLM(table=True)
    ids = prompts(vocab=12)
    patching = AttributionPatching(model)
    for baselines in ("zero", prompts(seed=3, vocab=12), torch.randn(N, T, 8)):
        torch.testing.assert_close(
            patching.attribute(ids, baselines),
            activation_patching(model, ids, baselines),
            rtol=1e-4,
            atol=1e-5,
        )
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    with pytest.raises(TypeError, match="W_E"):
        patching.compute_baselines(ids, "random")
    assert calls == []
    handle.remove()
    with pytest.raises(ValueError, match=r"\(N, T, d\)"):
        patching.attribute(ids, torch.zeros(N, T))
    with pytest.raises(ValueError, match=r"outside the vocabulary \[0, V\)"):
        patching.attribute(ids - 12)
    with pytest.raises(RuntimeError, match="embedding module returned shape"):
        patching.attribute(ids, torch.zeros(N, T, 3))


def test_unlearned_baseline_equals_algorithm_1_loop(family_model):
    family, model = family_model
    ids = prompts()
    patching = AttributionPatching(model, pgd_steps=3, epsilon=0.5, unlearning_step=2.0)
    wrapper = ref.LastLogits(model, family)

    def expected(tokens):
        return ref.unlearned_baselines_loop(
            model,
            family,
            ids,
            tokens,
            lambda i: reference_unlearned_probs(
                wrapper, (ids[i : i + 1],), tokens[i], eta=2.0
            ),
            steps=3,
            eps=0.5,
            mu=0.1,
        )

    top = top_tokens(model, family, ids)
    learned = patching.compute_baselines(ids)
    torch.testing.assert_close(learned, expected(top), rtol=1e-4, atol=1e-6)
    distance = (learned - ref.clean_embeddings(model, family, ids)).norm(dim=(1, 2))
    torch.testing.assert_close(distance, torch.full((N,), 0.5))
    given = torch.tensor([3, 7])
    torch.testing.assert_close(
        patching.compute_baselines(ids, target=given),
        expected(given),
        rtol=1e-4,
        atol=1e-6,
    )

    # a callable F unlearns the clean top token
    def logit_sum(logits, rows):
        return logits[:, -1, :2].sum(-1)

    torch.testing.assert_close(
        patching.compute_baselines(ids, target=logit_sum), learned, rtol=0, atol=0
    )
    # attribute's default is that baseline
    torch.testing.assert_close(
        patching.attribute(ids), patching.attribute(ids, baselines=learned)
    )


def test_random_zero_and_corrupted_baselines():
    model = tiny_lms.tiny_gpt2()
    ids, corrupted = prompts(), prompts(seed=4)
    patching = AttributionPatching(model)
    matrix = model.transformer.wte.weight.detach()
    noise = torch.randn(N, T, tiny_lms.HIDDEN, generator=seeded(7))
    torch.testing.assert_close(
        patching.compute_baselines(ids, "random", generator=seeded(7)),
        matrix.mean() + matrix.std() * noise,
    )
    assert torch.equal(
        patching.compute_baselines(ids, "zero"), torch.zeros(N, T, tiny_lms.HIDDEN)
    )
    assert torch.equal(patching.compute_baselines(ids, corrupted), matrix[corrupted])
    given = torch.randn(N, T, tiny_lms.HIDDEN)
    assert torch.equal(patching.compute_baselines(ids, given), given)
    torch.testing.assert_close(
        patching.attribute(ids, "random", generator=seeded(7)),
        patching.attribute(ids, matrix.mean() + matrix.std() * noise),
    )
    torch.testing.assert_close(
        activation_patching(model, ids, "random", generator=seeded(7)),
        activation_patching(model, ids, matrix.mean() + matrix.std() * noise),
    )
    torch.testing.assert_close(
        activation_patching(model, ids, "zero"),
        activation_patching(model, ids, torch.zeros(N, T, tiny_lms.HIDDEN)),
    )


def test_targets_token_ids_top_token_and_a_callable(family_model):
    family, model = family_model
    ids, corrupted = prompts(), prompts(seed=5)
    patching = AttributionPatching(model)
    good, bad = torch.tensor([4, 9]), torch.tensor([11, 2])
    top = top_tokens(model, family, ids)
    for method in (
        lambda target: activation_patching(model, ids, corrupted, target=target),
        lambda target: patching.attribute(ids, corrupted, target=target),
    ):
        torch.testing.assert_close(method(None), method(top), rtol=0, atol=0)
        torch.testing.assert_close(
            method(6), method(torch.tensor([6, 6])), rtol=0, atol=0
        )
        torch.testing.assert_close(method(torch.tensor(6)), method(6), rtol=0, atol=0)

        def difference(logits, rows):
            last = logits[:, -1]
            return (last.gather(1, good[rows, None]) - last.gather(1, bad[rows, None]))[
                :, 0
            ]

        # F is a difference of two logits: so are its effects
        torch.testing.assert_close(
            method(difference), method(good) - method(bad), rtol=1e-5, atol=1e-6
        )
        # a callable of the logits alone: the same F for every prompt
        torch.testing.assert_close(
            method(lambda logits: logits[:, -1, 4] - logits[:, -1, 11]),
            method(4) - method(11),
            rtol=1e-5,
            atol=1e-6,
        )


def test_named_sites_in_any_order_and_module_outputs():
    model = tiny_lms.tiny_gpt2()
    ids, corrupted = prompts(), prompts(seed=5)
    names = ["blocks.1.hook_resid_post", "transformer.h.0", "blocks.0.hook_resid_pre"]
    residual = activation_patching(model, ids, corrupted)
    named = activation_patching(model, ids, corrupted, sites=names)
    # transformer.h.0's output is the residual stream before block 1
    torch.testing.assert_close(named, residual[:, [2, 1, 0]], rtol=0, atol=0)
    patching = AttributionPatching(model, sites=names)
    assert patching.site_names == names
    torch.testing.assert_close(
        patching.attribute(ids, corrupted),
        AttributionPatching(model).attribute(ids, corrupted)[:, [2, 1, 0]],
        rtol=0,
        atol=0,
    )
    # the token embeddings as a site: before the positional embeddings are added,
    # so e(x) - e(x') and the gradient are those of the residual stream before
    # block 0
    first = ["transformer.wte", "blocks.0.hook_resid_pre"]
    torch.testing.assert_close(
        AttributionPatching(model, sites=first).attribute(ids, corrupted),
        AttributionPatching(model).attribute(ids, corrupted)[:, [0, 0]],
    )
    torch.testing.assert_close(
        activation_patching(model, ids, corrupted, sites=first),
        residual[:, [0, 0]],
    )
    single = activation_patching(model, ids, corrupted, sites="transformer.h.1")
    torch.testing.assert_close(single, residual[:, [2]], rtol=0, atol=0)
    # a site with heads: the trailing dimensions are summed
    hooked = tiny_lms.tiny_hooked_transformer()
    per_head = AttributionPatching(hooked, sites=["blocks.0.attn.hook_z"])
    assert per_head.attribute(ids, corrupted).shape == (N, 1, T)


def attention_implementations(model):
    config = getattr(model, "config", None)
    return getattr(config, "_attn_implementation", None)


def test_model_unchanged_afterwards(family_model):
    family, model = family_model
    # a partly frozen model: the flags must come back as they were
    first = next(model.parameters())
    first.requires_grad_(False)
    snapshot = ModelSnapshot.take(model)
    attention = attention_implementations(model)
    ids = prompts()
    patching = AttributionPatching(model, pgd_steps=2)
    x_prime = patching.compute_baselines(ids)
    patching.attribute(ids, x_prime, n_steps=2)
    activation_patching(model, ids, x_prime)
    snapshot.assert_same(model)
    assert attention_implementations(model) == attention
    assert first.grad is None and all(p.grad is None for p in model.parameters())


def bad_calls(model):
    ids = prompts()
    vocab = tiny_lms.VOCAB
    patching = AttributionPatching(model)
    return {
        "corrupted prompt of another length": (
            lambda: activation_patching(model, ids, prompts(t=T + 1)),
            ValueError,
            "shape of `input_ids`",
        ),
        "corrupted token out of vocabulary": (
            lambda: patching.attribute(ids, torch.full((N, T), vocab)),
            ValueError,
            "`baselines` holds token ids outside",
        ),
        "token ids out of vocabulary": (
            lambda: patching.attribute(ids + vocab),
            ValueError,
            rf"`input_ids` holds token ids outside the vocabulary \[0, {vocab}\)",
        ),
        "negative token ids": (
            lambda: activation_patching(model, ids - vocab, "zero"),
            ValueError,
            "outside the vocabulary",
        ),
        "empty prompt": (
            lambda: patching.attribute(ids[:, :0]),
            ValueError,
            "at least one prompt of at least one token",
        ),
        "no prompt": (
            lambda: activation_patching(model, ids[:0], "zero"),
            ValueError,
            "at least one prompt",
        ),
        "float token ids": (
            lambda: patching.attribute(ids.float()),
            TypeError,
            "integer token ids",
        ),
        "one-dimensional prompt": (
            lambda: patching.compute_baselines(ids[0]),
            ValueError,
            r"shape \(N, T\)",
        ),
        "unknown site": (
            lambda: activation_patching(model, ids, "zero", sites=["blocks.9.x"]),
            ValueError,
            r"blocks\.0\.hook_resid_pre",
        ),
        "repeated site": (
            lambda: activation_patching(
                model, ids, "zero", sites=["blocks.0.hook_resid_pre"] * 2
            ),
            ValueError,
            "repeat",
        ),
        "n_steps < 1": (
            lambda: patching.attribute(ids, n_steps=0),
            ValueError,
            "`n_steps` must be >= 1",
        ),
        "unknown method": (
            lambda: patching.attribute(ids, method="simpson"),
            ValueError,
            "`method`",
        ),
        "unknown baseline": (
            lambda: patching.attribute(ids, baselines="blur"),
            ValueError,
            "`baselines` must be one of",
        ),
        "unlearned in activation patching": (
            lambda: activation_patching(model, ids, "unlearned"),
            ValueError,
            "compute_baselines",
        ),
        "embeddings of another width": (
            lambda: activation_patching(model, ids, torch.zeros(N, T, 3)),
            ValueError,
            r"\(N, T, d\)",
        ),
        "NaN embeddings": (
            lambda: patching.attribute(ids, torch.full((N, T, 16), float("nan"))),
            ValueError,
            "NaN",
        ),
        "float target": (
            lambda: patching.attribute(ids, "zero", target=2.0),
            TypeError,
            "`target`",
        ),
        "float tensor target": (
            lambda: activation_patching(
                model, ids, "zero", target=torch.tensor([1.5, 2.0])
            ),
            TypeError,
            "`target`",
        ),
        "whole-number float tensor target": (
            lambda: patching.attribute(ids, "zero", target=torch.tensor([1.0, 2.0])),
            TypeError,
            "`target`",
        ),
        "target out of vocabulary": (
            lambda: activation_patching(model, ids, "zero", target=vocab),
            ValueError,
            "`target` holds token ids outside",
        ),
        "target of another length": (
            lambda: patching.attribute(ids, "zero", target=torch.tensor([1, 2, 3])),
            ValueError,
            r"one per prompt \(2,\)",
        ),
        "chunk_size 0": (
            lambda: activation_patching(model, ids, "zero", chunk_size=0),
            ValueError,
            "`chunk_size` must be >= 1",
        ),
        "generator of another type": (
            lambda: patching.compute_baselines(ids, "random", generator=3),
            TypeError,
            "`generator`",
        ),
    }


BAD_CASES = (
    "corrupted prompt of another length",
    "corrupted token out of vocabulary",
    "token ids out of vocabulary",
    "negative token ids",
    "empty prompt",
    "no prompt",
    "float token ids",
    "one-dimensional prompt",
    "unknown site",
    "repeated site",
    "n_steps < 1",
    "unknown method",
    "unknown baseline",
    "unlearned in activation patching",
    "embeddings of another width",
    "NaN embeddings",
    "float target",
    "float tensor target",
    "whole-number float tensor target",
    "target out of vocabulary",
    "target of another length",
    "chunk_size 0",
    "generator of another type",
)


@pytest.mark.parametrize("family", ["gpt2", "hooked_transformer"])
@pytest.mark.parametrize("case", BAD_CASES)
def test_bad_input_fails_before_any_model_call(family, case):
    model = tiny_lms.BUILDERS[family]()
    calls = []
    handle = model.register_forward_pre_hook(lambda module, args: calls.append(1))
    snapshot = ModelSnapshot.take(model)
    attention = attention_implementations(model)
    cases = bad_calls(model)
    assert set(cases) == set(BAD_CASES)
    call, error, message = cases[case]
    with pytest.raises(error, match=message):
        call()
    assert calls == []
    snapshot.assert_same(model)
    assert attention_implementations(model) == attention
    handle.remove()


def test_model_family_without_adapter_is_refused(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", [])
    model = torch.nn.Embedding(10, 4)
    for call in (
        lambda: AttributionPatching(model),
        lambda: activation_patching(model, prompts(vocab=10), "zero"),
    ):
        with pytest.raises(TypeError, match="Hugging Face GPT-2.*register_adapter"):
            call()


def test_constructor_arguments_are_checked():
    model = tiny_lms.tiny_gpt2()
    for kwargs, error, message in (
        ({"epsilon": 0.0}, ValueError, "`epsilon` must be > 0"),
        ({"epsilon": float("inf")}, ValueError, "`epsilon` must be finite"),
        ({"unlearning_step": -1.0}, ValueError, "`unlearning_step`"),
        ({"pgd_step_size": "big"}, TypeError, "`pgd_step_size`"),
        ({"pgd_steps": -1}, ValueError, "`pgd_steps` must be >= 0"),
        ({"pgd_steps": 2.5}, TypeError, "`pgd_steps` must be an integer"),
        ({"sites": []}, TypeError, "`sites`"),
        ({"sites": ["nowhere"]}, ValueError, "valid names"),
    ):
        with pytest.raises(error, match=message):
            AttributionPatching(model, **kwargs)
    patching = AttributionPatching(model)
    with pytest.raises(ValueError, match="`internal_batch_size` must be >= 1"):
        patching.attribute(prompts(), internal_batch_size=0)
    with pytest.raises(ValueError, match="riemann_trapezoid"):
        patching.attribute(prompts(), n_steps=1, method="riemann_trapezoid")


@pytest.mark.parametrize("family", ["llama", "hooked_transformer"])
def test_exception_inside_a_forward_leaves_the_model_unchanged(family):
    model = tiny_lms.BUILDERS[family]()
    snapshot = ModelSnapshot.take(model)
    attention = attention_implementations(model)
    ids = prompts()

    def failing(logits, rows):
        raise RuntimeError("boom")

    def wrong_shape(logits, rows):
        return logits[:, -1]

    patching = AttributionPatching(model, pgd_steps=1)
    for call, error, message in (
        (
            lambda: activation_patching(model, ids, "zero", target=failing),
            RuntimeError,
            "boom",
        ),
        (lambda: patching.attribute(ids, "zero", target=failing), RuntimeError, "boom"),
        (
            lambda: patching.attribute(ids, "zero", target=wrong_shape),
            ValueError,
            r"shape \(2,\)",
        ),
        (
            lambda: patching.attribute(ids, "unlearned", target=failing, n_steps=2),
            RuntimeError,
            "boom",
        ),
    ):
        with pytest.raises(error, match=message):
            call()
        snapshot.assert_same(model)
        assert attention_implementations(model) == attention


def test_nan_from_the_model_is_refused_at_the_clean_run():
    """A model whose logits are NaN for one prompt (here a hook on the final layer
    norm) stops both patching methods at the clean run with a ValueError naming
    the method and the prompt, instead of NaN effects; the model comes back as it
    was."""
    model = tiny_lms.BUILDERS["gpt2"]()
    handle = model.transformer.ln_f.register_forward_hook(
        lambda module, args, output: output.index_fill(0, torch.tensor([1]), torch.nan)
    )
    snapshot = ModelSnapshot.take(model)
    ids = prompts()
    calls = {
        "AttributionPatching": lambda: AttributionPatching(model).attribute(
            ids, "zero"
        ),
        "activation_patching": lambda: activation_patching(model, ids, "zero"),
    }
    for name, call in calls.items():
        with pytest.raises(
            ValueError, match=rf"^{name}: the model returned non-finite .*\[1\]"
        ):
            call()
        snapshot.assert_same(model)
    handle.remove()
    assert AttributionPatching(model).attribute(ids, "zero").isfinite().all()
