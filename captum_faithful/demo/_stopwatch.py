"""The demo's one clock: wall seconds and CPU seconds (this process, every thread).

The job times its steps with it (each lap since the previous one) and the training
functions their phases (a lap around each); both records have the same two keys,
``wall_seconds`` and ``cpu_seconds``, which the report reads and the model caches'
``meta.json`` keeps.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager


class Stopwatch:
    """Wall and CPU seconds since the previous lap, and of named phases."""

    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        self.started = self.wall
        self.phases: dict[str, dict[str, float]] = {}

    def elapsed(self) -> float:
        """Wall seconds since the stopwatch was made."""
        return time.perf_counter() - self.started

    def lap(self) -> dict[str, float]:
        """``{"wall_seconds", "cpu_seconds"}`` since the previous lap (or since the
        stopwatch was made); the next lap starts now."""
        wall, cpu = time.perf_counter(), time.process_time()
        lap = {"wall_seconds": wall - self.wall, "cpu_seconds": cpu - self.cpu}
        self.wall, self.cpu = wall, cpu
        return lap

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        """Time the block as the phase ``name`` (kept in :attr:`phases`), also when
        it raises."""
        self.lap()
        try:
            yield
        finally:
            self.phases[name] = self.lap()

    def total(self, key: str) -> float:
        """The sum of ``key`` (``"wall_seconds"`` or ``"cpu_seconds"``) over the
        phases."""
        return sum(phase[key] for phase in self.phases.values())
