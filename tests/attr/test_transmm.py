import pytest
import torch
from captum.attr import NoiseTunnel
from helpers import ModelSnapshot
from tiny_vits import (
    BUILDERS,
    IMAGE,
    PATCH,
    hf_vit,
    images,
    reference_transmm,
    timm_vit,
)

from captum_faithful import TransMM
from captum_faithful.attr._core.transmm import cls_relevance, patches_to_pixels

GRID = IMAGE // PATCH


def _attr(tiny, explainer, x, **kwargs):
    return explainer.attribute(
        x, additional_forward_args=tiny.additional_forward_args, **kwargs
    )


@pytest.mark.parametrize("family", sorted(BUILDERS))
def test_equals_reference_implementation(family):
    tiny = BUILDERS[family]()
    x = images(3)
    explainer = TransMM(tiny.forward_func, model=tiny.model)
    result = _attr(tiny, explainer, x, output="patches")
    assert result.shape == (3, GRID, GRID)
    tiny.set_eager()
    expected = reference_transmm(tiny, x).reshape(3, GRID, GRID)
    assert expected.abs().max() > 0
    torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-6)


def test_explicit_target_and_start_layer_match_reference():
    tiny = hf_vit()
    x = images(4)
    target = torch.tensor([0, 3, 1, 4])
    result = TransMM(tiny.model, start_layer=1).attribute(
        x, target=target, output="patches"
    )
    none_target = TransMM(tiny.model).attribute(x, output="patches")
    tiny.set_eager()
    expected = reference_transmm(tiny, x, target=target, start_layer=1)
    torch.testing.assert_close(result.reshape(4, -1), expected, rtol=1e-5, atol=1e-6)
    predicted = reference_transmm(tiny, x)
    torch.testing.assert_close(
        none_target.reshape(4, -1), predicted, rtol=1e-5, atol=1e-6
    )
    assert not torch.allclose(result.reshape(4, -1), predicted)


@pytest.mark.parametrize("family", ["vit", "clip", "timm"])
def test_batched_equals_one_by_one(family):
    tiny = BUILDERS[family]()
    x = images(4, seed=2)
    explainer = TransMM(tiny.forward_func, model=tiny.model)
    batched = _attr(tiny, explainer, x, output="patches")
    singles = torch.cat(
        [_attr(tiny, explainer, x[i : i + 1], output="patches") for i in range(4)]
    )
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-7)


def test_output_input_spreads_each_patch_over_its_pixels():
    tiny = timm_vit()
    x = images(2)
    explainer = TransMM(tiny.model)
    patches = explainer.attribute(x, output="patches")
    pixels = explainer.attribute(x)
    assert pixels.shape == x.shape
    for n in range(2):
        for c in range(3):
            for i in range(IMAGE):
                for j in range(IMAGE):
                    assert pixels[n, c, i, j] == patches[n, i // PATCH, j // PATCH]


def test_patches_to_pixels_zero_outside_the_grid():
    patch_map = torch.arange(4.0).reshape(1, 2, 2)
    pixels = patches_to_pixels(patch_map, (3, 3), torch.Size([1, 2, 7, 8]))
    assert pixels.shape == (1, 2, 7, 8)
    assert (
        pixels[0, 1, 2, 2] == 0 and pixels[0, 0, 3, 5] == 3 and pixels[0, 0, 4, 1] == 2
    )
    assert (pixels[:, :, 6, :] == 0).all() and (pixels[:, :, :, 6:] == 0).all()


def test_cls_relevance_equals_explicit_product():
    torch.manual_seed(3)
    bars = [torch.rand(2, 5, 5) for _ in range(3)]
    relevance = torch.eye(5).repeat(2, 1, 1)
    for bar in bars:
        relevance = relevance + bar @ relevance
    torch.testing.assert_close(cls_relevance(bars), relevance[:, 0])


def test_tuple_inputs_are_mirrored():
    tiny = hf_vit()
    x = images(2)
    explainer = TransMM(tiny.model)
    (result,) = explainer.attribute((x,))
    torch.testing.assert_close(result, explainer.attribute(x))


def test_one_forward_and_one_backward_through_gradient_func():
    tiny = hf_vit()
    forwards = []

    def forward(x):
        forwards.append(len(x))
        return tiny.model(x)

    explainer = TransMM(forward, model=tiny.model)
    calls = []
    original = explainer.gradient_func

    def counting(*args, **kwargs):
        calls.append(len(args[1]))
        return original(*args, **kwargs)

    explainer.gradient_func = counting
    explainer.attribute(images(3))
    assert forwards == [3]  # the whole batch at once
    assert calls == [2]  # one call, gradients of both layers' attention


def test_noise_tunnel_drop_in():
    tiny = hf_vit()
    x = images(2)
    nt = NoiseTunnel(TransMM(tiny.model))
    result = nt.attribute(x, nt_type="smoothgrad", nt_samples=3, stdevs=0.1, target=1)
    assert result.shape == x.shape and torch.isfinite(result).all()
    assert not torch.allclose(result, TransMM(tiny.model).attribute(x, target=1))


def test_model_and_inputs_untouched_after_success_and_exception():
    tiny = hf_vit()
    model = tiny.model
    assert model.config._attn_implementation == "sdpa"
    snapshot = ModelSnapshot.take(model)
    x = images(2)
    x_copy = x.clone()
    explainer = TransMM(model)
    explainer.attribute(x)
    snapshot.assert_same(model)
    assert model.config._attn_implementation == "sdpa"
    with pytest.raises(ValueError, match="target"):
        explainer.attribute(x, target=99)
    snapshot.assert_same(model)
    assert model.config._attn_implementation == "sdpa"
    assert torch.equal(x, x_copy) and not x.requires_grad

    timm = timm_vit()
    snapshot = ModelSnapshot.take(timm.model)

    def failing(images_):
        timm.model(images_)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        TransMM(failing, model=timm.model).attribute(x)
    snapshot.assert_same(timm.model)
    assert all(block.attn.fused_attn for block in timm.model.blocks)


def test_frozen_model_under_no_grad():
    tiny = hf_vit()
    for param in tiny.model.parameters():
        param.requires_grad_(False)
    x = images(2)
    with torch.no_grad():
        result = TransMM(tiny.model).attribute(x, output="patches")
    for param in tiny.model.parameters():
        param.requires_grad_(True)
    tiny.set_eager()
    torch.testing.assert_close(result.reshape(2, -1), reference_transmm(tiny, x))
    assert not any(p.grad is not None for p in tiny.model.parameters())


def test_cnn_is_rejected_with_supported_families(cnn):
    with pytest.raises(TypeError) as info:
        TransMM(cnn)
    message = str(info.value)
    assert "register_adapter" in message
    for family in ("ViT", "DeiT", "CLIP", "Dinov2", "timm"):
        assert family in message


def test_bad_arguments():
    tiny = hf_vit()
    with pytest.raises(ValueError, match="start_layer"):
        TransMM(tiny.model, start_layer=2)
    with pytest.raises(TypeError, match="start_layer"):
        TransMM(tiny.model, start_layer=0.5)
    explainer = TransMM(tiny.model)
    x = images(2)
    with pytest.raises(ValueError, match="output"):
        explainer.attribute(x, output="pixels")
    with pytest.raises(ValueError, match="inputs"):
        explainer.attribute(x.flatten(2))
    bad = x.clone()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        explainer.attribute(bad)


def test_integer_images_and_empty_batches_are_named_before_the_model_runs():
    """Integer pixels used to fail inside autograd, an empty batch deep in
    transformers; both are now ValueError/TypeError naming ``inputs``, raised
    before any forward pass (no hook left behind)."""
    tiny = hf_vit()
    snapshot = ModelSnapshot.take(tiny.model)
    explainer = TransMM(tiny.model)
    with pytest.raises(TypeError, match="`inputs`.*floating point.*torch.uint8"):
        explainer.attribute((images(2) * 255).clamp(0, 255).to(torch.uint8))
    with pytest.raises(ValueError, match="`inputs`.*empty batch"):
        explainer.attribute(images(2)[:0])
    snapshot.assert_same(tiny.model)


def test_nan_from_the_model_is_refused_at_the_first_forward():
    """A forward that returns NaN for one image (a NaN ``additional_forward_args``
    row) stops TransMM and FeatureGatedTransMM with a ValueError naming the method
    and the sample, instead of NaN attributions; the model comes back untouched."""
    from sae_factory import make_sae

    from captum_faithful import FeatureGatedTransMM

    vit = hf_vit().model
    x = images(3)
    scale = torch.tensor([[1.0], [float("nan")], [1.0]])

    def forward(pixels, factor):
        return vit(pixels).logits * factor

    snapshot = ModelSnapshot.take(vit)
    explainers = {
        "TransMM": TransMM(forward, model=vit),
        "FeatureGatedTransMM": FeatureGatedTransMM(
            forward, {1: make_sae("standard")}, model=vit
        ),
    }
    for name, explainer in explainers.items():
        with pytest.raises(
            ValueError, match=rf"^{name}: the model returned non-finite .*\[1\]"
        ):
            explainer.attribute(x, additional_forward_args=(scale,))
        snapshot.assert_same(vit)
        finite = explainer.attribute(x, additional_forward_args=(torch.ones(3, 1),))
        assert finite.isfinite().all()


@pytest.mark.parametrize("weight", ["W_enc", "b_enc", "W_dec"])
def test_an_sae_with_nan_weights_is_refused(weight):
    """An SAE whose weights hold NaN would make every gate, hence every
    attribution, NaN: FeatureGatedTransMM refuses it when built, naming
    ``saes[block]`` and the tensor."""
    from sae_factory import make_sae

    from captum_faithful import FeatureGatedTransMM

    sae = make_sae("standard")
    with torch.no_grad():
        getattr(sae, weight)[0] = float("nan")
    with pytest.raises(ValueError, match=rf"`saes\[1\]`.*NaN or Inf in \['?.*{weight}"):
        FeatureGatedTransMM(hf_vit().model, {1: sae})
