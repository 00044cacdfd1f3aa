"""Files of an evaluation run: settings once, one immutable file per finished batch.

Layout of ``out``::

    settings.json                 written once when the run starts
    batches/batch-00000042.parquet  the rows of global batch 42 (``.csv`` without pyarrow)
    results.parquet               the merged table, written by rank 0 at the end

A batch file is never appended to or rewritten: its bytes go to a hidden temporary
file in the same folder, which is flushed, ``fsync``-ed, and then renamed to its final
name with ``os.replace`` (atomic on POSIX and Windows); the folder is ``fsync``-ed
after the rename. A process killed at any moment (SIGKILL included) therefore leaves
either the complete file or no file under the final name, never half a row that a
resumed run would trust. Leftover temporary files are ignored and removed on resume.
"""

from __future__ import annotations

import csv
import importlib.util
import io
import json
import os
import re
from collections.abc import Iterable
from pathlib import Path
from typing import Any

COLUMNS = ("index", "method", "metric", "value", "seconds")
SETTINGS_FILE = "settings.json"
BATCH_DIR = "batches"
RESULTS_STEM = "results"
_BATCH_NAME = re.compile(r"^batch-(\d{8})\.(parquet|csv)$")

Rows = dict[str, list]


def default_format() -> str:
    """The file format of new runs: Parquet when pyarrow is installed, else CSV."""
    return "parquet" if importlib.util.find_spec("pyarrow") is not None else "csv"


def empty_rows() -> Rows:
    return {column: [] for column in COLUMNS}


def _fsync_dir(folder: Path) -> None:
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that ``path`` is either absent or complete."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def encode(rows: Rows, file_format: str) -> bytes:
    """The bytes of a table with the columns of :data:`COLUMNS`."""
    if file_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        table = pa.table(
            {
                "index": pa.array(rows["index"], type=pa.int64()),
                "method": pa.array(rows["method"], type=pa.string()),
                "metric": pa.array(rows["metric"], type=pa.string()),
                "value": pa.array(rows["value"], type=pa.float64()),
                "seconds": pa.array(rows["seconds"], type=pa.float64()),
            }
        )
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        return sink.getvalue().to_pybytes()
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(COLUMNS)
    for row in zip(*(rows[column] for column in COLUMNS), strict=True):
        index, method, metric, value, seconds = row
        writer.writerow(
            [index, method, metric, repr(float(value)), repr(float(seconds))]
        )
    return text.getvalue().encode("utf-8")


def decode(path: Path) -> Rows:
    """Read a table written by :func:`encode` back into columns."""
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError as err:
            raise ImportError(
                f"{path} is a Parquet file; reading it needs pyarrow "
                "(`pip install pyarrow`)"
            ) from err
        table = pq.read_table(path)
        return {column: table.column(column).to_pylist() for column in COLUMNS}
    rows = empty_rows()
    with open(path, newline="", encoding="utf-8") as handle:
        reader = csv.reader(handle)
        header = next(reader, None)
        if tuple(header or ()) != COLUMNS:
            raise ValueError(f"{path} is not a results file: header {header!r}")
        for index, method, metric, value, seconds in reader:
            rows["index"].append(int(index))
            rows["method"].append(method)
            rows["metric"].append(metric)
            rows["value"].append(float(value))
            rows["seconds"].append(float(seconds))
    return rows


def concat(tables: Iterable[Rows]) -> Rows:
    merged = empty_rows()
    for table in tables:
        for column in COLUMNS:
            merged[column].extend(table[column])
    return merged


class RunStorage:
    """The files of one run under ``out`` (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, file_format: str | None = None) -> None:
        self.out = Path(out)
        self.batch_dir = self.out / BATCH_DIR
        self.settings_path = self.out / SETTINGS_FILE
        self.file_format = file_format or default_format()

    def results_path(self, file_format: str | None = None) -> Path:
        return self.out / f"{RESULTS_STEM}.{file_format or self.file_format}"

    def read_settings(self) -> dict[str, Any] | None:
        if not self.settings_path.exists():
            return None
        try:
            return json.loads(self.settings_path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as err:
            raise ValueError(
                f"{self.settings_path} is not valid JSON; it was not written by "
                "captum_faithful.evaluate"
            ) from err

    def write_settings(self, settings: dict[str, Any]) -> None:
        self.batch_dir.mkdir(parents=True, exist_ok=True)
        data = json.dumps(settings, indent=2, sort_keys=True) + "\n"
        atomic_write(self.settings_path, data.encode("utf-8"))

    def clear(self) -> None:
        """Delete every file a run writes (and nothing else) under ``out``."""
        for path in self._batch_files().values():
            path.unlink()
        self.remove_temporary_files()
        for suffix in ("parquet", "csv"):
            self.results_path(suffix).unlink(missing_ok=True)
        self.settings_path.unlink(missing_ok=True)

    def remove_temporary_files(self) -> None:
        for folder in (self.out, self.batch_dir):
            if folder.is_dir():
                for path in folder.glob(".*.tmp-*"):
                    path.unlink(missing_ok=True)

    def _batch_files(self) -> dict[int, Path]:
        if not self.batch_dir.is_dir():
            return {}
        files = {}
        for path in self.batch_dir.iterdir():
            match = _BATCH_NAME.match(path.name)
            if match:
                files[int(match.group(1))] = path
        return files

    def recorded_batches(self) -> list[int]:
        return sorted(self._batch_files())

    def write_batch(self, batch_id: int, rows: Rows) -> None:
        path = self.batch_dir / f"batch-{batch_id:08d}.{self.file_format}"
        atomic_write(path, encode(rows, self.file_format))

    def read_batches(self) -> Rows:
        files = self._batch_files()
        return concat(decode(files[batch_id]) for batch_id in sorted(files))

    def write_results(self, rows: Rows) -> Path:
        path = self.results_path()
        atomic_write(path, encode(rows, self.file_format))
        return path

    def read_results(self) -> Rows:
        """The merged table if rank 0 wrote it, else the batches recorded so far."""
        for suffix in ("parquet", "csv"):
            path = self.results_path(suffix)
            if path.exists():
                return decode(path)
        return self.read_batches()
