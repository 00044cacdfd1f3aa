import pytest
import tiny_lms
import torch
from helpers import ModelSnapshot
from patching_reference import LinearLM, blocks, embedding_module
from torch import nn

from captum_faithful.lm import (
    SUPPORTED_FAMILIES,
    LMAdapter,
    Site,
    get_adapter,
    register_adapter,
)
from captum_faithful.lm import _registry as registry_module
from captum_faithful.lm._adapter import capture_sites, replace_site_values

FAMILIES = sorted(tiny_lms.BUILDERS)
SITES = [
    "blocks.0.hook_resid_pre",
    "blocks.1.hook_resid_pre",
    "blocks.1.hook_resid_post",
]


@pytest.fixture
def empty_registry(monkeypatch):
    """A registry without the adapters other tests registered, restored after."""
    monkeypatch.setattr(registry_module, "_REGISTRY", [])


def ids(n=2, t=6, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, tiny_lms.VOCAB, (n, t), generator=generator)


@pytest.mark.parametrize("family", FAMILIES)
def test_adapter_finds_embedding_blocks_and_residual_sites(family):
    model = tiny_lms.BUILDERS[family]()
    adapter = get_adapter(model)
    assert adapter.family in SUPPORTED_FAMILIES
    assert adapter.num_layers == tiny_lms.LAYERS
    assert adapter.site_names() == SITES
    assert adapter.embedding is embedding_module(model, family)
    assert adapter.blocks == blocks(model, family)
    assert adapter.vocab_size == tiny_lms.VOCAB
    assert adapter.embedding_matrix.shape == (tiny_lms.VOCAB, tiny_lms.HIDDEN)
    x = ids()
    with torch.no_grad():
        expected = model(x) if family == "hooked_transformer" else model(x).logits
        torch.testing.assert_close(adapter.logits(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("family", sorted(set(FAMILIES) - {"hooked_transformer"}))
def test_hf_residual_sites_equal_output_hidden_states(family):
    model = tiny_lms.BUILDERS[family]()
    adapter = get_adapter(model)
    x = ids()
    last_output = []
    handle = blocks(model, family)[-1].register_forward_hook(
        lambda module, args, output: last_output.append(
            output if isinstance(output, torch.Tensor) else output[0]
        )
    )
    with torch.no_grad():
        hidden_states = model(input_ids=x, output_hidden_states=True).hidden_states
    handle.remove()
    with torch.no_grad(), capture_sites(adapter.residual_sites.values()) as got:
        adapter.logits(x)
    for layer in range(tiny_lms.LAYERS):
        # hidden_states[L] has the final norm applied: not a residual site
        torch.testing.assert_close(
            got[f"blocks.{layer}.hook_resid_pre"], hidden_states[layer]
        )
    torch.testing.assert_close(got["blocks.1.hook_resid_post"], last_output[0])


def test_hooked_transformer_residual_sites_equal_run_with_cache():
    model = tiny_lms.tiny_hooked_transformer()
    adapter = get_adapter(model)
    x = ids()
    with torch.no_grad():
        _, cache = model.run_with_cache(x)
    with torch.no_grad(), capture_sites(adapter.residual_sites.values()) as got:
        adapter.logits(x)
    for name in SITES:
        torch.testing.assert_close(got[name], cache[name])
    torch.testing.assert_close(
        got["blocks.0.hook_resid_pre"] - model.W_pos[: x.shape[1]], model.W_E[x]
    )


@pytest.mark.parametrize("family", FAMILIES)
def test_named_module_sites_and_hooks_removed_after_an_exception(family):
    model = tiny_lms.BUILDERS[family]()
    adapter = get_adapter(model)
    module_name = (
        "blocks.0"
        if family == "hooked_transformer"
        else {"gpt2": "transformer.h.0", "gpt_neox": "gpt_neox.layers.0"}.get(
            family, "model.layers.0"
        )
    )
    site = adapter.site(module_name)
    assert site.kind == "output" and site.module is blocks(model, family)[0]
    x = ids()
    with torch.no_grad(), capture_sites([site, adapter.site(SITES[1])]) as got:
        adapter.logits(x)
    # the output of block 0 is the residual stream before block 1
    torch.testing.assert_close(got[module_name], got[SITES[1]])
    snapshot = ModelSnapshot.take(model)

    def fail(value):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        with replace_site_values([adapter.site(SITES[0])], [fail]):
            adapter.logits(x)
    snapshot.assert_same(model)


def test_unknown_site_lists_the_valid_names():
    adapter = get_adapter(tiny_lms.tiny_gpt2())
    with pytest.raises(ValueError, match=r"blocks\.1\.hook_resid_post.*named_modules"):
        adapter.site("blocks.7.hook_resid_pre")
    with pytest.raises(TypeError, match="strings"):
        adapter.site(3)


def test_unsupported_model_names_the_families_and_register_adapter(empty_registry):
    with pytest.raises(TypeError) as info:
        get_adapter(nn.Linear(3, 3))
    message = str(info.value)
    assert "Linear" in message and "register_adapter" in message
    for family in SUPPORTED_FAMILIES:
        assert family in message
    with pytest.raises(TypeError, match="torch.nn.Module"):
        get_adapter("gpt2")


def test_register_adapter_keyword_block_call_and_precedence(empty_registry):
    model = LinearLM()
    register_adapter(
        LinearLM,
        lambda m: LMAdapter(m, m.tok, m.layers, family="linear"),
    )
    adapter = get_adapter(model)
    assert adapter.family == "linear" and adapter.site_names() == SITES
    x = torch.randint(0, 12, (2, 5))
    # LinearLM calls its blocks with the keyword hidden_states
    with torch.no_grad(), capture_sites(adapter.residual_sites.values()) as got:
        logits = adapter.logits(x)
    hidden = model.tok(x) + model.pos[:5]
    with torch.no_grad():
        torch.testing.assert_close(got[SITES[0]], hidden)
        torch.testing.assert_close(got[SITES[1]], model.layers[0](hidden))
        torch.testing.assert_close(
            got[SITES[2]], model.layers[1](model.layers[0](hidden))
        )
        torch.testing.assert_close(logits, model(x))
    # a site's value can be replaced through the keyword argument too
    with (
        torch.no_grad(),
        replace_site_values(
            [adapter.site(SITES[1])], [lambda value: torch.zeros_like(value)]
        ),
    ):
        zeroed = adapter.logits(x)
    with torch.no_grad():
        expected = model.unembed(model.layers[1](torch.zeros_like(hidden)))
    torch.testing.assert_close(zeroed, expected)
    register_adapter(lambda m: isinstance(m, LinearLM), lambda m: None)
    assert get_adapter(model).family == "linear"  # None passes it on
    register_adapter(
        lambda m: isinstance(m, LinearLM),
        lambda m: LMAdapter(m, m.tok, m.layers, family="later"),
    )
    assert get_adapter(model).family == "later"


def test_register_adapter_and_lm_adapter_validate(empty_registry):
    with pytest.raises(TypeError, match="matches"):
        register_adapter(3, lambda m: None)
    with pytest.raises(TypeError, match="factory"):
        register_adapter(LinearLM, "factory")
    register_adapter(LinearLM, lambda m: "not an adapter")
    with pytest.raises(TypeError, match="LMAdapter or None"):
        get_adapter(LinearLM())
    model = LinearLM()
    with pytest.raises(ValueError, match="blocks"):
        LMAdapter(model, model.tok, [])
    with pytest.raises(TypeError, match="embedding"):
        LMAdapter(model, "tok", model.layers)
    adapter = LMAdapter(model, model.layers[0].own, model.layers)
    assert adapter.embedding_matrix.shape == (8, 8)  # a Linear's weight is 2-D
    with pytest.raises(TypeError, match="W_E"):
        LMAdapter(model, nn.ReLU(), model.layers).embedding_matrix  # noqa: B018
    site = Site("x", model.layers[0], "input")
    assert site.input_name == "hidden_states"


def test_a_site_that_runs_twice_in_one_forward_is_refused():
    """Patching assumes one activation per site and forward: a module called twice
    (weight sharing) is refused, naming the site (``check_first_run``, which
    attribution patching's gradient hooks call too); its hook is removed."""
    from captum_faithful.lm import Site

    shared = nn.Linear(3, 3)

    def forward(x):
        return shared(shared(x))

    site = Site("shared", shared, "output")
    with pytest.raises(RuntimeError, match="site 'shared' ran twice"):
        with capture_sites([site]):
            forward(torch.ones(1, 2, 3))
    with capture_sites([site]) as got:  # once is fine
        shared(torch.ones(1, 2, 3))
    assert set(got) == {"shared"}
    assert not shared._forward_hooks
