"""FEI benchmark on the demo's models (not run by CI).

1. Speed (the demo CNN, ``--images`` test images, K=5, 100 iterations): FEI (every
   clip rule, default smooth maps, ClipGrad on the convolutions) against its floor,
   the forward+backward passes it cannot avoid (100 passes of the N*K batch, the
   target probability's gradient to the input), FEI (vm) against the same quantiles
   optimised one after another, and everything against Captum's
   ``IntegratedGradients(n_steps=50)`` on the same batch. Measured with
   ``benchmarks/_harness.py`` (interleaved rounds, wall clock, one thread, median and
   within-round ratios, allocator thresholds fixed). On a shared 2-core machine one
   call's time varied by up to 6% from round to round: compare several runs, not one
   number.
2. Variant table: per-pixel vs grouped (a Captum feature mask of 4x4 blocks) vs
   smooth (stride 4) maps; clip none / vm / ivm / avm / ibm; the demo CNN with
   ClipGrad on its convolutions, and the demo ViT with ClipGrad on the attention
   probabilities or on the block outputs. Columns, each the mean over the images:

   - insertion AUC (blur baseline) and deletion AUC (black baseline), 100 steps, the
     demo report's settings;
   - evidence precision: share of the top-|block| pixels of the map (summed over
     channels, ties broken at random with a fixed seed) inside the digit's block
     (chance 0.25);
   - activation deviation along the hard insertion curve (mean-colour baseline, 20
     steps; CNN: every convolution; ViT: every block's attention probabilities),
     the demo's metric;
   - blank-image insertion: :func:`blank_image_diagnostic`'s insertion AUC on
     constant images of random colours (evidence found where there is none);
   - seconds per image, ratio to the floor, ratio to Captum IG (n_steps=50) on
     the same model and batch (one call each, interleaved per model: the speed
     part is the careful measurement).

Run (trains and caches the demo models on first use):

    python -m benchmarks.bench_fei [--images 16] [--rounds 5]
    python -m benchmarks.bench_fei --quick --skip-table
"""

from __future__ import annotations

import argparse

import torch

from benchmarks import _harness as harness
from captum_faithful._baselines import monochrome_reference
from captum_faithful._utils import logits_forward
from captum_faithful.attr import FaithfulnessEnsemble
from captum_faithful.attr._utils.retention_maps import quantile_levels
from captum_faithful.demo.registry import EvidencePrecision
from captum_faithful.metrics import (
    deletion_auc,
    insertion_activation_deviation,
    insertion_auc,
)
from captum_faithful.studies import blank_image_diagnostic

CLIPS = ("none", "vm", "ivm", "avm", "ibm")
N_ITER = 100
K = 5


def floor(model, images, targets, n_levels=K, n_iter=N_ITER):
    """n_iter forward+backward passes of the N*K batch: the target probability's
    gradient with respect to the input (what FEI cannot avoid)."""
    forward = logits_forward(model)
    batch = images.repeat(n_levels, 1, 1, 1)
    classes = targets.repeat(n_levels).view(-1, 1)

    def run():
        for _ in range(n_iter):
            x = batch.clone().requires_grad_()
            prob = forward(x).softmax(1).gather(1, classes).sum()
            torch.autograd.grad(prob, x)

    return run


def integrated_gradients(model, images, targets):
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(logits_forward(model))
    return lambda: ig.attribute(images, target=targets, n_steps=50)


def speed(demo, images, targets, rounds):
    model = demo.cnn
    reference = monochrome_reference(images, torch.Generator().manual_seed(1))
    n = images.shape[0]

    def fei(clip, quantiles=K):
        explainer = FaithfulnessEnsemble(model, clip=clip, quantiles=quantiles)
        return lambda: explainer.attribute(images, baselines=reference, target=targets)

    def one_after_another():
        for q in quantile_levels(K):
            fei("vm", [q])()

    ig = "Captum IG (n_steps=50)"
    timings = harness.interleave(
        {
            "floor": floor(model, images, targets),
            **{f"FEI ({clip})": fei(clip) for clip in CLIPS},
            "FEI (vm), one quantile after another": one_after_another,
            ig: integrated_gradients(model, images, targets),
        },
        rounds,
    )
    print(
        f"\n## Speed: demo CNN, {n} images, K={K}, {N_ITER} iterations "
        f"({rounds} interleaved rounds; {harness.load_note()})\n"
    )
    print("| call | seconds | per image | / floor | / Captum IG |")
    print("|---|---:|---:|---:|---:|")
    for name in timings.names():
        print(
            f"| {name} | {harness.seconds_cell(timings, name)} | "
            f"{timings.median(name) / n:.3f} | "
            f"{harness.ratio_cell(timings, name, 'floor')} | "
            f"{harness.ratio_cell(timings, name, ig)} |"
        )
    joint = timings.ratio("FEI (vm), one quantile after another", "FEI (vm)")
    print(f"\nJoint quantiles vs one after another: {joint:.2f}x")


def block_feature_mask(size: int, block: int) -> torch.Tensor:
    cells = size // block
    rows = torch.arange(size) // block
    return (rows.view(-1, 1) * cells + rows.view(1, -1)).view(1, 1, size, size)


def variant_rows(model_name: str, patch: int):
    maps = [
        ("per-pixel", dict(maps="pixel"), None),
        ("grouped 4x4", dict(maps="pixel"), 4),
        (f"smooth (stride {4})", dict(maps="smooth", map_stride=4), None),
    ]
    layer_sets = ["conv"] if model_name == "cnn" else ["attention", "blocks"]
    for map_name, map_kwargs, block in maps:
        for layers in layer_sets:
            for clip in CLIPS:
                if clip == "none" and layers != layer_sets[0]:
                    continue
                yield map_name, map_kwargs, block, layers, clip


def variant_call(
    store,
    index,
    forward,
    model,
    images,
    targets,
    _name,
    map_kwargs,
    block,
    layers,
    clip,
):
    """FEI with one variant's settings, storing its attributions in ``store``."""
    fei = FaithfulnessEnsemble(
        forward, model=model, layers=layers, clip=clip, **map_kwargs
    )
    feature_mask = block_feature_mask(images.shape[-1], block) if block else None

    def run():
        store[index] = fei.attribute(
            images,
            target=targets,
            feature_mask=feature_mask,
            generator=torch.Generator().manual_seed(0),
        )

    return run


def variant_table(demo, images, masks, n_blank):
    precision = EvidencePrecision(images, masks)
    generator = torch.Generator().manual_seed(5)
    blank = torch.rand(n_blank, 3, 1, 1, generator=generator)
    blank = blank.expand(-1, -1, *images.shape[2:]).contiguous()
    print(
        f"\n## FEI variants ({images.shape[0]} test images, {n_blank} blank images, "
        f"K={K}, {N_ITER} iterations, random monochrome references)\n"
    )
    print(
        "| model | maps | ClipGrad layers | clip | insertion ↑ | deletion ↓ | "
        "evidence precision ↑ | activation deviation ↓ | blank-image insertion ↓ | "
        "s / image | / floor | / Captum IG |"
    )
    print("|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for model_name in ("cnn", "vit"):
        model = demo.cnn if model_name == "cnn" else demo.vit
        forward = logits_forward(model)
        patch = int(getattr(getattr(model, "config", None), "patch_size", 1))
        with torch.no_grad():
            targets = forward(images).argmax(1)
        deviation_layers = "conv" if model_name == "cnn" else "attention"
        variants = list(variant_rows(model_name, patch))
        attributions_of: dict[int, torch.Tensor] = {}

        # one call each, interleaved (the speed part is the careful measurement)
        timings = harness.interleave(
            {
                "floor": floor(model, images, targets),
                "ig": integrated_gradients(model, images, targets),
                **{
                    i: variant_call(
                        attributions_of, i, forward, model, images, targets, *variant
                    )
                    for i, variant in enumerate(variants)
                },
            },
            rounds=1,
            warmup=False,
        )
        for index, (map_name, map_kwargs, block, layers, clip) in enumerate(variants):
            attributions = attributions_of[index]
            seconds = timings.median(index)
            insertion = insertion_auc(
                forward,
                images,
                attributions,
                target=targets,
                n_steps=100,
                max_examples_per_batch=256,
            )
            deletion = deletion_auc(
                forward,
                images,
                attributions,
                target=targets,
                n_steps=100,
                max_examples_per_batch=256,
            )
            deviation = insertion_activation_deviation(
                model,
                deviation_layers,
                images,
                attributions,
                baselines="mean",
                n_steps=20,
                max_examples_per_batch=256,
            )["mse"]
            report = (
                blank_image_diagnostic(
                    forward,
                    blank,
                    clips=[clip],
                    model=model,
                    layers=layers,
                    deviation_layers=deviation_layers,
                    n_steps=20,
                    generator=torch.Generator().manual_seed(6),
                    **map_kwargs,
                )
                if block is None
                else None
            )
            blank_insertion = (
                f"{float(report[clip]['insertion_auc'].mean()):.3f}"
                if report is not None
                else "–"
            )
            print(
                f"| {model_name.upper() if model_name == 'cnn' else 'ViT'} | "
                f"{map_name} | {layers if clip != 'none' else '–'} | {clip} | "
                f"{float(insertion.mean()):.3f} | {float(deletion.mean()):.3f} | "
                f"{float(precision(forward, images, attributions).mean()):.3f} | "
                f"{float(deviation.mean()):.4f} | {blank_insertion} | "
                f"{seconds / images.shape[0]:.3f} | "
                f"{timings.ratio(index, 'floor'):.2f} | "
                f"{timings.ratio(index, 'ig'):.1f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--blank-images", type=int, default=8)
    harness.add_arguments(parser, rounds=5)
    parser.add_argument("--quick", action="store_true", help="the quick demo models")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    args = parser.parse_args()
    print(f"# {harness.configure()}")
    from captum_faithful.demo import load_demo

    demo = load_demo(quick=args.quick)
    for model in (demo.cnn, demo.vit):
        for param in model.parameters():
            param.requires_grad_(False)
    images = demo.x_test[: args.images]
    masks = demo.masks_test[: args.images]
    with torch.no_grad():
        targets = demo.cnn(images).argmax(1)
    print(
        f"# demo models ({'quick' if args.quick else 'full'} recipe): test accuracy "
        f"CNN {demo.accuracy['cnn']:.3f}, ViT {demo.accuracy['vit']:.3f}"
    )
    if not args.skip_speed:
        speed(demo, images, targets, args.rounds)
    if not args.skip_table:
        variant_table(demo, images, masks, args.blank_images)


if __name__ == "__main__":
    main()
