"""Files written so that a reader never sees half of one.

:func:`atomic_write` puts the bytes in a hidden temporary file next to the target,
named for the writing process (``.{name}.tmp-{pid}-{random}``, created exclusively),
flushes and ``fsync``-s it, renames it to the target with ``os.replace`` (atomic on
POSIX and Windows) and ``fsync``-s the folder. A process killed at any moment
(SIGKILL included) leaves the complete file or none under the target's name, plus
at worst a temporary file. The new file gets the usual permissions (the umask's).

While it writes, the process holds an exclusive ``flock`` on its temporary file
(POSIX), so :func:`remove_stale_temporary_files` can tell a leftover of a killed
process (unlocked: removed) from a file another live process is writing into the
same folder (locked: left alone).
"""

from __future__ import annotations

import contextlib
import os
import secrets
from collections.abc import Iterator
from pathlib import Path

TEMPORARY_GLOB = ".*.tmp-*"

try:
    import fcntl
except ImportError:  # Windows: no flock; temporary files are then never removed
    fcntl = None  # type: ignore[assignment]  # the module or None, checked where used


def _fsync_folder(folder: Path) -> None:
    if os.name != "posix":
        return
    descriptor = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def atomic_write(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}")
    descriptor = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(descriptor, "wb") as handle:
            if fcntl is not None:
                fcntl.flock(handle, fcntl.LOCK_EX)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
            os.replace(temporary, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temporary)
    _fsync_folder(path.parent)


@contextlib.contextmanager
def _unlocked(path: Path) -> Iterator[bool]:
    """Whether nobody holds ``path``'s lock; it stays taken inside the block."""
    try:
        handle = open(path, "rb")
    except FileNotFoundError:
        yield False
        return
    with handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            yield False
            return
        yield True


def remove_stale_temporary_files(folder: str | os.PathLike) -> list[Path]:
    """Remove the temporary files of :func:`atomic_write` in ``folder`` that no
    live process is writing (see the module docstring); return them."""
    folder = Path(folder)
    if fcntl is None or not folder.is_dir():
        return []
    removed = []
    for path in folder.glob(TEMPORARY_GLOB):
        with _unlocked(path) as stale:
            if stale:
                path.unlink(missing_ok=True)
                removed.append(path)
    return removed
