"""Intake of pass applications: validate a batch file, quarantine bad rows, store one application per user.

A batch file is CSV or Parquet with ``user_id`` and ``applied_at`` (an instant with its offset:
``2023-01-05T00:00:01.250+09:00``, ``…Z``, or a Parquet timestamp with a time zone). Rows are
checked one by one; a bad row goes to the batch's quarantine file with its reason:

* malformed (counted against ENTITLE_REJECTED_SHARE_MAX; above it the whole file is refused and
  nothing is stored): ``null_user_id``, ``not_integer``, ``out_of_range``, ``null_applied_at``,
  ``applied_at_not_a_time``, ``applied_at_without_offset``;
* refused by the program's rules (the rest of the file is stored): ``before_open``,
  ``after_close``, ``in_future`` (later than now), ``late`` (at or before a window already
  allocated: it can no longer be served in order);
* ``duplicate_in_file``: the same user again in the file (the earliest ``applied_at`` stays).

One application per (program, user): if a user applies again in another batch, the earliest
``applied_at`` stands (a later one changes nothing). Because every stored application is after
the allocation watermark, "keep the earliest" never touches an application that has had its turn.

A file whose content was ingested before is recognised by its SHA-256 and not read again.
Everything a batch stores is one transaction: a crash stores nothing, and a rerun stores it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import io
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import schemas
from pipeline.errors import SnapshotError
from pipeline.grants.partitioning import user_bucket_expr
from pipeline.ledger import pass_batches, write_transaction
from pipeline.programs.drawer_pass.allocation import PassContext, lock_program

USER_ID_COLUMN, APPLIED_AT_COLUMN = "user_id", "applied_at"
MALFORMED = (
    "null_user_id",
    "not_integer",
    "out_of_range",
    "null_applied_at",
    "applied_at_not_a_time",
    "applied_at_without_offset",
)
REFUSED = ("before_open", "after_close", "in_future", "late")
DUPLICATE = "duplicate_in_file"
EXAMPLES_IN_MESSAGE_MAX = 5
HASH_CHUNK_BYTES = 1 << 20
SQLITE_ROWS_PER_CALL = 100_000  # executemany chunk: bounds the Python tuples alive at once
_INTEGER = r"^[+-]?[0-9]+$"
_WITH_OFFSET = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?[+-]\d{2}:?\d{2}$"
_WITHOUT_OFFSET = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?$"
_TIMESTAMP_FORMAT = "%Y-%m-%dT%H:%M:%S%.f%z"


class ApplicationFileError(SnapshotError):
    """An application batch file cannot be read or has too many malformed rows (exit 3)."""


@dataclass(frozen=True)
class IntakeReport:
    """What ingesting one batch file found and stored."""

    program_id: str
    source_file: str
    content_sha256: str
    batch_key: int | None
    already_ingested: bool
    rows_read: int = 0
    malformed: int = 0
    refused: int = 0
    duplicate_rows: int = 0
    new_applications: int = 0
    earlier_repeats: int = 0  # users already applied whose applied_at this batch moved earlier
    unchanged_repeats: int = 0  # users already applied earlier: nothing changed
    reasons: dict[str, int] = field(default_factory=dict)
    quarantine_file: str | None = None
    allocated_through: dt.datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json and XCom."""
        values = asdict(self)
        at = values["allocated_through"]
        values["allocated_through"] = None if at is None else at.isoformat()
        return values


def intake_root(context: PassContext) -> Path:
    """``$ENTITLE_HOME/campaigns/<program>/pass``: quarantine files of application batches."""
    return context.settings.home / "campaigns" / context.program.program_id / "pass"


def ingest(context: PassContext, path: Path) -> IntakeReport:
    """Validate a batch file and store its applications (idempotent by content)."""
    path = Path(path)
    digest = _sha256(path)
    known = _known_batch(context, digest)
    if known is not None:
        return IntakeReport(context.program.program_id, str(path), digest, known, True)
    classified = _classify(context, path)
    rows_read = classified.height
    if rows_read == 0:
        raise ApplicationFileError(f"{path}: the file has no data rows; expected columns user_id, applied_at")
    malformed = classified.filter(pl.col("reason").is_in(MALFORMED))
    share = malformed.height / rows_read
    quarantine_path = intake_root(context) / "quarantine" / f"{path.name}.{digest[:16]}.parquet"
    if share > context.settings.rejected_share_max:
        _write_quarantine(classified.filter(pl.col("reason").is_not_null()), path, quarantine_path)
        examples = "; ".join(
            f"row {r} {reason} (user_id={u!r}, applied_at={a!r})"
            for r, u, a, reason in malformed.select("row_number", "raw_user_id", "raw_applied_at", "reason")
            .head(EXAMPLES_IN_MESSAGE_MAX)
            .iter_rows()
        )
        raise ApplicationFileError(
            f"{path}: {malformed.height:,} of {rows_read:,} rows are malformed ({share:.4%}), more than the allowed "
            f"{context.settings.rejected_share_max:.4%}. Nothing was stored. First rows: {examples}. All bad rows: "
            f"{quarantine_path}. Fix the file (user_id: a positive whole number; applied_at: an instant with its "
            "offset, e.g. 2023-01-05T00:00:01.250+09:00), or raise ENTITLE_REJECTED_SHARE_MAX if these rows are "
            "expected."
        )
    with write_transaction(context.engine) as connection:
        program = lock_program(connection, context.campaign_key, exclusive=False)
        watermark = program.allocated_through
        if watermark is not None:
            late = pl.col("reason").is_null() & (pl.col("applied_at") <= watermark.astimezone(dt.UTC))
            classified = classified.with_columns(pl.when(late).then(pl.lit("late")).otherwise("reason").alias("reason"))
        classified = _mark_duplicates(classified)
        counts = {str(r): int(n) for r, n in classified.group_by("reason").len().iter_rows() if r is not None}
        accepted = classified.filter(pl.col("reason").is_null())
        bad = classified.filter(pl.col("reason").is_not_null())
        quarantine = str(quarantine_path) if bad.height else None
        batch_key = _insert_batch(connection, context, path, digest, quarantine, rows_read, counts)
        if batch_key is None:
            return IntakeReport(context.program.program_id, str(path), digest, _known_batch(context, digest), True)
        if bad.height:
            _write_quarantine(bad, path, quarantine_path)
        rows = accepted.select(
            pl.col("user_id"),
            user_bucket_expr("user_id").alias("user_bucket"),
            pl.col("applied_at").dt.epoch("us").alias("applied_us"),
        ).sort("user_id")
        if connection.dialect.name == "postgresql":
            new, earlier = _store_postgresql(connection, context.campaign_key, batch_key, rows)
        else:
            new, earlier = _store_sqlite(connection, context.campaign_key, batch_key, rows)
        connection.execute(
            pass_batches.update()
            .where(pass_batches.c.batch_key == batch_key)
            .values(new_applications=new, earlier_repeats=earlier)
        )
    return IntakeReport(
        context.program.program_id,
        str(path),
        digest,
        batch_key,
        False,
        rows_read=rows_read,
        malformed=sum(counts.get(r, 0) for r in MALFORMED),
        refused=sum(counts.get(r, 0) for r in REFUSED),
        duplicate_rows=counts.get(DUPLICATE, 0),
        new_applications=new,
        earlier_repeats=earlier,
        unchanged_repeats=accepted.height - new - earlier,
        reasons=dict(sorted(counts.items())),
        quarantine_file=quarantine,
        allocated_through=watermark,
    )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            while chunk := handle.read(HASH_CHUNK_BYTES):
                digest.update(chunk)
    except FileNotFoundError as exc:
        raise ApplicationFileError(f"{path}: no such application file") from exc
    except OSError as exc:
        raise ApplicationFileError(f"{path}: cannot read the application file ({exc.strerror})") from exc
    return digest.hexdigest()


def _known_batch(context: PassContext, digest: str) -> int | None:
    with context.engine.connect() as connection:
        value = connection.execute(
            sa.select(pass_batches.c.batch_key).where(
                pass_batches.c.campaign_key == context.campaign_key, pass_batches.c.content_sha256 == digest
            )
        ).scalar()
    return None if value is None else int(value)


def _insert_batch(
    connection: Connection,
    context: PassContext,
    path: Path,
    digest: str,
    quarantine: str | None,
    rows_read: int,
    counts: dict[str, int],
) -> int | None:
    """The new batch's key, or None when the same content was stored meanwhile (by another process)."""
    values = {
        "campaign_key": context.campaign_key,
        "content_sha256": digest,
        "source_file": str(path),
        "rows_read": rows_read,
        "malformed": sum(counts.get(r, 0) for r in MALFORMED),
        "refused": sum(counts.get(r, 0) for r in REFUSED),
        "duplicate_rows": counts.get(DUPLICATE, 0),
        "new_applications": 0,
        "earlier_repeats": 0,
        "quarantine_file": quarantine,
        "ingested_at": context.settings.clock(),
    }
    exists = connection.execute(
        sa.select(pass_batches.c.batch_key).where(
            pass_batches.c.campaign_key == context.campaign_key, pass_batches.c.content_sha256 == digest
        )
    ).first()
    if exists is not None:
        return None
    return int(connection.execute(pass_batches.insert().values(**values)).inserted_primary_key[0])  # type: ignore[index]


# A repeated application keeps the earliest applied_at (both backends).
_KEEP_EARLIEST = (
    "ON CONFLICT (campaign_key, user_id) DO UPDATE SET applied_at = excluded.applied_at, "
    "user_bucket = excluded.user_bucket, batch_key = excluded.batch_key "
    "WHERE excluded.applied_at < pass_applications.applied_at"
)
_SQLITE_UPSERT = (
    "INSERT INTO pass_applications (campaign_key, user_id, user_bucket, applied_at, batch_key) VALUES (?, ?, ?, ?, ?) "
    + _KEEP_EARLIEST
)


def _store_sqlite(connection: Connection, campaign_key: int, batch_key: int, rows: pl.DataFrame) -> tuple[int, int]:
    """executemany in the open write transaction; (new applications, earlier repeats)."""
    raw: Any = connection.connection.driver_connection
    cursor = raw.cursor()
    count = "SELECT count(*) FROM pass_applications WHERE campaign_key = ?"
    before = cursor.execute(count, (campaign_key,)).fetchone()[0]
    changes_before = raw.total_changes
    for chunk in rows.iter_slices(SQLITE_ROWS_PER_CALL):
        frame = chunk.select(
            pl.lit(campaign_key, dtype=pl.Int64).alias("campaign_key"),
            "user_id",
            "user_bucket",
            "applied_us",
            pl.lit(batch_key, dtype=pl.Int64).alias("batch_key"),
        )
        cursor.executemany(_SQLITE_UPSERT, frame.iter_rows())
    changed = raw.total_changes - changes_before
    new = cursor.execute(count, (campaign_key,)).fetchone()[0] - before
    cursor.close()
    return int(new), int(changed - new)


_PG_STAGE = "CREATE TEMPORARY TABLE pass_stage (user_id BIGINT, user_bucket BIGINT, applied_us BIGINT) ON COMMIT DROP"
_PG_UPSERT = (
    "WITH stored AS (INSERT INTO pass_applications (campaign_key, user_id, user_bucket, applied_at, batch_key) "
    "SELECT %(c)s, s.user_id, s.user_bucket, timestamptz 'epoch' + s.applied_us * interval '1 microsecond', %(b)s "
    "FROM pass_stage AS s ORDER BY s.user_id " + _KEEP_EARLIEST + " RETURNING (xmax = 0) AS inserted) "
    "SELECT count(*) FILTER (WHERE inserted), count(*) FILTER (WHERE NOT inserted) FROM stored"
)


def _store_postgresql(connection: Connection, campaign_key: int, batch_key: int, rows: pl.DataFrame) -> tuple[int, int]:
    """COPY into a temporary table, then one upsert in user order (concurrent batches lock rows in the same order)."""
    driver: Any = connection.connection.driver_connection
    with driver.cursor() as cursor:
        cursor.execute(_PG_STAGE)
        buffer = io.BytesIO()
        rows.write_csv(buffer, include_header=False)
        with cursor.copy("COPY pass_stage (user_id, user_bucket, applied_us) FROM STDIN (FORMAT CSV)") as copy:
            copy.write(buffer.getvalue())
        cursor.execute(_PG_UPSERT, {"c": campaign_key, "b": batch_key})
        new, earlier = cursor.fetchone()
        cursor.execute("DROP TABLE pass_stage")
    return int(new), int(earlier)


def _write_quarantine(bad: pl.DataFrame, path: Path, target: Path) -> None:
    frame = bad.select(
        pl.lit(str(path)).alias("source_file"),
        pl.col("row_number").cast(pl.Int64),
        pl.col("raw_user_id").cast(pl.String),
        pl.col("raw_applied_at").cast(pl.String),
        pl.col("reason").cast(pl.String),
    ).sort("row_number")
    schemas.write_parquet(frame, "pass_quarantine", target)


def _mark_duplicates(classified: pl.DataFrame) -> pl.DataFrame:
    """Among valid rows, a user's earliest applied_at (then first row) stays; the others are duplicates."""
    ordered = classified.filter(pl.col("reason").is_null()).sort("user_id", "applied_at", "row_number")
    repeated = ordered.filter(pl.col("user_id") == pl.col("user_id").shift(1))["row_number"]
    if repeated.len() == 0:
        return classified
    return classified.with_columns(
        pl.when(pl.col("row_number").is_in(repeated.implode()))
        .then(pl.lit(DUPLICATE))
        .otherwise("reason")
        .alias("reason")
    )


def _classify(context: PassContext, path: Path) -> pl.DataFrame:
    """(row_number, raw_user_id, raw_applied_at, user_id, applied_at, reason); reason null = valid so far."""
    suffixes = "".join(path.suffixes).lower()
    if suffixes.endswith((".parquet", ".pq")):
        frame = _read_parquet(path)
    elif suffixes.endswith((".csv", ".csv.gz")):
        frame = _read_csv(path)
    else:
        raise ApplicationFileError(f"{path}: unknown file type; use .parquet or .csv with user_id and applied_at")
    program = context.program
    now = context.settings.clock().astimezone(dt.UTC)
    opens = program.opens.astimezone(dt.UTC)
    closes = None if program.closes is None else program.closes.astimezone(dt.UTC)
    raw_user, user, raw_at, at = (pl.col(c) for c in ("raw_user_id", "user_id", "raw_applied_at", "applied_at"))
    text_at = raw_at.cast(pl.String).str.strip_chars()
    reason = (
        pl.when(raw_user.is_null())
        .then(pl.lit("null_user_id"))
        .when(user.is_null() & raw_user.cast(pl.String).str.strip_chars().str.contains(_INTEGER))
        .then(pl.lit("out_of_range"))
        .when(user.is_null())
        .then(pl.lit("not_integer"))
        .when(user <= 0)
        .then(pl.lit("out_of_range"))
        .when(raw_at.is_null())
        .then(pl.lit("null_applied_at"))
        .when(at.is_null() & text_at.str.contains(_WITHOUT_OFFSET))
        .then(pl.lit("applied_at_without_offset"))
        .when(at.is_null())
        .then(pl.lit("applied_at_not_a_time"))
        .when(at < opens)
        .then(pl.lit("before_open"))
        .when(pl.lit(closes is not None) & (at >= (closes or now)))
        .then(pl.lit("after_close"))
        .when(at > now)
        .then(pl.lit("in_future"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    return frame.with_row_index("row_number", offset=1).with_columns(reason.alias("reason"))


def _parse_instants(text: pl.Series) -> pl.Series:
    """ISO 8601 instants with an offset (``Z``, ``+09:00``, ``+0900``; ``T`` or a space) → UTC µs; else null."""
    normal = text.str.strip_chars().str.replace(" ", "T", literal=True).str.replace(r"[zZ]$", "+00:00")
    parsed = pl.select(
        pl.when(normal.str.contains(_WITH_OFFSET))
        .then(normal.str.to_datetime(_TIMESTAMP_FORMAT, time_unit="us", time_zone="UTC", strict=False))
        .otherwise(None)
    ).to_series()
    return parsed.cast(pl.Datetime("us", "UTC"))


def _user_ids(raw: pl.Series) -> pl.Series:
    if raw.dtype.is_integer():
        return raw.cast(pl.Int64, strict=False)
    if raw.dtype.is_float():
        whole = raw.is_not_null() & (raw == raw.floor()) & (raw.abs() < 2.0**63)
        return pl.select(pl.when(whole).then(raw).otherwise(None).cast(pl.Int64, strict=False)).to_series()
    return raw.cast(pl.String).str.strip_chars().cast(pl.Int64, strict=False)


def _read_parquet(path: Path) -> pl.DataFrame:
    try:
        schema = pq.read_schema(path)
    except (OSError, pa.ArrowInvalid) as exc:
        raise ApplicationFileError(f"{path}: not a readable Parquet file ({exc}); is it truncated?") from exc
    _require_columns(path, schema.names)
    at_type = schema.field(APPLIED_AT_COLUMN).type
    if pa.types.is_timestamp(at_type) and at_type.tz is None:
        raise ApplicationFileError(
            f"{path}: column applied_at is a timestamp without a time zone, so the instant is ambiguous; write it "
            "with a time zone (e.g. UTC) or as text with its offset (2023-01-05T00:00:01+09:00)"
        )
    if not (pa.types.is_timestamp(at_type) or pa.types.is_string(at_type) or pa.types.is_large_string(at_type)):
        raise ApplicationFileError(f"{path}: column applied_at has type {at_type}; expected a timestamp or ISO text")
    try:
        frame = pl.read_parquet(path, columns=[USER_ID_COLUMN, APPLIED_AT_COLUMN])
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise ApplicationFileError(f"{path}: cannot read user_id, applied_at ({exc})") from exc
    raw_user, raw_at = frame[USER_ID_COLUMN], frame[APPLIED_AT_COLUMN]
    if pa.types.is_timestamp(at_type):
        applied = raw_at.dt.convert_time_zone("UTC").dt.cast_time_unit("us")
        raw_text = applied.dt.to_string("%Y-%m-%dT%H:%M:%S%.6f%:z")
    else:
        applied, raw_text = _parse_instants(raw_at), raw_at
    return pl.DataFrame(
        {
            "raw_user_id": raw_user.cast(pl.String),
            "user_id": _user_ids(raw_user),
            "raw_applied_at": raw_text,
            "applied_at": applied,
        }
    )


def _read_csv(path: Path) -> pl.DataFrame:
    try:
        header = pl.read_csv(path, n_rows=0)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise ApplicationFileError(f"{path}: not a readable CSV file ({exc})") from exc
    _require_columns(path, header.columns)
    try:
        frame = pl.read_csv(
            path,
            columns=[USER_ID_COLUMN, APPLIED_AT_COLUMN],
            schema_overrides={USER_ID_COLUMN: pl.String, APPLIED_AT_COLUMN: pl.String},
        )
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise ApplicationFileError(f"{path}: cannot parse the CSV ({exc}); check quoting and line endings") from exc
    raw_user, raw_at = frame[USER_ID_COLUMN], frame[APPLIED_AT_COLUMN]
    return pl.DataFrame(
        {
            "raw_user_id": raw_user,
            "user_id": _user_ids(raw_user),
            "raw_applied_at": raw_at,
            "applied_at": _parse_instants(raw_at),
        }
    )


def _require_columns(path: Path, columns: list[str]) -> None:
    missing = [c for c in (USER_ID_COLUMN, APPLIED_AT_COLUMN) if c not in columns]
    if missing:
        raise ApplicationFileError(
            f"{path}: missing column(s) {missing}; found {columns[:10]}. An application file has user_id (a whole "
            "number) and applied_at (an instant with its offset)."
        )
