"""Throughput of ``captum_faithful.evaluate`` on 1 and 2 processes (gloo, CPU), and
its overhead over a bare loop doing the same work. Not run by CI.

Workload: UNI (``UnlearnedIntegratedGradients`` with its defaults; Captum
``IntegratedGradients`` with ``n_steps=15`` when UNI is not installed) scored by
``insertion_auc``, ``deletion_auc`` and ``saco`` with their defaults, on a small
ReLU CNN (3 conv layers 16/32/64 channels, 32×32 RGB inputs, 10 classes, random
weights) and random images, ``--batch-size`` images per batch.

Each configuration (bare loop or ``evaluate``; 1 process × 1 thread, 2 processes ×
1 thread on gloo, 1 process × 2 threads) is one call of ``benchmarks/_harness.py``'s
round-robin: it starts fresh processes, which build the workload, warm up (the bare
loop and ``evaluate`` on two batches, so first calls and the one-off pandas/pyarrow
imports are not timed), initialise the gloo group, and time one run on the wall
clock; the slowest rank's time is the configuration's. The configurations run
interleaved, ``--rounds`` rounds, median and within-round ratios. The 2-process
time is that of ``evaluate`` on a running group (sharding, batches, per-rank files,
barrier, merge on rank 0). Wall time is the point here: scaling over processes is
what a user waits for (on a loaded machine it is not what a quiet one gives).

    python -m benchmarks.bench_evaluate [--images 128] [--batch-size 16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks import _harness as harness

ROOT = Path(__file__).resolve().parents[1]
#: name -> (processes, threads per process, mode)
CONFIGURATIONS = {
    "bare 1x1": (1, 1, "bare"),
    "evaluate 1x1": (1, 1, "evaluate"),
    "evaluate 2x1": (2, 1, "evaluate"),
    "bare 1x2": (1, 2, "bare"),
    "evaluate 1x2": (1, 2, "evaluate"),
}


def build(n_images: int, batch_size: int):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from captum_faithful import UnlearnedIntegratedGradients
    from captum_faithful.demo.models import build_cnn
    from captum_faithful.metrics import deletion_auc, insertion_auc, saco

    torch.manual_seed(0)
    # The demo CNN's architecture; throughput does not depend on trained weights.
    model = build_cnn().eval()
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(n_images, 3, 32, 32, generator=generator)
    loader = DataLoader(TensorDataset(images), batch_size=batch_size)
    explainers = {"uni": UnlearnedIntegratedGradients(model)}
    metrics = {"insertion": insertion_auc, "deletion": deletion_auc, "saco": saco}
    return model, loader, explainers, metrics


def bare_loop(model, loader, explainers, metrics) -> None:
    """The same work as ``evaluate`` without files, settings or sharding."""
    import torch

    for (inputs,) in loader:
        with torch.no_grad():
            target = model(inputs).argmax(dim=1)
        for explainer in explainers.values():
            call = getattr(explainer, "attribute", explainer)
            attributions = call(inputs, target=target).detach()
            for metric in metrics.values():
                metric(model, inputs, attributions, target=target).tolist()


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from captum_faithful import evaluate

    harness.configure(threads=args.threads)
    model, loader, explainers, metrics = build(args.images, args.batch_size)
    _, warm, _, _ = build(args.batch_size * 2, args.batch_size)
    distributed = int(os.environ.get("WORLD_SIZE", "1")) > 1
    if distributed:
        dist.init_process_group("gloo")
    # warm-up: first calls, and the one-off imports of pandas/pyarrow by evaluate
    bare_loop(model, warm, explainers, metrics)
    evaluate(
        model,
        warm,
        explainers,
        metrics,
        out=Path(args.out) / "warm-up",
        show_progress=False,
    )
    if distributed:
        dist.barrier()
    start = harness.CLOCK()
    if args.mode == "bare":
        bare_loop(model, loader, explainers, metrics)
    else:
        evaluate(
            model,
            loader,
            explainers,
            metrics,
            out=Path(args.out) / "run",
            resume=False,
            show_progress=False,
        )
    seconds = harness.CLOCK() - start
    if distributed:
        dist.barrier()
        dist.destroy_process_group()
    print(json.dumps({"seconds": seconds}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(processes: int, threads: int, mode: str, args: argparse.Namespace) -> float:
    """Launch ``processes`` workers (torchrun's variables); the slowest rank's
    seconds for ``mode``."""
    out = tempfile.mkdtemp(prefix="bench_evaluate_")
    port = str(_free_port())
    command = [
        sys.executable,
        "-m",
        "benchmarks.bench_evaluate",
        "--worker",
        "--threads",
        str(threads),
        "--mode",
        mode,
        "--out",
        out,
        "--images",
        str(args.images),
        "--batch-size",
        str(args.batch_size),
    ]
    procs = []
    for rank in range(processes):
        env = dict(os.environ)
        if processes > 1:
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(processes),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        procs.append(
            subprocess.Popen(
                command, env=env, cwd=ROOT, stdout=subprocess.PIPE, text=True
            )
        )
    seconds = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark worker failed with code {proc.returncode}")
        seconds.append(json.loads(stdout.strip().splitlines()[-1])["seconds"])
    shutil.rmtree(out, ignore_errors=True)
    return max(seconds)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    harness.add_arguments(parser, rounds=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--mode", default="evaluate", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    print(harness.configure())
    _, _, explainers, _ = build(args.batch_size, args.batch_size)
    calls = {
        name: lambda p=processes, t=threads, m=mode: run(p, t, m, args)
        for name, (processes, threads, mode) in CONFIGURATIONS.items()
    }
    t = harness.interleave(calls, args.rounds, warmup=False, self_timed=True)
    method = next(iter(explainers))
    print(
        f"{args.images} images, batch {args.batch_size}, explainer {method!r}, "
        f"metrics insertion/deletion/saco; {args.rounds} interleaved rounds\n"
    )
    print("| run | processes × threads | wall s | images/s |")
    print("|---|---|---:|---:|")
    for name, (processes, threads, mode) in CONFIGURATIONS.items():
        print(
            f"| {'bare loop' if mode == 'bare' else 'evaluate'} | "
            f"{processes} × {threads} | {harness.seconds_cell(t, name)} | "
            f"{args.images / t.median(name):.1f} |"
        )
    scaling = harness.ratio_cell(t, "evaluate 1x1", "evaluate 2x1")
    print(
        f"\nscaling 1→2 processes (1 thread each): {scaling} "
        f"(linear = 2; target ≥ 1.8 = 0.9 of linear)"
    )
    for threads in (1, 2):
        overhead = [
            (r - 1) * 100
            for r in t.ratios(f"evaluate 1x{threads}", f"bare 1x{threads}")
        ]
        print(
            f"runner overhead vs bare loop, 1 process × {threads} thread(s): "
            f"{statistics.median(overhead):+.1f}% "
            f"({min(overhead):+.1f}% to {max(overhead):+.1f}%; target ≤ 5%)"
        )
    print(
        "2 processes × 1 thread vs 1 process × 2 threads: "
        f"{harness.ratio_cell(t, 'evaluate 1x2', 'evaluate 2x1')}"
    )
    print(f"\n({harness.load_note()})")


if __name__ == "__main__":
    main()
