"""Files of an evaluation run: settings once, one immutable file per finished batch.

Layout of ``out``::

    settings.json                 written once when the run starts
    batches/batch-00000042.parquet  the rows of global batch 42 (``.csv`` without pyarrow)
    results.parquet               the merged table, written by rank 0 at the end

Every file is written with :func:`captum_faithful._files.atomic_write`: a process
killed at any moment leaves either the complete file or no file under the final
name, never half a row that a resumed run would trust. The tables are encoded,
decoded and concatenated by pandas.

Every table file carries the fingerprint of the run that wrote it (the SHA-256 of
its settings, also in ``settings.json``): in the Parquet schema's metadata under
``captum_faithful.run``, or as a first line ``# captum_faithful.evaluate run
<fingerprint>`` of a CSV file.

A batch file is trusted only if it holds exactly the rows of its batch: the run's
file format, the run's fingerprint, and one row per (sample of the batch, method,
metric) of the recorded settings. A file that cannot be read (zero bytes, truncated
by something else than this package) is named in a warning and its batch
recomputed; a readable file of another run (other rows, or the same rows computed
with other settings, such as other model weights: another fingerprint) or a
hand-made one is refused with an error naming it, and left in place, so nothing
foreign is ever merged and nobody's results are deleted. Runs recorded before the
fingerprint was written (``settings.json`` version 1) accept files without one.
"""

from __future__ import annotations

import importlib.util
import io
import json
import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from captum_faithful._files import atomic_write, remove_stale_temporary_files
from captum_faithful._utils import optional_import

COLUMNS = ("index", "method", "metric", "value", "seconds")
DTYPES = {"index": "int64", "value": "float64", "seconds": "float64"}
SETTINGS_FILE = "settings.json"
BATCH_DIR = "batches"
RESULTS_STEM = "results"
#: The version ``settings.json`` records; from 2 on, every table file carries the
#: run's fingerprint.
SETTINGS_VERSION = 2
_RUN_KEY = b"captum_faithful.run"
_CSV_RUN_LINE = b"# captum_faithful.evaluate run "
_BATCH_NAME = re.compile(r"^batch-(\d{8})\.(parquet|csv)$")

Rows = dict[str, list]


class UnreadableFileError(ValueError):
    """A run's file that is not a complete table (truncated, empty)."""


class ForeignFileError(ValueError):
    """A readable file in a run's folder that does not hold the rows it should."""


def default_format() -> str:
    """The file format of new runs: Parquet when pyarrow is installed, else CSV."""
    return "parquet" if importlib.util.find_spec("pyarrow") is not None else "csv"


def empty_rows() -> Rows:
    return {column: [] for column in COLUMNS}


def as_table(rows: Any) -> Any:
    """``rows`` (columns as lists, or a DataFrame) as a DataFrame of :data:`COLUMNS`."""
    pd = optional_import("pandas", "evaluate")
    return pd.DataFrame(rows, columns=list(COLUMNS)).astype(DTYPES)


def encode(rows: Any, file_format: str, run: str | None = None) -> bytes:
    """The bytes of a table with the columns of :data:`COLUMNS`: Parquet, or CSV
    with floats written exactly (shortest round-trip form) and NaN as an empty
    field; carrying the fingerprint ``run`` of the run that writes it, if given
    (see the module docstring)."""
    table = as_table(rows)
    if file_format == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        arrow = pa.Table.from_pandas(table, preserve_index=False)
        if run is not None:
            metadata = dict(arrow.schema.metadata or {})
            metadata[_RUN_KEY] = run.encode("ascii")
            arrow = arrow.replace_schema_metadata(metadata)
        buffer = io.BytesIO()
        pq.write_table(arrow, buffer)
        return buffer.getvalue()
    data = table.to_csv(index=False, lineterminator="\n").encode("utf-8")
    if run is not None:
        data = _CSV_RUN_LINE + run.encode("ascii") + b"\n" + data
    return data


def decode(path: Path) -> tuple[Any, str | None]:
    """Read a table written by :func:`encode` back into a DataFrame.

    Returns:
        (DataFrame, str or None): the table, and the fingerprint of the run that
        wrote it (``None`` for a file without one).

    Raises:
        UnreadableFileError: naming ``path``, when it is not a complete table.
    """
    pd = optional_import("pandas", "evaluate")
    if path.suffix == ".parquet" and importlib.util.find_spec("pyarrow") is None:
        raise ImportError(
            f"{path} is a Parquet file; reading it needs pyarrow (`pip install pyarrow`)"
        )
    run = None
    try:
        if path.suffix == ".parquet":
            import pyarrow.parquet as pq

            table = pd.read_parquet(path)
            metadata = pq.read_schema(path).metadata or {}
            if _RUN_KEY in metadata:
                run = metadata[_RUN_KEY].decode("ascii")
        else:
            data = path.read_bytes()
            if not data.endswith(b"\n"):
                raise ValueError("the file does not end with a complete line")
            if data.startswith(_CSV_RUN_LINE):
                first, data = data.split(b"\n", 1)
                run = first[len(_CSV_RUN_LINE) :].decode("ascii").strip()
            table = pd.read_csv(
                io.BytesIO(data),
                dtype={"method": str, "metric": str},
                keep_default_na=False,
                na_values={"value": [""], "seconds": [""]},
            )
    except Exception as err:  # noqa: BLE001 - any reader error means the same
        raise UnreadableFileError(
            f"{path} is truncated or not a results table ({err})"
        ) from err
    if tuple(table.columns) != COLUMNS:
        raise ForeignFileError(
            f"{path} is not a results table of captum_faithful.evaluate: columns "
            f"{list(table.columns)}, expected {list(COLUMNS)}"
        )
    return table.astype(DTYPES), run


def concat(tables: list) -> Any:
    pd = optional_import("pandas", "evaluate")
    if not tables:
        return as_table(empty_rows())
    return pd.concat(tables, ignore_index=True)


@dataclass(frozen=True)
class RunLayout:
    """What the batches of a run hold, from its recorded settings."""

    n_samples: int
    batch_size: int
    methods: tuple[str, ...]
    metrics: tuple[str, ...]
    file_format: str
    run: str | None = None
    files_carry_run: bool = False

    @classmethod
    def from_settings(cls, recorded: dict[str, Any]) -> RunLayout:
        settings = recorded["settings"]
        return cls(
            n_samples=int(settings["dataset"]["length"]),
            batch_size=int(settings["batch_size"]),
            methods=tuple(settings["methods"]),
            metrics=tuple(settings["metrics"]),
            file_format=recorded.get("file_format", default_format()),
            run=recorded.get("fingerprint"),
            files_carry_run=int(recorded.get("version", 1)) >= SETTINGS_VERSION,
        )

    def check_run(self, path: Path, run: str | None) -> None:
        """Raise :class:`ForeignFileError` unless the file at ``path``, carrying
        the fingerprint ``run``, was written by this run."""
        if run is None and not self.files_carry_run:
            return
        if run != self.run:
            found = "no run fingerprint" if run is None else f"run fingerprint {run}"
            raise ForeignFileError(
                f"{path} is not a batch of this run: it carries {found}, where this "
                f"run's is {self.run} (a file of another run, computed with other "
                "settings, e.g. other model weights); remove it, or choose another "
                "`out`"
            )

    @property
    def n_batches(self) -> int:
        return -(-self.n_samples // self.batch_size)

    def samples(self, batch_id: int) -> range:
        start = batch_id * self.batch_size
        return range(start, min(start + self.batch_size, self.n_samples))

    def check(self, batch_id: int, path: Path, table: Any, run: str | None) -> None:
        """Raise :class:`ForeignFileError` (or :class:`UnreadableFileError` for
        a table of this run missing some of its rows) unless ``table``, carrying
        the fingerprint ``run``, holds exactly one row per (sample, method, metric)
        of batch ``batch_id`` of this run."""
        samples = self.samples(batch_id)
        if batch_id >= self.n_batches or not set(table["index"]) <= set(samples):
            found = sorted(set(table["index"].tolist()))
            raise ForeignFileError(
                f"{path} is not a batch of this run: it holds samples "
                f"{_span(found)}, where batch {batch_id} of this {self.n_samples}-"
                f"sample run holds {_span(list(samples))}; remove it, or choose "
                "another `out`"
            )
        if not (
            set(table["method"]) <= set(self.methods)
            and set(table["metric"]) <= set(self.metrics)
        ):
            raise ForeignFileError(
                f"{path} is not a batch of this run: methods "
                f"{sorted(set(table['method']))} and metrics "
                f"{sorted(set(table['metric']))}, where the run has "
                f"{list(self.methods)} and {list(self.metrics)}; remove it, or "
                "choose another `out`"
            )
        # before the row count: a file of another run is refused, never deleted
        self.check_run(path, run)
        keys = table[["index", "method", "metric"]]
        expected = len(samples) * len(self.methods) * len(self.metrics)
        if keys.duplicated().any() or len(keys) != expected:
            raise UnreadableFileError(
                f"{path} holds {len(keys)} rows where batch {batch_id} has "
                f"{expected} (one per sample, method and metric, no repeats)"
            )


def _span(indices: list[int]) -> str:
    if not indices:
        return "none"
    if indices == list(range(indices[0], indices[-1] + 1)):
        return f"{indices[0]}..{indices[-1]}"
    return str(indices[:8])[:-1] + (", ...]" if len(indices) > 8 else "]")


class RunStorage:
    """The files of one run under ``out`` (see the module docstring)."""

    def __init__(self, out: str | os.PathLike, file_format: str | None = None) -> None:
        self.out = Path(out)
        self.batch_dir = self.out / BATCH_DIR
        self.settings_path = self.out / SETTINGS_FILE
        self.file_format = file_format or default_format()
        #: The fingerprint written into every table file (see the module docstring).
        self.run: str | None = None

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

    def layout(self) -> RunLayout:
        recorded = self.read_settings()
        if recorded is None:
            raise FileNotFoundError(
                f"`out` ({self.out}) holds no evaluation run (no settings.json)"
            )
        return RunLayout.from_settings(recorded)

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
        """Remove the leftovers of killed writers; a file another live process is
        writing is left alone."""
        for folder in (self.out, self.batch_dir):
            remove_stale_temporary_files(folder)

    def _batch_files(self) -> dict[int, Path]:
        if not self.batch_dir.is_dir():
            return {}
        files = {}
        for path in self.batch_dir.iterdir():
            match = _BATCH_NAME.match(path.name)
            if match:
                files[int(match.group(1))] = path
        return files

    def _read_batch(self, batch_id: int, path: Path, layout: RunLayout) -> Any:
        if path.suffix != f".{layout.file_format}":
            raise ForeignFileError(
                f"{path} is not a batch of this run: the run writes "
                f"{layout.file_format} files; remove it, or choose another `out`"
            )
        table, run = decode(path)
        layout.check(batch_id, path, table, run)
        return table

    def recorded_batches(self) -> list[int]:
        """The batches already recorded, each file checked (see the module
        docstring): an unreadable one is removed with a warning, so that its batch
        is computed again; a foreign one raises :class:`ForeignFileError`."""
        layout = self.layout()
        recorded = []
        for batch_id, path in sorted(self._batch_files().items()):
            try:
                self._read_batch(batch_id, path, layout)
            except UnreadableFileError as err:
                warnings.warn(
                    f"evaluate: {err}; batch {batch_id} is computed again",
                    stacklevel=2,
                )
                path.unlink(missing_ok=True)
                continue
            recorded.append(batch_id)
        return recorded

    def write_batch(self, batch_id: int, rows: Rows) -> None:
        path = self.batch_dir / f"batch-{batch_id:08d}.{self.file_format}"
        atomic_write(path, encode(rows, self.file_format, self.run))

    def read_batches(self) -> Any:
        """The rows of every recorded batch, in batch order, each file checked;
        raises naming the first file that is unreadable or foreign."""
        layout = self.layout()
        files = self._batch_files()
        tables = []
        for batch_id in sorted(files):
            try:
                tables.append(self._read_batch(batch_id, files[batch_id], layout))
            except UnreadableFileError as err:
                raise UnreadableFileError(
                    f"{err}; calling evaluate with resume=True on {self.out} "
                    "computes the batch again"
                ) from err
        return concat(tables)

    def write_results(self, table: Any) -> Path:
        path = self.results_path()
        atomic_write(path, encode(table, self.file_format, self.run))
        return path

    def read_results(self) -> Any:
        """The merged table if rank 0 wrote it, else the batches recorded so far."""
        for suffix in ("parquet", "csv"):
            path = self.results_path(suffix)
            if path.exists():
                table, run = decode(path)
                self.layout().check_run(path, run)
                return table
        return self.read_batches()
