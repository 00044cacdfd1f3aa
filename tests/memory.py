"""What bounds memory: the largest batch a model sees, and a call's peak memory."""

from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch import nn

from benchmarks._harness import peak_memory_mb as harness_peak_memory_mb


class LargestBatch:
    """Records the largest leading dimension of the first input ``module`` sees
    (a forward pre-hook, removed on exit)."""

    def __init__(self, module: nn.Module) -> None:
        self.module = module
        self.largest = 0

    def _hook(self, module: nn.Module, args: tuple) -> None:
        if args:
            self.largest = max(self.largest, args[0].shape[0])

    def __enter__(self) -> LargestBatch:
        self._handle = self.module.register_forward_pre_hook(self._hook)
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self._handle.remove()


def peak_memory_mb(fn: Callable[[], Any]) -> float:
    """Peak resident memory one call of ``fn`` adds, in MB (Linux only): the
    benchmarks' measurement (:func:`benchmarks._harness.peak_memory_mb`: freed heap
    returned first, high-water mark reset, so the peak is the most memory the call
    held at any moment), skipping the test where ``/proc`` cannot say."""
    clear_refs = Path("/proc/self/clear_refs")
    if not sys.platform.startswith("linux") or not clear_refs.exists():
        pytest.skip("peak memory is read from /proc (Linux only)")
    peak = harness_peak_memory_mb(fn)
    assert peak is not None
    return peak
