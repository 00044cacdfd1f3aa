"""Throughput of ``captum_faithful.evaluate`` on 1 and 2 processes (gloo, CPU), and
its overhead over a bare loop doing the same work. Not run by CI.

Workload: UNI (``UnlearnedIntegratedGradients`` with its defaults; Captum
``IntegratedGradients`` with ``n_steps=15`` when UNI is not installed) scored by
``insertion_auc``, ``deletion_auc`` and ``saco`` with their defaults, on a small
ReLU CNN (3 conv layers 16/32/64 channels, 32×32 RGB inputs, 10 classes, random
weights) and random images, ``--batch-size`` images per batch.

Every configuration runs in fresh processes with a fixed number of torch intra-op
threads, after a warm-up (the bare loop and ``evaluate`` on two batches, so first
calls and the one-off pandas/pyarrow imports are not timed); each timed run is done
twice per process, the processes are launched ``--repeats`` times, interleaved, and
the fastest run is reported (the machine may be shared). CPU time is summed over the
ranks: unlike wall time it is not inflated by other processes on a shared machine. The 2-process run
initialises the gloo group and warms up before the clock starts, so its time is that
of ``evaluate`` on a running group (sharding, batches, per-rank files, barrier,
merge on rank 0).

    python benchmarks/bench_evaluate.py [--images 128] [--batch-size 16] [--repeats 3]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


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
    import torch
    import torch.distributed as dist

    from captum_faithful import evaluate

    torch.set_num_threads(args.threads)
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
    timings, cpu = {}, {}
    for mode in args.modes.split(","):
        out = Path(args.out) / mode
        start, cpu_start = time.perf_counter(), time.process_time()
        if mode == "bare":
            bare_loop(model, loader, explainers, metrics)
        else:
            evaluate(
                model,
                loader,
                explainers,
                metrics,
                out=out,
                resume=False,
                show_progress=False,
            )
        elapsed, cpu_elapsed = (
            time.perf_counter() - start,
            time.process_time() - cpu_start,
        )
        timings[mode] = min(timings.get(mode, float("inf")), elapsed)
        cpu[mode] = min(cpu.get(mode, float("inf")), cpu_elapsed)
        if distributed:
            dist.barrier()
    if distributed:
        dist.destroy_process_group()
    rank = int(os.environ.get("RANK", "0"))
    print(json.dumps({"rank": rank, "timings": timings, "cpu": cpu}))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(
    processes: int, threads: int, modes: str, args: argparse.Namespace
) -> tuple[dict, dict]:
    """Launch ``processes`` workers (torchrun's variables); per mode, the wall time of
    the slowest rank and the CPU time summed over the ranks."""
    out = tempfile.mkdtemp(prefix="bench_evaluate_")
    port = str(_free_port())
    env_base = {
        **os.environ,
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    command = [
        sys.executable,
        __file__,
        "--worker",
        "--threads",
        str(threads),
        "--modes",
        modes,
        "--out",
        out,
        "--images",
        str(args.images),
        "--batch-size",
        str(args.batch_size),
    ]
    procs = []
    for rank in range(processes):
        env = dict(env_base)
        if processes > 1:
            env.update(
                RANK=str(rank),
                LOCAL_RANK=str(rank),
                WORLD_SIZE=str(processes),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        procs.append(
            subprocess.Popen(command, env=env, stdout=subprocess.PIPE, text=True)
        )
    reports = []
    for proc in procs:
        stdout, _ = proc.communicate()
        if proc.returncode != 0:
            raise RuntimeError(f"benchmark worker failed with code {proc.returncode}")
        reports.append(json.loads(stdout.strip().splitlines()[-1]))
    shutil.rmtree(out, ignore_errors=True)
    modes_run = set(modes.split(","))
    wall = {m: max(r["timings"][m] for r in reports) for m in modes_run}
    cpu = {m: sum(r["cpu"][m] for r in reports) for m in modes_run}
    return wall, cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--modes", default="bare,evaluate", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    _, _, explainers, _ = build(args.batch_size, args.batch_size)
    load_before = os.getloadavg()[0]
    configurations = [
        ("1 process", 1, 1, "bare,evaluate,bare,evaluate"),
        ("2 processes (gloo)", 2, 1, "evaluate,evaluate"),
        ("1 process", 1, 2, "bare,evaluate,bare,evaluate"),
    ]
    best: dict[tuple, float] = {}
    best_cpu: dict[tuple, float] = {}
    for _ in range(args.repeats):
        for label, processes, threads, modes in configurations:
            wall, cpu = run(processes, threads, modes, args)
            for mode in wall:
                key = (label, threads, mode)
                best[key] = min(best.get(key, float("inf")), wall[mode])
                best_cpu[key] = min(best_cpu.get(key, float("inf")), cpu[mode])

    method = next(iter(explainers))
    print(
        f"{args.images} images, batch {args.batch_size}, explainer {method!r}, "
        "metrics insertion/deletion/saco; best of "
        f"{args.repeats} repeats; load average {load_before:.1f} at the start, "
        f"{os.getloadavg()[0]:.1f} at the end on {os.cpu_count()} CPUs\n"
    )
    print("| run | processes × threads | wall s | images/s | CPU ms/image |")
    print("|---|---|---:|---:|---:|")
    for key in sorted(best, key=lambda k: (k[1], k[0], k[2])):
        label, threads, mode = key
        processes = 2 if label.startswith("2") else 1
        seconds = best[key]
        print(
            f"| {'bare loop' if mode == 'bare' else 'evaluate'} | "
            f"{processes} × {threads} | {seconds:.2f} | {args.images / seconds:.1f} | "
            f"{1000 * best_cpu[key] / args.images:.1f} |"
        )
    one = best["1 process", 1, "evaluate"]
    two = best["2 processes (gloo)", 1, "evaluate"]
    one_cpu = best_cpu["1 process", 1, "evaluate"]
    two_cpu = best_cpu["2 processes (gloo)", 1, "evaluate"]
    print(
        f"\nscaling 1→2 processes (1 thread each), wall clock: {one / two:.2f}× "
        f"= {one / two / 2:.2f} of linear (target ≥ 0.9)"
    )
    print(
        "work efficiency of 2 processes (CPU time of 1 process / total CPU time "
        f"of 2): {one_cpu / two_cpu:.2f} (wall-clock scaling on 2 free cores is "
        "bounded by 2 × this)"
    )
    for threads in (1, 2):
        key_bare, key_run = (
            ("1 process", threads, "bare"),
            ("1 process", threads, "evaluate"),
        )
        print(
            f"runner overhead vs bare loop, 1 process × {threads} thread(s): wall "
            f"{(best[key_run] / best[key_bare] - 1) * 100:+.1f}%, CPU "
            f"{(best_cpu[key_run] / best_cpu[key_bare] - 1) * 100:+.1f}% "
            "(target ≤ 5%)"
        )
    print(
        "2 processes × 1 thread vs 1 process × 2 threads: "
        f"{best['1 process', 2, 'evaluate'] / two:.2f}×"
    )


if __name__ == "__main__":
    main()
