import pytest
import torch
from helpers import ModelSnapshot
from tiny_vits import (
    BUILDERS,
    HIDDEN,
    LAYERS,
    PATCH,
    ToyViT,
    hf_clip,
    hf_vit,
    images,
    timm_vit,
)
from torch import nn

from captum_faithful.vit import (
    ViTAdapter,
    capture,
    eager_attention,
    get_adapter,
    register_adapter,
)
from captum_faithful.vit import _registry as registry_module


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_adapter_finds_blocks_prefix_and_patches(family):
    tiny = BUILDERS[family]()
    adapter = get_adapter(tiny.model)
    assert adapter.num_layers == LAYERS
    assert adapter.num_prefix_tokens == tiny.num_prefix_tokens
    assert adapter.patch_size == (PATCH, PATCH)
    assert adapter.hidden_size == HIDDEN
    x = images(2)
    with (
        eager_attention(tiny.model),
        capture(adapter, range(LAYERS), range(LAYERS)) as got,
    ):
        tiny.logits(x)
    tiny.set_eager()
    expected = []
    handles = [
        m.register_forward_hook(
            lambda mod, i, o: expected.append(tiny.probabilities(o))
        )
        for m in tiny.attention_modules
    ]
    tiny.logits(x)
    for handle in handles:
        handle.remove()
    tokens = tiny.num_prefix_tokens + (24 // PATCH) ** 2
    for layer in range(LAYERS):
        probs = got.attention[layer]
        assert probs.shape == (2, 4, tokens, tokens) and probs.requires_grad
        torch.testing.assert_close(probs.sum(-1), torch.ones(2, 4, tokens))
        torch.testing.assert_close(probs, expected[layer])
        assert got.residual[layer].shape == (2, tokens, HIDDEN)


def test_hf_attentions_match_output_attentions():
    tiny = hf_vit()
    adapter = get_adapter(tiny.model)
    x = images(2)
    with (
        eager_attention(tiny.model),
        capture(adapter, range(LAYERS), range(LAYERS)) as got,
    ):
        out = tiny.model(x, output_attentions=True, output_hidden_states=True)
    for layer in range(LAYERS):
        torch.testing.assert_close(got.attention[layer], out.attentions[layer])
        torch.testing.assert_close(got.residual[layer], out.hidden_states[layer + 1])


def test_clip_adapter_uses_the_vision_tower():
    tiny = hf_clip()
    adapter = get_adapter(tiny.model)
    assert adapter.blocks == list(tiny.model.vision_model.encoder.layers)


def test_eager_attention_restores_after_exception():
    tiny = hf_clip()
    configs = [
        tiny.model.config,
        tiny.model.config.vision_config,
        tiny.model.config.text_config,
    ]
    before = [c._attn_implementation for c in configs]
    assert before[1] == "sdpa"
    with pytest.raises(RuntimeError, match="inside"):
        with eager_attention(tiny.model):
            assert all(c._attn_implementation == "eager" for c in configs)
            raise RuntimeError("inside")
    assert [c._attn_implementation for c in configs] == before

    timm = timm_vit()
    with pytest.raises(RuntimeError, match="inside"):
        with eager_attention(timm.model):
            assert not any(b.attn.fused_attn for b in timm.model.blocks)
            raise RuntimeError("inside")
    assert all(b.attn.fused_attn for b in timm.model.blocks)


def test_capture_removes_hooks_after_exception():
    tiny = timm_vit()
    snapshot = ModelSnapshot.take(tiny.model)
    adapter = get_adapter(tiny.model)
    with pytest.raises(RuntimeError, match="inside"):
        with capture(adapter, [0, 1], [1]):
            raise RuntimeError("inside")
    snapshot.assert_same(tiny.model)


def test_capture_without_eager_reports_missing_probabilities():
    tiny = hf_vit()
    adapter = get_adapter(tiny.model)
    with pytest.raises(RuntimeError, match="no attention probabilities"):
        with capture(adapter, [0]):
            tiny.model(images(1))


def test_hook_names_follow_transformer_lens():
    adapter = get_adapter(hf_vit().model)
    assert adapter.hook_name(3) == "blocks.3.hook_resid_post"
    assert adapter.layer_of_hook("blocks.3.hook_resid_post") == 3
    assert adapter.layer_of_hook("blocks.3.hook_resid_pre") == 2
    assert adapter.layer_of_hook("vit.layers.3") is None
    with pytest.raises(ValueError, match="residual stream"):
        adapter.layer_of_hook("blocks.3.attn.hook_z")


def test_generic_fallback_finds_a_hand_written_vit():
    model = ToyViT()
    adapter = get_adapter(model)
    assert adapter.family == "generic"
    assert adapter.blocks == list(model.layers)
    assert adapter.attention_modules == [b.attn for b in model.layers]
    assert (adapter.num_prefix_tokens, adapter.patch_size, adapter.hidden_size) == (
        1,
        (4, 4),
        16,
    )


def test_register_adapter_takes_precedence(monkeypatch):
    monkeypatch.setattr(registry_module, "_REGISTRY", [])
    model = ToyViT()
    wrapper = nn.Sequential(nn.Identity(), model)
    register_adapter(
        ToyViT,
        lambda m: ViTAdapter(
            m, m.layers, [b.attn for b in m.layers], 1, 4, hidden_size=16, family="toy"
        ),
    )
    adapter = get_adapter(wrapper)
    assert adapter.family == "toy" and adapter.model is model
    with pytest.raises(TypeError, match="factory"):
        register_adapter(ToyViT, "not callable")


def test_cnn_has_no_adapter(cnn):
    with pytest.raises(TypeError, match="register_adapter"):
        get_adapter(cnn)
