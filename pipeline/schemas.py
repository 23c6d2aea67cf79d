"""Arrow schemas of every file the pipeline reads or writes, and checked I/O.

The schemas live as JSON in the repository's ``schemas/`` folder; every read
and write below is checked against them, and every write is atomic
(temporary name, fsync, rename; on an object store one upload of the whole
object, see :mod:`pipeline.storage`), so a crash never leaves half a file.
"""

from __future__ import annotations

import functools
import hashlib
import json
import sys
from importlib import resources
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import storage
from pipeline.errors import PartitionError, SchemaMismatchError
from pipeline.storage import Location
from pipeline.storage import replaced_atomically as replaced_atomically

# The repository's schemas/ folder, shipped in the package as pipeline.json_schemas.
SCHEMAS_DIR = Path(str(resources.files("pipeline.json_schemas")))
SCHEMA_NAMES = ("snapshot", "quarantine", "partition", "manifest", "breaks")
PARQUET_COMPRESSION = "zstd"
PARQUET_ROW_GROUP_ROWS_MAX = 1_048_576

_ARROW_TYPES: dict[str, pa.DataType] = {
    "int32": pa.int32(),
    "int64": pa.int64(),
    "string": pa.string(),
    "bool": pa.bool_(),
    "timestamp_us_utc": pa.timestamp("us", tz="UTC"),
}


@functools.cache
def arrow_schema(name: str) -> pa.Schema:
    """The Arrow schema called ``name``, read from ``schemas/<name>.json``."""
    path = SCHEMAS_DIR / f"{name}.json"
    spec = json.loads(path.read_text(encoding="utf-8"))
    fields = [pa.field(f["name"], _ARROW_TYPES[f["type"]], nullable=bool(f["nullable"])) for f in spec["fields"]]
    return pa.schema(fields)


def check_schema(actual: pa.Schema, name: str, where: str) -> None:
    """Raise :class:`SchemaMismatchError` unless ``actual`` has the names and types of ``name``."""
    expected = arrow_schema(name)
    got = [(f.name, _normalise(f.type)) for f in actual]
    want = [(f.name, f.type) for f in expected]
    if got != want:
        raise SchemaMismatchError(
            f"{where}: columns {_describe(got)} do not match the {name!r} schema {_describe(want)} "
            f"(schemas/{name}.json)"
        )


def to_arrow(frame: pl.DataFrame, name: str, where: str) -> pa.Table:
    """Convert a frame to the exact Arrow schema ``name`` (types and nullability)."""
    table = frame.to_arrow()
    check_schema(table.schema, name, where)
    expected = arrow_schema(name)
    for field in expected:
        if not field.nullable and table.column(field.name).null_count:
            raise SchemaMismatchError(f"{where}: column {field.name!r} has nulls; the schema forbids them")
    return table.cast(expected)


def write_parquet(frame: pl.DataFrame, name: str, path: Location) -> None:
    """Write ``frame`` as Parquet with schema ``name``, atomically and byte-reproducibly (local or object store)."""
    table = to_arrow(frame, name, str(path))
    with storage.atomic_output(path) as target:
        pq.write_table(
            table,
            target,
            compression=PARQUET_COMPRESSION,
            row_group_size=PARQUET_ROW_GROUP_ROWS_MAX,
            write_statistics=True,
        )


def write_json(path: Location, document: dict[str, Any]) -> None:
    """Write ``document`` as sorted, indented JSON, atomically (values JSON lacks become strings)."""
    storage.write_text(path, json.dumps(document, indent=2, default=str, sort_keys=True) + "\n")


def read_parquet(path: Location, name: str) -> pl.DataFrame:
    """Read a Parquet file (local or object store) written with schema ``name``, checking the schema first."""
    try:
        source = storage.read_source(path)
        schema = pq.read_schema(storage.arrow_input(source))
    except storage.ObjectNotFoundError as exc:
        raise PartitionError(str(exc)) from exc
    except FileNotFoundError as exc:
        raise PartitionError(f"{path}: file not found") from exc
    except (OSError, pa.ArrowInvalid) as exc:
        raise PartitionError(f"{path}: not a readable Parquet file ({exc})") from exc
    check_schema(schema, name, str(path))
    try:
        return pl.read_parquet(source)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise PartitionError(f"{path}: cannot read the Parquet data ({exc})") from exc


def int64_sha256(series: pl.Series) -> str:
    """SHA-256 of an int64 column's values as little-endian bytes, in order."""
    digest = hashlib.sha256()
    update_int64_digest(digest, series)
    return digest.hexdigest()


def update_int64_digest(digest: Any, series: pl.Series) -> None:
    """Feed an int64 column's values to ``digest``; piece by piece equals :func:`int64_sha256` of the whole."""
    array = series.cast(pl.Int64).rechunk().to_arrow()
    if isinstance(array, pa.ChunkedArray):
        array = array.combine_chunks()
    if len(array):
        values = array.buffers()[1]
        assert_little_endian()
        start = array.offset * 8
        digest.update(memoryview(values)[start : start + len(array) * 8])


class ParquetStream:
    """Write frames one after another into one local Parquet file with schema ``name``.

    The bytes equal :func:`write_parquet` of all the frames concatenated: every row
    group holds exactly ``PARQUET_ROW_GROUP_ROWS_MAX`` rows (the last one fewer) from
    one contiguous array, however the frames were cut.  Use as a context manager; the
    file is complete only when the block ends without an error.
    """

    def __init__(self, name: str, path: Path) -> None:
        self.name = name
        self.path = path
        self.rows = 0
        self._pending: list[pl.DataFrame] = []
        self._pending_rows = 0
        self._writer: pq.ParquetWriter | None = None
        self._empty: pl.DataFrame | None = None

    def __enter__(self) -> ParquetStream:
        return self

    def write(self, frame: pl.DataFrame) -> None:
        """Append ``frame``'s rows."""
        if self._empty is None:
            self._empty = frame.clear()
        if not frame.height:
            return
        self._pending.append(frame)
        self._pending_rows += frame.height
        self.rows += frame.height
        while self._pending_rows >= PARQUET_ROW_GROUP_ROWS_MAX:
            self._flush(PARQUET_ROW_GROUP_ROWS_MAX)

    def __exit__(self, kind: object, error: object, trace: object) -> None:
        if error is not None:
            if self._writer is not None:
                self._writer.close()
            return
        if self._pending_rows or self._writer is None:
            self._flush(self._pending_rows)
        assert self._writer is not None
        self._writer.close()

    def _flush(self, rows: int) -> None:
        whole = pl.concat(self._pending, rechunk=True) if self._pending else self._empty
        if whole is None:
            raise SchemaMismatchError(f"{self.path}: nothing was written, not even an empty frame")
        table = to_arrow(whole.head(rows), self.name, str(self.path)).combine_chunks()
        if self._writer is None:
            self._writer = pq.ParquetWriter(
                self.path, table.schema, compression=PARQUET_COMPRESSION, write_statistics=True
            )
        self._writer.write_table(table, row_group_size=PARQUET_ROW_GROUP_ROWS_MAX)
        rest = whole.slice(rows)
        self._pending = [rest] if rest.height else []
        self._pending_rows = rest.height


def assert_little_endian() -> None:
    """Content hashes are defined on little-endian int64; refuse other machines."""
    if sys.byteorder != "little":
        raise SchemaMismatchError("content hashes are defined for little-endian machines only")


def _normalise(data_type: pa.DataType) -> pa.DataType:
    if data_type in (pa.large_string(), pa.string_view()):
        return pa.string()
    return data_type


def _describe(columns: list[tuple[str, pa.DataType]]) -> str:
    return "[" + ", ".join(f"{n}: {t}" for n, t in columns) + "]"
