import itertools

import pytest
import torch
from helpers import ModelSnapshot, small_cnn
from torch import nn

from captum_faithful._layers import select_layers
from captum_faithful.attr import ClipGrad
from captum_faithful.attr._core.clip_grad import CLIP_RULES, clip_mask


class Copy(nn.Module):
    """A toy layer whose output equals its input (a new tensor)."""

    def forward(self, x):
        return x * 1.0


def _zeroed_by_rule(rule, h, d, g):
    """The rules of SPEC §4, written out element by element."""
    if rule == "vm":
        return g * d < 0 or d == 0
    if rule == "ivm":
        return g < 0 and d >= 0
    if rule == "avm":
        return g > 0 and d <= 0
    if rule == "ibm":
        return h <= 0 and g < 0
    return False


# Every sign combination of clean activation h, deviation d and incoming gradient g.
COMBOS = list(itertools.product((-1.5, 0.0, 2.0), (-0.5, 0.0, 0.25), (-3.0, 0.0, 1.0)))


@pytest.mark.parametrize(
    "dtype", [torch.float32, torch.float64, torch.float16, torch.bfloat16]
)
@pytest.mark.parametrize("huge", [False, True])
@pytest.mark.parametrize("rule", CLIP_RULES)
def test_each_rule_zeroes_exactly_the_named_entries(rule, huge, dtype):
    """In every dtype, and with gradients near the dtype's largest number (the
    one-sided rules clamp to a bound that is 0 or that largest number)."""
    h = torch.tensor([[c[0] for c in COMBOS]], dtype=dtype)
    d = torch.tensor([[c[1] for c in COMBOS]], dtype=dtype)
    scale = torch.finfo(dtype).max / 4 if huge else 1.0
    g = torch.tensor([[c[2] * scale for c in COMBOS]], dtype=dtype)
    layer = Copy()
    perturbed = (h + d).clone().requires_grad_()
    with ClipGrad([layer], rule) as clip:
        clip.capture(lambda: layer(h))
        (layer(perturbed) * g).sum().backward()
    expected = g.clone()
    for i, (hv, dv, gv) in enumerate(COMBOS):
        if _zeroed_by_rule(rule, hv, dv, gv):
            expected[0, i] = 0.0
    assert torch.equal(perturbed.grad, expected)
    if rule != "none":
        assert (expected == 0).sum() > (g == 0).sum()  # the rule did zero something


@pytest.mark.parametrize("rule", CLIP_RULES)
def test_clip_mask_matches_elementwise_rule(rule):
    h, d, g = (torch.tensor([c[i] for c in COMBOS]) for i in range(3))
    mask = clip_mask(rule, g, d, h)
    expected = [_zeroed_by_rule(rule, *c) for c in COMBOS]
    assert mask.tolist() == expected


def test_rows_after_the_clean_rows_pass_unclipped_and_index_pairs_rows():
    layer = Copy()
    clean = torch.tensor([[1.0, 1.0], [5.0, 5.0]])
    # rows 0-2 are compared with clean rows 1, 0, 1; row 3 is not clipped
    perturbed = torch.tensor(
        [[5.0, 6.0], [1.0, 0.0], [5.0, 4.0], [1.0, 1.0]], requires_grad=True
    )
    g = torch.tensor([[1.0, 1.0], [1.0, 1.0], [-1.0, 1.0], [-1.0, -1.0]])
    with ClipGrad([layer], "vm") as clip:
        clip.capture(lambda: layer(clean), index=torch.tensor([1, 0, 1]))
        (layer(perturbed) * g).sum().backward()
    # d = [[0, 1], [0, -1], [0, -1]]; vm zeroes d = 0 and g*d < 0
    expected = torch.tensor([[0.0, 1.0], [0.0, 0.0], [0.0, 0.0], [-1.0, -1.0]])
    assert torch.equal(perturbed.grad, expected)


@pytest.mark.parametrize("rule", CLIP_RULES)
def test_repeats_pair_each_clean_row_with_consecutive_rows_like_the_index(rule):
    """``repeats=3`` keeps one clean row per sample and broadcasts it: the gradients
    equal the element-by-element rule applied with clean row r // 3, and those of
    the equivalent ``index``; rows after the repeated ones pass unclipped."""
    generator = torch.Generator().manual_seed(4)
    combos = torch.tensor(COMBOS)  # every sign combination, in both samples
    clean = torch.stack([combos[:, 0], -combos[:, 0]]).view(2, 1, -1)
    d = combos[:, 1].view(1, 1, -1).repeat(7, 1, 1)
    d[:, :, 0] = torch.randn(7, 1, generator=generator)
    rows = torch.arange(2).repeat_interleave(3)
    perturbed = torch.cat([clean[rows], clean[:1]]) + d  # 6 paired rows, 1 extra
    g = combos[:, 2].view(1, 1, -1) * torch.randn(7, 1, 1, generator=generator).sign()
    grads = {}
    for pairing in ("repeats", "index"):
        layer = Copy()
        x = perturbed.clone().requires_grad_()
        with ClipGrad([layer], rule) as clip:
            if pairing == "repeats":
                clip.capture(lambda layer=layer: layer(clean), repeats=3)
            else:
                clip.capture(lambda layer=layer: layer(clean), index=rows)
            (layer(x) * g).sum().backward()
        grads[pairing] = x.grad
    expected = g.clone()
    for r in range(6):
        for i in range(len(COMBOS)):
            h = float(clean[r // 3, 0, i])
            if _zeroed_by_rule(rule, h, float(d[r, 0, i]), float(g[r, 0, i])):
                expected[r, 0, i] = 0.0
    assert torch.equal(grads["repeats"], expected)
    assert torch.equal(grads["index"], expected)
    if rule != "none":
        assert not torch.equal(expected[:6], g[:6])


def test_repeats_argument_is_checked():
    layer = Copy()
    with ClipGrad([layer], "vm") as clip:
        with pytest.raises(ValueError, match="repeats"):
            clip.capture(lambda: layer(torch.ones(1, 2)), repeats=0)
        with pytest.raises(ValueError, match="`index` and `repeats`"):
            clip.capture(
                lambda: layer(torch.ones(1, 2)), index=torch.zeros(2).long(), repeats=2
            )


def test_inplace_relu_after_the_layer_does_not_change_the_clipping():
    torch.manual_seed(1)
    x = torch.randn(2, 3, 6, 6)
    x_tilde = x + 0.5 * torch.randn_like(x)
    grads = []
    for inplace in (False, True):
        torch.manual_seed(2)
        model = nn.Sequential(
            nn.Conv2d(3, 4, 3), nn.ReLU(inplace=inplace), nn.Conv2d(4, 5, 3)
        )
        x_req = x_tilde.clone().requires_grad_()
        with ClipGrad(select_layers(model, "conv"), "ibm") as clip:
            clip.capture(lambda model=model: model(x))
            model(x_req).sum().backward()
        grads.append(x_req.grad)
    assert torch.equal(grads[0], grads[1])
    assert grads[0].abs().sum() > 0


def test_reused_module_is_paired_call_by_call():
    layer = Copy()

    def forward(a):
        return layer(a) + layer(2 * a)

    x = torch.tensor([[1.0, -1.0]])
    with ClipGrad([layer], "vm") as clip:
        clip.capture(lambda: forward(x))
        assert [c.tolist() for c in clip.clean[0]] == [[[1.0, -1.0]], [[2.0, -2.0]]]
        x_tilde = torch.tensor([[2.0, -1.0]], requires_grad=True)
        forward(x_tilde).sum().backward()
    # call 1: d = [1, 0], g = [1, 1] -> keeps entry 0; call 2: d = [2, 0], g = [1, 1]
    # -> keeps entry 0 (times 2 from the chain rule); entry 1 has d = 0 in both calls
    assert torch.equal(x_tilde.grad, torch.tensor([[3.0, 0.0]]))


def test_hooks_removed_after_use_and_when_forward_raises():
    model = small_cnn()
    snapshot = ModelSnapshot.take(model)
    layers = select_layers(model, "conv")
    x = torch.randn(2, 3, 8, 8)
    with ClipGrad(layers, "vm") as clip:
        clip.capture(lambda: model(x))
        assert all(len(m._forward_hooks) == 1 for m in layers)
        model(x.clone().requires_grad_()).sum().backward()
    snapshot.assert_same(model)
    with pytest.raises(RuntimeError, match="boom"):
        with ClipGrad(layers, "vm") as clip:
            clip.capture(lambda: model(x))

            def failing(a):
                model(a)
                raise RuntimeError("boom")

            failing(x.clone().requires_grad_())
    snapshot.assert_same(model)
    with pytest.raises(ValueError, match="shape"):
        with ClipGrad(layers, "vm") as clip:
            clip.capture(lambda: model(x))
            model(torch.randn(1, 3, 8, 8, requires_grad=True))
    snapshot.assert_same(model)


def test_vm_on_a_resnet_blocks_every_path_when_nothing_deviates():
    torchvision = pytest.importorskip("torchvision")
    model = torchvision.models.resnet18(weights=None, num_classes=4).eval()
    snapshot = ModelSnapshot.take(model)
    x = torch.randn(2, 3, 32, 32)
    layers = select_layers(model, "conv")
    assert len(layers) == 20  # 17 3x3/7x7 convs + 3 downsample convs
    for rule, expect_zero in (("vm", True), ("none", False)):
        x_req = x.clone().requires_grad_()
        with ClipGrad(layers, rule) as clip:
            clip.capture(lambda: model(x))
            model(x_req)[:, 1].sum().backward()
        # d = 0 at every conv output: vm blocks all gradient; the stem conv is on
        # every path from the input, so nothing reaches it.
        assert bool((x_req.grad == 0).all()) == expect_zero
    snapshot.assert_same(model)


def test_layer_selection_presets_names_and_errors():
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.Conv2d(4, 4, 3)
    )
    convs = [model[0], model[2], model[3]]
    assert select_layers(model, "conv") == convs
    assert select_layers(model, "early") == convs[:2]
    assert select_layers(model, "late") == convs[1:]
    assert select_layers(model, ["2", model[0], "2"]) == [model[2], model[0]]
    with pytest.raises(ValueError, match="no submodule named 'conv9'"):
        select_layers(model, ["conv9"])
    with pytest.raises(ValueError, match="layers"):
        select_layers(model, "all")
    with pytest.raises(ValueError, match="not part of the model"):
        select_layers(model, [nn.Conv2d(1, 1, 1)])
    with pytest.raises(ValueError, match="Conv2d"):
        select_layers(nn.Sequential(nn.Linear(2, 2)), "conv")
    with pytest.raises(ValueError, match="rule"):
        ClipGrad(convs, "clip-all")


def test_vm_at_attention_probabilities_blocks_exactly_the_attention_path():
    """At x~ = x every attention probability has d = 0, so ``vm`` at
    ``layers="attention"`` zeroes the whole gradient through them, and only through
    them: the input gradient must equal that of the same ViT whose attention
    probabilities are constants (an attention function registered with transformers
    that detaches them)."""
    pytest.importorskip("transformers")
    from tiny_vits import hf_vit, images
    from transformers import AttentionInterface

    from captum_faithful._layers import model_places

    model = hf_vit().model
    snapshot = ModelSnapshot.take(model)
    x = images(2)

    def input_gradient():
        x_req = x.clone().requires_grad_()
        model(x_req).logits[:, 1].sum().backward()
        return x_req.grad

    def detached(module, query, key, value, attention_mask, scaling=None, **kwargs):
        scores = query @ key.transpose(2, 3) * (scaling or query.shape[-1] ** -0.5)
        weights = scores.softmax(-1).detach()
        return (weights @ value).transpose(1, 2).contiguous(), weights

    config = vars(model.config)
    before = config["_attn_implementation_internal"]
    AttentionInterface.register("detached_probabilities", detached)
    try:
        config["_attn_implementation_internal"] = "detached_probabilities"
        expected = input_gradient()
    finally:
        config["_attn_implementation_internal"] = before
        del AttentionInterface._global_mapping["detached_probabilities"]
    plain = input_gradient()
    with model_places(model, "attention") as places, ClipGrad(places, "vm") as clip:
        assert model.config._attn_implementation == "eager"
        clip.capture(lambda: model(x))
        clipped = input_gradient()
    assert model.config._attn_implementation == before
    assert torch.allclose(clipped, expected, atol=1e-6)
    assert not torch.allclose(clipped, plain, atol=1e-4)
    snapshot.assert_same(model)


@pytest.mark.parametrize("rule", ["vm", "ivm", "avm"])
def test_state_buffers_are_reused_across_iterations_but_never_under_a_live_graph(rule):
    """The per-forward state (sign of d, or the sign test) goes back to its slot
    when the graph holding it is freed, so an optimisation loop writes every forward
    into the same buffer; a graph kept for a second backward (``retain_graph``)
    keeps its own, and its second backward still clips by its own deviation."""
    layer = Copy()
    clean = torch.zeros(1, 6)
    g = torch.tensor([[1.0, -1.0, 1.0, -1.0, 1.0, -1.0]])
    first_input = torch.tensor([[1.0, 1.0, -1.0, -1.0, 0.0, 0.0]])

    def clipped(x):
        """The input gradient of one forward and backward (graph freed after)."""
        x = x.clone().requires_grad_()
        out = layer(x)
        (grad,) = torch.autograd.grad((out * g).sum(), x)
        return grad

    def expected(x):
        pairs = zip((x - clean)[0].tolist(), g[0].tolist(), strict=True)
        zeroed = [_zeroed_by_rule(rule, 0.0, dv, gv) for dv, gv in pairs]
        return torch.where(torch.tensor([zeroed]), 0.0, g)

    # the two deviations clip differently, so a reused buffer would show
    assert not torch.equal(expected(first_input), expected(-first_input))
    with ClipGrad([layer], rule) as clip:
        clip.capture(lambda: layer(clean))
        assert torch.equal(clipped(first_input), expected(first_input))
        buffer = clip._spare[(0, 0)]
        for _ in range(3):
            assert torch.equal(clipped(-first_input), expected(-first_input))
            assert clip._spare[(0, 0)] is buffer  # written again, not reallocated

        kept = first_input.clone().requires_grad_()
        kept_loss = (layer(kept) * g).sum()
        assert (0, 0) not in clip._spare  # the live graph holds the buffer
        (first,) = torch.autograd.grad(kept_loss, kept, retain_graph=True)
        # a later forward with the opposite deviation must not overwrite it
        assert torch.equal(clipped(-first_input), expected(-first_input))
        (second,) = torch.autograd.grad(kept_loss, kept)
        assert torch.equal(first, expected(first_input))
        assert torch.equal(second, first)


def test_a_single_module_is_one_layer_as_in_captum():
    """``ClipGrad(module)`` = ``ClipGrad([module])`` (Captum's layer arguments take a
    module or a list); an ``nn.Sequential`` passed alone is one layer, its output,
    not its children."""
    torch.manual_seed(3)
    clean, x = torch.randn(2, 4), torch.randn(2, 4)
    g = torch.randn(2, 4)
    grads = []
    for layers in ("list", "single"):
        layer = Copy()
        x_req = x.clone().requires_grad_()
        with ClipGrad([layer] if layers == "list" else layer, "vm") as clip:
            clip.capture(lambda layer=layer: layer(clean))
            (layer(x_req) * g).sum().backward()
        grads.append(x_req.grad)
    assert torch.equal(grads[0], grads[1])
    assert not torch.equal(grads[0], g)  # vm zeroed something
    block = nn.Sequential(Copy(), Copy())
    with ClipGrad(block, "vm") as clip:
        assert clip.layers == [block]
        assert len(block._forward_hooks) == 1
        assert all(not m._forward_hooks for m in block)
    assert not block._forward_hooks
    for bad in (3, [], [3], "conv1"):
        with pytest.raises(TypeError, match="`layers`"):
            ClipGrad(bad)


def test_capture_index_is_checked_and_names_the_rows():
    layer = Copy()
    calls = []

    def forward():
        calls.append(1)
        return layer(torch.ones(2, 3))

    with ClipGrad([layer], "vm") as clip:
        for bad, error, match in (
            (torch.tensor([0.0, 1.0]), TypeError, r"`index`.*integer.*float32"),
            ([0, 1], TypeError, r"`index`.*tensor.*list"),
            (torch.tensor([[0, 1]]), ValueError, r"`index`.*1-D.*\(1, 2\)"),
            (torch.tensor([0, -1]), ValueError, r"`index`.*-1"),
        ):
            with pytest.raises(error, match=match):
                clip.capture(forward, index=bad)
        assert not calls  # refused before the forward
        with pytest.raises(ValueError, match=r"`index`.*2.*2 clean rows"):
            clip.capture(forward, index=torch.tensor([0, 2]))
        # the failed capture left nothing behind; a good one still works
        assert all(not c for c in clip.clean)
        clip.capture(forward, index=torch.tensor([1, 0, 1]))
        assert clip.clean[0][0].shape == (3, 3)
