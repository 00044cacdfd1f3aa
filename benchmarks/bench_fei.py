"""FEI benchmark on the demo's models (not run by CI).

1. Speed (the demo CNN, ``--images`` test images, K=5, 100 iterations): FEI (every
   clip rule, default smooth maps, ClipGrad on the convolutions) against its floor,
   the forward+backward passes it cannot avoid (100 passes of the N*K batch, the
   target probability's gradient to the input), FEI (vm) against the same quantiles
   optimised one after another, and everything against Captum's
   ``IntegratedGradients(n_steps=50)`` on the same batch. Calls are interleaved
   round-robin (``--repeats`` rounds, default 5, one warm-up each), CPU time of this
   process (``time.process_time``), one thread; the table gives the minimum and the
   ratios of the minima, and the median over the rounds of each round's ratio to the
   floor (timed in the same round, so a drift of the machine's speed between rounds
   cancels; the ratio of the minima can pair a fast round of the floor with a slow
   one of the call). On a shared 2-core machine one call's CPU time (the floor's too)
   varied by up to 6% from round to round, and a rule's ratio of the minima moved by
   up to 0.13 between runs (by 0.28 in a run whose floor had one unusually fast
   round, 8% below its minimum in six other runs); the median of the rounds' ratios
   does not depend on one round. Compare several runs, not one number. On Linux the
   allocator's thresholds are fixed first (glibc ``mallopt``: blocks up to 32 MB from
   the heap, which is never trimmed): with its default, adaptive thresholds a call's
   time depends on whether the calls before it left its activations to be served by
   fresh ``mmap`` pages, and the page faults moved the floor by up to 30% and the
   ratios by 0.1 between runs. ``--default-malloc`` keeps glibc's defaults.
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
   - CPU seconds per image, ratio to the floor, ratio to Captum IG (n_steps=50) on
     the same model and batch.

Run (trains and caches the demo models on first use):

    OMP_NUM_THREADS=1 python benchmarks/bench_fei.py [--images 16] [--repeats 5]
    OMP_NUM_THREADS=1 python benchmarks/bench_fei.py --quick --skip-table
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from captum_faithful._baselines import monochrome_reference  # noqa: E402
from captum_faithful._utils import logits_forward  # noqa: E402
from captum_faithful.attr import FaithfulnessEnsemble  # noqa: E402
from captum_faithful.attr._utils.retention_maps import quantile_levels  # noqa: E402
from captum_faithful.demo.registry import EvidencePrecision  # noqa: E402
from captum_faithful.metrics import (  # noqa: E402
    deletion_auc,
    insertion_activation_deviation,
    insertion_auc,
)
from captum_faithful.studies import blank_image_diagnostic  # noqa: E402

CLIPS = ("none", "vm", "ivm", "avm", "ibm")
N_ITER = 100
K = 5


def fix_allocator() -> bool:
    """Serve blocks up to 32 MB from glibc's heap and never trim it (``mallopt``),
    so that no timed call pays page faults for memory an earlier call freed.
    Returns False where that is not available (not glibc)."""
    import ctypes

    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        and libc.mallopt(m_trim_threshold, 2**30)
    )


def process_seconds(fn: Callable[[], object]) -> float:
    start = time.process_time()
    fn()
    return time.process_time() - start


def interleaved(calls: dict[str, Callable[[], object]], repeats: int) -> dict:
    """Minimum CPU seconds of each call over ``repeats`` round-robin rounds (after
    one warm-up round)."""
    rounds = interleaved_rounds(calls, repeats)
    return {name: min(times[name] for times in rounds) for name in calls}


def interleaved_rounds(
    calls: dict[str, Callable[[], object]], repeats: int
) -> list[dict[str, float]]:
    """CPU seconds of every call in each of ``repeats`` round-robin rounds (after
    one warm-up round)."""
    for fn in calls.values():
        fn()
    return [
        {name: process_seconds(fn) for name, fn in calls.items()}
        for _ in range(repeats)
    ]


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


def speed(demo, images, targets, repeats):
    model = demo.cnn
    reference = monochrome_reference(images, torch.Generator().manual_seed(1))
    n = images.shape[0]

    def fei(clip, quantiles=K):
        explainer = FaithfulnessEnsemble(model, clip=clip, quantiles=quantiles)
        return lambda: explainer.attribute(images, baselines=reference, target=targets)

    def one_after_another():
        for q in quantile_levels(K):
            fei("vm", [q])()

    rounds = interleaved_rounds(
        {
            "floor": floor(model, images, targets),
            **{f"FEI ({clip})": fei(clip) for clip in CLIPS},
            "FEI (vm), one quantile after another": one_after_another,
            "Captum IG (n_steps=50)": integrated_gradients(model, images, targets),
        },
        repeats,
    )
    times = {name: min(r[name] for r in rounds) for name in rounds[0]}
    # the ratio within each round, where the floor ran next to the call: robust to
    # the machine's speed drifting between rounds (which the ratio of the minima,
    # taken from different rounds, is not)
    paired = {
        name: statistics.median(r[name] / r["floor"] for r in rounds)
        for name in rounds[0]
    }
    print(
        f"\n## Speed: demo CNN, {n} images, K={K}, {N_ITER} iterations "
        f"(CPU seconds, {repeats} interleaved rounds, "
        f"{torch.get_num_threads()} thread(s))\n"
    )
    print(
        "| call | seconds (min) | per image | / floor (ratio of minima) "
        "| / floor (median of the rounds' ratios) | / Captum IG |"
    )
    print("|---|---:|---:|---:|---:|---:|")
    for name, seconds in times.items():
        print(
            f"| {name} | {seconds:.2f} | {seconds / n:.3f} | "
            f"{seconds / times['floor']:.2f} | {paired[name]:.2f} | "
            f"{seconds / times['Captum IG (n_steps=50)']:.1f} |"
        )
    print(
        "\nJoint quantiles vs one after another: "
        f"{times['FEI (vm), one quantile after another'] / times['FEI (vm)']:.2f}x"
    )


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
        floor_seconds = process_seconds(floor(model, images, targets))
        ig_seconds = process_seconds(integrated_gradients(model, images, targets))
        deviation_layers = "conv" if model_name == "cnn" else "attention"
        for map_name, map_kwargs, block, layers, clip in variant_rows(
            model_name, patch
        ):
            fei = FaithfulnessEnsemble(
                forward, model=model, layers=layers, clip=clip, **map_kwargs
            )
            feature_mask = (
                block_feature_mask(images.shape[-1], block) if block else None
            )
            start = time.process_time()
            attributions = fei.attribute(
                images,
                target=targets,
                feature_mask=feature_mask,
                generator=torch.Generator().manual_seed(0),
            )
            seconds = time.process_time() - start
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
                f"{seconds / images.shape[0]:.3f} | {seconds / floor_seconds:.2f} | "
                f"{seconds / ig_seconds:.1f} |",
                flush=True,
            )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--blank-images", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="the quick demo models")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    parser.add_argument(
        "--default-malloc",
        action="store_true",
        help="keep glibc's adaptive allocator thresholds (timings vary more)",
    )
    args = parser.parse_args()
    fixed = False if args.default_malloc else fix_allocator()
    print(f"# allocator thresholds fixed: {fixed}")
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
        f"CNN {demo.accuracy['cnn']:.3f}, ViT {demo.accuracy['vit']:.3f}; torch "
        f"threads {torch.get_num_threads()}"
    )
    if not args.skip_speed:
        speed(demo, images, targets, args.repeats)
    if not args.skip_table:
        variant_table(demo, images, masks, args.blank_images)


if __name__ == "__main__":
    main()
