"""The benchmark harness (``benchmarks/_harness.py``): round-robin order, the median
and the within-round ratio, derived floors and the memory reading. Fake callables
and a fake clock; no timed assertion.

The harness is loaded from its file, so this test does not depend on the repository
root being importable."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "benchmarks" / "_harness.py"
_spec = importlib.util.spec_from_file_location("bench_harness_under_test", _PATH)
harness = importlib.util.module_from_spec(_spec)
sys.modules[_spec.name] = harness  # dataclasses look their module up there
_spec.loader.exec_module(harness)


class FakeClock:
    """A clock that only moves when a scripted call says so."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def scripted(clock: FakeClock, log: list[str], name: str, durations: list[float]):
    """A call that logs its name and advances the clock by its next duration."""
    calls = iter(durations)

    def call() -> None:
        log.append(name)
        clock.now += next(calls)

    return call


def test_round_robin_order_rotates_after_an_untimed_warm_up():
    clock, log = FakeClock(), []
    calls = {name: scripted(clock, log, name, [1.0] * 4) for name in "abc"}
    timings = harness.interleave(calls, rounds=3, clock=clock)
    expected = list("abc") + list("abc") + list("bca") + list("cab")
    assert log == expected
    assert [name for _, name in timings.order] == expected
    assert [r for r, _ in timings.order] == [-1] * 3 + [0] * 3 + [1] * 3 + [2] * 3
    # every round is reported in the callers' order, whatever order it ran in
    assert all(list(r) == list("abc") for r in timings.rounds)


def test_without_warm_up_every_call_runs_rounds_times():
    clock, log = FakeClock(), []
    calls = {name: scripted(clock, log, name, [1.0] * 2) for name in "ab"}
    harness.interleave(calls, rounds=2, warmup=False, clock=clock)
    assert log == list("ab") + list("ba")


def test_median_spread_and_the_ratio_within_rounds():
    clock, log = FakeClock(), []
    # first duration of each is the warm-up (untimed): 100 would show up if timed
    a = scripted(clock, log, "a", [100.0, 1.0, 5.0, 3.0])
    b = scripted(clock, log, "b", [100.0, 2.0, 2.0, 6.0])
    timings = harness.interleave({"a": a, "b": b}, rounds=3, clock=clock)
    assert timings.values("a") == [1.0, 5.0, 3.0]
    assert timings.values("b") == [2.0, 2.0, 6.0]
    assert timings.median("a") == 3.0
    assert timings.spread("a") == (1.0, 5.0)
    # the ratio is the median of the rounds' own ratios (0.5, 2.5, 0.5), not the
    # ratio of the medians (3 / 2)
    assert timings.ratios("a", "b") == [0.5, 2.5, 0.5]
    assert timings.ratio("a", "b") == 0.5
    assert harness.ratio_cell(timings, "a", "b") == "0.5 (0.5–2.5)"
    assert harness.ratio_cell(timings, "a", "missing") == "–"


def test_derived_floor_is_summed_within_each_round():
    clock, log = FakeClock(), []
    calls = {
        "method": scripted(clock, log, "method", [0.0, 12.0, 30.0]),
        "pass": scripted(clock, log, "pass", [0.0, 1.0, 2.0]),
        "path": scripted(clock, log, "path", [0.0, 2.0, 5.0]),
    }
    timings = harness.interleave(calls, rounds=2, clock=clock)
    timings.derive("floor", {"pass": 10, "path": 1})
    assert timings.values("floor") == [12.0, 25.0]
    assert timings.ratios("method", "floor") == [1.0, 1.2]


def test_self_timed_calls_report_their_own_seconds():
    seconds = iter([9.0, 4.0, 8.0])
    timings = harness.interleave(
        {"a": lambda: next(seconds)}, rounds=2, self_timed=True
    )
    assert timings.values("a") == [4.0, 8.0]


def test_arguments_are_checked():
    with pytest.raises(ValueError, match="rounds"):
        harness.interleave({"a": lambda: None}, rounds=0)
    with pytest.raises(ValueError, match="calls"):
        harness.interleave({}, rounds=1)


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="peak memory is Linux only"
)
def test_peak_memory_is_read_in_the_warm_up_call():
    size_mb = 128

    def allocate() -> None:
        torch.ones(size_mb * 2**20 // 4)  # float32, every page written

    state = {"calls": 0}

    def allocate_only_after_the_first_call() -> None:
        state["calls"] += 1
        if state["calls"] > 1:
            allocate()

    timings = harness.interleave(
        {"big": allocate, "late": allocate_only_after_the_first_call},
        rounds=1,
        peaks=True,
    )
    assert timings.peaks["big"] > 0.8 * size_mb
    assert timings.peaks["late"] < 0.25 * size_mb
    # a second call does not inherit the first one's high-water mark
    assert harness.peak_memory_mb(lambda: None) < 0.25 * size_mb


def test_small_cnn_is_deterministic_and_in_eval_mode():
    first, second = harness.small_cnn(), harness.small_cnn()
    assert not first.training
    x = torch.rand(2, 3, 32, 32)
    assert torch.equal(first(x), second(x))
    assert first(x).shape == (2, 10)


def test_benchmarks_package_sets_one_thread_only_before_torch():
    root = _PATH.parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "4"}
    show = "import os; print(os.environ['OMP_NUM_THREADS'])"
    outputs = [
        subprocess.run(
            [sys.executable, "-c", code + show],
            cwd=root,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for code in ("import benchmarks; ", "import torch, benchmarks; ")
    ]
    # before torch: one thread; after torch (as in a test session): left alone
    assert outputs == ["1", "4"]
