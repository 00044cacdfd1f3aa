"""The ranks of a distributed evaluation: torch.distributed, set up and torn down.

:func:`process_group` joins the process group a launcher such as ``torchrun``
describes (or one the caller initialised), with ``nccl`` for CUDA devices and
``gloo`` otherwise, and destroys it on exit if it created it; without a launcher it
is a group of one process. :class:`ProcessGroup` offers the three collective steps
:func:`captum_faithful.evaluate` needs: compute on rank 0 and broadcast, gather, and
fail on every rank when one rank failed.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.distributed as dist


class ProcessGroup:
    """The ranks of a run; a group of one when torch.distributed is not in use."""

    def __init__(self, distributed: bool) -> None:
        self.distributed = distributed
        self.rank = dist.get_rank() if distributed else 0
        self.size = dist.get_world_size() if distributed else 1

    def broadcast(self, compute: Callable[[], Any]) -> Any:
        """``compute()`` on rank 0, its result on every rank; an exception raised by
        ``compute`` is raised on every rank."""
        payload: tuple[Any, Exception | None] | None
        try:
            payload = (compute(), None) if self.rank == 0 else None
        except Exception as err:  # noqa: BLE001 - sent to every rank, then raised
            payload = (None, err)
        if self.distributed:
            box = [payload]
            dist.broadcast_object_list(box, src=0)
            payload = box[0]
        # set on every rank now: computed on rank 0, broadcast to the others
        value, error = cast(tuple[Any, Exception | None], payload)
        if error is not None:
            raise error
        return value

    def all_gather(self, value: Any) -> list[Any]:
        if not self.distributed:
            return [value]
        gathered = [None] * self.size
        dist.all_gather_object(gathered, value)
        return gathered

    def raise_if_any_failed(self, failure: BaseException | None) -> None:
        """Raise ``failure`` here, or an error naming the rank that failed."""
        reports = self.all_gather(None if failure is None else repr(failure))
        if failure is not None:
            raise failure
        for rank, report in enumerate(reports):
            if report is not None:
                raise RuntimeError(f"evaluate failed on rank {rank}: {report}")


def launcher_environment() -> bool:
    needed = ("RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")
    return (
        all(key in os.environ for key in needed) and int(os.environ["WORLD_SIZE"]) > 1
    )


@contextmanager
def process_group(device: torch.device) -> Iterator[ProcessGroup]:
    if not dist.is_available() or not (dist.is_initialized() or launcher_environment()):
        yield ProcessGroup(distributed=False)
        return
    owned = not dist.is_initialized()
    if owned:
        backend = "nccl" if device.type == "cuda" else "gloo"
        if backend == "nccl":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=backend)
    try:
        yield ProcessGroup(distributed=True)
    finally:
        if owned:
            dist.destroy_process_group()
