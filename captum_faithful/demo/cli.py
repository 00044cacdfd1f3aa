"""``captum-faithful demo``: the console script's default job."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a positive integer, got {text!r}"
        ) from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer, got {text!r}"
        ) from None
    if value < 0:
        raise argparse.ArgumentTypeError(
            f"expected a non-negative integer, got {value}"
        )
    return value


def _device(text: str) -> str:
    try:
        device = torch.device(text)
    except (RuntimeError, ValueError):
        raise argparse.ArgumentTypeError(
            f"unknown device {text!r}; e.g. 'cpu' or 'cuda:0'"
        ) from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise argparse.ArgumentTypeError(
            f"device {text!r} asked for, but CUDA is not available"
        )
    if device.type not in ("cpu", "cuda", "mps"):
        raise argparse.ArgumentTypeError(
            f"unsupported device {text!r}; use 'cpu' or 'cuda[:i]'"
        )
    return str(device)


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the ``demo`` subcommand (the default job) to ``subparsers``."""
    from captum_faithful.demo.registry import METHODS

    parser = subparsers.add_parser(
        "demo",
        help="train tiny models on bundled data, explain and score every method, write a report",
        description=(
            "Explain held-out BlockMNIST-style images (scikit-learn digits) with every "
            "method, score every explanation with every metric, and write a Markdown "
            "report, a PNG grid of maps and a per-image CSV. The models are trained on "
            "first use (a few minutes on the CPU) and cached."
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
        type=_positive_int,
        default=None,
        help="number of test images (default: 100, 8 with --quick)",
    )
    parser.add_argument(
        "--n-validation",
        type=_positive_int,
        default=None,
        help="validation images FG-TransMM's layers, kappa, c_max and variant are "
        "chosen on, disjoint from the test images (default: 64, 16 with --quick)",
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
        "--device", type=_device, default="cpu", help="torch device (default: cpu)"
    )
    parser.add_argument(
        "--seed",
        type=_seed,
        default=0,
        help="seed of data, training and evaluation (default: 0)",
    )
    parser.add_argument(
        "--batch-size",
        type=_positive_int,
        default=16,
        help="images per evaluation batch (default: 16)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.set_defaults(func=main)
    return parser


def main(args: argparse.Namespace) -> int:
    """Run the demo job with parsed arguments; 0 on success, 1 with a message if not."""
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
        show_progress=not args.no_progress,
    )
    try:
        check_output_folder(settings.out)
    except OSError as err:
        print(f"captum-faithful demo: error: {err}", file=sys.stderr)
        return 2
    outcome = run(settings)
    print(
        f"\nreport: {outcome.files['report']}\nfigure: {outcome.files['figure']}\ncsv:    {outcome.files['csv']}"
    )
    return 0
