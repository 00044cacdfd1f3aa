"""Run every benchmark with the settings of ``docs/performance.md`` and keep the output.

    python -m benchmarks                     # everything (about 3 h 25 min)
    python -m benchmarks --only fei,uni      # some of them
    python -m benchmarks --list              # the commands, with their run times
    python -m benchmarks --no-warmup         # bench_scale without its warm-up call

Each entry runs as ``python -m benchmarks.<script> <arguments>`` in its own process,
one after the other (never two at once: they would share the cores). Its output
goes to ``<out>/<entry>.md`` (stderr to ``<out>/<entry>.log``), and
``<out>/summary.md`` lists the commands, their wall time and the load average before
and after each. Run it on a quiet machine: the harness notes when the load average
says otherwise.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

#: entry -> (script, arguments, wall time on the quiet machine of docs/performance.md:
#: the bench_scale entries measured there without warm-up, 50, 25, 10 and 5 min, and
#: doubled for the warm-up; about 3 h 25 min in all, three quarters bench_scale)
ENTRIES: dict[str, tuple[str, list[str], str]] = {
    "fei": ("bench_fei", ["--images", "8", "--skip-table"], "~5 min"),
    "fei_variants": ("bench_fei", ["--skip-speed"], "~15 min"),
    "uni": ("bench_uni", [], "~8 min"),
    "transmm": ("bench_transmm", [], "~10 min"),
    "metrics": ("bench_metrics", [], "~8 min"),
    "evaluate": ("bench_evaluate", [], "~6 min"),
    "scale_images": (
        "bench_scale",
        ["--only", "resnet50,vgg16,vit_hf,vit_timm,bert", "--parts", "methods,metrics"],
        "~1 h 40 min",
    ),
    "scale_memory": (
        "bench_scale",
        ["--only", "resnet50,vgg16,bert", "--parts", "memory"],
        "~5 min",
    ),
    "scale_lm": (
        "bench_scale",
        ["--only", "gpt2,pythia160m", "--parts", "methods", "--batch", "1"],
        "~28 min",
    ),
    "scale_lm_batch4": (
        "bench_scale",
        ["--only", "gpt2,pythia160m", "--parts", "methods", "--batch", "4"]
        + ["--methods", "uni"],
        "~20 min",
    ),
}

#: The settings every bench_scale entry shares (those of docs/performance.md).
SCALE_COMMON = ["--floor-chunks", "64", "--seq-len", "128"]


def command(entry: str, warmup: bool = True) -> list[str]:
    script, arguments, _ = ENTRIES[entry]
    extra = SCALE_COMMON if script == "bench_scale" else []
    if script == "bench_scale" and not warmup:
        extra = [*extra, "--no-warmup"]
    return [sys.executable, "-m", f"benchmarks.{script}", *arguments, *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", help=f"comma-separated subset of {','.join(ENTRIES)}")
    parser.add_argument(
        "--out",
        default="benchmark-results",
        help="folder for the outputs (default ./benchmark-results)",
    )
    parser.add_argument("--list", action="store_true", help="print the commands")
    parser.add_argument(
        "--no-warmup",
        dest="warmup",
        action="store_false",
        help="pass --no-warmup to the bench_scale entries: about half their time "
        "(90 min instead of about 2 h 30 min), the first call's one-off costs timed",
    )
    args = parser.parse_args()
    entries = list(ENTRIES) if not args.only else args.only.split(",")
    unknown = [e for e in entries if e not in ENTRIES]
    if unknown:
        parser.error(f"unknown entries {unknown}; choose from {','.join(ENTRIES)}")
    if args.list:
        for entry in entries:
            shown = " ".join(["python", *command(entry, args.warmup)[1:]])
            print(f"{entry}: {shown}  [{ENTRIES[entry][2]}]")
        return
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = [
        "| entry | command | wall time | load before → after |",
        "|---|---|---|---|",
    ]
    total = 0.0
    for entry in entries:
        load_before = os.getloadavg()[0]
        start = time.perf_counter()
        with (
            open(out / f"{entry}.md", "w") as stdout,
            open(out / f"{entry}.log", "w") as stderr,
        ):
            print(f"{entry}: {' '.join(command(entry, args.warmup)[1:])}", flush=True)
            result = subprocess.run(
                command(entry, args.warmup), cwd=ROOT, stdout=stdout, stderr=stderr
            )
        seconds = time.perf_counter() - start
        total += seconds
        status = (
            "" if result.returncode == 0 else f" (failed, code {result.returncode})"
        )
        print(f"  {seconds / 60:.1f} min{status}", flush=True)
        summary.append(
            f"| {entry}{status} | `python {' '.join(command(entry, args.warmup)[1:])}` | "
            f"{seconds / 60:.1f} min | {load_before:.1f} → {os.getloadavg()[0]:.1f} |"
        )
    summary.append(f"\ntotal {total / 60:.1f} min")
    (out / "summary.md").write_text("\n".join(summary) + "\n")
    print(f"total {total / 60:.1f} min; outputs in {out}/")


if __name__ == "__main__":
    main()
