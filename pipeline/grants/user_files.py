"""Reading a user file (Parquet or CSV, local or on an object store) as classified rows.

Every row of the file's id column becomes ``(row_number, user_id, reason)``:
``row_number`` counts data rows from 1, ``user_id`` is the parsed int64 id and
``reason`` says why the row cannot be used (``null``, ``not_integer``,
``out_of_range``), or is null for a usable id.  The rules, by the column's type:

- integers: the value itself; above int64 (an unsigned column) is out of range;
- floats: whole numbers below 2^63 (``42.0``); ``2.5`` is not an integer;
- text (Parquet strings, every CSV cell): digits with an optional sign, spaces
  around them ignored; digits beyond int64 are out of range.

An id must be positive.  The rows come as a lazy Polars query
(:func:`scan_user_file`), so a caller that only sinks them never holds the
file in memory; the text of a row as the file had it (the quarantine's
``raw_value``) is an expression computed only for the rows that need it.
"""

from __future__ import annotations

import errno
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import SnapshotError, StorageError
from pipeline.storage import Location

USER_ID_COLUMN = "user_id"
EXAMPLES_IN_MESSAGE_MAX = 5
_INTEGER_PATTERN = r"^[+-]?[0-9]+$"
_VALUE = "value"  # the file's id column, renamed


@dataclass(frozen=True)
class UserRows:
    """A user file's id column as a lazy query of (row_number, value), with the rules that classify it.

    ``value`` is the column as the file has it; :meth:`classified` adds ``user_id`` and
    ``reason`` to any frame holding ``value`` (so a spilled copy of the rows can be
    classified again without the file), and :attr:`raw_value` gives the row's text.
    """

    source: pl.LazyFrame  # (value, row_number)
    parsed: pl.Expr  # value -> user_id (Int64), null when it is no id
    reason: pl.Expr  # needs value and user_id -> the reason a row is unusable, null when usable
    raw_value: pl.Expr  # value -> the row's text as the file had it (String)
    integer_column: bool
    estimated_rows: int  # the row count (Parquet) or an upper estimate from the size (CSV)

    @property
    def rows(self) -> pl.LazyFrame:
        """(value, row_number, user_id, reason) of every row."""
        return self.classified(self.source)

    def classified(self, frame: pl.LazyFrame) -> pl.LazyFrame:
        """``frame`` (with ``value``) with ``user_id`` and ``reason`` added."""
        return frame.with_columns(self.parsed.alias("user_id")).with_columns(self.reason.alias("reason"))


def scan_user_file(path: Location, local: Path, id_column: str = USER_ID_COLUMN) -> UserRows:
    """Classify the id column of ``local`` (the file behind ``path``, which names it in errors)."""
    if _kind(path, id_column) == "parquet":
        return _scan_parquet(path, local, id_column)
    return _scan_csv(path, local, id_column)


def describe_rows(rows: Iterable[tuple[int, str | None, str]]) -> str:
    """``row 12 null (None); row 40 not_integer ('abc')``: (row_number, raw_value, reason) rows for a message."""
    return "; ".join(f"row {r} {reason} ({raw!r})" for r, raw, reason in rows)


def _kind(path: Location, id_column: str) -> str:
    """``parquet`` or ``csv`` from the file name; SnapshotError for any other."""
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith((".parquet", ".pq")):
        return "parquet"
    if suffixes.endswith((".csv", ".csv.gz")):
        return "csv"
    raise SnapshotError(f"{path}: unknown file type; use a .parquet or .csv file with a '{id_column}' column")


def classify(path: Location, id_column: str = USER_ID_COLUMN) -> pl.DataFrame:
    """A small user file's rows in memory: (row_number, raw_value, user_id, reason)."""
    with storage.scratch_folder(None, "read") as scratch:
        local = readable_file(path, scratch, id_column)
        scanned = scan_user_file(path, local, id_column)
        try:
            return scanned.rows.select(
                "row_number", scanned.raw_value.alias("raw_value"), "user_id", "reason"
            ).collect()
        except (OSError, pl.exceptions.PolarsError) as exc:
            raise unreadable(path, exc) from exc


def readable_file(path: Location, scratch: Path, id_column: str = USER_ID_COLUMN) -> Path:
    """``path`` as a local file (downloaded into ``scratch`` from an object store); SnapshotError if absent."""
    if not storage.exists(path):
        raise SnapshotError(storage.missing_message(path))
    _kind(path, id_column)
    try:
        return storage.local_file(path, scratch)
    except FileNotFoundError as exc:
        raise SnapshotError(str(exc)) from exc


def unreadable(path: Location, exc: Exception) -> SnapshotError | StorageError:
    """The error for a file that failed while its rows were read (or its spill files written)."""
    if "No space left on device" in str(exc) or getattr(exc, "errno", None) == errno.ENOSPC:
        return StorageError(
            f"{path}: no space left for the scratch files while reading it ({exc}); freezing needs about "
            "16 bytes a user beside the snapshots (TMPDIR for a dry run or an s3:// home): free space there"
        )
    if _kind(path, USER_ID_COLUMN) == "csv":
        return SnapshotError(f"{path}: cannot parse the CSV ({exc}); check quoting and line endings")
    return SnapshotError(f"{path}: cannot read the user ids ({exc}); is the file truncated?")


def load_exclusions(path: Location, id_column: str = USER_ID_COLUMN) -> pl.DataFrame:
    """Distinct user ids to exclude; any unusable row is an error, never a silent skip."""
    classified = classify(path, id_column)
    bad = classified.filter(pl.col("reason").is_not_null())
    if bad.height:
        listed = describe_rows(
            bad.select("row_number", "raw_value", "reason").head(EXAMPLES_IN_MESSAGE_MAX).iter_rows()
        )
        raise SnapshotError(
            f"{path}: {bad.height:,} exclusion rows are not valid user ids ({listed}). An exclusion that cannot "
            "be read could grant a blocked account, so nothing was granted; fix the exclusion file."
        )
    return classified.select("user_id").unique()


def _reason(raw: pl.Expr) -> pl.Expr:
    parsed = pl.col("user_id")
    return (
        pl.when(raw.is_null())
        .then(pl.lit("null"))
        .when(parsed.is_null() & raw.str.strip_chars().str.contains(_INTEGER_PATTERN))
        .then(pl.lit("out_of_range"))
        .when(parsed.is_null())
        .then(pl.lit("not_integer"))
        .when(parsed <= 0)
        .then(pl.lit("out_of_range"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )


def _numbered(frame: pl.LazyFrame, id_column: str) -> pl.LazyFrame:
    return frame.select(pl.col(id_column).alias(_VALUE)).with_row_index("row_number", offset=1)


def _scan_parquet(path: Location, local: Path, id_column: str) -> UserRows:
    try:
        metadata = pq.read_metadata(local)
        schema = metadata.schema.to_arrow_schema()
    except (OSError, pa.ArrowInvalid) as exc:
        raise SnapshotError(f"{path}: not a readable Parquet file ({exc}); is it truncated?") from exc
    _require_column(path, schema.names, id_column)
    field_type = schema.field(id_column).type
    value = pl.col(_VALUE)
    numbered = _numbered(pl.scan_parquet(local), id_column)
    if pa.types.is_integer(field_type):
        # Nothing but a null or a value beyond int64 fails to parse; no text is made for valid rows.
        parsed = value.cast(pl.Int64, strict=False)
        reason = (
            pl.when(value.is_null())
            .then(pl.lit("null"))
            .when(pl.col("user_id").is_null() | (pl.col("user_id") <= 0))
            .then(pl.lit("out_of_range"))
            .otherwise(pl.lit(None, dtype=pl.String))
        )
        return UserRows(numbered, parsed, reason, value.cast(pl.String), True, metadata.num_rows)
    if pa.types.is_floating(field_type):
        whole = value.is_not_null() & (value == value.floor()) & (value.abs() < 2.0**63)
        parsed = pl.when(whole).then(value).otherwise(None).cast(pl.Int64, strict=False)
    elif pa.types.is_string(field_type) or pa.types.is_large_string(field_type) or pa.types.is_string_view(field_type):
        parsed = value.cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False)
    else:
        raise SnapshotError(
            f"{path}: column '{id_column}' has type {field_type}; expected integers (int64) or text digits"
        )
    raw = value.cast(pl.String)
    return UserRows(numbered, parsed, _reason(raw), raw, False, metadata.num_rows)


def _scan_csv(path: Location, local: Path, id_column: str) -> UserRows:
    try:
        header = pl.read_csv(local, n_rows=0)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise SnapshotError(f"{path}: not a readable CSV file ({exc})") from exc
    _require_column(path, header.columns, id_column)
    scanned = pl.scan_csv(local, schema_overrides={id_column: pl.String})
    raw = pl.col(_VALUE)
    parsed = raw.str.strip_chars().cast(pl.Int64, strict=False)
    numbered = _numbered(scanned, id_column)
    # At least two bytes a row (a digit and a newline); compressed files hold more rows than bytes.
    size = local.stat().st_size
    estimate = size // 2 if "".join(path.suffixes).lower().endswith(".csv") else size * 8
    return UserRows(numbered, parsed, _reason(raw), raw, False, estimate)


def _require_column(path: Location, columns: list[str], id_column: str) -> None:
    if id_column in columns:
        return
    near = [
        c
        for c in columns
        if c.strip().lower().replace("-", "_").replace(" ", "_")
        in {"user_id", "userid", "id", "uid", id_column, id_column.replace("_", "")}
    ]
    hint = f" Did you mean {near[0]!r}? Rename it to '{id_column}'." if near else ""
    raise SnapshotError(f"{path}: no '{id_column}' column; found {columns[:10]}.{hint}")
