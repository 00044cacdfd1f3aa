"""UNI benchmark: speed against Captum IG and its floor, and faithfulness vs IG.

Run from the repository root (not part of CI; needs scikit-learn and timm)::

    python -m benchmarks.bench_uni                 # both tables
    python -m benchmarks.bench_uni --only speed    # or --only faithfulness

Speed (batch 16, 3x32x32, the harness's small CNN and small timm ViT), measured
with ``benchmarks/_harness.py`` (interleaved rounds, median, within-round ratios):

- UNI with defaults / Captum ``IntegratedGradients(n_steps=50)`` (target <= 0.5).
- UNI / its floor (target <= 1.5). Floor = ``pgd_steps`` forward+backward passes
  of the batch + ``n_steps`` x batch examples forward+backward at the fastest
  chunk size + the per-sample unlearning written directly with torch.func
  (``vmap(grad)`` and one vmapped forward with per-sample parameters).
- Vectorised / per-sample-loop unlearning at batch 16 (target >= 4), next to
  ``bound``: 16 batch-1 calls / one batch-16 call of forward, parameter gradient
  and forward with shared weights, the most any vectorisation can gain here.
- Peak memory the unlearning step adds (the harness's ``VmHWM`` reading; Linux
  only) against ``unlearning_batch_size``.

Faithfulness: a small CNN (4x4 pooled head) trained for about a minute on
scikit-learn digits at 3x32x32, each drawn on a random-colour noisy background,
darker than a light background and lighter than a dark one. UNI and
IG with black, blur and uniform-noise baselines on held-out images; insertion AUC
(blur baseline), deletion AUC (zero baseline) from ``captum_faithful.metrics``
and path monotonicity along each method's own path.
"""

from __future__ import annotations

import argparse
import time
import warnings

import torch
import torch.nn.functional as F
from captum.attr import IntegratedGradients
from torch import Tensor, nn
from torch.func import functional_call, grad, vmap

from benchmarks import _harness as harness
from captum_faithful import UnlearnedIntegratedGradients
from captum_faithful.attr._utils.unlearning import (
    ParametrizedForward,
    buffer_copies,
    unlearned_log_probs,
    unlearned_parameters,
)
from captum_faithful.metrics import path_monotonicity

BATCH = 16
UNI_DEFAULTS = {"n_steps": 15, "pgd_steps": 10}


MODELS = {"cnn": harness.small_cnn, "vit": harness.small_vit}


def input_fwd_bwd(model: nn.Module, x: Tensor, target: Tensor) -> None:
    x = x.detach().requires_grad_(True)
    out = model(x)[torch.arange(x.shape[0]), target.repeat(x.shape[0] // BATCH)]
    torch.autograd.grad(out.sum(), x)


def raw_unlearning(model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
    """The unavoidable per-sample work, written directly with torch.func."""
    params = {k: v.detach() for k, v in model.named_parameters()}

    def one(xi: Tensor, ci: Tensor) -> Tensor:
        def loss(p):
            return F.cross_entropy(functional_call(model, p, (xi[None],)), ci[None])

        g = grad(loss)(params)
        norm = torch.sqrt(sum(v.pow(2).sum() for v in g.values()))
        theta = {k: params[k] + g[k] / norm for k in params}
        return functional_call(model, theta, (xi[None],)).log_softmax(1)[0]

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return vmap(one)(x, target)


def shared_weight_passes(model: nn.Module, x: Tensor, target: Tensor) -> None:
    """What unlearning costs with one shared θ: forward, parameter gradient, forward.

    Batching a model that shares its weights across the batch is the best case of
    vectorisation, so 16 calls at batch 1 over one call at batch 16 bounds the
    speed-up any vectorised per-sample unlearning can reach on this machine.
    """
    params = [p for p in model.parameters() if p.requires_grad]
    loss = F.cross_entropy(model(x), target)
    torch.autograd.grad(loss, params)
    with torch.no_grad():
        model(x)


def speed(name: str, rounds: int) -> dict:
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.randn(BATCH, 3, 32, 32)
    target = model(x).argmax(1)
    uni = UnlearnedIntegratedGradients(model)
    ig = IntegratedGradients(model)
    wrapper = ParametrizedForward(model, model)
    params, buffers = unlearned_parameters(model), buffer_copies(model)

    def unlearn(mode: str) -> Tensor:
        return unlearned_log_probs(
            wrapper, params, buffers, (x,), target, None, 1.0, BATCH, mode
        )

    path = torch.cat([x] * UNI_DEFAULTS["n_steps"])
    chunks = (16, 48, 80, 240)
    fns = {
        "uni": lambda: uni.attribute(x),
        "ig50": lambda: ig.attribute(x, target=target, n_steps=50),
        "pass": lambda: input_fwd_bwd(model, x, target),
        "raw_unlearn": lambda: raw_unlearning(model, x, target),
        "vmap": lambda: unlearn("vmap"),
        "loop": lambda: unlearn("loop"),
        "shared_batched": lambda: shared_weight_passes(model, x, target),
        "shared_loop": lambda: [
            shared_weight_passes(model, x[i : i + 1], target[i : i + 1])
            for i in range(BATCH)
        ],
    }
    for chunk in chunks:
        fns[f"path{chunk}"] = lambda c=chunk: [
            input_fwd_bwd(model, path[i : i + c], target)
            for i in range(0, len(path), c)
        ]
    t = harness.interleave(fns, rounds)
    best_chunk = min(chunks, key=lambda c: t.median(f"path{c}"))
    t.derive(
        "floor",
        {"pass": UNI_DEFAULTS["pgd_steps"], f"path{best_chunk}": 1, "raw_unlearn": 1},
    )
    return {
        "model": name,
        "params": sum(p.numel() for p in model.parameters()),
        "uni s": harness.seconds_cell(t, "uni"),
        "uni / ig50": harness.ratio_cell(t, "uni", "ig50"),
        "floor s": harness.seconds_cell(t, "floor"),
        "uni / floor": harness.ratio_cell(t, "uni", "floor"),
        "floor chunk": best_chunk,
        "unlearn vmap s": harness.seconds_cell(t, "vmap"),
        "loop / vmap": harness.ratio_cell(t, "loop", "vmap"),
        "vmap / raw": harness.ratio_cell(t, "vmap", "raw_unlearn"),
        "bound": harness.ratio_cell(t, "shared_loop", "shared_batched"),
    }


def memory(name: str, chunks: list[int]) -> list[dict]:
    torch.manual_seed(0)
    model = MODELS[name]()
    x = torch.randn(BATCH, 3, 32, 32)
    with torch.no_grad():
        target = model(x).argmax(1)
    wrapper = ParametrizedForward(model, model)
    params, buffers = unlearned_parameters(model), buffer_copies(model)
    n_params = sum(p.numel() for p in params.values())
    rows = []
    for chunk in chunks:

        def run(c: int = chunk) -> Tensor:
            return unlearned_log_probs(
                wrapper, params, buffers, (x,), target, None, 1.0, c
            )

        rows.append(
            {
                "model": name,
                "unlearning_batch_size": chunk,
                "peak MB": harness.peak_memory_mb(run),
                "chunk*|theta|*4B (MB)": chunk * n_params * 4 / 2**20,
            }
        )
    return rows


# ---------------------------------------------------------------- faithfulness


def digits_dataset(seed: int = 0) -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    generator = torch.Generator().manual_seed(seed)
    strokes = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0
    strokes = F.interpolate(strokes, size=(32, 32), mode="bilinear")
    n = strokes.shape[0]
    background = torch.rand(n, 3, 1, 1, generator=generator)
    # the digit is darker than a light background and lighter than a dark one
    sign = torch.where(background.mean(1, keepdim=True) > 0.5, -1.0, 1.0)
    contrast = 0.4 + 0.4 * torch.rand(n, 3, 1, 1, generator=generator)
    foreground = (background + sign * contrast).clamp(0, 1)
    images = background + (foreground - background) * strokes
    images = images + 0.05 * torch.randn(images.shape, generator=generator)
    return images.clamp(0, 1), torch.tensor(digits.target)


def train(model: nn.Module, x: Tensor, y: Tensor, seconds: float) -> float:
    optimiser = torch.optim.Adam(model.parameters(), lr=2e-3)
    model.train()
    start, epoch = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(epoch))
        for i in range(0, len(x), 64):
            idx = order[i : i + 64]
            loss = F.cross_entropy(model(x[idx]), y[idx])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        epoch += 1
    model.eval()
    return epoch


def blur(x: Tensor) -> Tensor:
    coords = torch.arange(11, dtype=x.dtype) - 5
    kernel = torch.exp(-(coords**2) / (2 * 5.0**2))
    kernel = (kernel / kernel.sum()).to(x.device)
    c = x.shape[1]
    padded = F.pad(x, (5, 5, 5, 5), mode="reflect")
    out = F.conv2d(padded, kernel.view(1, 1, 1, 11).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(out, kernel.view(1, 1, 11, 1).repeat(c, 1, 1, 1), groups=c)


def faithfulness(n_images: int, train_seconds: float) -> list[dict]:
    from captum_faithful import metrics

    torch.manual_seed(0)
    images, labels = digits_dataset()
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(1))
    train_idx, test_idx = order[:1400], order[1400:]
    model = harness.small_cnn(pool=4)
    epochs = train(model, images[train_idx], labels[train_idx], train_seconds)
    x_test, y_test = images[test_idx], labels[test_idx]
    with torch.no_grad():
        accuracy = (model(x_test).argmax(1) == y_test).float().mean().item()
    print(f"trained {epochs} epochs, held-out accuracy {accuracy:.3f}")

    x, y = x_test[:n_images], y_test[:n_images]
    uni = UnlearnedIntegratedGradients(model)
    ig = IntegratedGradients(model)
    noise = torch.rand(x.shape, generator=torch.Generator().manual_seed(2))
    methods = {
        "UNI": (lambda: uni.attribute(x, target=y), uni.compute_baselines(x, y)),
        "IG black": (lambda: ig.attribute(x, 0.0, target=y), torch.zeros_like(x)),
        "IG blur": (lambda: ig.attribute(x, blur(x), target=y), blur(x)),
        "IG noise": (lambda: ig.attribute(x, noise, target=y), noise),
    }
    has_auc = hasattr(metrics, "insertion_auc") and hasattr(metrics, "deletion_auc")
    rows = []
    for name, (explain, baseline) in methods.items():
        start = harness.CLOCK()
        attributions = explain()
        seconds = (harness.CLOCK() - start) / len(x)
        monotonicity = path_monotonicity(model, x, baseline, target=y)
        row = {
            "method": name,
            "path_monotonicity": _mean_std(monotonicity),
            "s/image": seconds,
        }
        if has_auc:
            row["insertion_auc"] = _mean_std(
                metrics.insertion_auc(model, x, attributions, target=y)
            )
            row["deletion_auc"] = _mean_std(
                metrics.deletion_auc(model, x, attributions, target=y)
            )
        rows.append(row)
    if not has_auc:
        print("insertion/deletion AUC: captum_faithful.metrics has no insertion_auc")
    return rows


def _mean_std(values: Tensor) -> str:
    values = values[~torch.isnan(values)].double()
    return f"{values.mean().item():.3f} ± {values.std().item():.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", choices=["speed", "faithfulness"])
    harness.add_arguments(parser, rounds=7)
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--train-seconds", type=float, default=60.0)
    args = parser.parse_args()
    print(harness.configure())
    if args.only in (None, "speed"):
        print(f"\n## Speed (batch 16, 3x32x32, {args.rounds} interleaved rounds)\n")
        print(harness.markdown_table([speed(name, args.rounds) for name in MODELS]))
        print(f"\n({harness.load_note()})")
        print("\n## Unlearning step: peak MB added vs unlearning_batch_size\n")
        rows = []
        for name in MODELS:
            rows += memory(name, [1, 2, 4, 8, 16])
        print(harness.markdown_table(rows))
    if args.only in (None, "faithfulness"):
        print("\n## Faithfulness (trained CNN, held-out digits, mean ± std)\n")
        print(harness.markdown_table(faithfulness(args.images, args.train_seconds)))


if __name__ == "__main__":
    main()
