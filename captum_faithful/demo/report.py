"""The demo's outputs: the Markdown report, the PNG grid of maps, the per-image CSV.

Everything is rendered in memory and written at the end through temporary files that
are renamed into place, so a failed run leaves no partial report.
"""

from __future__ import annotations

import io
import math
import platform
import sys
from pathlib import Path
from typing import Any

import torch

from captum_faithful._files import atomic_write
from captum_faithful._utils import optional_import
from captum_faithful.demo.gating import C_MAXS, KAPPAS, STAGE_ONE_C_MAX, STAGE_ONE_KAPPA
from captum_faithful.demo.registry import METHODS, METRIC_INFO, comparisons

REPORT_NAME = "report.md"
FIGURE_NAME = "attributions.png"
CSV_NAME = "per_image.csv"


def _number(value: float, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _percent(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:+.1f} %"


def _pvalue(value: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:.2g}" if value >= 1e-4 else f"{value:.1e}"


def summary_table(outcome: Any) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: mean ± standard error per metric."""
    results = outcome.results
    summary = results.summary()
    metrics = [m for m in METRIC_INFO if m in set(results.table["metric"])]
    header = ["method", "model"]
    for metric in metrics:
        label, higher = METRIC_INFO[metric]
        header.append(f"{label} {'↑' if higher else '↓'}")
    header.append("s / image")
    rows = []
    for key in outcome.settings.methods:
        method = METHODS[key]
        cells = [method.label, method.model.upper() if method.model == "cnn" else "ViT"]
        seconds = math.nan
        for metric in metrics:
            if (key, metric) not in summary.index or summary.loc[(key, metric)][
                "n"
            ] == 0:
                cells.append("–")
                continue
            row = summary.loc[(key, metric)]
            seconds = float(row["seconds"])
            cells.append(f"{_number(row['mean'])} ± {_number(row['sem'])}")
        cells.append(_number(seconds, 4))
        rows.append(cells)
    return header, rows


def markdown_table(header: list[str], rows: list[list[str]]) -> str:
    lines = [
        "| " + " | ".join(header) + " |",
        "|" + "|".join(["---"] * 2 + ["---:"] * (len(header) - 2)) + "|",
    ]
    lines += ["| " + " | ".join(cells) + " |" for cells in rows]
    return "\n".join(lines)


def plain_table(header: list[str], rows: list[list[str]]) -> str:
    """The table as aligned text for the terminal."""
    widths = [
        max(len(str(c)) for c in column) for column in zip(header, *rows, strict=True)
    ]
    lines = ["  ".join(str(c).ljust(w) for c, w in zip(header, widths, strict=True))]
    lines.append("  ".join("-" * w for w in widths))
    lines += [
        "  ".join(str(c).ljust(w) for c, w in zip(cells, widths, strict=True))
        for cells in rows
    ]
    return "\n".join(lines)


def comparison_rows(outcome: Any) -> list[list[str]]:
    rows = []
    for test in comparisons(outcome.results, outcome.settings.methods):
        rows.append(
            [
                METHODS[test.a].label,
                METHODS[test.b].label,
                METRIC_INFO[test.metric][0],
                _number(test.mean_a),
                _number(test.mean_b),
                _number(test.statistic, 2),
                _pvalue(test.pvalue),
                f"{test.n_a}/{test.n_b}",
            ]
        )
    return rows


def render_report(outcome: Any) -> str:
    """The Markdown report."""
    settings, demo = outcome.settings, outcome.demo
    header, rows = summary_table(outcome)
    n_images = int(outcome.results.table["index"].nunique())
    recipe = demo.meta.get("recipe", {})
    patch = recipe.get("vit_patch_size", "?")
    lines = [
        "# captum-faithful demo report",
        "",
        f"{n_images} held-out BlockMNIST-style images (scikit-learn digits, colour-bias "
        "setting), each explained for the class the model predicts; "
        "mean ± standard error over the images. ↑ / ↓: higher / lower is better.",
        "",
        markdown_table(header, rows),
        "",
        "## Comparisons (Welch's t-test, two-sided)",
        "",
    ]
    compare = comparison_rows(outcome)
    if compare:
        lines.append(
            markdown_table(
                ["a", "b", "metric", "mean a", "mean b", "t", "p", "n a/b"], compare
            )
        )
    else:
        lines.append("None of the compared pairs ran (see `--methods`).")
    lines += gating_section(outcome)
    lines += [
        "",
        "## Models",
        "",
        f"- Test accuracy (all {len(demo.y_test)} test images): CNN "
        f"{demo.accuracy['cnn']:.3f}, ViT {demo.accuracy['vit']:.3f}.",
        f"- ViT: {recipe.get('vit_layers')} blocks, width {recipe.get('vit_hidden_size')}, "
        f"{recipe.get('vit_heads')} heads, {patch}×{patch} patches.",
        f"- SAEs: sae-lens top-k (k = {recipe.get('sae_k')}), expansion "
        f"{recipe.get('sae_expansion')}×, on the patch tokens of "
        f"`blocks.{{l}}.hook_resid_post` for l in {list(recipe.get('sae_layers', []))}, "
        f"{recipe.get('sae_steps')} steps of {recipe.get('sae_batch_tokens')} tokens. "
        "On the patch tokens of eight renderings of the validation scans (which "
        "neither the ViT nor the SAEs saw):",
        "",
        markdown_table(
            ["block", "explained variance", "dead features"],
            [
                [
                    str(layer),
                    _number(value),
                    _number(demo.sae_dead_fraction.get(layer, math.nan)),
                ]
                for layer, value in sorted(demo.sae_explained_variance.items())
            ],
        ),
        "",
        f"- Training recipe: {'quick' if settings.quick else 'full'}; cache "
        f"`{demo.cache_dir}`; {_training_time(demo.meta)}",
        "",
        "## Where the time went",
        "",
        f"On {_threads(torch.get_num_threads())}; CPU seconds count every thread "
        "of this process.",
        "",
        markdown_table(
            ["step", "wall seconds", "CPU seconds"],
            [
                [_step_label(step), f"{lap['wall']:.1f}", f"{lap['cpu']:.1f}"]
                for step, lap in outcome.timings.items()
            ],
        ),
        "",
        "## Settings",
        "",
        f"- Methods: {', '.join(METHODS[k].label for k in settings.methods)}.",
        f"- Images: the first {n_images} test images; batch size {settings.batch_size}; "
        f"seed {settings.seed}; device {settings.device}.",
        "- Metrics: insertion AUC (blur baseline) and deletion AUC (black baseline), "
        f"{50 if settings.quick else 100} steps; SaCo (10 groups, mean-colour baseline); "
        f"faithfulness correlation ({50 if settings.quick else 100} random subsets of 25 % "
        "of the features, black baseline, Pearson); path monotonicity (15 steps along "
        "the method's own path); evidence localisation (share of the positive "
        "attribution inside the digit's block). ViT methods are scored with the ViT's "
        f"{patch}×{patch} "
        "patches as features, CNN methods with pixels. Time: explanation seconds per "
        "image.",
        f"- Wall time of this run: {outcome.seconds:.0f} s. Python {platform.python_version()}, "
        f"torch {torch.__version__}.",
        "",
        f"![attribution maps]({FIGURE_NAME})",
        "",
        f"Per-image values: [{CSV_NAME}]({CSV_NAME}).",
        "",
    ]
    return "\n".join(lines)


def _training_time(meta: dict) -> str:
    phases = meta.get("training_phases")
    if not phases:
        return f"training took {meta.get('training_seconds', math.nan):.0f} s."
    parts = ", ".join(
        f"{name} {phase['wall_seconds']:.0f} s ({phase['cpu_seconds']:.0f} s CPU)"
        for name, phase in phases.items()
    )
    return (
        f"training took {meta['training_seconds']:.0f} s wall and "
        f"{meta['training_cpu_seconds']:.0f} s CPU on "
        f"{_threads(meta['training_threads'])} when it ran: {parts}."
    )


def _threads(count: int) -> str:
    return f"{count} thread{'s' if count != 1 else ''}"


def _step_label(step: str) -> str:
    if step in METHODS:
        return f"{METHODS[step].label}: explain and score"
    return {"models": "load (or train) the models"}.get(step, step)


def gating_section(outcome: Any) -> list[str]:
    """How FG-TransMM's configuration was chosen on the validation images: the
    protocol, the choice and why, and the whole validation table."""
    gating = outcome.gating
    if gating is None:
        return []
    chosen = gating.configuration
    metric = METRIC_INFO.get(gating.metric, (gating.metric, True))[0]
    table = gating.table()
    n_configurations = int((table["method"] != "transmm").sum())
    improvement = gating.stages[-1].improvement
    lines = [
        "",
        "## FG-TransMM: configuration chosen on validation images",
        "",
        f"The layers, κ, c_max and variant of every FG-TransMM row above were chosen "
        f"on {gating.n_images} validation images, disjoint from the test images, by "
        f"mean {metric}, with a protocol fixed in code before any test image was "
        "scored (as in the thesis): stage 1 tries every variant on each SAE block "
        "alone, on runs of three adjacent blocks and on all blocks together, at "
        f"κ = {STAGE_ONE_KAPPA:g}, c_max = {STAGE_ONE_C_MAX:g}; stage 2 tries "
        f"κ ∈ {{{', '.join(f'{k:g}' for k in KAPPAS)}}} × c_max ∈ "
        f"{{{', '.join(f'{c:g}' for c in C_MAXS)}}} on the best layers and variant of "
        "stage 1. The test images were then scored once with the choice; the "
        "shuffled control and the three variants use the same layers, κ and c_max.",
        "",
        f"**Chosen: blocks {list(chosen.layers)}, κ = {chosen.kappa:g}, c_max = "
        f"{chosen.c_max:g}, variant {chosen.variant}**, the highest validation "
        f"{metric} of the {n_configurations} configurations tried: "
        f"{_number(gating.score)} against TransMM's {_number(gating.baseline_score)} "
        f"({_percent(improvement)}).",
        "",
    ]
    if chosen.variant != "combined":
        lines += [
            f"The {chosen.variant} score does not pair SAE features with decoder "
            "rows, so the shuffled-decoder control computes exactly what "
            "FG-TransMM computes (the thesis's control tests the combined score).",
            "",
        ]
    rows = []
    for row in table.itertuples(index=False):
        gated = row.method != "transmm"
        cells = [
            str(row.stage),
            "TransMM" if not gated else " ".join(str(b) for b in row.layers),
            row.variant if gated else "–",
            f"{row.kappa:g}" if gated else "–",
            f"{row.c_max:g}" if gated else "–",
            f"{_number(row.mean)} ± {_number(row.sem)}",
            _percent(row.improvement) if gated else "–",
        ]
        if row.chosen:
            cells = [f"**{cell}**" for cell in cells]
        rows.append(cells)
    lines += [
        "<details><summary>The whole validation table</summary>",
        "",
        markdown_table(
            ["stage", "blocks", "variant", "κ", "c_max", metric, "vs TransMM"], rows
        ),
        "",
        "</details>",
    ]
    return lines


def render_figure(outcome: Any) -> bytes:
    """PNG grid: rows are images; columns input, evidence mask, one map per method."""
    matplotlib = optional_import("matplotlib", "demo")
    matplotlib.use("Agg")
    plt = optional_import("matplotlib.pyplot", "demo")
    keys = [
        k for k in outcome.settings.methods if outcome.figure_maps.get(k) is not None
    ]
    images = outcome.demo.x_test.cpu()
    masks = outcome.demo.masks_test.cpu()
    n = min(len(outcome.figure_maps[k]) for k in keys) if keys else 0
    columns = 2 + len(keys)
    fig, axes = plt.subplots(
        max(n, 1), columns, figsize=(1.6 * columns, 1.7 * max(n, 1)), squeeze=False
    )
    for row in range(n):
        axes[row, 0].imshow(images[row].permute(1, 2, 0).numpy())
        axes[row, 1].imshow(masks[row, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        for column, key in enumerate(keys, start=2):
            heat = outcome.figure_maps[key][row].float().sum(0)
            scale = float(heat.abs().max()) or 1.0
            axes[row, column].imshow(heat.numpy(), cmap="bwr", vmin=-scale, vmax=scale)
    titles = ["input", "evidence"] + [METHODS[k].label for k in keys]
    for column, title in enumerate(titles):
        axes[0, column].set_title(title, fontsize=7)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    return buffer.getvalue()


def write_outputs(outcome: Any) -> dict[str, Path]:
    """Render the report, figure and CSV, then write them; print the table."""
    out = outcome.settings.out
    table = outcome.results.table.copy()
    table["label"] = [outcome_label(k) for k in table["method"]]
    csv = (
        table[["index", "method", "label", "metric", "value", "seconds"]]
        .to_csv(index=False)
        .encode()
    )
    figure = render_figure(outcome)
    report = render_report(outcome).encode()
    files = {
        "report": out / REPORT_NAME,
        "figure": out / FIGURE_NAME,
        "csv": out / CSV_NAME,
    }
    atomic_write(files["csv"], csv)
    atomic_write(files["figure"], figure)
    atomic_write(files["report"], report)
    header, rows = summary_table(outcome)
    print(plain_table(header, rows), file=sys.stdout, flush=True)
    return files


def outcome_label(key: str) -> str:
    return METHODS[key].label
