"""FEI benchmark (not run by CI).

1. Speed: all quantile maps in one batched optimisation vs one quantile after
   another (per batch, and per image as a reference loop), and time per image vs
   Captum IntegratedGradients (n_steps=50) on the same batch. Two floors: the bare
   forward+backward passes of the joint batch, and of K batches of N images; their
   ratio is the most batching the quantiles can gain on the machine.
2. Faithfulness, on small CNNs trained for a few seconds on scikit-learn digits
   (3x16x16; a plain 4-conv sequential CNN and a residual one): the FEI variant table of the paper — insertion AUC, deletion AUC,
   activation deviation along the hard insertion curve (MSE, cosine; all conv
   layers) and the blank-image diagnostic (insertion AUC and mean probability of the
   hard insertion curve on constant images) — for clip none / vm / ivm / avm / ibm,
   with ClipGrad on all conv layers, the early half and the late half.

Run: OMP_NUM_THREADS=1 python benchmarks/bench_fei.py [--images 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from helpers import digit_images, four_conv_cnn  # noqa: E402

from captum_faithful.attr import FaithfulnessEnsemble  # noqa: E402
from captum_faithful.attr._core.faithfulness_ensemble import (  # noqa: E402
    monochrome_reference,
    quantile_levels,
)
from captum_faithful.metrics import (  # noqa: E402
    deletion_auc,
    insertion_activation_deviation,
    insertion_auc,
)


class ResidualBlock(nn.Module):
    """A torchvision-style basic block without BatchNorm (one ReLU module reused)."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1)
        self.relu = nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(x + self.conv2(self.relu(self.conv1(x))))


def residual_cnn(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        ResidualBlock(16),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        ResidualBlock(32),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * 16, 10),
    )


MODELS = {"sequential": four_conv_cnn, "residual": residual_cnn}


def train(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> nn.Module:
    generator = torch.Generator().manual_seed(0)
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(6):
        order = torch.randperm(len(x), generator=generator)
        for start in range(0, len(x), 64):
            rows = order[start : start + 64]
            loss = F.cross_entropy(model(x[rows]), y[rows])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
    return model.eval()


def timed(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def speed(model, images, predicted, reference, repeats):
    from captum.attr import IntegratedGradients

    n = images.shape[0]
    levels = quantile_levels(5)

    def joint():
        FaithfulnessEnsemble(model).attribute(
            images, baselines=reference, target=predicted
        )

    def per_quantile():
        for q in levels:
            FaithfulnessEnsemble(model, quantiles=[q]).attribute(
                images, baselines=reference, target=predicted
            )

    def per_image_per_quantile():
        for i in range(n):
            for q in levels:
                FaithfulnessEnsemble(model, quantiles=[q]).attribute(
                    images[i : i + 1],
                    baselines=reference[i : i + 1],
                    target=predicted[i : i + 1],
                )

    def ig():
        IntegratedGradients(model).attribute(
            images, baselines=reference.expand_as(images), target=predicted, n_steps=50
        )

    def passes(batch, classes):
        for _ in range(100):
            perturbed = batch.clone().requires_grad_()
            prob = model(perturbed).softmax(1).gather(1, classes.view(-1, 1)).sum()
            torch.autograd.grad(prob, perturbed)

    def floor():
        # the passes FEI cannot avoid: 100 forward+backward of the N*K batch
        passes(images.repeat(len(levels), 1, 1, 1), predicted.repeat(len(levels)))

    def floor_per_quantile():
        # the same passes, K times on the batch of N images
        for _ in levels:
            passes(images, predicted)

    t_floor = timed(floor, repeats)
    t_floor_quantile = timed(floor_per_quantile, repeats)
    t_joint = timed(joint, repeats)
    t_quantile = timed(per_quantile, repeats)
    t_loop = timed(per_image_per_quantile, 1)
    t_ig = timed(ig, repeats)
    print(f"\n## Speed ({n} images 3x16x16, K=5, 100 iterations, min of {repeats})\n")
    print("| variant | seconds | per image | joint speed-up |")
    print("|---|---|---|---|")
    for name, t in (
        ("joint: all quantiles, all images, one batch", t_joint),
        ("one quantile after another (batch of images)", t_quantile),
        ("one image and one quantile after another", t_loop),
        ("Captum IntegratedGradients n_steps=50", t_ig),
        ("floor: 100 forward+backward of the N*K batch", t_floor),
        ("floor, K times 100 forward+backward of the N batch", t_floor_quantile),
    ):
        print(f"| {name} | {t:.2f} | {1000 * t / n:.1f} ms | {t / t_joint:.2f}x |")
    print(
        f"\nFEI (vm) / IG time ratio: {t_joint / t_ig:.1f}; "
        f"FEI (vm) / floor: {t_joint / t_floor:.2f}; the most batching the quantiles "
        f"can gain here (floor per quantile / joint floor): "
        f"{t_floor_quantile / t_floor:.2f}x"
    )


def variant_table(model, images, predicted, n_steps):
    n = images.shape[0]
    reference = monochrome_reference(images, torch.Generator().manual_seed(1))
    blank = torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(5))
    blank = blank.expand_as(images).contiguous()
    blank_reference = torch.rand(n, 3, 1, 1, generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        blank_target = model(blank).argmax(1)
    levels = torch.tensor(quantile_levels(5))

    def scores(attributions, blank_attributions):
        row = {
            "ins": insertion_auc(
                model,
                images,
                attributions,
                target=predicted,
                baselines=reference,
                n_steps=n_steps,
            ),
            "del": deletion_auc(
                model,
                images,
                attributions,
                target=predicted,
                baselines=reference,
                n_steps=n_steps,
            ),
        }
        dev = insertion_activation_deviation(
            model, "conv", images, attributions, baselines=reference, n_steps=n_steps
        )
        row["mse"], row["cos"] = dev["mse"], dev["cosine"]
        if blank_attributions is not None:
            auc, curves = insertion_auc(
                model,
                blank,
                blank_attributions,
                target=blank_target,
                baselines=blank_reference,
                n_steps=n_steps,
                return_curves=True,
            )
            row["blank_ins"], row["blank_p"] = auc, curves.mean(1)
            bdev = insertion_activation_deviation(
                model,
                "conv",
                blank,
                blank_attributions,
                baselines=blank_reference,
                n_steps=n_steps,
            )
            row["blank_mse"] = bdev["mse"]
        return {k: float(v.mean()) for k, v in row.items()}

    rows = []
    from captum.attr import IntegratedGradients

    ig = IntegratedGradients(model)
    rows.append(
        (
            "IG (n_steps=50), zero baseline",
            "-",
            scores(
                ig.attribute(images, target=predicted),
                ig.attribute(blank, target=blank_target),
            ),
            None,
        )
    )
    rows.append(
        (
            "IG (n_steps=50), baseline = the metric's reference",
            "-",
            scores(
                ig.attribute(
                    images, baselines=reference.expand_as(images), target=predicted
                ),
                ig.attribute(
                    blank,
                    baselines=blank_reference.expand_as(blank),
                    target=blank_target,
                ),
            ),
            None,
        )
    )
    random = torch.rand(images.shape, generator=torch.Generator().manual_seed(3))
    rows.append(("random", "-", scores(random, torch.rand(images.shape)), None))
    configs = [("none", "conv", "insertion")] + [
        (clip, layers, "insertion")
        for clip in ("vm", "ivm", "avm", "ibm")
        for layers in ("conv", "early", "late")
    ]
    configs += [("none", "conv", "both"), ("vm", "conv", "both")]
    for clip, layers, objective in configs:
        start = time.perf_counter()
        fei = FaithfulnessEnsemble(model, clip=clip, layers=layers, objective=objective)
        attributions, maps = fei.attribute(
            images, baselines=reference, target=predicted, return_quantile_maps=True
        )
        blank_attributions = fei.attribute(
            blank, baselines=blank_reference, target=blank_target
        )
        games = maps.shape[1] // len(levels)
        coverage = float((maps.mean((2, 3)) - levels.repeat(games)).abs().max())
        row = scores(attributions, blank_attributions)
        row["coverage_err"] = coverage
        rows.append(
            (
                f"FEI {clip}" + (" (objective both)" if objective == "both" else ""),
                layers if clip != "none" else "-",
                row,
                time.perf_counter() - start,
            )
        )
    base = rows[3][2]
    print(
        f"\n## FEI variants ({n} images, K=5, 100 iterations, "
        f"hard curves with {n_steps} steps, same random monochrome reference)\n"
    )
    print(
        "| method | clip layers | insertion AUC ↑ | deletion AUC ↓ | act. MSE ↓ | "
        "MSE / none | act. cosine ↑ | blank ins. AUC ↓ | blank mean p ↓ | "
        "blank MSE / none | max coverage err |"
    )
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for name, layers, r, _ in rows:
        blank_ratio = (
            f"{r['blank_mse'] / base['blank_mse']:.2f}" if "blank_mse" in r else ""
        )
        print(
            f"| {name} | {layers} | {r['ins']:.3f} | {r['del']:.3f} | {r['mse']:.3f} | "
            f"{r['mse'] / base['mse']:.2f} | {r['cos']:.3f} | "
            f"{r.get('blank_ins', float('nan')):.3f} | "
            f"{r.get('blank_p', float('nan')):.3f} | {blank_ratio} | "
            f"{r.get('coverage_err', float('nan')):.3f} |"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--n-steps", type=int, default=50)
    parser.add_argument(
        "--models",
        nargs="+",
        default=["sequential", "residual"],
        choices=sorted(MODELS),
    )
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--skip-table", action="store_true")
    args = parser.parse_args()
    x, y = digit_images()
    for index, name in enumerate(args.models):
        start = time.perf_counter()
        model = train(MODELS[name](), x[:1500], y[:1500])
        for param in model.parameters():
            param.requires_grad_(False)
        with torch.no_grad():
            accuracy = float((model(x[1500:]).argmax(1) == y[1500:]).float().mean())
        print(
            f"\n# {name} CNN: trained in {time.perf_counter() - start:.1f}s, held-out "
            f"accuracy {accuracy:.3f}; torch threads {torch.get_num_threads()}"
        )
        images = x[1500 : 1500 + args.images].clone()
        with torch.no_grad():
            predicted = model(images).argmax(1)
        reference = monochrome_reference(images, torch.Generator().manual_seed(1))
        if not args.skip_speed and index == 0:
            speed(model, images, predicted, reference, args.repeats)
        if not args.skip_table:
            variant_table(model, images, predicted, args.n_steps)
    print("\n(machine shared with other jobs; timings are the min over repeats)")


if __name__ == "__main__":
    main()
