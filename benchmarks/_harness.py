"""How every benchmark measures: one clock, one statistic, one memory method.

Each script in ``benchmarks/`` states what it compares (which calls, which floor,
which reference tool) and leaves the measuring to this module:

- **One thread per process.** ``benchmarks/__init__.py`` sets ``OMP_NUM_THREADS``
  (and MKL's, OpenBLAS's) to 1 before torch is imported, and :func:`configure` sets
  ``torch.set_num_threads(1)``. A method's cost is then its work, not how well it
  spreads over cores, and runs on machines with other core counts compare.
- **Interleaved.** :func:`interleave` runs the compared calls round-robin: a warm-up
  round (first-call costs, lazy imports, the allocator's first growth; untimed),
  then ``rounds`` timed rounds, each call once per round. Round ``r`` starts at call
  ``r mod n`` (the order rotates), so no call always runs right after the same other
  call, and a change in the machine's load hits every call alike.
- **One clock: wall time,** ``time.perf_counter`` around each call. With one thread
  per process and a quiet machine it equals the CPU time; unlike CPU time it also
  counts what a user waits for that is not this process's computation (page faults
  served by the kernel are in both; file writes, barriers between processes and
  waiting for a worker are only in wall time), and ``bench_evaluate`` needs it for
  its scaling over processes. On a loaded machine wall time is inflated: the scripts
  print the load average before and after, and runs under load are marked as such.
- **One statistic: the median over the rounds,** with the spread (lowest and highest
  round) next to it. Ratios (to the floor, to Captum, to Quantus) are the median over
  the rounds of the ratio *within* each round, where both calls ran next to each
  other: a drift of the machine's speed between rounds cancels, which a ratio of two
  medians (or of two minima, possibly from different rounds) does not.
- **Peak memory, one way:** :func:`peak_memory_mb`. Before the call the process
  collects garbage, returns freed heap pages to the system (glibc ``malloc_trim``),
  reads its resident set ``VmRSS`` and resets its high-water mark ``VmHWM`` (writing
  ``5`` to ``/proc/self/clear_refs``); after it, the peak is ``VmHWM`` minus that
  ``VmRSS``: the most resident memory the call added at any moment, the model, the
  inputs and earlier results excluded. Linux only (``None`` elsewhere). It is read
  in the warm-up call, never in a timed one (the trim would make the timed call pay
  page faults again), so it costs no extra call. Compared with the alternatives
  the scripts used before: ``ru_maxrss`` cannot be reset, so it needs a fresh process
  per call; glibc ``mallinfo2`` polled from a thread counts bytes allocated, not
  pages touched, and misses peaks between two polls.
- **The allocator, fixed for every script** (:func:`fix_allocator`, glibc
  ``mallopt``): blocks up to 32 MB come from the heap, which is never trimmed by
  itself. With glibc's default, adaptive thresholds a call's time depends on whether
  the calls before it left its activations to be served by fresh ``mmap`` pages; the
  page faults moved a floor by up to 30% between runs of ``bench_fei``.
- **Ratios printed** by :func:`ratio_cell` as ``median (lowest–highest round)``.

Why not ``torch.utils.benchmark.Timer`` with ``Compare``: ``Timer`` measures one
statement at a time (``blocked_autorange`` repeats it in blocks before the next
statement runs), so the compared calls are not interleaved and a change of load
between statements biases their ratio; it sizes its blocks by itself (a call of
several seconds gets one run); ``Compare`` tabulates times but has no ratio to a
floor computed within a round and no peak memory. Interleaving, the in-round ratio
and the memory reading are what these benchmarks need, and they take a few dozen
lines here.

The shared models (:func:`small_cnn`, :func:`small_vit`, :func:`hf_vit`,
:func:`sparse_saes`) are built here too, so the scripts that compare on the same
model build the same one.
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import os
import platform
import statistics
import sys
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from captum_faithful import _utils

#: The clock of every timing (see the module docstring).
CLOCK: Callable[[], float] = time.perf_counter

#: Whether :func:`configure` fixed the allocator (None: not configured yet).
_allocator_fixed: bool | None = None


# --------------------------------------------------------------- the process


def fix_allocator() -> bool:
    """Serve blocks up to 32 MB from glibc's heap and never trim it (``mallopt``),
    so that no timed call pays page faults for memory an earlier call freed.
    Returns False where that is not available (not glibc)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    m_trim_threshold, m_mmap_threshold = -1, -3
    return bool(
        libc.mallopt(m_mmap_threshold, 32 * 1024 * 1024)
        and libc.mallopt(m_trim_threshold, 2**30)
    )


def configure(threads: int = 1) -> str:
    """Set up the process for measuring and return a one-line description of it.

    Fixes the allocator (once) and sets torch's intra-op threads to ``threads`` (1
    for every benchmark but ``bench_evaluate``'s one-process-two-threads run). Warns
    on stderr when ``OMP_NUM_THREADS`` is not 1, i.e. when torch was imported before
    ``benchmarks`` (run the scripts as ``python -m benchmarks.bench_x``).
    """
    global _allocator_fixed
    if _allocator_fixed is None:
        _allocator_fixed = fix_allocator()
    torch.set_num_threads(threads)
    if os.environ.get("OMP_NUM_THREADS") != "1":
        print(
            "warning: OMP_NUM_THREADS is not 1; run the benchmarks as "
            "`python -m benchmarks.bench_x` from the repository root",
            file=sys.stderr,
        )
    return describe_machine()


def describe_machine() -> str:
    """torch version, threads, CPU, load average: the header line of every table."""
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    fixed = bool(_allocator_fixed)
    return (
        f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), "
        f"{os.cpu_count()} CPU(s) ({cpu}), load average {load:.1f}, "
        f"allocator thresholds fixed: {fixed}"
    )


def load_note() -> str:
    """The load average now, and whether it says the machine was busy."""
    if not hasattr(os, "getloadavg"):
        return ""
    load = os.getloadavg()[0]
    busy = load > max(1.0, (os.cpu_count() or 1) - 0.5)
    return f"load average {load:.1f}" + (" (machine under load)" if busy else "")


def add_arguments(parser: argparse.ArgumentParser, rounds: int) -> None:
    """The option every script shares: ``--rounds`` (timed rounds after warm-up)."""
    parser.add_argument(
        "--rounds",
        type=int,
        default=rounds,
        help=f"timed round-robin rounds after one warm-up round (default {rounds})",
    )


# ------------------------------------------------------------------- timing


@dataclass
class Timings:
    """Seconds of every call in every timed round, and peak memory per call.

    ``rounds[r][name]`` is the time of ``name`` in round ``r``; ``order`` lists the
    calls in the order they ran, warm-up included, as ``(round, name)`` with round
    ``-1`` for the warm-up.
    """

    rounds: list[dict[str, float]]
    peaks: dict[str, float | None] = field(default_factory=dict)
    order: list[tuple[int, str]] = field(default_factory=list)

    def names(self) -> list[str]:
        return list(self.rounds[0])

    def __contains__(self, name: str) -> bool:
        return bool(self.rounds) and name in self.rounds[0]

    def values(self, name: str) -> list[float]:
        return [r[name] for r in self.rounds]

    def median(self, name: str) -> float:
        """Median over the rounds of ``name``'s seconds."""
        return statistics.median(self.values(name))

    def spread(self, name: str) -> tuple[float, float]:
        """Lowest and highest round of ``name``'s seconds."""
        values = self.values(name)
        return min(values), max(values)

    def ratios(self, name: str, reference: str) -> list[float]:
        """``name`` over ``reference`` within each round."""
        return [r[name] / r[reference] for r in self.rounds]

    def ratio(self, name: str, reference: str) -> float:
        """Median over the rounds of ``name``'s time over ``reference``'s in the same
        round (robust to the machine's speed drifting between rounds)."""
        return statistics.median(self.ratios(name, reference))

    def derive(self, name: str, weights: Mapping[str, float]) -> None:
        """Add ``name``, in each round the weighted sum of other calls of that round
        (a floor made of several timed parts, e.g. 10 passes + a path)."""
        for r in self.rounds:
            r[name] = sum(w * r[part] for part, w in weights.items())

    def update(self, other: Timings) -> None:
        """Add the calls of ``other`` (timed in as many rounds) to these rounds."""
        if len(other.rounds) != len(self.rounds):
            raise ValueError("Timings.update needs the same number of rounds")
        for mine, theirs in zip(self.rounds, other.rounds, strict=True):
            mine.update(theirs)
        self.peaks.update(other.peaks)
        self.order += other.order


def interleave(
    calls: Mapping[str, Callable[[], Any]],
    rounds: int,
    *,
    warmup: bool = True,
    peaks: bool = False,
    self_timed: bool = False,
    clock: Callable[[], float] | None = None,
) -> Timings:
    """Time ``calls`` round-robin (see the module docstring).

    Args:
        calls: name -> zero-argument callable; the compared calls.
        rounds: timed rounds (each call once per round) after the warm-up round.
        warmup: run every call once, untimed, before the rounds. Only the longest
            benchmarks (minutes per call) turn it off.
        peaks: read each call's peak memory (:func:`peak_memory_mb`) in its warm-up
            call, or in its first timed call without a warm-up.
        self_timed: the callables return their own seconds (a float) instead of
            being timed here: for calls that start processes and time the work
            inside them, after their own warm-up.
        clock: the clock (default :data:`CLOCK`; the tests pass a fake one).
    """
    if rounds < 1:
        raise ValueError(f"rounds must be at least 1, got {rounds}")
    if not calls:
        raise ValueError("calls must name at least one call")
    clock = CLOCK if clock is None else clock
    names = list(calls)
    result = Timings(rounds=[])

    def timed(name: str) -> float:
        gc.collect()
        if self_timed:
            return float(calls[name]())
        start = clock()
        calls[name]()
        return clock() - start

    if warmup:
        for name in names:
            result.order.append((-1, name))
            if peaks:
                result.peaks[name] = peak_memory_mb(calls[name])
            else:
                calls[name]()
    for r in range(rounds):
        seconds: dict[str, float] = {}
        start = r % len(names)
        for name in names[start:] + names[:start]:
            result.order.append((r, name))
            if peaks and not warmup and r == 0:
                seconds[name] = _timed_with_peak(calls[name], result, name, clock)
            else:
                seconds[name] = timed(name)
        # keep the callers' order in the table, whatever order the round ran in
        result.rounds.append({name: seconds[name] for name in names})
    return result


def _timed_with_peak(
    fn: Callable[[], Any], result: Timings, name: str, clock: Callable[[], float]
) -> float:
    holder: dict[str, float] = {}

    def run() -> None:
        start = clock()
        fn()
        holder["s"] = clock() - start

    result.peaks[name] = peak_memory_mb(run)
    return holder["s"]


# ------------------------------------------------------------------- memory


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_memory_mb(fn: Callable[[], Any]) -> float | None:
    """Peak resident memory one call of ``fn`` adds, in MB; ``None`` off Linux.

    See the module docstring: ``malloc_trim``, reset of ``VmHWM``, then ``VmHWM``
    minus the resident set before the call.
    """
    clear_refs = Path("/proc/self/clear_refs")
    if not sys.platform.startswith("linux") or not clear_refs.exists():
        fn()
        return None
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kb("VmRSS")
    clear_refs.write_text("5")
    fn()
    return (_status_kb("VmHWM") - base) / 1024


# ------------------------------------------------------------------- models


def small_cnn(n_classes: int = 10, pool: int = 1, seed: int | None = 0) -> nn.Module:
    """A small ReLU CNN for 3xHxW images (3 convolutions, 16/32/64 channels, an
    adaptive average pool to ``pool x pool``, a linear head), random weights, eval."""
    if seed is not None:
        torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(pool),
        nn.Flatten(),
        nn.Linear(64 * pool * pool, n_classes),
    ).eval()


def small_vit(n_classes: int = 10, seed: int = 0) -> nn.Module:
    """A small timm ViT for 3x32x32 images (patch 4, width 64, 4 blocks, 4 heads),
    random weights, eval."""
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(seed)
    return VisionTransformer(
        img_size=32,
        patch_size=4,
        embed_dim=64,
        depth=4,
        num_heads=4,
        num_classes=n_classes,
    ).eval()


#: Hugging Face ViT sizes at 224x224, patch 16, 12 blocks.
HF_VIT_SIZES = {
    "tiny": dict(hidden_size=192, num_attention_heads=3, intermediate_size=768),
    "base": dict(hidden_size=768, num_attention_heads=12, intermediate_size=3072),
}


def hf_vit(size: str = "base", seed: int = 0) -> nn.Module:
    """A Hugging Face ``ViTForImageClassification`` with random weights, 224x224,
    patch 16, 12 blocks, 1000 classes: ViT-Ti/16- (``"tiny"``) or ViT-B/16-sized
    (``"base"``). Timings and memory do not depend on the weights."""
    from transformers import ViTConfig, ViTForImageClassification

    torch.manual_seed(seed)
    config = ViTConfig(
        **HF_VIT_SIZES[size],
        num_hidden_layers=12,
        image_size=224,
        patch_size=16,
        num_labels=1000,
    )
    return ViTForImageClassification(config).eval()


def sparse_saes(
    hidden: int,
    blocks: Iterable[int],
    expansion: int,
    architecture: str = "standard",
    k: int = 128,
) -> dict[int, nn.Module]:
    """sae-lens SAEs with random weights, one per block, in eval mode.

    ``"standard"`` SAEs get their encoder bias shifted so that about 2% of the
    features fire, as in trained SAEs with an L0 of a few hundred (the gating cost
    depends on the sparsity); ``"topk"`` SAEs keep ``k`` features per token.
    """
    import sae_lens

    saes: dict[int, nn.Module] = {}
    for block in blocks:
        if architecture == "standard":
            config = sae_lens.StandardSAEConfig(d_in=hidden, d_sae=expansion * hidden)
            sae = sae_lens.StandardSAE(config)
            with torch.no_grad():
                sae.b_enc.fill_(-2.0 * sae.W_enc.norm(dim=0).mean())
        elif architecture == "topk":
            config = sae_lens.TopKSAEConfig(d_in=hidden, d_sae=expansion * hidden, k=k)
            sae = sae_lens.TopKSAE(config)
        else:
            raise ValueError(
                f"architecture must be 'standard' or 'topk', got {architecture!r}"
            )
        saes[block] = sae.eval()
    return saes


# ----------------------------------------------------------------- printing


def seconds_cell(timings: Timings, name: str) -> str:
    """``median (lowest–highest)`` of ``name``'s seconds."""
    low, high = timings.spread(name)
    if len(timings.rounds) == 1:
        return f"{timings.median(name):.3g}"
    return f"{timings.median(name):.3g} ({low:.3g}–{high:.3g})"


def ratio_cell(timings: Timings, name: str, reference: str) -> str:
    """``median (lowest–highest)`` over the rounds of ``name`` / ``reference``
    within each round; ``–`` when either was not timed."""
    if name not in timings or reference not in timings:
        return "–"
    values = timings.ratios(name, reference)
    median = statistics.median(values)
    if len(values) == 1:
        return f"{median:.3g}"
    return f"{median:.3g} ({min(values):.3g}–{max(values):.3g})"


def peak_cell(timings: Timings, name: str) -> str:
    peak = timings.peaks.get(name)
    return "–" if peak is None else f"{peak:.0f}"


def markdown_table(rows: list[Mapping[str, Any]], keys: list[str] | None = None) -> str:
    """A markdown table of ``rows``, one column per key (floats to 3 significant
    digits, a missing value as ``–``), written by the package's table writer."""
    keys = list(rows[0]) if keys is None else keys

    def cell(value: Any) -> str:
        if value is None:
            return "–"
        if isinstance(value, float):
            return f"{value:.3g}" if abs(value) < 1000 else f"{value:.0f}"
        return str(value)

    cells = ([cell(row.get(k)) for k in keys] for row in rows)
    return _utils.markdown_table(keys, cells, text_columns=len(keys))
