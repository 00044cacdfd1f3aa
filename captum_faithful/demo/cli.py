"""``captum-faithful demo``: the console script's default job."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from captum_faithful._cli import UsageError, device, non_negative_int, positive_int


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand (the default job) to ``subparsers``."""
    from captum_faithful.demo.data import DISTRACTORS
    from captum_faithful.demo.models import CACHE_ENV, cache_root
    from captum_faithful.demo.registry import METHODS

    parser = subparsers.add_parser(
        "demo",
        help="train small models on bundled data, explain and score every method, "
        "write a report",
        description=(
            "Explain held-out BlockMNIST-style images (scikit-learn's bundled digits, "
            "nothing is downloaded) with every method, score every explanation with "
            "every metric, and write a Markdown report (led by a summary: the best "
            "method per metric and model, and whether it is significantly better "
            "than the runner-up), one PNG grid of attribution maps per model (CNN, "
            "ViT) and a per-image CSV to --out. The report ends with the UNI "
            "paper's Table 8 in miniature: attribution patching against exact "
            "activation patching on a tiny GPT-2 trained on invented facts, from "
            "learned, random, zero and counterfactual baselines, over 100 prompts. "
            "On first use it trains a small CNN, a small ViT, SAEs and the language "
            "model on the CPU, which is the longest step; later runs load them from "
            "the cache. --quick trains shorter recipes and evaluates 8 images "
            "instead of 100, for a first look."
        ),
        epilog=(
            f"Trained models are cached in {cache_root()} (set "
            f"${CACHE_ENV} to use another folder), one sub-folder per training "
            "recipe and seed; delete it to retrain. Exit status: 0 done, 2 a usage "
            "error, 1 a failure while running."
        ),
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="short training recipe, 8 images, fewer metric steps",
    )
    parser.add_argument(
        "--out",
        type=Path,
        default=Path("demo_report"),
        help="output folder (default: ./demo_report)",
    )
    parser.add_argument(
        "--n-images",
        type=positive_int,
        default=None,
        help="number of test images (default: 100, 8 with --quick)",
    )
    parser.add_argument(
        "--n-validation",
        type=positive_int,
        default=None,
        help="validation images FG-TransMM's layers, kappa, c_max and variant are "
        "chosen on, disjoint from the test images (default: all 120)",
    )
    parser.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(METHODS),
        metavar="METHOD",
        help=f"methods to run (default: all): {', '.join(METHODS)}",
    )
    parser.add_argument(
        "--device", type=device, default="cpu", help="torch device (default: cpu)"
    )
    parser.add_argument(
        "--seed",
        type=non_negative_int,
        default=0,
        help="seed of data, training and evaluation (default: 0)",
    )
    parser.add_argument(
        "--batch-size",
        type=positive_int,
        default=16,
        help="images per evaluation batch (default: 16)",
    )
    parser.add_argument(
        "--threads",
        type=positive_int,
        default=None,
        help="CPU threads torch uses for training (at most 4), explaining and "
        "scoring; the language model always uses one. Default: the cores that are "
        "free when the demo starts (the core count minus the 1-minute load "
        "average, rounded; at least 1, at most 4), so an idle 2-core machine uses "
        "both (2 threads train the quick recipe in 0.77x the time of 1 there) and a "
        "loaded one is not oversubscribed (threads competing with other work for "
        "the same cores can make a run several times slower). The thread count "
        "changes the order of floating-point sums, so models trained with "
        "different counts differ slightly; pass --threads to fix it. Cached models "
        "are reused whatever --threads is (the cache is keyed by recipe and seed), "
        "and the report names the count it ran with",
    )
    parser.add_argument(
        "--distractor",
        choices=list(DISTRACTORS),
        default="shuffled",
        help="what the block beside the digit holds: 'shuffled', a digit scan cut "
        "into shuffled 2x2 tiles (no class information; the default), or 'digit', a "
        "real digit of a class other than the label, where the ViT's SAE features "
        "can carry class meaning outside the evidence. Each has its own trained "
        "models (the same recipes; the full 'digit' models train once, in about as "
        "long as the default ones)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=main)
    return parser


def free_cores(limit: int = 4) -> int:
    """The cores not busy with other work: the core count minus the 1-minute load
    average, rounded, between 1 and ``limit`` (1 where the load is unknown)."""
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):
        return 1
    return max(1, min(limit, round((os.cpu_count() or 1) - load)))


def main(args: argparse.Namespace) -> int:
    """Run the demo job with parsed arguments; 0 on success.

    Raises:
        UsageError: the output folder cannot be written.
    """
    from captum_faithful.demo.job import check_output_folder, run
    from captum_faithful.demo.registry import Settings

    settings = Settings(
        out=args.out,
        quick=args.quick,
        n_images=args.n_images,
        n_validation=args.n_validation,
        methods=tuple(dict.fromkeys(args.methods)),
        device=args.device,
        seed=args.seed,
        batch_size=args.batch_size,
        threads=free_cores() if args.threads is None else args.threads,
        show_progress=not args.no_progress,
        distractor=args.distractor,
    )
    try:
        check_output_folder(settings.out)
    except OSError as err:
        raise UsageError(f"argument --out: {err}") from err
    outcome = run(settings)
    print()
    for name, path in outcome.files.items():
        print(f"{name + ':':<11} {path}")
    return 0
