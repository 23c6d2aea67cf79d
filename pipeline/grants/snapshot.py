"""Eligibility snapshots: validate a user file, quarantine bad rows, freeze the rest.

A snapshot is the sorted set of distinct eligible user ids (input minus
exclusions), stored as Parquet under its content hash.  Freezing the same
input twice yields the same snapshot id and the same bytes.  The user file and
the snapshot folder may each be a local path or an ``s3://`` URI
(:mod:`pipeline.storage`); ``snapshot.json`` is written last, so a snapshot
folder without it is not a snapshot.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas, storage
from pipeline.errors import SnapshotError
from pipeline.storage import Location, ObjectStoreOptions

USER_ID_COLUMN = "user_id"
REJECTED_SHARE_MAX_DEFAULT = 0.0001  # 0.01 %
EXAMPLES_IN_MESSAGE_MAX = 5
INT64_MAX = 2**63 - 1
EXCLUDED_FILE_NAME = "excluded.parquet"  # snapshot users removed by the exclusion list
_INTEGER_PATTERN = r"^[+-]?[0-9]+$"


@dataclass(frozen=True)
class SnapshotReport:
    """What freezing a user file found and where the results are."""

    snapshot_id: str
    directory: str
    source_file: str
    exclusion_file: str | None
    rows_read: int
    eligible_users: int
    null_rows: int
    not_integer_rows: int
    out_of_range_rows: int
    duplicate_rows: int
    excluded_users: int
    rejected_share: float
    quarantine_file: str
    # How to reach ``directory`` when it is on an object store; never written out.
    store: ObjectStoreOptions | None = field(default=None, compare=False, repr=False)

    @property
    def location(self) -> Location:
        """The snapshot's folder: a local Path or an object-store URI."""
        return storage.location(self.directory, self.store)

    @property
    def users_file(self) -> Location:
        """The snapshot's Parquet file of eligible user ids."""
        return self.location / "users.parquet"

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON output."""
        values = asdict(self)
        del values["store"]
        return values


def snapshot_root(home: Location, campaign_id: str) -> Location:
    """The folder that holds a campaign's snapshots (under ENTITLE_HOME, or ENTITLE_DATA_URI when set)."""
    return home / "campaigns" / campaign_id / "snapshots"


def freeze_snapshot(
    users_file: Location,
    home: Location,
    campaign_id: str,
    exclusion_file: Location | None = None,
    rejected_share_max: float = REJECTED_SHARE_MAX_DEFAULT,
    dry_run: bool = False,
    id_column: str = USER_ID_COLUMN,
) -> SnapshotReport:
    """Validate ``users_file``, quarantine bad rows and freeze the eligible set.

    Raises :class:`SnapshotError` (after writing the quarantine file, which the
    message names) when the file cannot be read or too large a share is rejected.
    With ``dry_run`` nothing is written at all.  ``home`` is the data root: the
    snapshot goes to ``home/campaigns/<campaign>/snapshots/<id>/``.  ``id_column`` is the
    file's id column (the campaign's ``id_column``: ``user_id``, or e.g. ``merchant_id`` for a
    program over merchants); inside the pipeline and the ledger it is the subject's ``user_id``.
    """
    users_file = storage.location(users_file)
    classified = _classify(users_file, id_column)
    rows_read = classified.height
    if rows_read == 0:
        raise SnapshotError(f"{users_file}: the file has no data rows; expected a '{id_column}' column of ids")

    counts = classified.group_by("reason").len()
    by_reason = {row[0]: row[1] for row in counts.iter_rows()}
    null_rows = int(by_reason.get("null", 0))
    not_integer_rows = int(by_reason.get("not_integer", 0))
    out_of_range_rows = int(by_reason.get("out_of_range", 0))

    valid = classified.filter(pl.col("reason").is_null()).select("row_number", "user_id", "raw_value")
    ordered = valid.sort(["user_id", "row_number"])
    duplicate_mask = ordered["user_id"] == ordered["user_id"].shift(1)
    duplicates = ordered.filter(duplicate_mask)
    distinct = ordered.filter(~duplicate_mask.fill_null(False)).select("user_id")
    del ordered, valid

    quarantine = pl.concat(
        [
            classified.filter(pl.col("reason").is_not_null()).select("row_number", "raw_value", "reason"),
            duplicates.select(
                "row_number",
                pl.col("raw_value").cast(pl.String),
                pl.lit("duplicate").alias("reason"),
            ),
        ]
    ).sort("row_number")
    quarantine = quarantine.select(
        pl.lit(str(users_file)).alias("source_file"),
        pl.col("row_number").cast(pl.Int64),
        pl.col("raw_value").cast(pl.String),
        pl.col("reason").cast(pl.String),
    )
    rejected = null_rows + not_integer_rows + out_of_range_rows
    rejected_share = rejected / rows_read

    excluded_users = 0
    excluded = distinct.clear()
    if exclusion_file is not None:
        exclusions = load_exclusions(storage.location(exclusion_file), id_column)
        # Kept with the snapshot so reconciliation can say why a grant to one of them is unexpected.
        excluded = distinct.join(exclusions, on="user_id", how="semi", maintain_order="left")
        distinct = distinct.join(exclusions, on="user_id", how="anti", maintain_order="left")
        excluded_users = excluded.height

    snapshot_id = schemas.int64_sha256(distinct["user_id"])[:16]
    directory = snapshot_root(home, campaign_id) / snapshot_id
    quarantine_path = directory / "quarantine.parquet"
    report = SnapshotReport(
        snapshot_id=snapshot_id,
        directory=str(directory),
        source_file=str(users_file),
        exclusion_file=None if exclusion_file is None else str(exclusion_file),
        rows_read=rows_read,
        eligible_users=distinct.height,
        null_rows=null_rows,
        not_integer_rows=not_integer_rows,
        out_of_range_rows=out_of_range_rows,
        duplicate_rows=duplicates.height,
        excluded_users=excluded_users,
        rejected_share=rejected_share,
        quarantine_file=str(quarantine_path),
        store=storage.options_of(directory),
    )
    if rejected_share > rejected_share_max:
        # Keep the evidence next to the input's name, not under a snapshot id that will never be used.
        failed_path = snapshot_root(home, campaign_id) / "rejected" / f"{users_file.name}.quarantine.parquet"
        if not dry_run:
            schemas.write_parquet(quarantine, "quarantine", failed_path)
        examples = quarantine.filter(pl.col("reason") != "duplicate").head(EXAMPLES_IN_MESSAGE_MAX)
        listed = "; ".join(f"row {r} {reason} ({raw!r})" for _, r, raw, reason in examples.iter_rows())
        raise SnapshotError(
            f"{users_file}: {rejected:,} of {rows_read:,} rows rejected ({rejected_share:.4%}), more than the "
            f"allowed {rejected_share_max:.4%} (null {null_rows:,}, not an integer {not_integer_rows:,}, "
            f"out of range {out_of_range_rows:,}). Nothing was granted. First rows: {listed}. "
            f"All rejected rows: {'(dry run: not written)' if dry_run else failed_path}. "
            "Fix the file, or raise ENTITLE_REJECTED_SHARE_MAX "
            "if these rows are expected."
        )
    if distinct.height == 0:
        raise SnapshotError(f"{users_file}: no eligible user ids remain after validation and exclusions")
    if dry_run:
        return report

    storage.makedirs(directory)
    metadata_path = directory / "snapshot.json"
    schemas.write_parquet(quarantine, "quarantine", quarantine_path)
    schemas.write_parquet(distinct, "snapshot", report.users_file)
    if excluded.height:
        schemas.write_parquet(excluded, "snapshot", directory / EXCLUDED_FILE_NAME)
    # Written last: a snapshot folder without snapshot.json is incomplete.
    schemas.write_json(metadata_path, report.as_dict())
    return report


def load_snapshot_report(directory: Location) -> SnapshotReport:
    """Read a frozen snapshot's metadata; :class:`SnapshotError` if it is not complete."""
    path = directory / "snapshot.json"
    try:
        values = json.loads(storage.read_text(path))
    except FileNotFoundError as exc:
        raise SnapshotError(f"{directory}: not a frozen snapshot (no snapshot.json); freeze it again") from exc
    return SnapshotReport(**values, store=storage.options_of(directory))


def load_exclusions(path: Location, id_column: str = USER_ID_COLUMN) -> pl.DataFrame:
    """Distinct user ids to exclude; any unusable row is an error, never a silent skip."""
    classified = _classify(path, id_column)
    bad = classified.filter(pl.col("reason").is_not_null())
    if bad.height:
        listed = "; ".join(
            f"row {r} {reason} ({raw!r})"
            for r, raw, reason, _ in bad.select("row_number", "raw_value", "reason", "user_id")
            .head(EXAMPLES_IN_MESSAGE_MAX)
            .iter_rows()
        )
        raise SnapshotError(
            f"{path}: {bad.height:,} exclusion rows are not valid user ids ({listed}). An exclusion that cannot "
            "be read could grant a blocked account, so nothing was granted; fix the exclusion file."
        )
    return classified.select("user_id").unique()


def _classify(path: Location, id_column: str = USER_ID_COLUMN) -> pl.DataFrame:
    """Read a user file's ``id_column`` into (row_number, raw_value, user_id, reason); reason null = valid."""
    if not storage.exists(path):
        raise SnapshotError(storage.missing_message(path))
    suffixes = "".join(path.suffixes).lower()
    if not suffixes.endswith((".parquet", ".pq", ".csv", ".csv.gz")):
        raise SnapshotError(f"{path}: unknown file type; use a .parquet or .csv file with a '{id_column}' column")
    try:
        source = storage.read_source(path)  # the local path, or the object's content (one GET)
    except FileNotFoundError as exc:
        raise SnapshotError(str(exc)) from exc
    if suffixes.endswith((".parquet", ".pq")):
        frame = _read_parquet_column(path, source, id_column)
    else:
        frame = _read_csv_column(path, source, id_column)
    raw = pl.col("raw_value")
    parsed = pl.col("user_id")
    reason = (
        pl.when(raw.is_null())
        .then(pl.lit("null"))
        .when(parsed.is_null() & raw.cast(pl.String).str.strip_chars().str.contains(_INTEGER_PATTERN))
        .then(pl.lit("out_of_range"))
        .when(parsed.is_null())
        .then(pl.lit("not_integer"))
        .when(parsed <= 0)
        .then(pl.lit("out_of_range"))
        .otherwise(pl.lit(None, dtype=pl.String))
    )
    return frame.with_row_index("row_number", offset=1).with_columns(reason.alias("reason"))


def _read_parquet_column(path: Location, source: storage.Source, id_column: str) -> pl.DataFrame:
    try:
        schema = pq.read_schema(storage.arrow_input(source))
    except (OSError, pa.ArrowInvalid) as exc:
        raise SnapshotError(f"{path}: not a readable Parquet file ({exc}); is it truncated?") from exc
    _require_column(path, schema.names, id_column)
    field_type = schema.field(id_column).type
    try:
        column = pl.read_parquet(source, columns=[id_column])[id_column]
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise SnapshotError(f"{path}: cannot read column '{id_column}' ({exc}); is the file truncated?") from exc
    if pa.types.is_integer(field_type):
        parsed = column.cast(pl.Int64, strict=False)
        raw_value = column.cast(pl.String)
    elif pa.types.is_floating(field_type):
        whole = column.is_not_null() & (column == column.floor()) & (column.abs() < 2.0**63)
        parsed = pl.select(pl.when(whole).then(column).otherwise(None).cast(pl.Int64, strict=False)).to_series()
        raw_value = column.cast(pl.String)
    elif pa.types.is_string(field_type) or pa.types.is_large_string(field_type) or pa.types.is_string_view(field_type):
        raw_value = column.cast(pl.String)
        parsed = raw_value.str.strip_chars().cast(pl.Int64, strict=False)
    else:
        raise SnapshotError(
            f"{path}: column '{id_column}' has type {field_type}; expected integers (int64) or text digits"
        )
    return pl.DataFrame({"raw_value": raw_value, "user_id": parsed})


def _read_csv_column(path: Location, source: storage.Source, id_column: str) -> pl.DataFrame:
    try:
        header = pl.read_csv(source, n_rows=0)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise SnapshotError(f"{path}: not a readable CSV file ({exc})") from exc
    _require_column(path, header.columns, id_column)
    try:
        column = pl.read_csv(
            source,
            columns=[id_column],
            schema_overrides={id_column: pl.String},
        )[id_column]
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise SnapshotError(f"{path}: cannot parse the CSV ({exc}); check quoting and line endings") from exc
    parsed = column.str.strip_chars().cast(pl.Int64, strict=False)
    return pl.DataFrame({"raw_value": column, "user_id": parsed})


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
