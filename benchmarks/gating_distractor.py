"""Feature-Gated TransMM's claims on a benchmark where SAE features can carry meaning
(issue 24 §2; not run by CI).

The thesis reports FG-TransMM above TransMM and its real SAE decoders above shuffled
ones. The demo's data put a *shuffled* digit beside the evidence: it has no class
information, so there is little for a semantic feature to tell apart. Here the same
protocol runs on two renderings of the same scans, each with its own cached ViT and
SAEs trained with the same recipe (:func:`captum_faithful.demo.load_demo`):

- ``shuffled``: today's data, the distractor a tile-shuffled digit;
- ``digit``: the distractor a real digit of a class other than the label.

On each, FG-TransMM's configuration is chosen on the validation images by the demo's
two-stage protocol (:func:`captum_faithful.demo.gating.choose_gating`), twice:

- ``all``: stage 1 tries every score variant on every block with an SAE (alone, in
  runs of three, all together), as the demo does;
- ``thesis``: the combined score only, the first and the last block with an SAE left
  out (:func:`captum_faithful.demo.gating.protocol_candidates`).

Then the test images (disjoint from the validation images) are scored once, with
every choice: TransMM; FG-TransMM as chosen; the combined score at the chosen
layers, κ and c_max (the same as the choice under ``thesis``); and that combined
score with every SAE decoder's rows permuted (the thesis's shuffled-decoder
control, seed 0). Metrics: the demo report's for the ViT (SaCo, insertion,
deletion, faithfulness correlation on patches, evidence localisation and
precision) and the share of the positive attribution on the distractor block.
Welch tests: each choice against TransMM, combined against its shuffled control.
Nothing is chosen after the test images are scored.

Run from the repository root (trains the two data sets' models on first use; the
full ``digit`` models take about as long as the default ones)::

    OMP_NUM_THREADS=1 python -m benchmarks.gating_distractor [--quick]
        [--n-test 239] [--n-validation 120] [--out FILE]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import sys
import tempfile
import time
from typing import Any

import torch

from captum_faithful._utils import markdown_table
from captum_faithful.attr import TransMM
from captum_faithful.demo import load_demo
from captum_faithful.demo.data import DISTRACTORS
from captum_faithful.demo.gating import PROTOCOLS, choose_gating
from captum_faithful.demo.registry import (
    METHODS,
    EvidenceLocalisation,
    Settings,
    metrics_for,
)
from captum_faithful.evaluation import evaluate

#: Metrics in the tables: name → (label, True when higher is better).
COLUMNS = {
    "saco": ("SaCo", True),
    "insertion": ("insertion", True),
    "deletion": ("deletion", False),
    "faithfulness_correlation": ("faith. corr.", True),
    "precision": ("evidence precision", True),
    "localisation": ("evidence share", True),
    "distractor": ("distractor share", False),
}
#: Seed of the shuffled-decoder control (the demo's seed).
SHUFFLE_SEED = 0


def _number(value: float, digits: int = 3) -> str:
    return "nan" if value != value else f"{value:.{digits}f}"


def _p(value: float) -> str:
    if value != value:
        return "nan"
    return f"{value:.2g}" if value >= 1e-3 else f"{value:.0e}"


class _Explain:
    """``(inputs, target) -> attributions`` of an explainer with ``attribute``."""

    def __init__(self, explainer: Any) -> None:
        self.explainer = explainer

    def __call__(self, inputs: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return self.explainer.attribute(inputs, target=target).detach()


def run_distractor(
    distractor: str, args: argparse.Namespace, runs: str
) -> dict[str, Any]:
    """Choose on the validation images under both protocols, then score the test
    images once with every choice. Returns the choices, the results and times."""
    started = time.perf_counter()
    demo = load_demo(quick=args.quick, seed=0, distractor=distractor)
    load_seconds = time.perf_counter() - started
    n_validation = min(args.n_validation, len(demo.y_validation))
    choices, selection_seconds = {}, {}
    for protocol in PROTOCOLS:
        clock = time.perf_counter()
        choices[protocol] = choose_gating(
            demo.vit,
            demo.saes,
            demo.x_validation[:n_validation],
            out=os.path.join(runs, distractor, f"gating-{protocol}"),
            batch_size=16,
            seed=0,
            protocol=protocol,
        )
        selection_seconds[protocol] = time.perf_counter() - clock
        print(
            f"[{distractor}] {protocol}: chose {choices[protocol].configuration.name} "
            f"(validation SaCo {choices[protocol].score:.4f} vs TransMM "
            f"{choices[protocol].baseline_score:.4f}) in "
            f"{selection_seconds[protocol]:.0f} s",
            file=sys.stderr,
            flush=True,
        )

    # every explainer once, also when both protocols chose the same configuration
    rows: dict[str, str] = {}  # row name → explainer name
    explainers: dict[str, Any] = {"transmm": _Explain(TransMM(demo.vit))}
    rows["transmm"] = "transmm"

    def add(row: str, configuration: Any, shuffle: int | None) -> None:
        name = configuration.name + ("" if shuffle is None else f" shuffled={shuffle}")
        if name not in explainers:
            explainers[name] = _Explain(
                configuration.explainer(demo.vit, demo.saes, shuffle_decoder=shuffle)
            )
        rows[row] = name

    for protocol, choice in choices.items():
        chosen = choice.configuration
        combined = dataclasses.replace(chosen, variant="combined")
        add(f"{protocol}: chosen", chosen, None)
        add(f"{protocol}: combined", combined, None)
        add(f"{protocol}: shuffled", combined, SHUFFLE_SEED)

    n_test = min(args.n_test, len(demo.y_test))
    images, labels = demo.x_test[:n_test], demo.y_test[:n_test]
    settings = Settings(out=runs, quick=args.quick)
    metrics = metrics_for(
        METHODS["transmm"], None, demo.vit, images, demo.masks_test[:n_test], settings
    )
    metrics["distractor"] = EvidenceLocalisation(
        images, demo.distractor_masks_test[:n_test]
    )
    loader = torch.utils.data.DataLoader(
        torch.utils.data.TensorDataset(images, labels), batch_size=16
    )
    clock = time.perf_counter()
    results = evaluate(
        demo.vit,
        loader,
        explainers=explainers,
        metrics={name: metrics[name] for name in COLUMNS},
        out=os.path.join(runs, distractor, "test"),
        target="predicted",
        resume=False,
        show_progress=False,
        seed=0,
    )
    test_seconds = time.perf_counter() - clock
    return {
        "demo": demo,
        "choices": choices,
        "rows": rows,
        "results": results,
        "n_validation": n_validation,
        "n_test": n_test,
        "seconds": {
            "models": load_seconds,
            **{f"selection ({p})": s for p, s in selection_seconds.items()},
            "test": test_seconds,
        },
    }


def report(distractor: str, run: dict[str, Any]) -> str:
    """The Markdown section of one data set."""
    results, rows, choices = run["results"], run["rows"], run["choices"]
    summary = results.summary()
    demo = run["demo"]
    lines = [
        f"### Distractor: {distractor}",
        "",
        f"ViT test accuracy {demo.accuracy['vit']:.3f}; SAEs at blocks "
        f"{sorted(demo.saes)}; {run['n_validation']} validation images, "
        f"{run['n_test']} test images.",
        "",
        "Chosen on the validation images (SaCo, mean):",
        "",
        markdown_table(
            ["protocol", "layers", "κ", "c_max", "variant", "SaCo", "TransMM"],
            [
                [
                    protocol,
                    "+".join(map(str, choice.configuration.layers)),
                    f"{choice.configuration.kappa:g}",
                    f"{choice.configuration.c_max:g}",
                    choice.configuration.variant,
                    _number(choice.score),
                    _number(choice.baseline_score),
                ]
                for protocol, choice in choices.items()
            ],
        ),
        "",
        "Test images, mean ± s.e.:",
        "",
    ]
    body = []
    for row, name in rows.items():
        protocol = row.split(":")[0]
        if row.endswith("combined") and name == rows[f"{protocol}: chosen"]:
            continue  # the choice is the combined score: the row above
        label = row
        if row.endswith("chosen"):
            label = f"{row} ({choices[protocol].configuration.variant})"
        cells = [label]
        for metric in COLUMNS:
            entry = summary.loc[(name, metric)]
            cells.append(f"{_number(entry['mean'])} ± {_number(entry['sem'])}")
        body.append(cells)
    lines.append(
        markdown_table(["method", *(label for label, _ in COLUMNS.values())], body)
    )
    lines += ["", "Welch tests on the test images (difference a − b, p):", ""]
    pairs = []
    for protocol in choices:
        pairs.append((f"{protocol}: chosen", "transmm"))
        if rows[f"{protocol}: combined"] != rows[f"{protocol}: chosen"]:
            pairs.append((f"{protocol}: combined", "transmm"))
        pairs.append((f"{protocol}: combined", f"{protocol}: shuffled"))
    body = []
    for a, b in pairs:
        cells = [f"{a} − {b}"]
        for metric in COLUMNS:
            test = results.compare(rows[a], rows[b], metric)
            cells.append(f"{test.difference:+.3f} (p {_p(test.pvalue)})")
        body.append(cells)
    lines.append(
        markdown_table(["a − b", *(label for label, _ in COLUMNS.values())], body)
    )
    seconds = ", ".join(f"{k} {v:.0f} s" for k, v in run["seconds"].items())
    lines += ["", f"Wall time: {seconds}.", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--quick", action="store_true", help="the quick demo models (a smoke run)"
    )
    parser.add_argument(
        "--n-test", type=int, default=None, help="test images (default: all)"
    )
    parser.add_argument(
        "--n-validation",
        type=int,
        default=None,
        help="validation images (default: all 120)",
    )
    parser.add_argument(
        "--distractors",
        nargs="+",
        choices=list(DISTRACTORS),
        default=list(DISTRACTORS),
        help="data sets to run (default: both)",
    )
    parser.add_argument("--out", default=None, help="also write the tables here")
    args = parser.parse_args(argv)
    if args.n_test is None:
        args.n_test = 10**9
    if args.n_validation is None:
        args.n_validation = 10**9
    torch.set_num_threads(1)
    started = time.perf_counter()
    sections = []
    with tempfile.TemporaryDirectory(prefix="gating-distractor-") as runs:
        for distractor in args.distractors:
            run = run_distractor(distractor, args, runs)
            sections.append(report(distractor, run))
            print(sections[-1], flush=True)
    total = time.perf_counter() - started
    command = "OMP_NUM_THREADS=1 python -m benchmarks.gating_distractor " + " ".join(
        argv if argv is not None else sys.argv[1:]
    )
    footer = (
        f"Command: `{command.strip()}`; {torch.get_num_threads()} thread, "
        f"{platform.processor() or platform.machine()}, torch {torch.__version__}; "
        f"total wall time {total / 60:.1f} min."
    )
    print(footer)
    if args.out:
        with open(args.out, "w") as handle:
            handle.write("\n".join([*sections, footer, ""]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
