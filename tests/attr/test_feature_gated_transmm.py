import math
import warnings

import numpy as np
import pytest
import torch
from helpers import ModelSnapshot
from sae_factory import make_sae, saved_sae
from tiny_vits import GRID, hf_clip, hf_vit, images, reference_transmm, timm_vit

from captum_faithful import FeatureGatedTransMM, TransMM, load_sae
from captum_faithful.attr._core.feature_gated_transmm import (
    feature_scores,
    robust_normalize,
)


def _blocks(tiny):
    if tiny.name == "vit":
        return list(tiny.model.vit.layers)
    if tiny.name == "clip":
        return list(tiny.model.vision_model.encoder.layers)
    return list(tiny.model.blocks)


def lower_median(values):
    """The median as torch.median takes it: the lower middle value when the count
    is even (sorted values, index (n - 1) // 2)."""
    ordered = np.sort(np.asarray(values))
    return ordered[(len(ordered) - 1) // 2]


def reference_gates(
    tiny, x, saes, variant="combined", kappa=0.5, c_max=10.0, perms=None
):
    """Gates written out from the thesis: hooks, autograd, numpy median/MAD."""
    blocks = _blocks(tiny)
    outputs = {}
    handles = [
        blocks[layer].register_forward_hook(
            lambda mod, inp, out, layer=layer: outputs.__setitem__(layer, out)
        )
        for layer in saes
    ]
    try:
        logits = tiny.logits(x)
    finally:
        for handle in handles:
            handle.remove()
    y = logits.gather(1, logits.argmax(1, keepdim=True)).sum()
    layers = sorted(saes)
    grads = torch.autograd.grad(y, [outputs[layer] for layer in layers])
    prefix = tiny.num_prefix_tokens
    gates = {}
    for layer, grad in zip(layers, grads, strict=True):
        sae = saes[layer]
        x_patch = outputs[layer][:, prefix:].detach()
        g_patch = grad[:, prefix:]
        w_dec = sae.W_dec.detach()
        if perms is not None:
            w_dec = w_dec[perms[layer]]
        with torch.no_grad():
            f = sae.encode(x_patch)
        feature_grad = torch.einsum("kd,npd->npk", w_dec, g_patch)
        if variant == "combined":
            s = (f * feature_grad).sum(-1)
        elif variant == "activation":
            s = f.sum(-1)
        else:
            s = feature_grad.abs().sum(-1)
        s = s.double().numpy()
        rows = []
        for row in s:
            med = lower_median(row)
            mad = lower_median(np.abs(row - med))
            s_hat = (row - med) / (1.4826 * mad + 1e-8)
            rows.append(np.exp(math.log(c_max) * np.tanh(kappa * s_hat)))
        gates[layer] = torch.tensor(np.stack(rows), dtype=torch.float32)
    return gates


@pytest.fixture(scope="module")
def sae_folders(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("saes")
    return {
        (arch, layer): saved_sae(
            tmp, arch, hook_name=f"blocks.{layer}.hook_resid_post", seed=layer + 7
        )[0]
        for arch in ("standard", "topk", "jumprelu")
        for layer in (0, 1)
    }


@pytest.mark.parametrize("arch", ["standard", "topk", "jumprelu"])
def test_gates_and_attribution_equal_reference(sae_folders, arch):
    tiny = hf_vit()
    x = images(3)
    folders = {layer: sae_folders[(arch, layer)] for layer in (0, 1)}
    explainer = FeatureGatedTransMM(tiny.model, folders, kappa=0.7, c_max=5.0)
    result, gates = explainer.attribute(x, output="patches", return_gates=True)
    saes = {layer: load_sae(folder) for layer, folder in folders.items()}
    tiny.set_eager()
    expected_gates = reference_gates(tiny, x, saes, kappa=0.7, c_max=5.0)
    assert sorted(gates) == [0, 1]
    for layer in (0, 1):
        assert gates[layer].shape == (3, GRID * GRID)
        torch.testing.assert_close(
            gates[layer], expected_gates[layer], rtol=1e-4, atol=1e-5
        )
        assert gates[layer].min() >= 1 / 5.0 - 1e-6 and gates[layer].max() <= 5.0 + 1e-6
    assert not torch.allclose(gates[0], torch.ones_like(gates[0]))
    expected = reference_transmm(tiny, x, gates=expected_gates)
    torch.testing.assert_close(result.reshape(3, -1), expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("variant", ["activation", "gradient"])
def test_variants_equal_reference(variant):
    tiny = timm_vit()
    x = images(2)
    saes = {1: make_sae("standard", seed=3)}
    explainer = FeatureGatedTransMM(tiny.model, saes, variant=variant)
    result, gates = explainer.attribute(x, output="patches", return_gates=True)
    tiny.set_eager()
    expected_gates = reference_gates(tiny, x, saes, variant=variant)
    torch.testing.assert_close(gates[1], expected_gates[1], rtol=1e-4, atol=1e-5)
    expected = reference_transmm(tiny, x, gates=expected_gates)
    torch.testing.assert_close(result.reshape(2, -1), expected, rtol=1e-4, atol=1e-6)


def test_clip_image_text_logits():
    tiny = hf_clip()
    x = images(2)
    saes = {0: make_sae("topk", seed=1)}
    explainer = FeatureGatedTransMM(tiny.forward_func, saes, model=tiny.model)
    result, gates = explainer.attribute(
        x,
        additional_forward_args=tiny.additional_forward_args,
        output="patches",
        return_gates=True,
    )
    tiny.set_eager()
    expected_gates = reference_gates(tiny, x, saes)
    torch.testing.assert_close(gates[0], expected_gates[0], rtol=1e-4, atol=1e-5)
    expected = reference_transmm(tiny, x, gates=expected_gates)
    torch.testing.assert_close(result.reshape(2, -1), expected, rtol=1e-4, atol=1e-6)


def test_c_max_one_equals_transmm_exactly(sae_folders):
    tiny = hf_vit()
    x = images(3)
    folders = {layer: sae_folders[("standard", layer)] for layer in (0, 1)}
    gated, gates = FeatureGatedTransMM(tiny.model, folders, c_max=1.0).attribute(
        x, return_gates=True
    )
    assert all(torch.equal(g, torch.ones_like(g)) for g in gates.values())
    assert torch.equal(gated, TransMM(tiny.model).attribute(x))
    assert not torch.equal(FeatureGatedTransMM(tiny.model, folders).attribute(x), gated)


def test_batched_equals_one_by_one(sae_folders):
    tiny = hf_vit()
    x = images(4, seed=5)
    explainer = FeatureGatedTransMM(
        tiny.model, {1: sae_folders[("jumprelu", 1)]}, c_max=3.0
    )
    batched = explainer.attribute(x, output="patches")
    singles = torch.cat(
        [explainer.attribute(x[i : i + 1], output="patches") for i in range(4)]
    )
    torch.testing.assert_close(batched, singles, rtol=1e-5, atol=1e-7)


def test_shuffle_decoder_changes_result_reproducibly():
    tiny = hf_vit()
    x = images(3)
    sae = make_sae("standard", seed=11)
    plain = FeatureGatedTransMM(tiny.model, {0: sae})
    shuffled = FeatureGatedTransMM(tiny.model, {0: sae}, shuffle_decoder=0)
    again = FeatureGatedTransMM(tiny.model, {0: sae}, shuffle_decoder=0)
    other = FeatureGatedTransMM(tiny.model, {0: sae}, shuffle_decoder=1)
    w_dec = sae.W_dec.detach().clone()
    a_plain, g_plain = plain.attribute(x, return_gates=True)
    a_shuffled, g_shuffled = shuffled.attribute(x, return_gates=True)
    assert torch.equal(sae.W_dec, w_dec)
    assert not torch.allclose(g_plain[0], g_shuffled[0])
    assert not torch.allclose(a_plain, a_shuffled)
    assert torch.equal(a_shuffled, again.attribute(x))
    assert not torch.allclose(a_shuffled, other.attribute(x))
    # the control equals an SAE whose decoder rows really are permuted
    perm = shuffled.permutations[0]
    assert sorted(perm.tolist()) == list(range(64))
    tiny.set_eager()
    expected = reference_gates(tiny, x, {0: sae}, perms={0: perm})
    torch.testing.assert_close(g_shuffled[0], expected[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("variant", ["activation", "gradient"])
def test_shuffle_decoder_warns_where_it_cannot_change_anything(variant):
    """The activation score never reads W_dec and the gradient score sums |W_dec g|
    over all rows: permuting the rows leaves both unchanged, so the "control" is the
    method itself and the class says so (the demo once reported such a control as
    if it had been one)."""
    tiny = hf_vit()
    x = images(3)
    sae = make_sae("standard", seed=11)
    plain = FeatureGatedTransMM(tiny.model, {0: sae}, variant=variant)
    with pytest.warns(UserWarning, match=f"no effect with variant='{variant}'"):
        shuffled = FeatureGatedTransMM(
            tiny.model, {0: sae}, variant=variant, shuffle_decoder=0
        )
    torch.testing.assert_close(
        shuffled.attribute(x), plain.attribute(x), rtol=1e-5, atol=1e-7
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        FeatureGatedTransMM(tiny.model, {0: sae}, variant="combined", shuffle_decoder=0)


@pytest.mark.parametrize("k", [2, 16])  # density 1/32 (sparse product), 1/4 (dense)
@pytest.mark.parametrize("variant", ["combined", "activation", "gradient"])
def test_feature_scores_equal_sum_over_features(k, variant):
    sae = make_sae("topk", k=k, seed=4)
    generator = torch.Generator().manual_seed(1)
    x = torch.randn(2, 5, 32, generator=generator)
    g = torch.randn(2, 5, 32, generator=generator)
    perm = torch.randperm(64, generator=generator)
    for permutation in (None, perm):
        w_dec = sae.W_dec.detach() if permutation is None else sae.W_dec.detach()[perm]
        f = sae.encode(x).detach()
        feature_grad = torch.einsum("kd,npd->npk", w_dec, g)
        expected = {
            "combined": (f * feature_grad).sum(-1),
            "activation": f.sum(-1),
            "gradient": feature_grad.abs().sum(-1),
        }[variant]
        result = feature_scores(sae, x, g, variant, permutation)
        torch.testing.assert_close(result, expected, rtol=1e-5, atol=1e-5)


def test_robust_normalize_takes_the_lower_median_like_torch_median():
    """The thesis's code normalises with torch.median: for an even number of tokens
    the lower of the two middle values, for both the median and the MAD."""
    generator = torch.Generator().manual_seed(0)
    for size in (9, 16, 196):
        scores = torch.randn(3, size, generator=generator, dtype=torch.float64)
        result = robust_normalize(scores)
        for row, out in zip(scores.numpy(), result, strict=True):
            med = lower_median(row)
            mad = lower_median(np.abs(row - med))
            np.testing.assert_allclose(out.numpy(), (row - med) / (1.4826 * mad + 1e-8))
            if size % 2 == 0:
                # the convention matters: the mean of the two middle values differs
                mean_med = np.median(row)
                assert mean_med != med
                assert not np.allclose(
                    out.numpy(),
                    (row - mean_med)
                    / (1.4826 * np.median(np.abs(row - mean_med)) + 1e-8),
                )


def test_robust_normalize_on_a_hand_made_even_row():
    # sorted: 0, 1, 3, 10 -> lower median 1; |s - 1| = 1, 0, 2, 9 -> lower median 1
    scores = torch.tensor([[3.0, 0.0, 10.0, 1.0]], dtype=torch.float64)
    expected = (scores - 1.0) / (1.4826 * 1.0 + 1e-8)
    torch.testing.assert_close(robust_normalize(scores), expected)


def test_model_and_saes_untouched(sae_folders):
    tiny = hf_vit()
    sae = make_sae("topk", seed=2)
    snapshots = [ModelSnapshot.take(tiny.model), ModelSnapshot.take(sae)]
    explainer = FeatureGatedTransMM(tiny.model, {1: sae})
    explainer.attribute(images(2))
    with pytest.raises(ValueError, match="target"):
        explainer.attribute(images(2), target=-1)
    snapshots[0].assert_same(tiny.model)
    snapshots[1].assert_same(sae)
    assert tiny.model.config._attn_implementation == "sdpa"


def test_bad_arguments(cnn):
    tiny = hf_vit()
    sae = make_sae("standard")
    with pytest.raises(ValueError, match="d_in"):
        FeatureGatedTransMM(tiny.model, {0: make_sae("standard", d_in=16)})
    with pytest.raises(ValueError, match="out of range"):
        FeatureGatedTransMM(tiny.model, {2: sae})
    with pytest.raises(ValueError, match="out of range"):
        FeatureGatedTransMM(tiny.model, {0: sae}, start_layer=1)
    with pytest.raises(ValueError, match="kappa"):
        FeatureGatedTransMM(tiny.model, {0: sae}, kappa=0.0)
    with pytest.raises(ValueError, match="kappa"):
        FeatureGatedTransMM(tiny.model, {0: sae}, kappa=-1.0)
    with pytest.raises(ValueError, match="c_max"):
        FeatureGatedTransMM(tiny.model, {0: sae}, c_max=0.5)
    with pytest.raises(ValueError, match="variant"):
        FeatureGatedTransMM(tiny.model, {0: sae}, variant="both")
    with pytest.raises(TypeError, match="saes"):
        FeatureGatedTransMM(tiny.model, {})
    with pytest.raises(TypeError, match="shuffle_decoder"):
        FeatureGatedTransMM(tiny.model, {0: sae}, shuffle_decoder="yes")
    with pytest.raises(ValueError, match="block 1"):
        FeatureGatedTransMM(
            tiny.model, {0: make_sae(hook_name="blocks.1.hook_resid_post")}
        )
    with pytest.raises(ValueError, match="residual stream"):
        FeatureGatedTransMM(
            tiny.model, {0: make_sae(hook_name="blocks.0.hook_mlp_out")}
        )
    # resid_pre of block 1 is the output of block 0
    FeatureGatedTransMM(tiny.model, {0: make_sae(hook_name="blocks.1.hook_resid_pre")})
    with pytest.raises(TypeError, match="register_adapter"):
        FeatureGatedTransMM(cnn, {0: sae})
    with pytest.raises(TypeError, match="return_gates"):
        FeatureGatedTransMM(tiny.model, {0: sae}).attribute(images(1), return_gates=1)
