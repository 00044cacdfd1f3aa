import math
from pathlib import Path

import pytest
import torch
from helpers import ModelSnapshot, child_env, small_cnn
from torch import nn

from captum_faithful.metrics import activation_deviation


def _reference(layer_outputs_clean, layer_outputs_perturbed):
    """Per sample: mean over layers of the MSE and of the cosine, by plain loops."""
    n = layer_outputs_clean[0].shape[0]
    mse, cos = [], []
    for i in range(n):
        m_sum, c_sum = 0.0, 0.0
        for a, b in zip(layer_outputs_clean, layer_outputs_perturbed, strict=True):
            u = a[i].flatten().tolist()
            v = b[i].flatten().tolist()
            m_sum += sum((p - q) ** 2 for p, q in zip(u, v, strict=True)) / len(u)
            dot = sum(p * q for p, q in zip(u, v, strict=True))
            c_sum += dot / (
                math.sqrt(sum(p * p for p in u)) * math.sqrt(sum(q * q for q in v))
            )
        mse.append(m_sum / len(layer_outputs_clean))
        cos.append(c_sum / len(layer_outputs_clean))
    return torch.tensor(mse), torch.tensor(cos)


def test_matches_a_loop_over_samples_and_layers(cnn):
    x = torch.randn(3, 3, 8, 8)
    x_tilde = x + torch.randn_like(x)
    snapshot = ModelSnapshot.take(cnn)
    result = activation_deviation(cnn, "conv", x, x_tilde)
    snapshot.assert_same(cnn)
    conv1, conv2 = cnn[0], cnn[3]

    def conv_outputs(inp):
        with torch.no_grad():
            a = conv1(inp)
            b = conv2(cnn[2](cnn[1](a)))
        return [a, b]

    mse, cos = _reference(conv_outputs(x), conv_outputs(x_tilde))
    assert torch.allclose(result["mse"], mse.double(), rtol=1e-5)
    assert torch.allclose(result["cosine"], cos.double(), rtol=1e-5)
    assert result["mse"].shape == (3,)
    # one layer by name gives that layer only
    only_first = activation_deviation(cnn, ["0"], x, x_tilde)
    mse1, cos1 = _reference(conv_outputs(x)[:1], conv_outputs(x_tilde)[:1])
    assert torch.allclose(only_first["mse"], mse1.double(), rtol=1e-5)
    assert torch.allclose(only_first["cosine"], cos1.double(), rtol=1e-5)


def test_identical_inputs_and_zero_activations():
    model = nn.Sequential(nn.Conv2d(1, 2, 1), nn.ReLU())
    with torch.no_grad():
        model[0].weight.fill_(1.0)
        model[0].bias.zero_()
    x = torch.randn(2, 1, 4, 4)
    same = activation_deviation(model, "conv", x, x.clone())
    assert torch.equal(same["mse"], torch.zeros(2))
    assert torch.allclose(same["cosine"], torch.ones(2, dtype=torch.float64))
    zeros = torch.zeros(2, 1, 4, 4)
    # both all-zero: identical (cosine 1); zero against non-zero: cosine 0
    out = activation_deviation(
        model, [model[1]], zeros, torch.stack([zeros[0], x[0].abs() + 1])
    )
    assert out["cosine"].tolist() == [1.0, 0.0]


def test_tuple_inputs_and_additional_forward_args():
    class TwoInputs(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3)

        def forward(self, a, b, scale):
            return self.conv(a + b) * scale

    model = TwoInputs()
    a, b = torch.randn(2, 1, 5, 5), torch.randn(2, 1, 5, 5)
    out = activation_deviation(
        model, "conv", (a, b), (a, b + 1), additional_forward_args=2.0
    )
    with torch.no_grad():
        h, h_tilde = model.conv(a + b), model.conv(a + b + 1)
    mse, cos = _reference([h], [h_tilde])
    assert torch.allclose(out["mse"], mse.double(), rtol=1e-5)
    assert torch.allclose(out["cosine"], cos.double(), rtol=1e-5)


def test_bad_input_raises_clear_errors():
    model = small_cnn()
    x = torch.randn(2, 3, 8, 8)
    with pytest.raises(ValueError, match="perturbed_inputs"):
        activation_deviation(model, "conv", x, x[:1])
    with pytest.raises(ValueError, match="no submodule named 'fc'"):
        activation_deviation(model, ["fc"], x, x)
    with pytest.raises(ValueError, match="Conv2d"):
        activation_deviation(
            nn.Sequential(nn.Flatten(), nn.Linear(192, 2)), "conv", x, x
        )
    with pytest.raises(ValueError, match="NaN"):
        activation_deviation(model, "conv", x, torch.full_like(x, float("nan")))
    with pytest.raises(TypeError, match="model"):
        activation_deviation(lambda t: t, "conv", x, x)


def test_insertion_activation_deviation_follows_the_hard_insertion_curve(cnn):
    from captum_faithful.metrics import insertion_activation_deviation

    x = torch.rand(3, 3, 6, 6)
    reference = torch.rand(3, 3, 1, 1)
    attributions = torch.randn(3, 1, 6, 6)
    attributions[0, 0, 0, :3] = 5.0  # ties: broken by the lower pixel index
    n_steps = 9
    result = insertion_activation_deviation(
        cnn, "conv", x, attributions, baselines=reference, n_steps=n_steps
    )
    chunked = insertion_activation_deviation(
        cnn,
        "conv",
        x,
        attributions,
        baselines=reference,
        n_steps=n_steps,
        max_examples_per_batch=4,
    )
    # independent: build every curve image with a loop, compare with the clean image
    mse = torch.zeros(3)
    cos = torch.zeros(3)
    for i in range(3):
        order = sorted(
            range(36), key=lambda p: (-float(attributions[i, 0].flatten()[p]), p)
        )
        for k in range(n_steps + 1):
            keep = torch.zeros(36, dtype=torch.bool)
            keep[order[: round(k * 36 / n_steps)]] = True
            image = torch.where(keep.view(1, 6, 6), x[i], reference[i])
            one = activation_deviation(cnn, "conv", x[i : i + 1], image.unsqueeze(0))
            mse[i] += one["mse"][0] / (n_steps + 1)
            cos[i] += one["cosine"][0] / (n_steps + 1)
    for out in (result, chunked):
        assert torch.allclose(out["mse"], mse.double(), rtol=1e-4)
        assert torch.allclose(out["cosine"], cos.double(), atol=1e-5)
    with pytest.raises(ValueError, match="`n_steps`"):
        insertion_activation_deviation(cnn, "conv", x, attributions, n_steps=0)
    with pytest.raises(ValueError, match="attributions"):
        insertion_activation_deviation(cnn, "conv", x, attributions[:2])


def test_vision_transformer_layer_sets_match_the_model_outputs():
    """``"blocks"``: the residual stream after every block; ``"attention"``: every
    block's attention probabilities (with eager attention switched on for the call and
    restored). Compared with the model's own ``hidden_states`` / ``attentions``."""
    pytest.importorskip("transformers")
    from tiny_vits import hf_vit, images

    model = hf_vit().model
    before = model.config._attn_implementation
    x = images(3)
    x_tilde = x + 0.3 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    model.config._attn_implementation_internal = "eager"
    with torch.no_grad():
        clean = model(x, output_hidden_states=True, output_attentions=True)
        perturbed = model(x_tilde, output_hidden_states=True, output_attentions=True)
    model.config._attn_implementation_internal = before
    # (taken now: transformers installs its output recorders on the first call that
    # asks for hidden states or attentions)
    snapshot = ModelSnapshot.take(model)
    for layers, key, offset in (
        ("blocks", "hidden_states", 1),
        ("attention", "attentions", 0),
    ):
        result = activation_deviation(model, layers, x, x_tilde)
        assert model.config._attn_implementation == before
        mse, cos = _reference(
            list(getattr(clean, key)[offset:]), list(getattr(perturbed, key)[offset:])
        )
        assert torch.allclose(result["mse"], mse.double(), rtol=1e-4), layers
        assert torch.allclose(result["cosine"], cos.double(), rtol=1e-5), layers
    snapshot.assert_same(model)


def test_insertion_activation_deviation_rounds_exact_halves_to_even():
    from captum_faithful.metrics import insertion_activation_deviation

    # F = 10 pixels, n_steps = 4: k F / n_steps = 2.5 and 7.5, rounded to 2 and 8.
    # The recorded layer is the flattened image: all ones on a zero baseline, so
    # with c features inserted MSE = (10 - c) / 10 and cosine = sqrt(c / 10).
    model = nn.Sequential(nn.Flatten(), nn.Linear(10, 2))
    x = torch.ones(2, 1, 2, 5)
    attributions = torch.stack([torch.arange(10.0), torch.arange(10.0).flip(0)])
    counts = [0, 2, 5, 8, 10]  # half-up rounding would give [0, 3, 5, 8, 10]
    result = insertion_activation_deviation(
        model, [model[0]], x, attributions.view(x.shape), baselines=0.0, n_steps=4
    )
    mse = sum((10 - c) / 10 for c in counts) / 5
    cosine = sum(math.sqrt(c / 10) for c in counts) / 5
    torch.testing.assert_close(
        result["mse"], torch.full((2,), mse, dtype=torch.float64), atol=1e-6, rtol=0
    )
    torch.testing.assert_close(
        result["cosine"],
        torch.full((2,), cosine, dtype=torch.float64),
        atol=1e-6,
        rtol=0,
    )


def test_eager_attention_is_restored_when_the_forward_raises():
    """``layers="attention"`` switches the ViT to eager attention for the call; a
    forward that raises under it leaves the model as it was, for
    ``activation_deviation``, ``insertion_activation_deviation`` and
    ``blank_image_diagnostic``."""
    pytest.importorskip("transformers")
    from tiny_vits import hf_vit, images

    from captum_faithful._layers import select_places
    from captum_faithful.metrics import insertion_activation_deviation
    from captum_faithful.studies import blank_image_diagnostic

    model = hf_vit().model
    before = model.config._attn_implementation
    assert before != "eager"
    seen = []

    def fail(module, args):  # the first forward with eager attention raises
        seen.append(model.config._attn_implementation)
        if seen[-1] == "eager":
            raise RuntimeError("block 0 failed")

    x = images(2)
    calls = {
        "activation_deviation": lambda: activation_deviation(
            model, "attention", x, x.flip(0)
        ),
        "insertion_activation_deviation": lambda: insertion_activation_deviation(
            model, "attention", x, torch.rand(x.shape), baselines=0.0, n_steps=2
        ),
        "blank_image_diagnostic": lambda: blank_image_diagnostic(
            model,
            torch.full_like(x, 0.5),
            clips=["vm"],
            layers="attention",
            deviation_layers="attention",
            n_iter=1,
        ),
    }
    first_block = select_places(model, "blocks")[0].module
    handle = first_block.register_forward_pre_hook(fail)
    try:
        for name, call in calls.items():
            seen.clear()
            with pytest.raises(RuntimeError, match="block 0 failed"):
                call()
            assert seen[-1] == "eager", name
            assert model.config._attn_implementation == before, name
    finally:
        handle.remove()


class WideConv(nn.Module):
    """One 1x1 convolution to 256 channels: 4 MB of activation per 3x64x64 image, so
    the memory the metrics hold per sample stands out."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 256, 1)
        self.head = nn.Linear(256, 2)

    def forward(self, x, shift=None):
        if shift is not None:
            x = x + shift.view(-1, 1, 1, 1)
        return self.head(self.conv(x).mean(dim=(2, 3)))


def test_activation_deviation_runs_max_examples_per_batch_samples_at_a_time():
    """Chunks give the unchunked values, an additional argument with a batch dimension
    follows its samples, and no forward sees more than the chunk."""
    from memory import LargestBatch

    model = WideConv()
    x, shift = torch.rand(7, 3, 8, 8), torch.linspace(-1, 1, 7)
    x_tilde = x + torch.randn_like(x)
    whole = activation_deviation(
        model, "conv", x, x_tilde, additional_forward_args=(shift,),
        max_examples_per_batch=64,
    )  # fmt: skip
    with LargestBatch(model) as probe:
        chunked = activation_deviation(
            model, "conv", x, x_tilde, additional_forward_args=(shift,),
            max_examples_per_batch=3,
        )  # fmt: skip
    assert probe.largest == 3
    with torch.no_grad():
        h = model.conv(x + shift.view(-1, 1, 1, 1))
        h_tilde = model.conv(x_tilde + shift.view(-1, 1, 1, 1))
    mse = ((h - h_tilde) ** 2).flatten(1).mean(1)
    for out in (whole, chunked):
        torch.testing.assert_close(out["mse"], mse.double(), rtol=1e-5, atol=0)
    torch.testing.assert_close(chunked["cosine"], whole["cosine"], rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="max_examples_per_batch"):
        activation_deviation(model, "conv", x, x, max_examples_per_batch=0)


@pytest.mark.slow
@pytest.mark.parametrize("metric", ["activation_deviation", "insertion"])
def test_peak_memory_is_bounded_by_the_chunk_not_the_batch(metric):
    """24 images hold no more memory than 4 at chunks of 4. Measured before the fix
    (WideConv, 3x64x64): from N=4 to N=24, activation_deviation took +956 MB (all
    clean and perturbed activations at once, and their float64 copies),
    insertion_activation_deviation +220 MB (the clean activations of every sample,
    held for the whole curve); after it +25 MB and -35 MB (the allocator's noise)."""
    from memory import peak_memory_mb

    from captum_faithful.metrics import insertion_activation_deviation

    model = WideConv()
    peaks = {}
    for n in (4, 24):
        x = torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(0))
        if metric == "insertion":
            attributions = torch.rand(n, 1, 64, 64)

            def call(x=x, attributions=attributions):
                return insertion_activation_deviation(
                    model, "conv", x, attributions, baselines=0.0, n_steps=1,
                    max_examples_per_batch=4,
                )  # fmt: skip

        else:

            def call(x=x):
                return activation_deviation(
                    model, "conv", x, x.flip(0), max_examples_per_batch=4
                )

        peaks[n] = peak_memory_mb(call)
    assert peaks[24] < peaks[4] + 100, peaks


def _deviation_by_formula(pairs):
    """MSE and cosine of one image, averaged over its (clean, perturbed) layer
    outputs: the docstring's formula in float64, one layer at a time."""
    mse, cos = 0.0, 0.0
    for h, h_tilde in pairs:
        h, h_tilde = h.flatten().double(), h_tilde.flatten().double()
        mse += float(((h_tilde - h) ** 2).mean())
        if not h.any() and not h_tilde.any():
            cos += 1.0
        elif not h.any() or not h_tilde.any():
            cos += 0.0
        else:
            cos += float(h @ h_tilde / (h.norm() * h_tilde.norm()))
    return mse / len(pairs), cos / len(pairs)


class SharedConvInPlace(nn.Module):
    """One convolution called twice, each call's output overwritten right after by
    an in-place ReLU: the metric must read the output at hook time, and match the
    calls of a layer across forward passes."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(3)
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.relu = nn.ReLU(inplace=True)
        self.head = nn.Linear(3, 2)

    def forward(self, x):
        h = self.relu(self.conv(x))
        h = self.relu(self.conv(h))
        return self.head(h.mean(dim=(2, 3)))

    def conv_calls(self, x):
        """The two outputs of ``conv`` before the ReLUs, computed directly."""
        with torch.no_grad():
            first = self.conv(x)
            return [first, self.conv(torch.relu(first))]


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, None])
def test_matches_the_formula_per_image_with_in_place_activations(chunk):
    """Every chunking (one image per pass, chunks that do or do not divide the
    batch, one chunk) gives the formula's value per image, computed one image and
    one layer call at a time; the layer's output is read before the in-place ReLU
    overwrites it, and its two calls are matched call by call."""
    model = SharedConvInPlace()
    x = torch.rand(5, 3, 7, 7, generator=torch.Generator().manual_seed(0))
    x_tilde = x + 0.5 * torch.randn(x.shape, generator=torch.Generator().manual_seed(1))
    snapshot = ModelSnapshot.take(model)
    out = activation_deviation(
        model, [model.conv], x, x_tilde, max_examples_per_batch=chunk
    )
    snapshot.assert_same(model)
    for i in range(5):
        pairs = list(
            zip(
                model.conv_calls(x[i : i + 1]),
                model.conv_calls(x_tilde[i : i + 1]),
                strict=True,
            )
        )
        mse, cos = _deviation_by_formula(pairs)
        assert out["mse"][i].item() == pytest.approx(mse, rel=1e-6)
        assert out["cosine"][i].item() == pytest.approx(cos, rel=1e-6)


@pytest.mark.parametrize("chunk", [1, 4, 7])
def test_insertion_deviation_matches_the_formula_per_curve_image(chunk):
    """The insertion curve's images, built one by one, compared with the clean
    image by the formula, for chunks that split a sample's curve or hold images of
    several samples."""
    from captum_faithful.metrics import insertion_activation_deviation

    model = SharedConvInPlace()
    x = torch.rand(3, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    attributions = torch.randn(3, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    n_steps = 5
    out = insertion_activation_deviation(
        model,
        [model.conv],
        x,
        attributions,
        baselines=0.25,
        n_steps=n_steps,
        max_examples_per_batch=chunk,
    )
    for i in range(3):
        order = sorted(
            range(16), key=lambda p: (-float(attributions[i].flatten()[p]), p)
        )
        mse, cos = 0.0, 0.0
        for k in range(n_steps + 1):
            keep = torch.zeros(16, dtype=torch.bool)
            keep[order[: round(k * 16 / n_steps)]] = True
            image = torch.where(keep.view(1, 4, 4), x[i], torch.tensor(0.25))
            pairs = zip(
                model.conv_calls(x[i : i + 1]),
                model.conv_calls(image.unsqueeze(0)),
                strict=True,
            )
            m, c = _deviation_by_formula(list(pairs))
            mse, cos = mse + m / (n_steps + 1), cos + c / (n_steps + 1)
        assert out["mse"][i].item() == pytest.approx(mse, rel=1e-5)
        assert out["cosine"][i].item() == pytest.approx(cos, rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
def test_values_at_the_ends_of_the_floating_point_range(dtype):
    """Activations whose squares underflow or overflow the activations' dtype, all-
    zero ones, and ordinary ones in float32, float64 and bfloat16: the formula's
    values in float64 (the metric sums products in float64; rows out of the safe
    range are recomputed exactly)."""
    model = nn.Sequential(nn.Flatten(), nn.Identity())
    gen = torch.Generator().manual_seed(0)
    shape = (6, 3, 16, 16)
    base = torch.randn(shape, generator=gen, dtype=torch.float64)
    noise = torch.randn(shape, generator=gen, dtype=torch.float64)
    scale = torch.tensor([1.0, 1e-25, 1e25, 0.0, 1.0, 1e-30]).view(-1, 1, 1, 1)
    if dtype == torch.bfloat16:  # bfloat16 has float32's range
        scale = scale.clamp(max=1e20)
    x = (base * scale).to(dtype)
    x_tilde = ((base + 0.3 * noise) * scale).to(dtype)
    x_tilde[4] = 0.0  # a zero activation against a non-zero one (cosine 0)
    x_tilde[0] = x[0] + (1e-3 * noise[0]).to(dtype)  # nearly identical
    out = activation_deviation(model, [model[1]], x, x_tilde)
    for i in range(6):
        mse, cos = _deviation_by_formula([(x[i], x_tilde[i])])
        expected = torch.tensor([mse, cos], dtype=torch.float64)
        got = torch.stack([out["mse"][i], out["cosine"][i]])
        torch.testing.assert_close(got, expected, rtol=2e-7, atol=0)


_PEAKS_CHILD = """
import json, sys
import torch
from torch import nn
from memory import peak_memory_mb
from captum_faithful.metrics import activation_deviation, insertion_activation_deviation

peaks = {}
for depth in (1, 9):
    torch.manual_seed(0)
    model = nn.Sequential(
        *[nn.Conv2d(144, 144, 1) for _ in range(depth)], nn.AdaptiveAvgPool2d(1)
    ).eval()
    x = torch.rand(4, 144, 128, 128, generator=torch.Generator().manual_seed(0))
    attributions = torch.rand(4, 1, 128, 128)
    peaks[depth] = (
        peak_memory_mb(
            lambda: activation_deviation(
                model, "conv", x, x.flip(0), max_examples_per_batch=4
            )
        ),
        peak_memory_mb(
            lambda: insertion_activation_deviation(
                model, "conv", x, attributions, baselines=0.0, n_steps=3,
                max_examples_per_batch=4,
            )
        ),
    )
print(json.dumps([peaks[1], peaks[9]]))
"""


@pytest.mark.slow
def test_peak_memory_per_layer_is_the_clean_activations_only():
    """Each extra recorded layer costs the memory of its clean outputs of one chunk
    and little more: the perturbed outputs are reduced inside their forward hooks,
    with no float64 copy. 4 images of 144x128x128 at chunks of 4, measured in a
    fresh process (the heap of a long test session adds up to 110 MB of
    fragmentation); 8 more layers record 288 MiB of clean outputs for
    activation_deviation (4 clean images per chunk) and 72 MiB for the insertion
    metric (the one sample of a chunk of 4 curve images). Measured, 9 layers over
    1 (repeated to within 2 MB): before the fix +608 MB and +375 MB (the clean and
    the perturbed outputs of a chunk, then float64 copies of each layer's); after
    it +312 MB and +78 MB."""
    import json
    import subprocess
    import sys

    if not Path("/proc/self/clear_refs").exists():
        pytest.skip("peak memory is read from /proc (Linux only)")
    child = subprocess.run(
        [sys.executable, "-c", _PEAKS_CHILD],
        capture_output=True,
        text=True,
        env=child_env(),
        check=True,
    )
    one, many = json.loads(child.stdout.strip().splitlines()[-1])
    layer_mb = 144 * 128 * 128 * 4 / 2**20  # one image's output of one layer
    clean_mb = (8 * 4 * layer_mb, 8 * 1 * layer_mb)
    for name, low, high, clean in zip(
        ("activation_deviation", "insertion"), one, many, clean_mb, strict=True
    ):
        assert high - low < clean + 60, (name, one, many)
