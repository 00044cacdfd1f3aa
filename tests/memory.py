"""What bounds memory: the largest batch a model sees, and a call's peak memory."""

from __future__ import annotations

import ctypes
import gc
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from torch import nn


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


def _status_kb(key: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {key}")


def peak_memory_mb(fn: Callable[[], Any]) -> float:
    """Peak resident memory one call of ``fn`` adds, in MB (Linux only).

    The freed heap is returned to the system first (``malloc_trim``), then the
    process's high-water mark is reset (``/proc/self/clear_refs``), so the peak is
    the most memory the call held at any moment, not what earlier calls left behind.
    The same method as the benchmarks' (``benchmarks/_harness.py``).
    """
    clear_refs = Path("/proc/self/clear_refs")
    if not sys.platform.startswith("linux") or not clear_refs.exists():
        pytest.skip("peak memory is read from /proc (Linux only)")
    gc.collect()
    ctypes.CDLL("libc.so.6").malloc_trim(0)
    base = _status_kb("VmRSS")
    clear_refs.write_text("5")
    fn()
    return (_status_kb("VmHWM") - base) / 1024
