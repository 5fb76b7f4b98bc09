"""Results tables: load and validate any scaling-results CSV, and append rows safely.

A table is one row per finished run. The columns the fitter needs are ``params``, ``hours``,
``img_size`` and the target (``top1`` by default); everything else is carried along. The runner
writes the columns of :data:`RESULT_COLUMNS` (those of the shared results CSV plus provenance).

No pandas: a :class:`ResultsTable` is a thin wrapper over a dict of numpy columns.
"""
from __future__ import annotations

import contextlib
import csv
import fcntl
import io
import math
import os
import warnings
from pathlib import Path
from typing import Iterable, Iterator, Mapping, Sequence

import numpy as np

from mae_fast.training.checkpoint import atomic_write_bytes

__all__ = [
    "TableError", "ResultsTable", "load_results", "append_result", "read_rows",
    "SHARED_COLUMNS", "PROVENANCE_COLUMNS", "RESULT_COLUMNS", "FIT_COLUMNS",
]

# Columns of the shared human-like-video results table, in its order.
SHARED_COLUMNS = (
    "run", "arch", "params", "width", "depth", "heads", "patch_size", "img_size",
    "data_fraction", "hours", "seed", "top1",
)
# What the runner adds so a row can be traced back to what produced it.
PROVENANCE_COLUMNS = (
    "top5", "images_seen", "wall_time_s", "checkpoint", "git_commit", "finished_at", "config_json",
    "protocol", "protocol_hash", "protocol_json",
)
RESULT_COLUMNS = SHARED_COLUMNS + PROVENANCE_COLUMNS
# The factors every scaling fit uses (the target is added by the caller).
FIT_COLUMNS = ("params", "hours", "img_size")
# Columns that must parse as numbers whenever they are present (blank means missing: NaN).
NUMERIC_COLUMNS = frozenset(
    {"params", "width", "depth", "heads", "patch_size", "img_size", "data_fraction", "hours", "seed",
     "top1", "top5", "images_seen", "wall_time_s", "images"}
)
# Must be > 0 because the laws take their logarithm.
POSITIVE_COLUMNS = ("params", "hours", "img_size")
PERCENT_COLUMNS = ("top1", "top5")


class TableError(ValueError):
    """A results table cannot be used; the message says which file, line and column."""


class SweepWarning(UserWarning):
    """A sweep's bookkeeping (a results row, a status.json) is damaged and was left out; the sweep goes on."""


class ResultsTable:
    """Columns of a results table as numpy arrays (numeric ones float64, the others object)."""

    def __init__(self, columns: Mapping[str, Sequence], source: str = "<table>", data_unit: str = "hours"):
        self.source = source
        # the data axis the ``hours`` column holds: ``hours`` of video, or ``images`` (a table whose data
        # column is ``images`` is read with that column as the fit's data axis)
        self.data_unit = data_unit
        self.columns: dict[str, np.ndarray] = {}
        lengths = {len(v) for v in columns.values()}
        if len(lengths) > 1:
            raise TableError(f"{source}: columns have different lengths {sorted(lengths)}")
        for name, values in columns.items():
            arr = np.asarray(values)
            if arr.dtype.kind in "biuf":
                arr = arr.astype(np.float64)
            else:
                arr = arr.astype(object)
            self.columns[name] = arr

    # --- construction ---------------------------------------------------------------------------
    @classmethod
    def from_rows(cls, rows: Iterable[Mapping], source: str = "<rows>", target: str = "top1",
                  required: Sequence[str] | None = None) -> "ResultsTable":
        """Build and validate a table from dicts (e.g. a synthetic table in a test)."""
        rows = list(rows)
        names: list[str] = []
        for row in rows:
            names.extend(k for k in row if k not in names)
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=names)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: _to_cell(v) for k, v in row.items()})
        return _parse(text.getvalue(), source, target, required)

    # --- access ---------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(next(iter(self.columns.values()))) if self.columns else 0

    def __getitem__(self, name: str) -> np.ndarray:
        try:
            return self.columns[name]
        except KeyError:
            raise KeyError(f"{self.source} has no column {name!r}; columns: {', '.join(self.columns)}") from None

    def __contains__(self, name: str) -> bool:
        return name in self.columns

    @property
    def column_names(self) -> list[str]:
        return list(self.columns)

    def subset(self, mask_or_index) -> "ResultsTable":
        out = ResultsTable({}, self.source, self.data_unit)
        out.columns = {k: v[mask_or_index] for k, v in self.columns.items()}
        return out

    def rows(self) -> Iterator[dict]:
        for i in range(len(self)):
            yield {k: v[i] for k, v in self.columns.items()}

    def model_key(self) -> np.ndarray:
        """One label per run naming its model (``arch`` if present, else its parameter count)."""
        if "arch" in self.columns:
            return np.asarray([str(a) for a in self.columns["arch"]], dtype=object)
        return np.asarray([f"{p / 1e6:.4g}M" for p in self.columns["params"]], dtype=object)

    def group_ids(self, keys: Sequence[str] = ("model", "img_size", "hours")) -> np.ndarray:
        """Integer id per row of its configuration (same model, resolution and hours: seeds of one point)."""
        cols = [self.model_key() if k == "model" else self[k] for k in keys]
        labels = [tuple(str(c[i]) for c in cols) for i in range(len(self))]
        index: dict[tuple, int] = {}
        return np.asarray([index.setdefault(lab, len(index)) for lab in labels], dtype=np.int64)


def _to_cell(value) -> str:
    if value is None:
        return ""
    if isinstance(value, float) and math.isnan(value):
        return ""
    return str(value)


def _parse(text: str, source: str, target: str = "top1", required: Sequence[str] | None = None) -> ResultsTable:
    reader = csv.reader(io.StringIO(text))
    try:
        header = [h.strip() for h in next(reader)]
    except StopIteration:
        raise TableError(f"{source}: the file is empty (no header line)") from None
    records = list(reader)
    data_unit = "hours"
    if required is None and "images" in header and (
        "hours" not in header or _column_blank(records, header.index("hours"))
    ):
        data_unit = "images"  # an image-count study (the runner leaves its hours cells blank)
    required = (tuple(c if c != "hours" else data_unit for c in FIT_COLUMNS) + (target,) if required is None
                else tuple(required))
    missing = [c for c in required if c not in header]
    if missing:
        raise TableError(
            f"{source}: missing required column(s) {', '.join(repr(c) for c in missing)}"
            + (" (the data axis: 'hours' of video or a number of 'images')" if "hours" in missing else "") + "; "
            f"found columns: {', '.join(header) or '(none)'}"
        )
    numeric = [c for c in header if c in NUMERIC_COLUMNS or c == target]
    raw: dict[str, list] = {h: [] for h in header}
    for lineno, record in enumerate(records, start=2):
        if not record or all(not cell.strip() for cell in record):
            continue
        if len(record) != len(header):
            raise TableError(f"{source} line {lineno}: {len(record)} fields, the header has {len(header)}")
        for name, cell in zip(header, record):
            cell = cell.strip()
            if name in numeric:
                raw[name].append(_number(cell, source, lineno, name, name in required))
            else:
                raw[name].append(cell)
        raw.setdefault("_line", []).append(lineno)
    if not raw.get("_line"):
        raise TableError(f"{source}: no data rows")
    lines = raw.pop("_line")
    for name in POSITIVE_COLUMNS + ("images",):
        if name in raw and name != ("hours" if data_unit == "images" else "images"):
            for lineno, v in zip(lines, raw[name]):
                if not (v > 0):  # NaN fails too
                    raise TableError(
                        f"{source} line {lineno}: {name} must be > 0 (got {v:g}); the laws use log({name})"
                    )
    for name in PERCENT_COLUMNS + (target,):
        if name in raw:
            for lineno, v in zip(lines, raw[name]):
                if not math.isnan(v) and not (0.0 <= v <= 100.0):
                    raise TableError(f"{source} line {lineno}: {name} must be a percentage in [0, 100] (got {v:g})")
    if data_unit == "images":
        raw["hours"] = list(raw["images"])  # the fit's data column; reports name it images
    table = ResultsTable(raw, source, data_unit)
    return _dedupe_by_run(table)


def _column_blank(records: list, index: int) -> bool:
    """Whether a column has no value in any non-empty record."""
    return all(len(r) <= index or not r[index].strip() for r in records if any(c.strip() for c in r))


def _number(cell: str, source: str, lineno: int, name: str, required: bool) -> float:
    if cell == "":
        if required:
            raise TableError(f"{source} line {lineno}, column {name!r}: empty, a number is required")
        return math.nan
    try:
        value = float(cell)
    except ValueError:
        raise TableError(f"{source} line {lineno}, column {name!r}: {cell!r} is not a number") from None
    if math.isinf(value) or (required and math.isnan(value)):
        raise TableError(f"{source} line {lineno}, column {name!r}: {cell!r} is not a finite number")
    return value


def _dedupe_by_run(table: ResultsTable) -> ResultsTable:
    """Keep the last row of each run id (a run finished twice, e.g. after a requeue, counts once)."""
    if "run" not in table or len(table) == 0:
        return table
    last: dict[str, int] = {}
    for i, run in enumerate(table["run"]):
        if run:
            last[run] = i
    keep = np.asarray(sorted(set(last.values()) | {i for i, r in enumerate(table["run"]) if not r}), dtype=np.int64)
    return table if len(keep) == len(table) else table.subset(keep)


def load_results(path: str | os.PathLike, target: str = "top1",
                 required: Sequence[str] | None = None) -> ResultsTable:
    """Load a results CSV (the runner's, the shared one, or a user's own) and validate it.

    Raises :class:`TableError` naming the file, line and column for missing columns, values that are
    not numbers, non-positive ``params``/``hours``/``img_size`` and percentages outside [0, 100].
    Rows with the same ``run`` id are deduplicated (the last one wins).
    """
    path = Path(path)
    if not path.exists():
        raise TableError(f"{path}: no such results table")
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as exc:  # a directory, a spreadsheet instead of a CSV, ...
        raise TableError(f"{path}: cannot read it as a CSV text file ({type(exc).__name__}: {exc})") from None
    return _parse(text, str(path), target, required)


# --- safe appends ------------------------------------------------------------------------------
@contextlib.contextmanager
def _locked(path: Path):
    """Exclusive advisory lock on ``<path>.lock`` (flock: fine on local disks and most cluster filesystems)."""
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as fh:
        fcntl.flock(fh.fileno(), fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh.fileno(), fcntl.LOCK_UN)


def read_rows(path: str | os.PathLike) -> list[dict[str, str]]:
    """Raw rows (strings) of a table written by :func:`append_result`, deduplicated by run id."""
    path = Path(path)
    if not path.exists() or path.stat().st_size == 0:
        return []
    rows = []
    with open(path, newline="", errors="replace") as fh:
        reader = csv.DictReader(fh)
        if reader.fieldnames is not None and "run" not in reader.fieldnames:
            warnings.warn(f"{path}: no 'run' column, so no row counts as a finished run", SweepWarning, stacklevel=2)
        for row in reader:
            if None in row.values():  # fewer fields than the header: a line cut short, not a finished run
                warnings.warn(f"{path} line {reader.line_num}: {sum(v is not None for v in row.values())} fields, "
                              f"the header has {len(reader.fieldnames)}; skipped", SweepWarning, stacklevel=2)
                continue
            rows.append(row)
    by_run: dict[str, dict] = {}
    for row in rows:
        by_run[row.get("run", "")] = row  # last wins, order of first appearance kept
    return list(by_run.values())


def append_result(path: str | os.PathLike, row: Mapping, columns: Sequence[str] = RESULT_COLUMNS) -> None:
    """Add (or replace, same ``run`` id) one row, atomically.

    Under a lock, the whole table is rewritten to a temporary file, fsynced and moved over the old
    one (``atomic_write_bytes``): a kill at any moment leaves either the old or the new table, never
    a torn line, and two writers cannot lose each other's rows.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path):
        rows = [r for r in read_rows(path) if r.get("run") != row.get("run")]
        names = list(columns) + [k for k in row if k not in columns]
        for r in rows:
            names.extend(k for k in r if k not in names)
        rows.append({k: _to_cell(v) for k, v in row.items()})
        text = io.StringIO()
        writer = csv.DictWriter(text, fieldnames=names, restval="")
        writer.writeheader()
        writer.writerows(rows)
        atomic_write_bytes(path, text.getvalue().encode())
