"""Real scale: ImageNet-sized models at 3x224x224, with step counts a CPU affords.

These run the paths a user takes with torchvision, Hugging Face and timm models
(BatchNorm in eval mode, per-sample unlearning of 25-110 M parameters, fused
attention switched off and back on, 197 tokens, padded text) and assert invariants:
shapes, completeness, chunking that changes nothing but memory, peak memory bounded
by the chunking arguments, and the model left as it was. Times are measured by
``benchmarks/bench_scale.py``, never here.
"""

from __future__ import annotations

import pytest
import torch
from helpers import ModelSnapshot
from memory import LargestBatch, peak_memory_mb
from torch import nn

from captum_faithful import (
    FeatureGatedTransMM,
    LayerUnlearnedIntegratedGradients,
    TransMM,
    UnlearnedIntegratedGradients,
    load_sae,
)
from captum_faithful.attr._utils.unlearning import (
    ParametrizedForward,
    buffer_copies,
    unlearned_log_probs,
    unlearned_parameters,
)
from captum_faithful.metrics import activation_deviation, insertion_auc

pytestmark = pytest.mark.slow
torchvision = pytest.importorskip("torchvision")


@pytest.fixture(scope="module")
def resnet50() -> nn.Module:
    torch.manual_seed(0)
    return torchvision.models.resnet50(weights=None).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.rand(2, 3, 224, 224, generator=torch.Generator().manual_seed(0))


def predicted(model, x):
    with torch.no_grad():
        out = model(x)
    return (out.logits if hasattr(out, "logits") else out).argmax(1)


def target_logits(model, x, target):
    with torch.no_grad():
        out = model(x)
    out = out.logits if hasattr(out, "logits") else out
    return out[torch.arange(x.shape[0]), target]


def test_uni_on_resnet50_is_complete_chunk_free_and_leaves_the_model(resnet50, images):
    """Baselines at L2 distance epsilon over the whole image; attributions sum to
    f_c(x) - f_c(x') (an independent forward); internal_batch_size changes nothing."""
    snapshot = ModelSnapshot.take(resnet50)
    target = predicted(resnet50, images)
    uni = UnlearnedIntegratedGradients(resnet50, pgd_steps=2)
    baselines = uni.compute_baselines(images, target=target)
    distance = (images - baselines).flatten(1).norm(dim=1)
    torch.testing.assert_close(distance, torch.full((2,), 0.25), rtol=1e-4, atol=0)

    attributions, delta = uni.attribute(
        images, target=target, n_steps=4, internal_batch_size=4,
        return_convergence_delta=True,
    )  # fmt: skip
    assert attributions.shape == images.shape
    total = attributions.flatten(1).sum(1)
    gap = target_logits(resnet50, images, target) - target_logits(
        resnet50, baselines, target
    )
    torch.testing.assert_close(total, gap, rtol=0.01, atol=0)
    torch.testing.assert_close(delta, total - gap, rtol=0, atol=1e-5)
    unchunked = uni.attribute(images, target=target, n_steps=4)
    scale = attributions.abs().max()
    torch.testing.assert_close(unchunked, attributions, rtol=0, atol=1e-4 * scale)
    snapshot.assert_same(resnet50)


def test_vectorised_unlearning_equals_the_loop_on_resnet50(resnet50, images):
    """vmap over two samples with 25.6 M parameters each gives the per-sample loop."""
    wrapper = ParametrizedForward(resnet50, resnet50)
    params, buffers = unlearned_parameters(resnet50), buffer_copies(resnet50)
    target = predicted(resnet50, images)
    results = {
        mode: unlearned_log_probs(
            wrapper, params, buffers, (images,), target, None, 1.0, 2, mode
        )
        for mode in ("vmap", "loop")
    }
    # log-probabilities of a random-weight ResNet-50 reach ~500 in magnitude, and
    # vmap's batched convolutions round differently from the loop's (measured: 1.5e-5
    # of the scale with 2 threads); mixing the samples' parameters would differ by
    # the size of the unlearning step itself
    scale = results["loop"].abs().max().item()
    torch.testing.assert_close(
        results["vmap"], results["loop"], rtol=0, atol=1e-4 * scale
    )
    # the unlearning step lowers the explained class in every sample
    clean = torch.log_softmax(resnet50(images).detach(), 1)
    rows = torch.arange(2)
    assert (results["vmap"][rows, target] < clean[rows, target]).all()
    # the tolerance above is far below the change the step makes
    step = (results["loop"] - clean).abs().max().item()
    assert step > 100 * 1e-4 * scale


def test_uni_memory_is_bounded_by_its_chunking_arguments(resnet50, images):
    """Peak memory follows internal_batch_size and unlearning_batch_size, not the
    number of path points. Measured (ResNet-50, 2 images, 12 path points): a plain
    forward+backward of the 12 took 1228 MB; UNI took 382 MB with
    internal_batch_size=2 and 1225 MB with 12; unlearning chunks of 1 and 2 samples
    took 376 and 786 MB (the parameters are 97 MB)."""
    target = predicted(resnet50, images)
    path = images.repeat(6, 1, 1, 1)

    def forward_backward(x):
        x = x.clone().requires_grad_()
        torch.autograd.grad(resnet50(x)[:, 0].sum(), x)

    twelve_rows = peak_memory_mb(lambda: forward_backward(path))
    uni = UnlearnedIntegratedGradients(resnet50, pgd_steps=1, unlearning_batch_size=1)
    peaks = {
        chunk: peak_memory_mb(
            lambda c=chunk: uni.attribute(
                images, target=target, n_steps=6, internal_batch_size=c
            )
        )
        for chunk in (2, 12)
    }
    assert peaks[12] > 0.8 * twelve_rows, (peaks, twelve_rows)
    assert peaks[2] < 0.5 * twelve_rows, (peaks, twelve_rows)

    parameter_mb = sum(p.numel() for p in resnet50.parameters()) * 4 / 2**20
    unlearning = {
        chunk: peak_memory_mb(
            lambda c=chunk: UnlearnedIntegratedGradients(
                resnet50, pgd_steps=0, unlearning_batch_size=c
            ).compute_baselines(images, target=target)
        )
        for chunk in (1, 2)
    }
    assert unlearning[1] < 6 * parameter_mb, (unlearning, parameter_mb)
    assert unlearning[2] - unlearning[1] > 2 * parameter_mb, (unlearning, parameter_mb)


def test_metrics_on_resnet50_match_a_per_image_loop_and_respect_the_chunk(
    resnet50, images
):
    attributions = torch.rand(
        2, 1, 224, 224, generator=torch.Generator().manual_seed(1)
    )
    target = predicted(resnet50, images)
    n_steps = 4
    with LargestBatch(resnet50) as probe:
        auc = insertion_auc(
            resnet50, images, attributions, target=target, baselines=0.0,
            n_steps=n_steps, max_examples_per_batch=3,
        )  # fmt: skip
    assert probe.largest == 3
    # independent: each curve image built and scored alone
    expected = []
    for i in range(2):
        order = torch.sort(attributions[i].flatten(), descending=True, stable=True)[1]
        curve = []
        for k in range(n_steps + 1):
            keep = torch.zeros(224 * 224, dtype=torch.bool)
            keep[order[: round(k * 224 * 224 / n_steps)]] = True
            image = torch.where(keep.view(1, 224, 224), images[i], 0.0)
            with torch.no_grad():
                probs = resnet50(image[None]).softmax(1)
            curve.append(probs[0, target[i]].item())
        expected.append(
            sum((a + b) / 2 for a, b in zip(curve, curve[1:], strict=False)) / n_steps
        )
    torch.testing.assert_close(
        auc, torch.tensor(expected, dtype=auc.dtype), rtol=0, atol=1e-6
    )

    perturbed = images.flip(0)
    whole = activation_deviation(resnet50, "conv", images, perturbed)
    with LargestBatch(resnet50) as probe:
        chunked = activation_deviation(
            resnet50, "conv", images, perturbed, max_examples_per_batch=1
        )
    assert probe.largest == 1
    for key in ("mse", "cosine"):
        torch.testing.assert_close(chunked[key], whole[key], rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def vit_b16() -> nn.Module:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.ViTConfig(image_size=224, patch_size=16, num_labels=1000)
    return transformers.ViTForImageClassification(config).eval()


def test_transmm_and_gating_on_hf_vit_b16(vit_b16, images, tmp_path):
    """Patch maps on the 14x14 grid spread over 16x16 pixels; gates with c_max=1
    leave TransMM unchanged exactly; SAEs saved and loaded from folders; the model's
    attention implementation and state come back as they were."""
    sae_lens = pytest.importorskip("sae_lens")
    snapshot = ModelSnapshot.take(vit_b16)
    attention = vit_b16.config._attn_implementation
    target = predicted(vit_b16, images)
    transmm = TransMM(vit_b16)
    patches = transmm.attribute(images, target=target, output="patches")
    pixels = transmm.attribute(images, target=target)
    assert patches.shape == (2, 14, 14) and pixels.shape == images.shape
    spread = patches.repeat_interleave(16, 1).repeat_interleave(16, 2)
    assert torch.equal(pixels, spread.unsqueeze(1).expand_as(images))
    assert (patches >= 0).all() and (patches.flatten(1).sum(1) > 0).all()

    folders = {}
    for block in (3, 9):
        config = sae_lens.StandardSAEConfig(d_in=768, d_sae=4 * 768)
        folders[block] = tmp_path / f"block_{block}"
        sae_lens.StandardSAE(config).save_model(folders[block])
    saes = {block: load_sae(folder) for block, folder in folders.items()}
    neutral = FeatureGatedTransMM(vit_b16, saes, c_max=1.0)
    assert torch.equal(
        neutral.attribute(images, target=target, output="patches"), patches
    )
    gated, gates = FeatureGatedTransMM(vit_b16, saes).attribute(
        images, target=target, output="patches", return_gates=True
    )
    assert set(gates) == {3, 9} and gates[3].shape == (2, 196)
    assert all(((g >= 0.1 - 1e-6) & (g <= 10 + 1e-5)).all() for g in gates.values())
    assert not torch.equal(gated, patches)
    assert vit_b16.config._attn_implementation == attention
    snapshot.assert_same(vit_b16)


def test_uni_on_hf_vit_b16_is_complete(vit_b16, images):
    """Per-sample unlearning of 86 M parameters through sdpa attention."""
    x = images[:1]
    target = predicted(vit_b16, x)
    uni = UnlearnedIntegratedGradients(vit_b16, pgd_steps=1)
    attributions, delta = uni.attribute(
        x, target=target, n_steps=2, return_convergence_delta=True
    )
    baseline = uni.compute_baselines(x, target=target)
    gap = target_logits(vit_b16, x, target) - target_logits(vit_b16, baseline, target)
    assert attributions.shape == x.shape
    torch.testing.assert_close(attributions.flatten(1).sum(1), gap, rtol=0.02, atol=0)


def test_transmm_on_timm_vit_base_restores_fused_attention(images):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    model = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
    fused = [block.attn.fused_attn for block in model.blocks]
    snapshot = ModelSnapshot.take(model)
    patches = TransMM(model).attribute(images, output="patches")
    assert patches.shape == (2, 14, 14) and (patches >= 0).all()
    assert [block.attn.fused_attn for block in model.blocks] == fused
    snapshot.assert_same(model)


def test_layer_uni_on_bert_base_embeddings():
    """BERT-base-sized, 32 tokens, the second sequence padded after 20: the mask
    follows each sample, so the padded tokens (never attended) get exactly zero;
    attributions sum to f(h) - f(h') computed here with a hook of our own."""
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(
        transformers.BertConfig(num_labels=2)
    ).eval()
    snapshot = ModelSnapshot.take(model)
    ids = torch.randint(1, model.config.vocab_size, (2, 32))
    mask = torch.ones(2, 32, dtype=torch.long)
    mask[1, 20:] = 0

    def forward(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask).logits

    layer = model.bert.embeddings
    uni = LayerUnlearnedIntegratedGradients(forward, layer, model=model, pgd_steps=1)
    target = forward(ids, mask).argmax(1).detach()
    attributions = uni.attribute(
        ids, target=target, additional_forward_args=(mask,), n_steps=3,
        internal_batch_size=2,
    )  # fmt: skip
    assert attributions.shape == (2, 32, 768)
    assert torch.equal(attributions[1, 20:], torch.zeros(12, 768))
    assert attributions[0, 20:].abs().sum() > 0

    start = uni.compute_baselines(ids, target, (mask,))

    def logit_with_layer_output(values):
        handle = layer.register_forward_hook(lambda m, a, out: values)
        try:
            return target_logits(lambda i: forward(i, mask), ids, target)
        finally:
            handle.remove()

    with torch.no_grad():
        end = layer(ids)
    gap = logit_with_layer_output(end) - logit_with_layer_output(start)
    torch.testing.assert_close(attributions.flatten(1).sum(1), gap, rtol=0.02, atol=0)
    snapshot.assert_same(model)
