"""The residual CNN of FEI's ablations: architecture, layer split, cache."""

import dataclasses
import json
import os

import pytest
import torch
from torch import nn

from captum_faithful._layers import select_layers
from captum_faithful.attr._core.clip_grad import ClipGrad
from captum_faithful.demo import data, models
from captum_faithful.demo.models import (
    ResidualBlock,
    accuracy,
    build_cnn,
    build_residual_cnn,
    load_residual_cnn,
    residual_key,
)


def _macs(model: nn.Module, x: torch.Tensor) -> int:
    """Multiply-adds of the convolutions and linear layers of one forward."""
    total = 0

    def hook(module, args, output):
        nonlocal total
        if isinstance(module, nn.Conv2d):
            per_output = module.in_channels * module.kernel_size[0] ** 2
            total += output[0].numel() * per_output // module.groups
        elif isinstance(module, nn.Linear):
            total += module.in_features * module.out_features

    handles = [m.register_forward_hook(hook) for m in model.modules()]
    with torch.no_grad():
        model(x)
    for handle in handles:
        handle.remove()
    return total


def test_residual_cnn_shape_and_cost():
    torch.manual_seed(0)
    model = build_residual_cnn().eval()
    x = torch.rand(3, 3, 32, 32)
    out = model(x)
    assert out.shape == (3, data.N_CLASSES) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    assert len(convs) == 9
    # the docstring's claim: about the demo CNN's cost per image (12.5M vs 12.2M),
    # counted by hand: stem, block 1 at 32x32, blocks 2 and 3 (two 3x3 and a 1x1
    # projection) at 16x16 and 8x8, the linear layer
    residual, plain = _macs(model, x[:1]), _macs(build_cnn().eval(), x[:1])
    assert residual == (
        3 * 16 * 9 * 32**2
        + 2 * 16 * 16 * 9 * 32**2
        + (16 * 32 * 9 + 32 * 32 * 9 + 16 * 32) * 16**2
        + (32 * 64 * 9 + 64 * 64 * 9 + 32 * 64) * 8**2
        + 64 * 10
    )
    assert plain == (3 * 16 + 16 * 32) * 9 * 32**2 + 32 * 64 * 9 * 16**2 + (
        64 * 64 * 9 * 8**2 + 64 * 10
    )
    assert abs(residual / plain - 1) < 0.05
    # each ReLU is its own module (hooks see one use each)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert len({id(m) for m in relus}) == len(relus) == 7


def test_residual_block_computes_relu_of_main_path_plus_shortcut():
    """Against the formula written out with functional calls."""
    torch.manual_seed(1)
    for in_channels, out_channels in ((16, 16), (16, 32)):
        block = ResidualBlock(in_channels, out_channels)
        # non-trivial BatchNorm statistics, then eval mode
        block.train()
        with torch.no_grad():
            block(torch.randn(8, in_channels, 6, 6))
        block.eval()
        x = torch.randn(2, in_channels, 6, 6)

        def bn(layer, h):
            return nn.functional.batch_norm(
                h, layer.running_mean, layer.running_var, layer.weight, layer.bias
            )

        h = torch.relu(bn(block.bn1, block.conv1(x)))
        main = bn(block.bn2, block.conv2(h))
        if in_channels == out_channels:
            assert isinstance(block.shortcut, nn.Identity)
            shortcut = x
        else:
            conv, norm = block.shortcut
            assert conv.kernel_size == (1, 1)
            shortcut = bn(norm, conv(x))
        with torch.no_grad():
            torch.testing.assert_close(block(x), torch.relu(main + shortcut))


def test_residual_connection_carries_the_input_when_the_main_path_is_silenced():
    """With the last BatchNorm of every block at zero, a plain stack would output
    a constant; the residual model still depends on the input through its
    shortcuts, and an identity block passes its (non-negative) input unchanged."""
    torch.manual_seed(2)
    model = build_residual_cnn().eval()
    blocks = [m for m in model if isinstance(m, ResidualBlock)]
    assert len(blocks) == 3
    with torch.no_grad():
        for block in blocks:
            block.bn2.weight.zero_()
            block.bn2.bias.zero_()
        x = torch.rand(4, 16, 8, 8)  # non-negative, as after the stem's ReLU
        torch.testing.assert_close(blocks[0](x), x)
        images = torch.rand(2, 3, 32, 32)
        out = model(images)
    assert not torch.allclose(out[0], out[1])


def test_early_and_late_split_the_residual_cnn_in_definition_order():
    """Nine convolutions: the first five and the last five (sharing the middle
    one), projections after their block's main path; ClipGrad hooks exactly those."""
    model = build_residual_cnn()
    stem, first, second, third = model[0], model[3], model[5], model[7]
    early = [stem, first.conv1, first.conv2, second.conv1, second.conv2]
    late = [second.conv2, second.shortcut[0], third.conv1, third.conv2]
    late.append(third.shortcut[0])
    assert select_layers(model, "early") == early
    assert select_layers(model, "late") == late
    assert select_layers(model, "conv") == early + late[1:]
    with ClipGrad(select_layers(model, "late")) as clip:
        clip.capture(lambda: model(torch.rand(1, 3, 32, 32)))
        assert [len(calls) for calls in clip.clean] == [1] * 5
        assert clip.clean[1][0].shape == (1, 32, 16, 16)  # the projection's output


def test_residual_key_reads_the_cnn_fields_only():
    recipe = models.QUICK_RECIPE
    assert residual_key(recipe, 0) != residual_key(recipe, 1)
    assert residual_key(recipe, 0) != residual_key(models.FULL_RECIPE, 0)
    longer = dataclasses.replace(recipe, cnn_epochs=recipe.cnn_epochs + 1)
    assert residual_key(longer, 0) != residual_key(recipe, 0)
    other_vit = dataclasses.replace(recipe, vit_epochs=recipe.vit_epochs + 1)
    assert residual_key(other_vit, 0) == residual_key(recipe, 0)


def test_load_residual_cnn_trains_once_and_loads_the_same_weights(
    tmp_path, monkeypatch
):
    """One training step (64 images, one epoch), cached; the second load
    reads the cache (no training, same weights, meta.json untouched)."""
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    monkeypatch.setattr(
        models, "QUICK_RECIPE", dataclasses.replace(models.QUICK_RECIPE, cnn_epochs=1)
    )
    make_blocks = data.make_blocks

    def few_training_images(split="test", seed=0, rendering=0):
        # the test split renders in a fraction of the training split's time; this
        # test is about the cache, not about what the model learns
        blocks = make_blocks("test", seed, rendering)
        if split != "train":
            return blocks
        return data.DigitBlocks(
            *(getattr(blocks, f.name)[:64] for f in dataclasses.fields(blocks))
        )

    monkeypatch.setattr(models, "make_blocks", few_training_images)
    model, meta = load_residual_cnn(quick=True, seed=0)
    torch.manual_seed(0)
    untrained = build_residual_cnn()
    changed = [
        not torch.equal(a, b)
        for a, b in zip(
            model.state_dict().values(), untrained.state_dict().values(), strict=True
        )
    ]
    assert any(changed)  # one optimiser step moved the weights
    assert not model.training
    folder = tmp_path / f"residual-cnn-{residual_key(models.QUICK_RECIPE, 0)}"
    assert json.loads((folder / "meta.json").read_text()) == meta
    test = make_blocks("test", 0)
    assert meta["accuracy"] == accuracy(model, test.images, test.labels)
    assert meta["parameters"] == sum(p.numel() for p in model.parameters())
    stamp = os.path.getmtime(folder / "meta.json")

    def no_training(*args, **kwargs):
        raise AssertionError("the second load must read the cache")

    monkeypatch.setattr(models, "train_residual_cnn", no_training)
    again, meta_again = load_residual_cnn(quick=True, seed=0)
    assert meta_again == meta
    assert os.path.getmtime(folder / "meta.json") == stamp
    for a, b in zip(
        again.state_dict().values(), model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b)


def test_load_residual_cnn_bad_arguments():
    with pytest.raises(TypeError, match="quick"):
        load_residual_cnn(quick="yes")
    with pytest.raises(ValueError, match="seed"):
        load_residual_cnn(seed=-1)
    with pytest.raises(TypeError, match="show_progress"):
        load_residual_cnn(show_progress=1)
