"""UNI's ``epsilon``: the paper's 0.25 against the budget scaled to the input size.

Run from the repository root (needs the ``demo`` extra; one thread)::

    python benchmarks/bench_uni_epsilon.py            # the full demo models
    python benchmarks/bench_uni_epsilon.py --quick    # the quick ones, 8 images

The UNI paper's ``epsilon = 0.25`` is an L2 radius over a whole 3x224x224 image in
[0, 1] (d = 150,528 elements). The demo's images are 3x32x32 (d = 3,072), where the
same per-element size is ``0.25 * sqrt(3072 / 150528) = 0.25 / 7``. This script
scores UNI on the demo CNN with both radii, on the demo's test images (100 with the
full recipe), with every metric of the demo report, through the demo's own
explainer, metrics and :func:`captum_faithful.evaluate` (so the numbers are those
of the report's UNI row), and prints mean ± standard error per metric and Welch's
two-sided p of the scaled radius against 0.25
(:meth:`captum_faithful.evaluation.Results.compare`), and, since both radii explain
the same images, the paired t-test's p as well (more sensitive). Besides the report's metrics
it prints the explained logit change (the attribution sum per sample), the class
probability at the learned baselines and the completeness gap, to show what the
radius changes.
"""

from __future__ import annotations

import argparse
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from captum_faithful import UnlearnedIntegratedGradients
from captum_faithful.demo import load_demo
from captum_faithful.demo.registry import (
    METHODS,
    METRIC_INFO,
    Explainer,
    Settings,
    metrics_for,
)
from captum_faithful.evaluation import Results, evaluate

#: Elements of one 3x224x224 image, the input of the paper's epsilon = 0.25.
PAPER_ELEMENTS = 3 * 224 * 224


def uni_explainer(model: torch.nn.Module, epsilon: float) -> Explainer:
    """The demo's UNI explainer (:mod:`captum_faithful.demo.registry`) with
    ``epsilon``: baselines learned once per batch and handed to ``attribute``, so
    path monotonicity is measured along the same path."""
    uni = UnlearnedIntegratedGradients(model, epsilon=epsilon)
    return Explainer(
        lambda x, t, b: uni.attribute(x, baselines=b, target=t),
        baselines=lambda x, t: uni.compute_baselines(x, target=t),
    )


def path_diagnostics(
    model: torch.nn.Module, images: torch.Tensor, epsilon: float
) -> dict[str, list[float]]:
    """Per image: the attribution sum (the logit change explained), the
    probability of the predicted class at the learned baseline and at the input,
    and the completeness gap relative to the attribution sum."""
    with torch.no_grad():
        targets = model(images).argmax(1)
    uni = UnlearnedIntegratedGradients(model, epsilon=epsilon)
    baselines = uni.compute_baselines(images, target=targets)
    attributions, delta = uni.attribute(
        images, baselines=baselines, target=targets, return_convergence_delta=True
    )
    with torch.no_grad():
        p_input = model(images).softmax(1).gather(1, targets[:, None]).squeeze(1)
        p_base = model(baselines).softmax(1).gather(1, targets[:, None]).squeeze(1)
    total = attributions.flatten(1).sum(1)
    return {
        "attribution sum": total.tolist(),
        "p(class | x')": p_base.tolist(),
        "p(class | x)": p_input.tolist(),
        "|delta| / |sum|": (delta.abs() / total.abs().clamp_min(1e-30)).tolist(),
    }


def mean_sem(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if not math.isnan(v)]
    mean = math.fsum(values) / len(values)
    var = math.fsum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(var / len(values))


def paired_pvalue(table: Any, metric: str) -> float:
    """Two-sided p of the paired t-test of "scaled" against "0.25" on ``metric``,
    over the images where both values are finite (NaN when undefined)."""
    from scipy import stats

    rows = table[table["metric"] == metric]
    values = rows.pivot(index="index", columns="method", values="value").dropna()
    differences = values["scaled"] - values["0.25"]
    if len(differences) < 2 or float(differences.abs().max()) == 0.0:
        return math.nan
    return float(stats.ttest_rel(values["scaled"], values["0.25"]).pvalue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick demo models")
    parser.add_argument("--n-images", type=int, default=None)
    args = parser.parse_args()
    torch.set_num_threads(1)
    started = time.perf_counter()
    settings = Settings(
        out=Path(tempfile.gettempdir()),
        quick=args.quick,
        n_images=args.n_images,
        show_progress=False,
    )
    demo = load_demo(quick=args.quick, seed=0, show_progress=False)
    n = min(settings.resolved_n_images(), len(demo.y_test))
    images, labels, masks = demo.x_test[:n], demo.y_test[:n], demo.masks_test[:n]
    d = images[0].numel()
    radii = {"0.25": 0.25, "scaled": 0.25 * math.sqrt(d / PAPER_ELEMENTS)}
    print(
        f"demo {'quick' if args.quick else 'full'} CNN, {n} test images of shape "
        f"{tuple(images.shape[1:])} (d = {d}); epsilon 0.25 vs scaled "
        f"0.25 * sqrt({d} / {PAPER_ELEMENTS}) = {radii['scaled']:.6f}; one thread",
        flush=True,
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels),
        batch_size=settings.batch_size,
    )
    tables = []
    with tempfile.TemporaryDirectory(prefix="uni-epsilon-") as runs:
        for name, epsilon in radii.items():
            explainer = uni_explainer(demo.cnn, epsilon)
            metrics = metrics_for(
                METHODS["uni"], explainer, demo.cnn, images, masks, settings
            )
            results = evaluate(
                demo.cnn,
                loader,
                explainers={name: explainer},
                metrics=metrics,
                out=str(Path(runs) / name),
                target="predicted",
                resume=False,
                show_progress=False,
                seed=settings.seed,
            )
            tables.append(results.table)
    import pandas as pd

    results = Results(pd.concat(tables, ignore_index=True), {})
    summary = results.summary()
    print()
    print(
        "| metric | better | ε = 0.25 | ε scaled | scaled − 0.25 | Welch p "
        "| paired p |\n|---|---|---:|---:|---:|---:|---:|"
    )
    for metric in METRIC_INFO:
        if metric not in results.metrics:
            continue
        label, higher = METRIC_INFO[metric]
        a, b = summary.loc[("0.25", metric)], summary.loc[("scaled", metric)]
        test = results.compare("scaled", "0.25", metric)
        print(
            f"| {label} | {'higher' if higher else 'lower'} | "
            f"{a['mean']:.4f} ± {a['sem']:.4f} | {b['mean']:.4f} ± {b['sem']:.4f} | "
            f"{test.difference:+.4f} | {test.pvalue:.3g} | "
            f"{paired_pvalue(results.table, metric):.3g} |"
        )
    seconds = {
        name: float(summary.loc[(name, results.metrics[0])]["seconds"])
        for name in radii
    }
    print(
        f"\nexplanation time per image: 0.25 {seconds['0.25']:.3f} s, scaled "
        f"{seconds['scaled']:.3f} s"
    )
    print("\nwhat the radius changes (mean ± s.e. over the same images):\n")
    print("| quantity | ε = 0.25 | ε scaled |\n|---|---:|---:|")
    diagnostics = {
        name: path_diagnostics(demo.cnn, images, epsilon)
        for name, epsilon in radii.items()
    }
    for quantity in diagnostics["0.25"]:
        cells = [
            "{:.4g} ± {:.2g}".format(*mean_sem(diagnostics[name][quantity]))
            for name in radii
        ]
        print(f"| {quantity} | {cells[0]} | {cells[1]} |")
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
