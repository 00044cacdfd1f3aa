"""FEI's ablations on our models: which layers to clip, which rule, which architecture.

The FEI paper reports two architecture findings: clipping only the late layers
collapses insertion while clipping only the early ones keeps it (VGG16, layers 1-16
vs 16-30), and the ``avm`` rule fails on sequential networks (VGG, AlexNet: 93-95 %
spurious attribution on blank images) but not on residual ones (ResNet, GoogLeNet).
This script tests both on the demo CNN (sequential, four convolutions) and on a
residual CNN of the same cost trained with the same recipe
(:func:`captum_faithful.demo.models.load_residual_cnn`, trained and cached on first
use; the demo job never trains it).

Conditions, per model: ``clip="none"`` (no ClipGrad, so no layer choice) and every
other rule of :data:`~captum_faithful.attr._core.clip_grad.CLIP_RULES` with
``layers="conv"`` (all convolutions), ``"early"`` (the first half in definition
order) and ``"late"`` (the second half; with an odd count both halves share the
middle convolution). FEI runs as in the demo job: default smooth maps, K=5, the
demo's iterations (50 with the full models, 30 with ``--quick``), the predicted
class, the random monochrome references of a generator seeded 0.

Metrics, each the demo report's (same functions and settings), mean ± standard
error over the images:

- insertion AUC (blur baseline) and deletion AUC (black baseline), 100 steps;
- evidence precision (share of the top-|block| pixels of the map inside the
  digit's block; chance 0.25), the demo's :class:`EvidencePrecision`;
- activation deviation along the hard insertion curve (mean-colour baseline,
  20 steps) on *all* convolutions of the model, whichever layers were clipped
  (comparable within a model, not across models: the layers differ);
- blank-image insertion: :func:`~captum_faithful.studies.blank_image_diagnostic`'s
  insertion AUC (20 steps) on constant images of random colours, evidence found
  where there is none; the row "random map" scores a random ranking of the same
  blank images against the same references, the level of a map that finds nothing.

After the tables, paired differences over the same images (mean ± s.e.) for the two
claims: insertion of early- and late-only clipping minus all-layer clipping per
rule, and blank-image insertion of each rule minus the random map.

Run from the repository root (trains and caches the models on first use; one
thread):

    OMP_NUM_THREADS=1 python -m benchmarks.fei_ablations [--images 32] [--blank-images 8]
    OMP_NUM_THREADS=1 python -m benchmarks.fei_ablations --quick
"""

from __future__ import annotations

import argparse
import math
import shlex
import sys
import time
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from captum_faithful._baselines import monochrome_reference
from captum_faithful._utils import markdown_table
from captum_faithful.attr import FaithfulnessEnsemble
from captum_faithful.attr._core.clip_grad import CLIP_RULES
from captum_faithful.demo.registry import EvidencePrecision
from captum_faithful.metrics import (
    deletion_auc,
    insertion_activation_deviation,
    insertion_auc,
)
from captum_faithful.studies import blank_image_diagnostic

LAYER_SETS = ("conv", "early", "late")
#: Columns of the table: key, label.
METRICS = (
    ("insertion", "insertion ↑"),
    ("deletion", "deletion ↓"),
    ("precision", "evidence precision ↑"),
    ("deviation", "activation deviation ↓"),
    ("blank", "blank-image insertion ↓"),
)
#: Images per FEI call (the demo job's batch size).
BATCH = 16
#: Seeds: FEI's references on the test images (the demo's seed), the blank images'
#: colours, and their references.
REFERENCE_SEED, BLANK_SEED, BLANK_REFERENCE_SEED = 0, 5, 6
BLANK_STEPS = 20


@dataclass(frozen=True)
class Condition:
    """One row: a clip rule and the layers it clips (None for ``"none"``)."""

    clip: str
    layers: str | None

    @property
    def label(self) -> str:
        return "–" if self.layers is None else self.layers


def conditions(rules: tuple[str, ...], layer_sets: tuple[str, ...]) -> list:
    rows = [Condition("none", None)] if "none" in rules else []
    for clip in rules:
        if clip != "none":
            rows.extend(Condition(clip, layers) for layers in layer_sets)
    return rows


def mean_se(values: Tensor) -> tuple[float, float]:
    """Mean and standard error (sample standard deviation / sqrt(n))."""
    values = values.double()
    n = values.numel()
    se = float(values.std(unbiased=True)) / math.sqrt(n) if n > 1 else math.nan
    return float(values.mean()), se


def fmt(values: Tensor, digits: int = 3) -> str:
    mean, se = mean_se(values)
    return f"{mean:.{digits}f} ± {se:.{digits}f}"


def random_map_blank_insertion(model: nn.Module, blank: Tensor) -> Tensor:
    """Insertion AUC on the blank images of a random ranking, against the same
    references and targets as :func:`blank_image_diagnostic` uses."""
    reference = monochrome_reference(
        blank, torch.Generator().manual_seed(BLANK_REFERENCE_SEED), (0.0, 1.0)
    )
    with torch.no_grad():
        targets = model(blank).argmax(1)
    noise = torch.rand(
        blank.shape[0], 1, *blank.shape[2:], generator=torch.Generator().manual_seed(7)
    ).expand_as(blank)
    return insertion_auc(
        model,
        blank,
        noise,
        target=targets,
        baselines=reference,
        n_steps=BLANK_STEPS,
    )


def run_cell(
    model: nn.Module,
    condition: Condition,
    images: Tensor,
    targets: Tensor,
    precision: EvidencePrecision,
    blank: Tensor,
    n_iter: int,
) -> dict[str, Tensor]:
    """Every metric of one (model, rule, layers), per image."""
    layers = condition.layers or "conv"
    fei = FaithfulnessEnsemble(model, clip=condition.clip, layers=layers, n_iter=n_iter)
    attributions = torch.cat(
        [
            fei.attribute(
                images[i : i + BATCH],
                target=targets[i : i + BATCH],
                generator=torch.Generator().manual_seed(REFERENCE_SEED),
            )
            for i in range(0, images.shape[0], BATCH)
        ]
    )
    result = {
        "insertion": insertion_auc(
            model,
            images,
            attributions,
            target=targets,
            n_steps=100,
            max_examples_per_batch=256,
        ),
        "deletion": deletion_auc(
            model,
            images,
            attributions,
            target=targets,
            n_steps=100,
            max_examples_per_batch=256,
        ),
        "precision": precision(model, images, attributions),
        "deviation": insertion_activation_deviation(
            model,
            "conv",
            images,
            attributions,
            baselines="mean",
            n_steps=20,
            max_examples_per_batch=256,
        )["mse"],
    }
    if blank.shape[0]:
        report = blank_image_diagnostic(
            model,
            blank,
            clips=[condition.clip],
            layers=layers,
            deviation_layers="conv",
            n_iter=n_iter,
            n_steps=BLANK_STEPS,
            generator=torch.Generator().manual_seed(BLANK_REFERENCE_SEED),
        )
        result["blank"] = report[condition.clip]["insertion_auc"]
    return result


def print_table(name: str, results: dict, random_blank: Tensor | None) -> None:
    rows = [
        [condition.clip, condition.label]
        + [
            fmt(values[key], 4 if key == "deviation" else 3) if key in values else "–"
            for key, _ in METRICS
        ]
        for condition, values in results.items()
    ]
    if random_blank is not None:
        rows.append(
            ["random map", "–"] + ["–"] * (len(METRICS) - 1) + [fmt(random_blank)]
        )
    header = ["clip", "layers", *(label for _, label in METRICS)]
    print(f"\n### {name}\n")
    print(markdown_table(header, rows, text_columns=2))


def print_differences(name: str, results: dict, random_blank: Tensor | None) -> None:
    by_key = {(c.clip, c.layers): v for c, v in results.items()}
    rows = []
    for condition, values in results.items():
        if condition.layers not in (None, "conv"):
            continue
        cells = [condition.clip]
        for layers in ("early", "late"):
            other = by_key.get((condition.clip, layers))
            cells.append(
                fmt(other["insertion"] - values["insertion"])
                if other is not None
                else "–"
            )
        if random_blank is not None and "blank" in values:
            cells.append(fmt(values["blank"] - random_blank))
        else:
            cells.append("–")
        rows.append(cells)
    header = [
        "clip",
        "insertion: early − all",
        "insertion: late − all",
        "blank-image insertion: rule − random map",
    ]
    print(f"\n{name}, paired differences (mean ± s.e. over the same images):\n")
    print(markdown_table(header, rows))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="quick models, 4 images")
    parser.add_argument("--images", type=int, default=None, help="test images")
    parser.add_argument("--blank-images", type=int, default=None)
    parser.add_argument("--models", nargs="+", default=["cnn", "residual"])
    parser.add_argument("--rules", nargs="+", default=list(CLIP_RULES))
    parser.add_argument("--layers", nargs="+", default=list(LAYER_SETS))
    args = parser.parse_args()
    for model_name in args.models:
        if model_name not in ("cnn", "residual"):
            parser.error(f"--models: 'cnn' or 'residual', got {model_name!r}")
    for rule in args.rules:
        if rule not in CLIP_RULES:
            parser.error(f"--rules: one of {CLIP_RULES}, got {rule!r}")
    for layers in args.layers:
        if layers not in LAYER_SETS:
            parser.error(f"--layers: one of {LAYER_SETS}, got {layers!r}")
    n_images = args.images if args.images is not None else (4 if args.quick else 32)
    n_blank = (
        args.blank_images if args.blank_images is not None else (2 if args.quick else 8)
    )
    torch.set_num_threads(1)
    start, cpu_start = time.perf_counter(), time.process_time()

    from captum_faithful.demo import load_demo
    from captum_faithful.demo.models import load_residual_cnn

    demo = load_demo(quick=args.quick, seed=0)
    models = {}
    accuracy = {}
    if "cnn" in args.models:
        models["demo CNN (sequential)"] = demo.cnn
        accuracy["demo CNN (sequential)"] = demo.accuracy["cnn"]
    if "residual" in args.models:
        residual, meta = load_residual_cnn(quick=args.quick, seed=0)
        models["residual CNN"] = residual
        accuracy["residual CNN"] = meta["accuracy"]
    for model in models.values():
        for param in model.parameters():
            param.requires_grad_(False)
    images = demo.x_test[:n_images]
    masks = demo.masks_test[:n_images]
    precision = EvidencePrecision(images, masks)
    blank = torch.rand(n_blank, 3, 1, 1, generator=torch.Generator().manual_seed(5))
    blank = blank.expand(-1, -1, *images.shape[2:]).contiguous()
    n_iter = 30 if args.quick else 50
    rows = conditions(tuple(args.rules), tuple(args.layers))
    command = "OMP_NUM_THREADS=1 python -m benchmarks.fei_ablations " + " ".join(
        shlex.quote(a) for a in sys.argv[1:]
    )
    print(f"# FEI ablations: `{command.strip()}`")
    print(
        f"# {'quick' if args.quick else 'full'} demo recipe, seed 0; the first "
        f"{n_images} test images, {n_blank} blank images; FEI K=5, {n_iter} "
        f"iterations; torch threads {torch.get_num_threads()}"
    )
    for name, model in models.items():
        print(
            f"# {name}: {sum(1 for m in model.modules() if isinstance(m, nn.Conv2d))} "
            f"convolutions, test accuracy {accuracy[name]:.3f}"
        )
    tables = {}
    for name, model in models.items():
        with torch.no_grad():
            targets = model(images).argmax(1)
        random_blank = random_map_blank_insertion(model, blank) if n_blank else None
        results = {}
        for condition in rows:
            cell_start = time.perf_counter()
            results[condition] = run_cell(
                model, condition, images, targets, precision, blank, n_iter
            )
            print(
                f"#   {name}, clip={condition.clip}, layers={condition.label}: "
                f"{time.perf_counter() - cell_start:.0f} s",
                file=sys.stderr,
                flush=True,
            )
        tables[name] = (results, random_blank)
    for name, (results, random_blank) in tables.items():
        print_table(name, results, random_blank)
    for name, (results, random_blank) in tables.items():
        print_differences(name, results, random_blank)
    print(
        f"\n# wall time {time.perf_counter() - start:.0f} s, CPU time of this process "
        f"{time.process_time() - cpu_start:.0f} s"
    )


if __name__ == "__main__":
    main()
