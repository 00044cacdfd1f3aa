"""The demo's outputs: the Markdown report, one PNG grid of maps per model, the
per-image CSV.

Everything is rendered in memory and written at the end through temporary files that
are renamed into place, so a failed run leaves no partial report.
"""

from __future__ import annotations

import io
import math
import platform
import sys
import textwrap
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from captum_faithful._files import atomic_write
from captum_faithful._utils import as_logits, markdown_table, optional_import
from captum_faithful.demo.gating import C_MAXS, KAPPAS, STAGE_ONE_C_MAX, STAGE_ONE_KAPPA
from captum_faithful.demo.patching import BASELINE_LABELS
from captum_faithful.demo.registry import (
    FIGURE_IMAGES,
    METHODS,
    METRIC_INFO,
    SHUFFLED_VARIANT,
    comparisons,
    duplicate_rows,
)

REPORT_NAME = "report.md"
#: One figure per model: its methods' maps.
FIGURE_NAMES = {"cnn": "attributions_cnn.png", "vit": "attributions_vit.png"}
CSV_NAME = "per_image.csv"
MODEL_NAMES = {"cnn": "CNN", "vit": "ViT"}
#: The summary's comparisons are significant below this Holm-corrected p-value.
SIGNIFICANCE = 0.05
#: With fewer images per method the summary says its comparisons have little power.
LOW_POWER_IMAGES = 30
#: The figures' width in inches at :data:`FIGURE_DPI`: 1500 pixels at most.
FIGURE_WIDTH, FIGURE_DPI = 15.0, 100


def _number(value: float, digits: int = 3) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def _percent(value: float) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:+.1f} %"


def _pvalue(value: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:.2g}" if value >= 1e-4 else f"{value:.1e}"


def _duplicates(outcome: Any) -> dict[str, str]:
    return duplicate_rows(outcome.settings.methods, getattr(outcome, "gating", None))


def shown_methods(outcome: Any) -> list[str]:
    """The methods the report shows, in the run's order: every method but those
    scored with exactly the configuration of an earlier one (see
    :func:`~captum_faithful.demo.registry.duplicate_rows`)."""
    duplicates = _duplicates(outcome)
    return [key for key in outcome.settings.methods if key not in duplicates]


def method_label(outcome: Any, key: str) -> str:
    """``key``'s label, joined with the labels of the rows it stands for
    ("FG-TransMM = FG-TransMM combined")."""
    same = [d for d, kept in _duplicates(outcome).items() if kept == key]
    return " = ".join([METHODS[key].label] + [METHODS[d].label for d in same])


def _metrics(outcome: Any) -> list[str]:
    present = set(outcome.results.table["metric"])
    return [m for m in METRIC_INFO if m in present]


def ranking(outcome: Any, summary: Any, model: str, metric: str) -> list[str]:
    """The shown methods of ``model`` with a mean on ``metric``, best first (ties
    keep the run's order)."""
    higher = METRIC_INFO[metric][1]
    means = {}
    for key in shown_methods(outcome):
        if METHODS[key].model != model or (key, metric) not in summary.index:
            continue
        mean = float(summary.loc[(key, metric)]["mean"])
        if not math.isnan(mean):
            means[key] = mean
    return sorted(means, key=lambda k: -means[k] if higher else means[k])


def summary_table(outcome: Any) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the main table: mean ± standard error per metric, the
    best mean of each column among each model's methods in bold."""
    summary = outcome.results.summary()
    metrics = _metrics(outcome)
    header = ["method", "model"]
    for metric in metrics:
        label, higher = METRIC_INFO[metric]
        header.append(f"{label} {'↑' if higher else '↓'}")
    header.append("s / image")
    best = {}
    for metric in metrics:
        for model in MODEL_NAMES:
            ranked = ranking(outcome, summary, model, metric)
            if ranked:
                top = float(summary.loc[(ranked[0], metric)]["mean"])
                for key in ranked:
                    if float(summary.loc[(key, metric)]["mean"]) == top:
                        best[key, metric] = True
    rows = []
    for key in shown_methods(outcome):
        method = METHODS[key]
        cells = [method_label(outcome, key), MODEL_NAMES[method.model]]
        seconds = math.nan
        for metric in metrics:
            if (key, metric) not in summary.index or summary.loc[(key, metric)][
                "n"
            ] == 0:
                cells.append("–")
                continue
            row = summary.loc[(key, metric)]
            seconds = float(row["seconds"])
            cell = f"{_number(row['mean'])} ± {_number(row['sem'])}"
            cells.append(f"**{cell}**" if best.get((key, metric)) else cell)
        cells.append(_number(seconds, 4))
        rows.append(cells)
    return header, rows


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of ``pvalues`` (NaN ones are left out of the
    family and stay NaN): the i-th smallest of the m p-values becomes
    max over j ≤ i of min(1, (m − j + 1) p_(j)); rejecting where the adjusted
    value is below α keeps the family-wise error rate at α."""
    finite = sorted((p, i) for i, p in enumerate(pvalues) if not math.isnan(p))
    adjusted = [math.nan] * len(pvalues)
    running = 0.0
    for rank, (p, i) in enumerate(finite):
        running = max(running, min(1.0, (len(finite) - rank) * p))
        adjusted[i] = running
    return adjusted


def best_versus_next(outcome: Any) -> list[dict[str, Any]]:
    """For each metric and model, the best method and the runner-up, with Welch's
    test of the two and its p-value Holm-adjusted over every such comparison
    (``holm_p``; NaN when the test is undefined or there is no runner-up)."""
    summary = outcome.results.summary()
    entries = []
    for metric in _metrics(outcome):
        for model in MODEL_NAMES:
            ranked = ranking(outcome, summary, model, metric)
            if not ranked:
                continue
            entry: dict[str, Any] = dict(metric=metric, model=model, best=ranked[0])
            entry["mean_best"] = float(summary.loc[(ranked[0], metric)]["mean"])
            entry["next"], entry["mean_next"], entry["pvalue"] = (
                None,
                math.nan,
                math.nan,
            )
            if len(ranked) > 1:
                test = outcome.results.compare(ranked[0], ranked[1], metric)
                entry["next"], entry["mean_next"] = ranked[1], test.mean_b
                entry["pvalue"] = test.pvalue
            entries.append(entry)
    for entry, adjusted in zip(
        entries, holm([e["pvalue"] for e in entries]), strict=True
    ):
        entry["holm_p"] = adjusted
    return entries


def _verdict(entry: dict[str, Any]) -> str:
    if entry["next"] is None:
        return "– (the only method)"
    if entry["mean_best"] == entry["mean_next"]:
        return "tied"
    if math.isnan(entry["holm_p"]):
        return "not testable"
    answer = "**yes**" if entry["holm_p"] < SIGNIFICANCE else "no"
    return f"{answer} (p = {_pvalue(entry['holm_p'])})"


def summary_section(outcome: Any) -> list[str]:
    """The report's summary: per metric and model, the best method, the runner-up
    and whether the best is significantly better (Holm-corrected Welch tests)."""
    entries = best_versus_next(outcome)
    n_images = int(outcome.results.table["index"].nunique())
    models = [m for m in MODEL_NAMES if any(e["model"] == m for e in entries)]
    tested = sum(not math.isnan(e["pvalue"]) for e in entries)
    lines = [
        "",
        "## Summary",
        "",
        "For each metric, the method with the best mean on each model and the "
        "runner-up (the CNN's and the ViT's methods are ranked apart: they explain "
        "different models and are scored on different features, pixels and "
        "patches). *Significantly better*: Welch's t-test (two-sided) of the best "
        "against the runner-up, its p-value corrected with **Holm's step-down "
        f"method over the {tested} best-vs-runner-up comparisons of this table** "
        f"(family-wise error rate {SIGNIFICANCE:g}).",
        "",
    ]
    if n_images < LOW_POWER_IMAGES:
        quick = " (`--quick`)" if outcome.settings.quick else ""
        lines += [
            f"**Only {n_images} image{'s' if n_images != 1 else ''} per "
            f"method{quick}: these comparisons have little power.** A real "
            "difference can easily come out as not significant, and the ranking "
            "itself can change with more images; the full run scores 100.",
            "",
        ]
    header = ["metric"]
    for model in models:
        name = MODEL_NAMES[model]
        header += [f"{name}: best", f"{name}: runner-up", "significantly better?"]
    rows = []
    for metric in _metrics(outcome):
        label, higher = METRIC_INFO[metric]
        cells = [f"{label} {'↑' if higher else '↓'}"]
        for model in models:
            entry = next(
                (e for e in entries if e["metric"] == metric and e["model"] == model),
                None,
            )
            if entry is None:
                cells += ["–", "–", "–"]
                continue
            cells.append(
                f"{method_label(outcome, entry['best'])}: {_number(entry['mean_best'])}"
            )
            cells.append(
                "–"
                if entry["next"] is None
                else f"{method_label(outcome, entry['next'])}: "
                f"{_number(entry['mean_next'])}"
            )
            cells.append(_verdict(entry))
        rows.append(cells)
    lines += [markdown_table(header, rows, text_columns=len(header)), ""]
    lines += duplicate_note(outcome)
    return lines


def duplicate_note(outcome: Any) -> list[str]:
    """Which variant FG-TransMM's chosen configuration is, when that variant's
    row ran too (it is then shown once)."""
    lines = []
    for duplicate, kept in _duplicates(outcome).items():
        lines += [
            f"{METHODS[kept].label} and {METHODS[duplicate].label} are scored with "
            "the same configuration (the one chosen on the validation images), so "
            "their attributions are identical: the row is shown once, as "
            f"{method_label(outcome, kept)}, and compared once.",
            "",
        ]
    return lines


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
    """The Welch tests of the comparisons the papers make, each once: a row that
    duplicates another (see :func:`shown_methods`) is compared under the other's
    name, and a comparison already listed is not repeated."""
    duplicates = _duplicates(outcome)
    seen = set()
    rows = []
    for test in comparisons(outcome.results, outcome.settings.methods):
        a, b = duplicates.get(test.a, test.a), duplicates.get(test.b, test.b)
        if a == b or (a, b, test.metric) in seen:
            continue
        seen.add((a, b, test.metric))
        rows.append(
            [
                method_label(outcome, a),
                method_label(outcome, b),
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
    ]
    lines += summary_section(outcome)
    lines += figure_lines(outcome)
    lines += reading_guide(outcome)
    lines += [
        "",
        "## Every method and metric",
        "",
        "Mean ± standard error over the images; bold: the best mean of each column "
        "among the CNN's methods and among the ViT's.",
        "",
        markdown_table(header, rows, text_columns=2),
        "",
        "## Comparisons (Welch's t-test, two-sided)",
        "",
        "The comparisons the papers make, each on its own (p-values not corrected "
        "for multiple comparisons).",
        "",
    ]
    compare = comparison_rows(outcome)
    if compare:
        lines.append(
            markdown_table(
                ["a", "b", "metric", "mean a", "mean b", "t", "p", "n a/b"],
                compare,
                text_columns=2,
            )
        )
    else:
        lines.append("None of the compared pairs ran (see `--methods`).")
    lines += gating_section(outcome)
    lines += language_section(outcome)
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
            text_columns=2,
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
                [
                    _step_label(step),
                    f"{lap['wall_seconds']:.1f}",
                    f"{lap['cpu_seconds']:.1f}",
                ]
                for step, lap in outcome.timings.items()
            ],
            text_columns=2,
        ),
        "",
        "## Settings",
        "",
        f"- Methods: {', '.join(METHODS[k].label for k in settings.methods)}.",
        f"- Images: the first {n_images} test images; batch size {settings.batch_size}; "
        f"seed {settings.seed}; device {settings.device}; the distractor block "
        f"holds {distractor_phrase(outcome)} (`--distractor "
        f"{getattr(settings, 'distractor', 'shuffled')}`).",
        "- Metrics: insertion AUC (blur baseline) and deletion AUC (black baseline), "
        "and both again from one random colour per image (drawn from the seed, the "
        f"same for every method), {50 if settings.quick else 100} steps; SaCo (10 groups, mean-colour baseline); "
        f"faithfulness correlation ({50 if settings.quick else 100} random subsets of 25 % "
        "of the features, black baseline, Pearson); path monotonicity (15 steps along "
        "the method's own path); evidence localisation (share of the positive "
        "attribution inside the digit's block); evidence precision (share of the "
        "top-|block| pixels of the map, ties broken at random with a fixed seed, "
        "inside the block; chance 0.25). ViT methods are scored with the ViT's "
        f"{patch}×{patch} "
        "patches as features, CNN methods with pixels. Time: explanation seconds per "
        "image.",
        f"- FEI: {settings.fei_iterations()} iterations (the library's default is "
        "100; the smooth maps have converged by then), 5 coverage levels, smooth "
        "maps of stride 4, a random single-colour reference per image.",
        f"- Wall time of this run: {outcome.seconds:.0f} s. Python {platform.python_version()}, "
        f"torch {torch.__version__}.",
        "",
        f"Per-image values: [{CSV_NAME}]({CSV_NAME}).",
        "",
    ]
    return "\n".join(lines)


def figure_models(outcome: Any) -> list[str]:
    """The models with at least one method's maps: one figure each."""
    keys = [k for k in shown_methods(outcome) if outcome.figure_maps.get(k) is not None]
    return [m for m in MODEL_NAMES if any(METHODS[k].model == m for k in keys)]


def distractor_phrase(outcome: Any) -> str:
    """What the distractor block of the run's images holds, in words."""
    if getattr(outcome.settings, "distractor", "shuffled") == "digit":
        return "a real digit of another class"
    return "shuffled strokes"


def figure_lines(outcome: Any) -> list[str]:
    """The figures, one per model, right after the summary."""
    models = figure_models(outcome)
    if not models:
        return []
    shown = min(
        len(outcome.figure_maps[k])
        for k in shown_methods(outcome)
        if outcome.figure_maps.get(k) is not None
    )
    lines = [
        "",
        "## The maps",
        "",
        f"The first {shown} test image{'s' if shown != 1 else ''}: each input with its true class and "
        "the class the model predicts (which every map explains), the block that "
        f"holds the digit (white; the other block holds {distractor_phrase(outcome)}), and one "
        "map per method. Red: evidence for the explained class, blue: against it; "
        "each map is divided by its largest |attribution|.",
        "",
    ]
    for model in models:
        lines += [
            f"![{MODEL_NAMES[model]} methods' attribution maps]({FIGURE_NAMES[model]})",
            "",
        ]
    return lines


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
    return {
        "models": "load (or train) the models",
        "language model": "load (or train) the language model",
        "language patching": "language model: activation and attribution patching",
    }.get(step, step)


#: How to read each metric of :data:`METRIC_INFO`: what it measures, the
#: reference image it uses, and which methods that favours.
METRIC_GUIDE: dict[str, str] = {
    "insertion": (
        "starts from a **blurred copy** of the image and puts the original pixels "
        "(patches for the ViT) back in the order of the map, most important first; "
        "the area under the class probability curve. High when the first features "
        "alone bring the prediction back. The blurred start favours IG (blur), whose "
        "path starts from the same blur."
    ),
    "deletion": (
        "starts from the image and sets features to **black** in the order of the "
        "map; the area under the class probability curve, lower is better. Low when "
        "removing the first features destroys the prediction. The black reference "
        "favours IG (black), which attributes relative to black. The images' "
        "background and ink colours are random (the colour-bias setting), so black is "
        "itself evidence for some colours and not others."
    ),
    "insertion_random_color": (
        "the same insertion game started from **one random colour** per image "
        "instead of the blur (a colour inside the image's range, drawn from the "
        "run's seed: the same colour for every method). No path method starts from "
        "it, so it favours neither IG nor UNI: the fair ground on which to compare "
        "them. FEI's masks blend the image with random single colours too (other "
        "draws), so it may favour FEI somewhat."
    ),
    "deletion_random_color": (
        "the same deletion game with features set to **one random colour** per image "
        "instead of black (drawn as for insertion). No path method attributes "
        "relative to it, so it favours neither IG nor UNI: the fair ground on which "
        "to compare them; as FEI's kind of reference it may favour FEI somewhat."
    ),
    "saco": (
        "cuts the ranked features into 10 groups, replaces each group on its own with "
        "the image's **mean colour**, and checks that a group with more attribution "
        "also costs more probability when removed (+1: always, −1: never). It "
        "compares the sizes of the attributions, not only their order, so maps with "
        "calibrated magnitudes score well; the mean colour is no method's reference, "
        "so it favours none of the path methods."
    ),
    "faithfulness_correlation": (
        "sets random subsets of a quarter of the features to **black** and correlates "
        "(Pearson) each subset's total attribution with the drop of the class "
        "logit. It rewards maps whose attributions add up like the model's "
        "response to removal, so it favours methods whose attributions sum to the "
        "output change relative to black (the completeness of IG (black))."
    ),
    "path_monotonicity": (
        "path methods only: the model's class probability at 15 points of the "
        "method's **own** straight path, from its baseline (black, blur or UNI's "
        "learned one) to the image, rank-correlated (Spearman) with the position on "
        "the path; 1 when the probability rises all the way. It judges the baseline, "
        "not the map: it favours baselines the model sees as featureless, which is "
        "what UNI learns."
    ),
    "activation_deviation": (
        "CNN methods and FEI's ViT rows: the insertion curve started from the "
        "image's **mean colour**, and at each of its 21 points the mean squared "
        "difference between the convolutional activations (on the ViT: every "
        "block's attention probabilities) and those of the clean image; lower is "
        "better. "
        "Low when the inserted features recreate the network's own internal state "
        "rather than another route to the same output; every map is compared at the "
        "same coverages. It favours what FEI's activation-clipping variants (vm, "
        "ibm) aim at."
    ),
    "localisation": (
        "no reference image: the share of the map's positive attribution that lies "
        "in the block holding the digit (the other block holds shuffled strokes "
        "with no class information; with `--distractor digit`, a real digit of "
        "another class). It favours maps concentrated on the digit, "
        "whether or not the model depends on every part of it; a map of the ViT has "
        "one value per patch, so it can spill over the block's edge."
    ),
    "precision": (
        "no reference image: of the pixels the map ranks highest, as many as the "
        "block holds (summed over channels, ties broken by one fixed random order), "
        "the share inside the digit's block; chance is 0.25. It uses the ranking "
        "only, so it does not penalise dense maps such as FEI's mean of coverage "
        "masks the way the localisation share does; it favours maps whose top "
        "pixels sit on the digit."
    ),
}

#: Why insertion and deletion are scored twice.
REFERENCE_NOTE = (
    "**Insertion and deletion are scored under two references each, side by "
    "side.** Every reference is some method's home ground or none: insertion's "
    "usual blur is the baseline of IG (blur), and deletion's black that of IG "
    "(black), so each favours the IG that integrates from it. A random single colour "
    "per image is no path method's baseline; it is FEI's kind of reference (with "
    "other draws), so it may favour FEI somewhat. UNI against IG (black) and IG "
    "(blur) is therefore compared under both references (see the comparisons "
    "below), and the random-colour columns are the fair ground for it."
)

#: Why a map optimised for insertion and deletion can still lose on deletion.
FEI_NOTE = (
    "**Why FEI can lose on deletion although it optimises insertion/deletion "
    "games.** FEI optimises soft masks that blend the image with its own random "
    "single-colour reference, at a few coverage levels, and mostly on the insertion "
    "game (keep as little as possible and still keep the class). The deletion row "
    "scores the hard version against black, at every coverage: a map that finds "
    "*one* region sufficient for the class scores well on insertion, but when the "
    "evidence is redundant (several strokes of the digit, or its colour) removing "
    "that region leaves the rest to carry the prediction, and the map is flat "
    "within each coverage level, so the order of its first pixels is arbitrary."
)


def reading_guide(outcome: Any) -> list[str]:
    """The report's "How to read this" section: one entry per metric in the
    table, and the FEI note when an FEI row ran."""
    present = set(outcome.results.table["metric"])
    lines = ["", "## How to read this", ""]
    if {"insertion", "insertion_random_color"} <= present or {
        "deletion",
        "deletion_random_color",
    } <= present:
        lines += [REFERENCE_NOTE, ""]
    for metric, (label, higher) in METRIC_INFO.items():
        if metric not in present:
            continue
        arrow = "higher is better" if higher else "lower is better"
        lines.append(f"- **{label}** ({arrow}): {METRIC_GUIDE[metric]}")
    if any(key.startswith("fei") for key in outcome.settings.methods):
        lines += ["", FEI_NOTE]
    return lines


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
        "three variants and the shuffled-decoder control use the same layers, κ "
        "and c_max.",
        "",
        f"**Chosen: blocks {list(chosen.layers)}, κ = {chosen.kappa:g}, c_max = "
        f"{chosen.c_max:g}, variant {chosen.variant}**, the highest validation "
        f"{metric} of the {n_configurations} configurations tried: "
        f"{_number(gating.score)} against TransMM's {_number(gating.baseline_score)} "
        f"({_percent(improvement)}).",
        "",
    ]
    lines += _control_note(chosen.variant)
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
            ["stage", "blocks", "variant", "κ", "c_max", metric, "vs TransMM"],
            rows,
            text_columns=2,
        ),
        "",
        "</details>",
    ]
    return lines


def _control_note(variant: str) -> list[str]:
    """What the shuffled-decoder control tests, for the chosen ``variant``."""
    note = (
        f"The shuffled-decoder control permutes the rows of every SAE decoder, which "
        f"breaks the pairing of each feature's activation with its own decoder row "
        f"while keeping the activations, the reconstructions and the set of decoder "
        f"directions. Only the {SHUFFLED_VARIANT} score reads that pairing, so the "
        f"control is FG-TransMM {SHUFFLED_VARIANT} with shuffled decoders, compared "
        f"with FG-TransMM {SHUFFLED_VARIANT} at the same configuration (as in the "
        "thesis)."
    )
    if variant != SHUFFLED_VARIANT:
        note += (
            f" The chosen {variant} score has no shuffled control: "
            + (
                "it never reads the decoder"
                if variant == "activation"
                else "it sums over all decoder rows, in any order"
            )
            + ", so with shuffled decoders it computes exactly what it computes "
            "with the real ones."
        )
    return [note, ""]


def predicted_classes(outcome: Any) -> dict[str, Tensor]:
    """Each model's predicted class (argmax of its logits) on the first test images:
    as many as the report scored, and at least the figure's."""
    demo = outcome.demo
    table = outcome.results.table
    n = max(int(table["index"].max()) + 1 if len(table) else 0, FIGURE_IMAGES)
    n = min(n, len(demo.y_test))
    images = demo.x_test[:n]
    predictions = {}
    for name, model in (("cnn", demo.cnn), ("vit", demo.vit)):
        device = next(model.parameters()).device
        with torch.no_grad():
            chunks = [
                as_logits(model(images[i : i + 64].to(device))).argmax(-1).cpu()
                for i in range(0, n, 64)
            ]
        predictions[name] = torch.cat(chunks)
    return predictions


#: The figure's colour map: red for positive attribution, blue for negative.
COLOUR_MAP = "bwr"
COLOUR_BAR_LABEL = (
    "attribution ÷ the largest |attribution| of its map "
    "(each map explains the class its model predicts)"
)
LEGEND_LABELS = (
    "red: positive, evidence for the explained class",
    "blue: negative, evidence against it",
)


def image_caption(index: int, labels: Tensor, predictions: Tensor) -> str:
    """The caption under an input image: its true class and the class the
    figure's model predicts."""
    return f"true {int(labels[index])}\npredicted {int(predictions[index])}"


def build_figure(outcome: Any, predictions: dict[str, Tensor], model: str) -> Any:
    """The figure of ``model``'s methods: rows are images (captioned with the true
    class and the model's prediction); columns the input, the evidence block and
    one map per method, on one colour scale with a colour bar and a legend for red
    and blue. At most :data:`FIGURE_WIDTH` inches (1500 pixels) wide."""
    matplotlib = optional_import("matplotlib", "demo")
    matplotlib.use("Agg")
    plt = optional_import("matplotlib.pyplot", "demo")
    patches = optional_import("matplotlib.patches", "demo")
    if model not in MODEL_NAMES:
        raise ValueError(f"model: expected one of {list(MODEL_NAMES)}, got {model!r}")
    keys = [
        k
        for k in shown_methods(outcome)
        if METHODS[k].model == model and outcome.figure_maps.get(k) is not None
    ]
    images = outcome.demo.x_test.cpu()
    masks = outcome.demo.masks_test.cpu()
    labels = outcome.demo.y_test.cpu()
    n = min(len(outcome.figure_maps[k]) for k in keys) if keys else 0
    columns = 2 + len(keys)
    rows = max(n, 1)
    cell = min(1.65, FIGURE_WIDTH / columns)
    fig, axes = plt.subplots(
        rows,
        columns,
        figsize=(cell * columns, (cell + 0.45) * rows + 1.2),
        squeeze=False,
        layout="constrained",
    )
    for row in range(n):
        axes[row, 0].imshow(images[row].permute(1, 2, 0).numpy())
        axes[row, 0].set_xlabel(
            image_caption(row, labels, predictions[model]), fontsize=10
        )
        axes[row, 1].imshow(masks[row, 0].numpy(), cmap="gray", vmin=0, vmax=1)
        for column, key in enumerate(keys, start=2):
            heat = outcome.figure_maps[key][row].float().sum(0)
            scale = float(heat.abs().max()) or 1.0
            axes[row, column].imshow(
                (heat / scale).numpy(), cmap=COLOUR_MAP, vmin=-1.0, vmax=1.0
            )
    titles = ["input", "evidence block"] + [
        textwrap.fill(method_label(outcome, k), 16, break_on_hyphens=False)
        for k in keys
    ]
    for column, title in enumerate(titles):
        axes[0, column].set_title(title, fontsize=10)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    fig.suptitle(f"{MODEL_NAMES[model]} methods", fontsize=13)
    scalar = matplotlib.cm.ScalarMappable(
        norm=matplotlib.colors.Normalize(-1.0, 1.0), cmap=COLOUR_MAP
    )
    bar = fig.colorbar(
        scalar, ax=axes, orientation="horizontal", fraction=0.03, aspect=50
    )
    bar.set_label(COLOUR_BAR_LABEL, fontsize=10)
    bar.set_ticks([-1.0, 0.0, 1.0])
    bar.ax.tick_params(labelsize=9)
    colours = matplotlib.colormaps[COLOUR_MAP]
    fig.legend(
        handles=[
            patches.Patch(color=colours(1.0), label=LEGEND_LABELS[0]),
            patches.Patch(color=colours(0.0), label=LEGEND_LABELS[1]),
        ],
        loc="outside lower center",
        ncol=2,
        fontsize=10,
        frameon=False,
    )
    return fig


def render_figure(
    outcome: Any, model: str, predictions: dict[str, Tensor] | None = None
) -> bytes:
    """The figure of ``model``'s methods (:func:`build_figure`) as PNG bytes."""
    plt = optional_import("matplotlib.pyplot", "demo")
    if predictions is None:
        predictions = predicted_classes(outcome)
    fig = build_figure(outcome, predictions, model)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=FIGURE_DPI)
    plt.close(fig)
    return buffer.getvalue()


def per_image_csv(outcome: Any, predictions: dict[str, Tensor]) -> bytes:
    """One row per (image, method, metric), with the image's true class and the
    class the method's model predicted (the class every method explains)."""
    table = outcome.results.table.copy()
    labels = outcome.demo.y_test.cpu()
    table["label"] = [outcome_label(k) for k in table["method"]]
    table["true_class"] = [int(labels[int(i)]) for i in table["index"]]
    table["predicted_class"] = [
        int(predictions[METHODS[key].model][int(i)])
        for key, i in zip(table["method"], table["index"], strict=True)
    ]
    columns = [
        "index",
        "true_class",
        "predicted_class",
        "method",
        "label",
        "metric",
        "value",
        "seconds",
    ]
    return table[columns].to_csv(index=False).encode()


def write_outputs(outcome: Any) -> dict[str, Path]:
    """Render the report, the figures and the CSV, then write them; print the
    table. Returns the paths written: ``"report"``, ``"csv"`` and ``"figure cnn"``,
    ``"figure vit"`` for each model whose methods ran."""
    out = outcome.settings.out
    predictions = predicted_classes(outcome)
    csv = per_image_csv(outcome, predictions)
    figures = {
        f"figure {model}": (
            out / FIGURE_NAMES[model],
            render_figure(outcome, model, predictions),
        )
        for model in figure_models(outcome)
    }
    report = render_report(outcome).encode()
    files = {"report": out / REPORT_NAME, "csv": out / CSV_NAME}
    atomic_write(files["csv"], csv)
    for name, (path, figure) in figures.items():
        atomic_write(path, figure)
        files[name] = path
    atomic_write(files["report"], report)
    header, rows = summary_table(outcome)
    # no Markdown bold on the terminal
    rows = [[cell.strip("*") for cell in cells] for cells in rows]
    print(plain_table(header, rows), file=sys.stdout, flush=True)
    if getattr(outcome, "patching", None) is not None:
        header, rows = language_table(outcome.patching)
        print("\n" + plain_table(header, rows), file=sys.stdout, flush=True)
    return files


def outcome_label(key: str) -> str:
    return METHODS[key].label


def language_table(measurement: Any) -> tuple[list[str], list[list[str]]]:
    """Header and rows of the language-model table: per baseline and number of
    path points, mean ± standard error over the prompts."""
    header = [
        "baseline x'",
        "path points",
        "L2 distance ↓",
        "relative distance ↓",
        "rank correlation ↑",
        "‖x' − E(x)‖",
        "t vs random",
        "p vs random",
    ]
    rows = []
    for row in measurement.summary():
        rows.append(
            [
                BASELINE_LABELS[row["baseline"]],
                str(row["n_steps"]),
                f"{_number(row['distance'])} ± {_number(row['distance_sem'])}",
                f"{_number(row['relative_distance'])} ± "
                f"{_number(row['relative_distance_sem'])}",
                f"{_number(row['rank_correlation'])} ± "
                f"{_number(row['rank_correlation_sem'])}",
                _number(row["baseline_distance"], 2),
                _number(row["t_vs_random"], 2),
                _pvalue(row["p_vs_random"]),
            ]
        )
    return header, rows


def language_verdict(measurement: Any) -> list[str]:
    """Sentences stating, from the numbers, whether the paper's claim held: the
    mean distance from UNI's baseline below the random baseline's, with Welch's
    p, at every number of path points; and the same for the scale-free measures."""
    rows = {(r["baseline"], r["n_steps"]): r for r in measurement.summary()}
    sentences = []
    for n in measurement.n_steps:
        uni, random = rows.get(("unlearned", n)), rows.get(("random", n))
        if uni is None or random is None:
            continue
        below = measurement.unlearned_below_random(n)
        points = f"{n} path point{'s' if n != 1 else ''}"
        significant = not math.isnan(uni["p_vs_random"]) and uni["p_vs_random"] < 0.05
        if below:
            verdict = "**held**" if significant else "held, but not significantly"
        else:
            verdict = "**did not hold**"
        sentences.append(
            f"- With {points}: the paper's claim (UNI's baseline closer than a random "
            f"one) {verdict}: mean distance {_number(uni['distance'])} against "
            f"{_number(random['distance'])} (Welch p = {_pvalue(uni['p_vs_random'])}); "
            f"relative distance {_number(uni['relative_distance'])} against "
            f"{_number(random['relative_distance'])} "
            f"({'lower' if uni['relative_distance'] < random['relative_distance'] else 'not lower'}), "
            f"rank correlation {_number(uni['rank_correlation'])} against "
            f"{_number(random['rank_correlation'])} "
            f"({'higher' if uni['rank_correlation'] > random['rank_correlation'] else 'not higher'})."
        )
    return sentences


def language_section(outcome: Any) -> list[str]:
    """The language-model section: the UNI paper's Table 8 in miniature, the
    model's recall, the settings and a verdict computed from the table."""
    measurement = getattr(outcome, "patching", None)
    language = getattr(outcome, "language", None)
    if measurement is None or language is None:
        return []
    recipe = language.meta.get("recipe", {})
    settings = measurement.settings
    n_sites = len(measurement.site_names)
    n_tokens = int(next(iter(measurement.exact.values())).shape[-1])
    header, rows = language_table(measurement)
    training = language.meta.get("training_seconds", math.nan)
    threads = language.meta.get("training_threads", 1)
    lines = [
        "",
        "## Language model: attribution patching against activation patching",
        "",
        "The UNI paper's Table 8 in miniature. A tiny GPT-2 "
        f"({recipe.get('layers')} blocks, width {recipe.get('width')}, "
        f"{recipe.get('heads')} heads) is trained on invented facts "
        f'("{language.facts.facts[0].sentence}"; every name made up, nothing '
        f"downloaded). It completes {_number(language.recall)} of all "
        f"{len(language.facts.facts)} fact prompts with their attribute and "
        f"{_number(language.pair_recall)} of the {2 * measurement.n_prompts} prompts "
        "of the counterfactual pairs (greedy, at the last token); training took "
        f"{training:.0f} s on {_threads(threads)} when it ran.",
        "",
        f'For each of the {measurement.n_prompts} prompts x ("{language.prompts[0]}"; '
        f'counterfactual "{language.counterfactual_prompts[0]}"), exact activation '
        "patching F(x' | e ← e(x)) − F(x') is computed at every residual-stream site "
        f"e ({n_sites} layers: before each block and after the last, × {n_tokens} "
        "tokens; one patched forward each) and "
        "compared with attribution patching (e(x) − e(x'))ᵀ ∇F, averaged along the "
        "straight path from x' to E(x) when there is more than one path point, "
        "from the same baseline x' in token-embedding space. F is the logit, at the "
        "last token, of the token the model ranks first on x. The L2 distance "
        "between the two (layer × token) matrices is the paper's measure; the "
        "relative distance divides it by the norm of the exact matrix and the rank "
        "correlation (Spearman) compares their orders, both independent of the "
        "effects' scale. Mean ± standard error over the prompts; Welch's t-test "
        "(two-sided) of each baseline's distances against the random baseline's.",
        "",
        markdown_table(header, rows, text_columns=2),
        "",
        *language_verdict(measurement),
        "",
        f"Baselines: UNI's learned one (Algorithm 1 on the token embeddings, "
        f"unlearning the explained token: η = {settings['unlearning_step']:g}, "
        f"{settings['pgd_steps']} PGD steps of size {settings['pgd_step_size']:g}, "
        f"ε = {settings['epsilon']:g}, the paper's values); random (i.i.d. Gaussian "
        "embeddings with the mean and standard deviation of the embedding matrix, "
        f"seed {settings['seed']}); zero embeddings; the counterfactual prompt's "
        "embeddings (the usual activation-patching baseline). The column "
        "‖x' − E(x)‖ shows how far each baseline is from the prompt: a nearer "
        "baseline makes both matrices smaller, which is why the scale-free "
        "columns are shown too.",
    ]
    return lines
