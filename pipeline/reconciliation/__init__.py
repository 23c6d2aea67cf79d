"""Reconciliation: the snapshot and the campaign against the ledger, computed from the data.

Expected is every snapshot user (exclusions already removed) times every
campaign item, with the item's terms.  The ledger side is the live grants
(grants minus voids).  Neither side is taken from the pipeline's own run
records, so a row deleted, added or edited directly in the database shows up.

Per partition (one contiguous ``user_bucket`` range of the ledger's key):

1. A checksum pass.  The database computes, over the partition's ledger
   rows, a count and two sums of 31-bit row hashes (one over bucket, item and
   terms, one over the user id and item); Polars computes the same for the
   expected rows.  Voided rows are taken out on both sides.  Equal checksums
   mean the live rows are exactly the expected rows (a chance collision needs
   two independent 31-bit sums and the count to agree at once).  This reads
   the ledger once, inside the database, without moving rows to Python —
   the same idea as table-diff tools that checksum segments before they
   compare rows.
2. Where the checksums differ (or with ``method="rows"``), a row-level
   comparison: the ledger rows of the range and the expected rows are joined
   on (user, item) and every difference is classified: ``missing``,
   ``unexpected``, ``terms_mismatch``, ``duplicate``.  Expected grants that
   were voided on purpose (and not reissued) are ``voided``: explained, not
   breaks.

The bridge always holds: expected = matched + terms_mismatch + missing +
voided, and ledger_live = matched + terms_mismatch + unexpected + duplicate,
where ``expected`` and ``ledger_live`` are counted independently (from the
partition file and by the database).  A non-zero residual makes the verdict
``INCOMPLETE`` with the reason.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline import ledger, schemas, storage
from pipeline.errors import EntitleError, InvariantViolation, LedgerError, SnapshotError, invariant
from pipeline.grants import runs
from pipeline.grants.partitioning import (
    BUCKET_MODULUS,
    PartitionEntry,
    load_manifest,
    partition_label,
    partitions_dir,
    read_partition,
    user_bucket,
    user_bucket_expr,
)
from pipeline.grants.snapshot import EXCLUDED_FILE_NAME
from pipeline.ledger import recon_breaks, recon_items, recon_partitions, recon_runs, write_transaction
from pipeline.reconciliation import three_way
from pipeline.reconciliation.three_way import ISSUER_BREAK_CLASSES, IssuerCheck
from pipeline.worker_processes import map_in_processes

CHECKSUM_MODULUS = 2_147_483_647  # 2^31 - 1: every product below stays under 2^62 in SQL and Polars
H1_BUCKET_FACTOR = 48_271
H1_ITEM_FACTOR = 69_621
H2_USER_MODULUS = 1_000_000_007
H2_ITEM_OFFSET = 16_807
BREAK_CLASSES = ("missing", "unexpected", "terms_mismatch", "duplicate")
COUNT_NAMES = ("expected", "live", "matched", "terms_mismatch", "missing", "voided", "unexpected", "duplicate")
BREAKS_ITEMIZED_MAX = 1_000_000  # break rows written per reconciliation; counts stay exact beyond it
TOP_BREAKS_IN_RESULT = 100
BREAK_ID_CHARS = 20
EXPORT_FILE_RESULT = "result.json"
EXPORT_FILE_BREAKS = "breaks.parquet"
_SQL_IN_CHUNK_ROWS = 500
ROW_FETCH_CHUNK_ROWS = 100_000
SEGMENTS_PER_PARTITION = 64  # key ranges checksummed separately once a partition's checksum differs


# --------------------------------------------------------------------------- plain values


@dataclass(frozen=True)
class ItemTerms:
    """One campaign item's key and terms, instants as UTC epoch microseconds."""

    item_key: int
    item_sku: str
    amount_krw: int | None
    valid_from_us: int
    valid_until_us: int | None


@dataclass(frozen=True)
class PartitionTask:
    """Everything one worker needs to check one partition (picklable)."""

    ledger_url: str
    campaign_key: int
    snapshot_id: str
    items: tuple[ItemTerms, ...]
    known_skus: tuple[tuple[int, str], ...]
    entry: PartitionEntry
    granted: bool
    method: str
    excluded_file: storage.Location | None


@dataclass
class PartitionCheck:
    """The outcome of checking one partition: state, counts, and itemized breaks when granted."""

    partition_id: int
    state: str  # matched | breaks | not_granted | unreadable
    method: str  # checksum | rows | none
    counts: dict[str, int | None]
    per_item: dict[int, dict[str, int]]
    residual_expected: int
    residual_ledger: int
    bucket_lo: int = 0
    bucket_hi: int = -1
    breaks: pl.DataFrame | None = None
    error: str | None = None
    duration_s: float = 0.0
    peak_rss_mb: float = 0.0  # of the process that checked it (a worker holds one partition at a time)


@dataclass(frozen=True)
class Reconciliation:
    """One reconciliation: verdict, bridge, per item and per partition figures, and where the exports are."""

    reconciliation_id: str
    campaign_id: str
    snapshot_id: str
    partition_count: int
    method: str
    started_at: str
    finished_at: str
    duration_s: float
    verdict: str
    explanation: str
    bridge: dict[str, int]
    items: list[dict[str, Any]]
    partitions: list[dict[str, Any]]
    breaks_by_class: dict[str, int]
    open_breaks: int
    breaks_itemized: int
    resolved_breaks: int
    top_breaks: list[dict[str, Any]]
    export_dir: str
    breaks_file: str
    checksum_partitions: int = 0
    row_partitions: int = 0
    grants_checked: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    issuers: list[dict[str, Any]] = field(default_factory=list)  # the third source, per issuer

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON, XCom and the report."""
        return asdict(self)

    def comparable(self) -> dict[str, Any]:
        """The result without what differs between two runs on the same data (ids, times, paths, memory)."""
        document = self.as_dict()
        for name in ("reconciliation_id", "started_at", "finished_at", "duration_s", "export_dir", "breaks_file"):
            document.pop(name)
        for partition in document["partitions"]:
            partition.pop("duration_s", None)
        for issuer in document["issuers"]:
            issuer.pop("duration_s", None)
        document["extra"].pop("worker_peak_rss_mb", None)
        return document


# --------------------------------------------------------------------------- checksums


def _hash_sql(dialect: str) -> tuple[str, str]:
    """The two row hashes over grants aliased ``g``, in SQL."""
    m = CHECKSUM_MODULUS
    until, since = ledger.epoch_us_sql("g.valid_until", dialect), ledger.epoch_us_sql("g.valid_from", dialect)
    h1 = (
        f"((g.user_bucket * {H1_BUCKET_FACTOR} + g.item_key * {H1_ITEM_FACTOR} + coalesce(g.amount_krw, 0) % {m} "
        f"+ coalesce({until}, 1) % {m} + {since} % {m}) % {m})"
    )
    h2 = f"((g.user_id % {H2_USER_MODULUS}) * (g.item_key + {H2_ITEM_OFFSET}) % {m})"
    return h1, h2


def _item_constant(item: ItemTerms) -> int:
    m = CHECKSUM_MODULUS
    until = 1 if item.valid_until_us is None else item.valid_until_us
    return item.item_key * H1_ITEM_FACTOR + (item.amount_krw or 0) % m + until % m + item.valid_from_us % m


def _row_hashes(user_id: int, item: ItemTerms) -> tuple[int, int]:
    """The two row hashes of one expected grant, in Python (same values as the SQL)."""
    m = CHECKSUM_MODULUS
    h1 = (user_bucket(user_id) * H1_BUCKET_FACTOR + _item_constant(item)) % m
    h2 = (user_id % H2_USER_MODULUS) * (item.item_key + H2_ITEM_OFFSET) % m
    return h1, h2


def expected_checksum(users: pl.DataFrame, items: Sequence[ItemTerms]) -> tuple[int, int, int]:
    """Count and the two hash sums of users × items, computed in Polars."""
    m = CHECKSUM_MODULUS
    bucket = user_bucket_expr("user_id")
    user_part = pl.col("user_id") % H2_USER_MODULUS
    exprs: list[pl.Expr] = []
    for index, item in enumerate(items):
        exprs.append(((bucket * H1_BUCKET_FACTOR + _item_constant(item)) % m).sum().alias(f"h1_{index}"))
        exprs.append((user_part * (item.item_key + H2_ITEM_OFFSET) % m).sum().alias(f"h2_{index}"))
    if not exprs or users.height == 0:
        return 0, 0, 0
    sums = users.select(exprs).row(0)
    return users.height * len(items), int(sum(sums[0::2])), int(sum(sums[1::2]))


# --------------------------------------------------------------------------- one partition (worker)

_ENGINES: dict[str, Engine] = {}


def _engine(url: str) -> Engine:
    # One engine per worker process and URL: a reconciliation checks many partitions per worker.
    engine = _ENGINES.get(url)
    if engine is None:
        engine = ledger.create_ledger_engine(url)
        _ENGINES[url] = engine
    return engine


def check_partition(task: PartitionTask) -> PartitionCheck:
    """Check one partition against the ledger (runs in a worker process)."""
    started = time.monotonic()
    engine = _engine(task.ledger_url)
    entry = task.entry
    try:
        with engine.connect() as connection:
            all_fp, voided_fp, touched = _ledger_checksums(connection, task)
            live_count = all_fp[0] - voided_fp[0]
            try:
                users = read_partition(entry)
            except (EntitleError, OSError) as exc:
                counts: dict[str, int | None] = dict.fromkeys(COUNT_NAMES)
                counts["live"] = live_count
                return PartitionCheck(
                    entry.partition_id,
                    "unreadable",
                    "none",
                    counts,
                    {},
                    0,
                    live_count,
                    entry.bucket_lo,
                    entry.bucket_hi,
                    error=str(exc),
                    duration_s=time.monotonic() - started,
                )
            result = _compare(connection, task, users, all_fp, voided_fp, touched, live_count, rows_allowed=False)
            if result is None:
                # Narrow down before reading rows: checksum each of SEGMENTS_PER_PARTITION key ranges and
                # compare row by row only those that differ, one range at a time (bounded memory).
                result = _compare_by_segment(connection, task, users)
    except SQLAlchemyError as exc:
        raise LedgerError(f"{entry.label}: reconciliation could not read the ledger: {exc}") from exc
    result.duration_s = time.monotonic() - started
    result.bucket_lo, result.bucket_hi = entry.bucket_lo, entry.bucket_hi
    result.peak_rss_mb = _peak_rss_mb()
    return result


def _peak_rss_mb() -> float:
    """This process's peak resident memory (Linux and macOS report ru_maxrss in different units)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 1_048_576 if sys.platform == "darwin" else peak / 1024


def _ledger_checksums(
    connection: Connection, task: PartitionTask
) -> tuple[tuple[int, int, int], tuple[int, int, int], list[tuple[int, int, int, int, bool]]]:
    dialect = connection.dialect.name
    h1, h2 = _hash_sql(dialect)
    bounds = {"ck": task.campaign_key, "lo": task.entry.bucket_lo, "hi": task.entry.bucket_hi}
    # Voids are few: drive the join from them. SQLite's CROSS JOIN fixes that loop order (left
    # alone it scans the partition's grants and probes the voids for each).
    void_first = "CROSS JOIN" if dialect == "sqlite" else "JOIN"
    all_row = connection.execute(
        sa.text(
            f"SELECT count(*), coalesce(sum({h1}), 0), coalesce(sum({h2}), 0) FROM grants AS g "
            "WHERE g.campaign_key = :ck AND g.user_bucket BETWEEN :lo AND :hi"
        ),
        bounds,
    ).one()
    voided_row = connection.execute(
        sa.text(
            f"SELECT count(*), coalesce(sum({h1}), 0), coalesce(sum({h2}), 0) FROM grant_voids AS v "
            f"{void_first} grants AS g ON g.campaign_key = v.campaign_key AND g.user_bucket = v.user_bucket "
            "AND g.user_id = v.user_id AND g.item_key = v.item_key AND g.issue_no = v.issue_no "
            "WHERE v.campaign_key = :ck AND v.user_bucket BETWEEN :lo AND :hi"
        ),
        bounds,
    ).one()
    # Every issue of every (user, item) that has a void in this range, and whether that issue is voided.
    touched = connection.execute(
        sa.text(
            "SELECT g.user_bucket, g.user_id, g.item_key, g.issue_no, "
            "CASE WHEN w.user_id IS NULL THEN 0 ELSE 1 END AS voided "
            "FROM (SELECT DISTINCT user_bucket, user_id, item_key FROM grant_voids "
            "      WHERE campaign_key = :ck AND user_bucket BETWEEN :lo AND :hi) AS k "
            "JOIN grants AS g ON g.campaign_key = :ck AND g.user_bucket = k.user_bucket "
            "AND g.user_id = k.user_id AND g.item_key = k.item_key "
            "LEFT JOIN grant_voids AS w ON w.campaign_key = g.campaign_key AND w.user_bucket = g.user_bucket "
            "AND w.user_id = g.user_id AND w.item_key = g.item_key AND w.issue_no = g.issue_no"
        ),
        bounds,
    ).all()

    def triple(row: Any) -> tuple[int, int, int]:
        return int(row[0]), int(row[1]), int(row[2])

    return (
        triple(all_row),
        triple(voided_row),
        [(int(r[0]), int(r[1]), int(r[2]), int(r[3]), bool(r[4])) for r in touched],
    )


def _compare_by_segment(connection: Connection, task: PartitionTask, users: pl.DataFrame) -> PartitionCheck:
    """The partition checked as SEGMENTS_PER_PARTITION contiguous bucket ranges, combined."""
    entry = task.entry
    buckets = users.with_columns(user_bucket_expr("user_id").alias("_bucket"))
    width = entry.bucket_hi - entry.bucket_lo + 1
    checks: list[PartitionCheck] = []
    for index in range(SEGMENTS_PER_PARTITION):
        lo = entry.bucket_lo + width * index // SEGMENTS_PER_PARTITION
        hi = entry.bucket_lo + width * (index + 1) // SEGMENTS_PER_PARTITION - 1
        if hi < lo:
            continue
        segment = dataclasses.replace(task, entry=dataclasses.replace(entry, bucket_lo=lo, bucket_hi=hi))
        segment_users = buckets.filter(pl.col("_bucket").is_between(lo, hi)).select("user_id")
        all_fp, voided_fp, touched = _ledger_checksums(connection, segment)
        live_count = all_fp[0] - voided_fp[0]
        check = _compare(connection, segment, segment_users, all_fp, voided_fp, touched, live_count, rows_allowed=True)
        if check is None:
            raise InvariantViolation("a segment is always compared (rows_allowed=True)")
        checks.append(check)
    per_item = _merge_per_item(checks, {})
    totals = _sum_counts(per_item.values())
    frames = [c.breaks for c in checks if c.breaks is not None and c.breaks.height]
    return PartitionCheck(
        entry.partition_id,
        _compared_state(task, totals),
        "rows",
        dict(totals),
        per_item,
        sum(c.residual_expected for c in checks),
        sum(c.residual_ledger for c in checks),
        breaks=pl.concat(frames) if frames else None,
    )


def _voided_keys(touched: list[tuple[int, int, int, int, bool]]) -> set[tuple[int, int, int]]:
    """(bucket, user, item) keys whose every issue is voided: deliberately taken away, not reissued."""
    live: set[tuple[int, int, int]] = set()
    seen: set[tuple[int, int, int]] = set()
    for bucket, user_id, item_key, _issue, voided in touched:
        seen.add((bucket, user_id, item_key))
        if not voided:
            live.add((bucket, user_id, item_key))
    return seen - live


def _compare(
    connection: Connection,
    task: PartitionTask,
    users: pl.DataFrame,
    all_fp: tuple[int, int, int],
    voided_fp: tuple[int, int, int],
    touched: list[tuple[int, int, int, int, bool]],
    live_count: int,
    rows_allowed: bool,
) -> PartitionCheck | None:
    """Matched by checksum, else compared row by row, or ``None`` when rows are not allowed (too many)."""
    items_by_key = {i.item_key: i for i in task.items}
    expected_fp = expected_checksum(users, task.items)
    voided_keys = _voided_keys(touched)
    user_set = set(users["user_id"].to_list()) if voided_keys else set()
    voided_expected = [
        (u, k) for b, u, k in sorted(voided_keys) if k in items_by_key and b == user_bucket(u) and u in user_set
    ]
    adjusted = list(expected_fp)
    for user_id, item_key in voided_expected:
        h1, h2 = _row_hashes(user_id, items_by_key[item_key])
        adjusted[0] -= 1
        adjusted[1] -= h1
        adjusted[2] -= h2
    live_fp = (all_fp[0] - voided_fp[0], all_fp[1] - voided_fp[1], all_fp[2] - voided_fp[2])
    entry = task.entry
    if task.method == "checksum" and live_fp == tuple(adjusted):
        per_item: dict[int, dict[str, int]] = {}
        for item in task.items:
            voided = sum(1 for _, k in voided_expected if k == item.item_key)
            matched = users.height - voided
            per_item[item.item_key] = _counts(expected=users.height, live=matched, matched=matched, voided=voided)
        counts = _sum_counts(per_item.values())
        state = "matched" if task.granted else "not_granted"
        return PartitionCheck(
            entry.partition_id,
            state,
            "checksum",
            dict(counts),
            per_item,
            counts["expected"] - (counts["matched"] + counts["voided"]),
            live_count - counts["matched"],
        )
    if not rows_allowed:
        return None
    return _compare_rows(connection, task, users, voided_keys, live_count)


def _compared_state(task: PartitionTask, totals: dict[str, int]) -> str:
    """not_granted before the partition's grant is done (differences are work to do), else breaks or matched."""
    if not task.granted:
        return "not_granted"
    return "breaks" if any(totals[c] for c in BREAK_CLASSES) else "matched"


def _merge_per_item(checks: list[PartitionCheck], into: dict[int, dict[str, int]]) -> dict[int, dict[str, int]]:
    """Per-item counts of several checks added up (``into`` is filled and returned)."""
    for check in checks:
        for item_key, counts in check.per_item.items():
            target = into.setdefault(item_key, _counts())
            for name in COUNT_NAMES:
                target[name] += counts[name]
    return into


def _counts(**values: int) -> dict[str, int]:
    return {name: int(values.get(name, 0)) for name in COUNT_NAMES}


def _sum_counts(rows: Any) -> dict[str, int]:
    total = _counts()
    for row in rows:
        for name in COUNT_NAMES:
            total[name] += int(row.get(name) or 0)
    return total


def _compare_rows(
    connection: Connection,
    task: PartitionTask,
    users: pl.DataFrame,
    voided_keys: set[tuple[int, int, int]],
    live_count: int,
) -> PartitionCheck:
    """Join the partition's ledger rows with its expected rows and classify every difference."""
    dialect = connection.dialect.name
    entry = task.entry
    bounds = {"ck": task.campaign_key, "lo": entry.bucket_lo, "hi": entry.bucket_hi}
    vf, vu = ledger.epoch_us_sql("g.valid_from", dialect), ledger.epoch_us_sql("g.valid_until", dialect)
    ledger_schema = {
        "user_bucket": pl.Int64,
        "user_id": pl.Int64,
        "item_key": pl.Int64,
        "issue_no": pl.Int64,
        "ledger_amount_krw": pl.Int64,
        "ledger_valid_from": pl.Int64,
        "ledger_valid_until": pl.Int64,
    }
    result = connection.execute(
        sa.text(
            f"SELECT g.user_bucket, g.user_id, g.item_key, g.issue_no, g.amount_krw, {vf}, {vu} FROM grants AS g "
            "WHERE g.campaign_key = :ck AND g.user_bucket BETWEEN :lo AND :hi"
        ),
        bounds,
    )
    # In chunks: Python tuples of a whole partition (~2M rows) would cost several times the frame's memory.
    chunks = []
    while batch := result.fetchmany(ROW_FETCH_CHUNK_ROWS):
        chunks.append(pl.DataFrame([tuple(r) for r in batch], schema=ledger_schema, orient="row"))
    all_rows = pl.concat(chunks) if chunks else pl.DataFrame(schema=ledger_schema)
    del chunks
    void_rows = connection.execute(
        sa.text(
            "SELECT user_bucket, user_id, item_key, issue_no FROM grant_voids "
            "WHERE campaign_key = :ck AND user_bucket BETWEEN :lo AND :hi"
        ),
        bounds,
    ).all()
    voids = pl.DataFrame(
        [tuple(r) for r in void_rows],
        schema={"user_bucket": pl.Int64, "user_id": pl.Int64, "item_key": pl.Int64, "issue_no": pl.Int64},
        orient="row",
    )
    live = all_rows.join(voids, on=["user_bucket", "user_id", "item_key", "issue_no"], how="anti")
    items = pl.DataFrame(
        {
            "item_key": [i.item_key for i in task.items],
            "expected_amount_krw": [i.amount_krw for i in task.items],
            "expected_valid_from": [i.valid_from_us for i in task.items],
            "expected_valid_until": [i.valid_until_us for i in task.items],
        },
        schema={
            "item_key": pl.Int64,
            "expected_amount_krw": pl.Int64,
            "expected_valid_from": pl.Int64,
            "expected_valid_until": pl.Int64,
        },
    )
    live = live.join(items, on="item_key", how="left").with_columns(
        (
            pl.col("expected_valid_from").is_not_null()
            & pl.col("ledger_amount_krw").eq_missing(pl.col("expected_amount_krw"))
            & pl.col("ledger_valid_from").eq_missing(pl.col("expected_valid_from"))
            & pl.col("ledger_valid_until").eq_missing(pl.col("expected_valid_until"))
        ).alias("exact"),
        (pl.col("user_bucket") != user_bucket_expr("user_id")).alias("forged_bucket"),
    )
    forged = live.filter(pl.col("forged_bucket"))
    placed = (
        live.filter(~pl.col("forged_bucket"))
        .sort(["user_id", "item_key", "exact", "issue_no"], descending=[False, False, True, False])
        .with_columns(pl.col("issue_no").cum_count().over(["user_id", "item_key"]).alias("rank"))
    )
    primary = placed.filter(pl.col("rank") == 1)
    extra = placed.filter(pl.col("rank") > 1)

    expected = users.select("user_id").join(items, how="cross")
    joined = expected.join(
        primary.drop("expected_amount_krw", "expected_valid_from", "expected_valid_until"),
        on=["user_id", "item_key"],
        how="full",
        coalesce=True,
    )
    voided_pairs = pl.DataFrame(
        [(u, k) for b, u, k in voided_keys if b == user_bucket(u)],
        schema={"user_id": pl.Int64, "item_key": pl.Int64},
        orient="row",
    ).with_columns(pl.lit(True).alias("is_voided"))
    joined = joined.join(voided_pairs, on=["user_id", "item_key"], how="left").with_columns(
        pl.when(pl.col("expected_valid_from").is_null())
        .then(pl.lit("unexpected"))
        .when(pl.col("ledger_valid_from").is_null() & pl.col("is_voided").fill_null(False))
        .then(pl.lit("voided"))
        .when(pl.col("ledger_valid_from").is_null() & pl.col("issue_no").is_null())
        .then(pl.lit("missing"))
        .when(pl.col("exact"))
        .then(pl.lit("matched"))
        .otherwise(pl.lit("terms_mismatch"))
        .alias("outcome")
    )
    forged_classes = [_classify_forged(connection, task, row) for row in forged.iter_rows(named=True)]
    forged = forged.with_columns(pl.Series("outcome", forged_classes, dtype=pl.String))
    extra = extra.with_columns(pl.lit("duplicate").alias("outcome"))

    per_item: dict[int, dict[str, int]] = {i.item_key: _counts(expected=users.height) for i in task.items}
    for frame in (joined, forged, extra):
        for item_key, outcome, n in frame.group_by(["item_key", "outcome"]).len().iter_rows():
            counts = per_item.setdefault(int(item_key), _counts())
            counts[str(outcome)] += int(n)
            if outcome != "missing" and outcome != "voided":
                counts["live"] += int(n)
    totals = _sum_counts(per_item.values())
    residual_expected = totals["expected"] - (
        totals["matched"] + totals["terms_mismatch"] + totals["missing"] + totals["voided"]
    )
    residual_ledger = live_count - (
        totals["matched"] + totals["terms_mismatch"] + totals["unexpected"] + totals["duplicate"]
    )
    state = _compared_state(task, totals)
    breaks = _break_rows(task, joined, forged, extra) if state == "breaks" else None
    return PartitionCheck(
        entry.partition_id,
        state,
        "rows",
        dict(totals),
        per_item,
        residual_expected,
        residual_ledger,
        breaks=breaks,
    )


def _classify_forged(connection: Connection, task: PartitionTask, row: dict[str, Any]) -> str:
    """A live row stored under a bucket that is not its user's: a duplicate if the user's real row is live."""
    real_bucket = user_bucket(int(row["user_id"]))
    found = connection.execute(
        sa.text(
            "SELECT 1 FROM grants AS g WHERE g.campaign_key = :ck AND g.user_bucket = :b AND g.user_id = :u "
            "AND g.item_key = :i AND NOT EXISTS (SELECT 1 FROM grant_voids AS v WHERE v.campaign_key = g.campaign_key "
            "AND v.user_bucket = g.user_bucket AND v.user_id = g.user_id AND v.item_key = g.item_key "
            "AND v.issue_no = g.issue_no) LIMIT 1"
        ),
        {"ck": task.campaign_key, "b": real_bucket, "u": int(row["user_id"]), "i": int(row["item_key"])},
    ).first()
    return "duplicate" if found is not None else "unexpected"


def _break_rows(task: PartitionTask, joined: pl.DataFrame, forged: pl.DataFrame, extra: pl.DataFrame) -> pl.DataFrame:
    """One row per break with its class, both sides' terms and a sentence saying what to do."""
    columns = [
        "outcome",
        "user_id",
        "user_bucket",
        "item_key",
        "issue_no",
        "expected_amount_krw",
        "expected_valid_from",
        "expected_valid_until",
        "ledger_amount_krw",
        "ledger_valid_from",
        "ledger_valid_until",
    ]
    joined = joined.with_columns(
        pl.col("user_bucket").fill_null(user_bucket_expr("user_id")),
    )
    frames = [frame.select(columns).filter(pl.col("outcome").is_in(BREAK_CLASSES)) for frame in (joined, forged, extra)]
    breaks = pl.concat(frames).rename({"outcome": "break_class"})
    known = dict(task.known_skus)
    excluded = _excluded_users(task.excluded_file, breaks)
    campaign_items = {i.item_key for i in task.items}
    details = [_detail(row, known, campaign_items, excluded, task.snapshot_id) for row in breaks.iter_rows(named=True)]
    return breaks.with_columns(
        pl.Series("item_sku", [known.get(int(k)) for k in breaks["item_key"]], dtype=pl.String),
        pl.Series("detail", details, dtype=pl.String),
        pl.lit(task.entry.partition_id).cast(pl.Int32).alias("partition_id"),
    )


def _excluded_users(excluded_file: storage.Location | None, breaks: pl.DataFrame) -> set[int]:
    if excluded_file is None:
        return set()
    candidates = breaks.filter(pl.col("break_class") == "unexpected").select("user_id")
    if candidates.height == 0 or not storage.exists(excluded_file):
        return set()
    excluded = schemas.read_parquet(excluded_file, "snapshot")
    return set(candidates.join(excluded, on="user_id", how="semi")["user_id"].to_list())


def _detail(
    row: dict[str, Any], known: dict[int, str], campaign_items: set[int], excluded: set[int], snapshot_id: str
) -> str:
    cls = row["break_class"]
    sku = known.get(int(row["item_key"]), f"item key {row['item_key']}")
    if cls == "missing":
        return f"{sku} was never granted to this eligible user; `entitle repair` grants it"
    if cls == "terms_mismatch":
        diffs = []
        for name, label in (("amount_krw", "amount_krw"), ("valid_from", "valid_from"), ("valid_until", "valid_until")):
            want, got = row[f"expected_{name}"], row[f"ledger_{name}"]
            if want != got:
                if name != "amount_krw":
                    want, got = _iso(want), _iso(got)
                diffs.append(f"{label} {got} in the ledger, {want} in the campaign")
        return f"{sku}: " + "; ".join(diffs) + "; `entitle repair` voids it and reissues it with the campaign's terms"
    if cls == "duplicate":
        return (
            f"a second live grant of {sku} for this user (bucket {row['user_bucket']}, issue {row['issue_no']}); "
            "void it: `entitle void --break ID`"
        )
    if int(row["item_key"]) not in campaign_items:
        why = f"{sku} is not an item of the campaign"
    elif int(row["user_id"]) in excluded:
        why = f"the user is on the exclusion list of snapshot {snapshot_id}"
    elif row["user_bucket"] != user_bucket(int(row["user_id"])):
        why = "the row's user_bucket does not belong to its user id"
    else:
        why = f"the user is not in snapshot {snapshot_id}"
    return f"granted but not expected: {why}; void it if it should not exist (`entitle void --break ID`)"


def _iso(value: int | None) -> str:
    if value is None:
        return "permanent"
    return ledger.from_epoch_us(int(value)).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- the whole campaign


def item_terms(pipeline: runs.Pipeline) -> tuple[ItemTerms, ...]:
    """The campaign's items with their ledger keys and terms in epoch microseconds."""
    return tuple(
        ItemTerms(
            pipeline.keys.item_keys[i.sku],
            i.sku,
            i.amount_krw,
            ledger.to_epoch_us(i.valid_from),
            None if i.valid_until is None else ledger.to_epoch_us(i.valid_until),
        )
        for i in pipeline.campaign.items
    )


def new_reconciliation_id(now: dt.datetime) -> str:
    """A sortable, unique reconciliation id."""
    return f"rec-{now:%Y%m%dT%H%M%SZ}-{os.urandom(4).hex()}"


def reconcile(
    pipeline: runs.Pipeline,
    snapshot_id: str | None = None,
    method: str = "checksum",
    workers: int | None = None,
    on_partition: Callable[[PartitionCheck], None] | None = None,
) -> Reconciliation:
    """Reconcile the campaign's snapshot against the ledger, store the result and export it."""
    invariant(method in ("checksum", "rows"), f"unknown reconciliation method {method!r}")
    started_mono = time.monotonic()
    started = pipeline.settings.clock()
    row = runs.snapshot_row(pipeline, snapshot_id)
    snapshot_id = str(row["snapshot_id"])
    count = int(row["partition_count"])
    try:
        entries = load_manifest(partitions_dir(pipeline.settings.location(row["snapshot_dir"]), count))
    except EntitleError as exc:
        raise SnapshotError(
            f"snapshot {snapshot_id}: its partition manifest cannot be read ({exc}); run the grant again to rebuild it"
        ) from exc
    latest = runs.latest_attempts(pipeline, snapshot_id, count)
    known = _known_skus(pipeline)
    terms = item_terms(pipeline)
    excluded = pipeline.settings.location(row["snapshot_dir"]) / EXCLUDED_FILE_NAME
    tasks = [
        PartitionTask(
            pipeline.settings.ledger_url,
            pipeline.keys.campaign_key,
            snapshot_id,
            terms,
            known,
            entry,
            latest.get(entry.partition_id, {}).get("status") == "done",
            method,
            excluded if storage.exists(excluded) else None,
        )
        for entry in entries
    ]
    checks = list(_run_checks(tasks, workers or pipeline.settings.reconcile_workers, on_partition))
    stray = _stray_grants(pipeline.engine, pipeline.keys.campaign_key)
    issuer_checks = three_way.check_issuers(pipeline, count)
    reconciliation_id = new_reconciliation_id(started)
    export_dir = (
        pipeline.settings.home / "campaigns" / pipeline.campaign.campaign_id / "reconciliations" / reconciliation_id
    )
    return _finish(
        pipeline,
        reconciliation_id,
        snapshot_id,
        count,
        method,
        started,
        started_mono,
        checks,
        stray,
        export_dir,
        terms,
        dict(known),
        issuer_checks,
    )


def _known_skus(pipeline: runs.Pipeline) -> tuple[tuple[int, str], ...]:
    table = ledger.campaign_items
    with pipeline.engine.connect() as connection:
        rows = connection.execute(
            sa.select(table.c.item_key, table.c.item_sku).where(table.c.campaign_key == pipeline.keys.campaign_key)
        ).all()
    return tuple((int(k), str(s)) for k, s in rows)


def _run_checks(
    tasks: list[PartitionTask], workers: int, on_partition: Callable[[PartitionCheck], None] | None
) -> Iterator[PartitionCheck]:
    if workers <= 1 or len(tasks) <= 1:
        try:
            for task in tasks:
                check = check_partition(task)
                if on_partition is not None:
                    on_partition(check)
                yield check
        finally:
            # In-process, the per-URL engines would outlive the reconciliation (and hold connections).
            while _ENGINES:
                _ENGINES.popitem()[1].dispose()
        return
    # Separate processes: the checksum scans run inside SQLite/PostgreSQL on one core each.  They are
    # fresh interpreters (pipeline.worker_processes), not multiprocessing children: Polars must not be
    # forked after its thread pool started, "spawn" re-imports the parent's __main__ (the airflow
    # console script under Airflow's task supervisor, which dies there), and a daemonic process (a
    # Celery prefork worker's child) may not start multiprocessing children at all.
    with closing(map_in_processes(check_partition, tasks, min(workers, len(tasks)))) as checks:
        for check in checks:
            if on_partition is not None:
                on_partition(check)
            yield check


def _stray_grants(engine: Engine, campaign_key: int) -> int:
    """Grants whose user_bucket lies outside every partition (only possible with the CHECK bypassed)."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                # Two range seeks on the key; an OR of both would make SQLite scan every grant.
                sa.text(
                    "SELECT (SELECT count(*) FROM grants WHERE campaign_key = :ck AND user_bucket < 0) "
                    "+ (SELECT count(*) FROM grants WHERE campaign_key = :ck AND user_bucket >= :m)"
                ),
                {"ck": campaign_key, "m": BUCKET_MODULUS},
            ).scalar_one()
        )


def _finish(
    pipeline: runs.Pipeline,
    reconciliation_id: str,
    snapshot_id: str,
    partition_count: int,
    method: str,
    started: dt.datetime,
    started_mono: float,
    checks: list[PartitionCheck],
    stray: int,
    export_dir: Path,
    items: tuple[ItemTerms, ...],
    known: dict[int, str],
    issuer_checks: list[IssuerCheck],
) -> Reconciliation:
    per_item = _merge_per_item(checks, {i.item_key: _counts() for i in items})
    bridge = _sum_counts(per_item.values())
    residual_expected = sum(c.residual_expected for c in checks)
    residual_ledger = sum(c.residual_ledger for c in checks) + stray
    bridge_doc = {
        "expected": bridge["expected"],
        "matched": bridge["matched"],
        "terms_mismatch": bridge["terms_mismatch"],
        "missing": bridge["missing"],
        "voided": bridge["voided"],
        "ledger": bridge["live"]
        + sum(int(c.counts.get("live") or 0) for c in checks if c.state == "unreadable")
        + stray,
        "unexpected": bridge["unexpected"],
        "duplicate": bridge["duplicate"],
        "residual_expected": residual_expected,
        "residual_ledger": residual_ledger,
        "issuer_missing": sum(i.issuer_missing for i in issuer_checks),
        "issuer_unexpected": sum(i.issuer_unexpected for i in issuer_checks),
    }
    frames = [c.breaks for c in checks if c.breaks is not None and c.breaks.height]
    frames += [i.breaks for i in issuer_checks if i.breaks is not None and i.breaks.height]
    breaks = pl.concat(frames, how="diagonal_relaxed") if frames else None
    # Differences in partitions not granted yet are work to do, not breaks.
    open_breaks = sum(int(c.counts.get(n) or 0) for c in checks if c.state == "breaks" for n in BREAK_CLASSES)
    open_breaks += bridge_doc["issuer_missing"] + bridge_doc["issuer_unexpected"]
    itemized = 0 if breaks is None else min(breaks.height, BREAKS_ITEMIZED_MAX)
    if breaks is not None and breaks.height > BREAKS_ITEMIZED_MAX:
        breaks = breaks.head(BREAKS_ITEMIZED_MAX)
    unreadable = [c for c in checks if c.state == "unreadable"]
    not_granted = [c for c in checks if c.state == "not_granted"]
    verdict, explanation = _verdict(bridge_doc, unreadable, not_granted, stray, open_breaks, itemized, issuer_checks)
    finished = pipeline.settings.clock()
    with write_transaction(pipeline.engine) as connection:
        reconciliation_key = int(
            connection.execute(
                recon_runs.insert().values(
                    reconciliation_id=reconciliation_id,
                    campaign_key=pipeline.keys.campaign_key,
                    snapshot_id=snapshot_id,
                    partition_count=partition_count,
                    method=method,
                    verdict=verdict,
                    explanation=explanation,
                    expected=bridge_doc["expected"],
                    matched=bridge_doc["matched"],
                    terms_mismatch=bridge_doc["terms_mismatch"],
                    missing=bridge_doc["missing"],
                    voided=bridge_doc["voided"],
                    ledger_live=bridge_doc["ledger"],
                    unexpected=bridge_doc["unexpected"],
                    duplicate=bridge_doc["duplicate"],
                    residual_expected=residual_expected,
                    residual_ledger=residual_ledger,
                    issuer_missing=bridge_doc["issuer_missing"],
                    issuer_unexpected=bridge_doc["issuer_unexpected"],
                    open_breaks=open_breaks,
                    breaks_itemized=itemized,
                    export_dir=str(export_dir),
                    started_at=started,
                    finished_at=finished,
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        )
        if per_item:
            connection.execute(
                recon_items.insert(),
                [
                    {"reconciliation_key": reconciliation_key, "item_key": k, "item_sku": known.get(k, f"#{k}"), **c}
                    for k, c in sorted(per_item.items())
                ],
            )
        connection.execute(
            recon_partitions.insert(),
            [
                {
                    "reconciliation_key": reconciliation_key,
                    "partition_id": c.partition_id,
                    "state": c.state,
                    "method": c.method,
                    "error": c.error,
                    **{n: c.counts.get(n) for n in COUNT_NAMES},
                }
                for c in checks
            ],
        )
        compared_issuers = {i.issuer for i in issuer_checks if i.state == "compared"}
        break_ids, resolved = _store_breaks(
            connection, pipeline, reconciliation_key, reconciliation_id, breaks, checks, compared_issuers
        )
    breaks_file = export_dir / EXPORT_FILE_BREAKS
    export = _breaks_export(breaks, break_ids)
    schemas.write_parquet(export, "breaks", breaks_file)
    result = Reconciliation(
        reconciliation_id=reconciliation_id,
        campaign_id=pipeline.campaign.campaign_id,
        snapshot_id=snapshot_id,
        partition_count=partition_count,
        method=method,
        started_at=started.isoformat(),
        finished_at=finished.isoformat(),
        duration_s=round(time.monotonic() - started_mono, 3),
        verdict=verdict,
        explanation=explanation,
        bridge=bridge_doc,
        items=[{"item_sku": known.get(k, f"#{k}"), "item_key": k, **c} for k, c in sorted(per_item.items())],
        partitions=[
            {
                "partition_id": c.partition_id,
                "label": partition_label(c.partition_id),
                "state": c.state,
                "method": c.method,
                "expected": c.counts.get("expected"),
                "live": c.counts.get("live"),
                "breaks": sum(int(c.counts.get(n) or 0) for n in BREAK_CLASSES),
                "error": c.error,
                "duration_s": round(c.duration_s, 3),
            }
            for c in checks
        ],
        breaks_by_class={c: bridge[c] for c in BREAK_CLASSES}
        | ({c: bridge_doc[c] for c in ISSUER_BREAK_CLASSES} if issuer_checks else {}),
        open_breaks=open_breaks,
        breaks_itemized=itemized,
        resolved_breaks=resolved,
        top_breaks=[
            {
                "break_id": r["break_id"],
                "break_class": r["break_class"],
                "user_id": r["user_id"],
                "item_sku": r["item_sku"],
                "partition_id": r["partition_id"],
                "detail": r["detail"],
            }
            for r in export.head(TOP_BREAKS_IN_RESULT).iter_rows(named=True)
        ],
        export_dir=str(export_dir),
        breaks_file=str(breaks_file),
        checksum_partitions=sum(1 for c in checks if c.method == "checksum"),
        row_partitions=sum(1 for c in checks if c.method == "rows"),
        grants_checked=bridge_doc["ledger"],
        extra={"stray_grants": stray, "worker_peak_rss_mb": round(max((c.peak_rss_mb for c in checks), default=0.0))},
        issuers=[i.summary() for i in issuer_checks],
    )
    schemas.write_json(export_dir / EXPORT_FILE_RESULT, result.as_dict())
    return result


def _verdict(
    bridge: dict[str, int],
    unreadable: list[PartitionCheck],
    not_granted: list[PartitionCheck],
    stray: int,
    open_breaks: int,
    itemized: int,
    issuer_checks: list[IssuerCheck],
) -> tuple[str, str]:
    reasons = []
    for check in issuer_checks:
        if check.state != "compared":
            reasons.append(
                f"{check.error}; its {check.ledger_live:,} live ledger grants could not be compared with it "
                "(is the issuer up? then reconcile again)"
            )
    if unreadable:
        ids = [c.partition_id for c in unreadable]
        reasons.append(
            f"{len(ids)} partition file(s) unreadable ({ids[:10]}: {unreadable[0].error}); their "
            f"{sum(int(c.counts.get('live') or 0) for c in unreadable):,} ledger grants could not be compared"
        )
    if not_granted:
        ids = [c.partition_id for c in not_granted]
        missing = sum(int(c.counts.get("missing") or 0) for c in not_granted)
        reasons.append(f"{len(ids)} partition(s) not granted yet ({ids[:10]}; {missing:,} grants to go)")
    if stray:
        reasons.append(
            f"{stray:,} grants have a user_bucket outside every partition (the CHECK constraint was bypassed)"
        )
    other_residual = (
        bridge["residual_expected"] != 0
        or bridge["residual_ledger"] - stray - sum(int(c.counts.get("live") or 0) for c in unreadable) != 0
    )
    if other_residual:
        reasons.append(
            f"unexplained residual: expected side {bridge['residual_expected']:,}, ledger side "
            f"{bridge['residual_ledger']:,} (a bug: please report it)"
        )
    if reasons:
        return "INCOMPLETE", "; ".join(reasons)
    if open_breaks:
        classes = ", ".join(f"{bridge[c]:,} {c}" for c in BREAK_CLASSES + ISSUER_BREAK_CLASSES if bridge[c])
        note = "" if itemized >= open_breaks else f" (first {itemized:,} itemized)"
        issuer_note = (
            "; `entitle repair` delivers issuer_missing again; issuer_unexpected is revoked at the issuer by a person"
            if bridge["issuer_missing"] or bridge["issuer_unexpected"]
            else ""
        )
        return (
            "BREAKS",
            f"{open_breaks:,} open breaks: {classes}{note}; list them with `entitle query open_breaks`; "
            f"`entitle repair` fixes missing and terms_mismatch, `entitle void` the rest{issuer_note}",
        )
    voided = f", {bridge['voided']:,} voided on purpose" if bridge["voided"] else ""
    held = "".join(
        f"; issuer {i.issuer!r} holds exactly the {i.matched:,} live grants it delivers" for i in issuer_checks
    )
    return (
        "RECONCILED",
        f"all {bridge['expected']:,} expected grants are in the ledger with the campaign's terms{voided}{held}",
    )


def _break_id(campaign_id: str, row: dict[str, Any]) -> str:
    issue = -1 if row["issue_no"] is None else int(row["issue_no"])
    key = f"{campaign_id}|{row['break_class']}|{row['user_id']}|{row['user_bucket']}|{row['item_key']}|{issue}"
    if row["break_class"] in ISSUER_BREAK_CLASSES:
        key += f"|{row['issuer']}|{row['item_sku']}"  # an exported sku the campaign does not know has no item key
    return "b-" + hashlib.sha256(key.encode()).hexdigest()[: BREAK_ID_CHARS - 2]


def _store_breaks(
    connection: Connection,
    pipeline: runs.Pipeline,
    reconciliation_key: int,
    reconciliation_id: str,
    breaks: pl.DataFrame | None,
    checks: list[PartitionCheck],
    compared_issuers: set[str],
) -> tuple[dict[str, str], int]:
    """Open or keep open this run's breaks, resolve the ones no longer found; returns {id: first seen in}."""
    campaign_key = pipeline.keys.campaign_key
    rows = [] if breaks is None else list(breaks.iter_rows(named=True))
    ids = [_break_id(pipeline.campaign.campaign_id, r) for r in rows]
    existing: dict[str, str] = {}
    for start in range(0, len(ids), _SQL_IN_CHUNK_ROWS):
        chunk = ids[start : start + _SQL_IN_CHUNK_ROWS]
        for break_id, first_seen in connection.execute(
            sa.select(recon_breaks.c.break_id, recon_runs.c.reconciliation_id)
            .join(recon_runs, recon_runs.c.reconciliation_key == recon_breaks.c.first_seen_key)
            .where(recon_breaks.c.break_id.in_(chunk))
        ):
            existing[str(break_id)] = str(first_seen)
    inserts = []
    for break_id, row in zip(ids, rows, strict=True):
        if break_id in existing:
            continue
        inserts.append(
            {
                "break_id": break_id,
                "campaign_key": campaign_key,
                "break_class": row["break_class"],
                "user_id": row["user_id"],
                "user_bucket": row["user_bucket"],
                "item_key": row["item_key"],
                "item_sku": row["item_sku"],
                "issue_no": row["issue_no"],
                "partition_id": row["partition_id"],
                "expected_amount_krw": row["expected_amount_krw"],
                "expected_valid_from": _instant(row["expected_valid_from"]),
                "expected_valid_until": _instant(row["expected_valid_until"]),
                "ledger_amount_krw": row["ledger_amount_krw"],
                "ledger_valid_from": _instant(row["ledger_valid_from"]),
                "ledger_valid_until": _instant(row["ledger_valid_until"]),
                "detail": row["detail"],
                "issuer": row.get("issuer"),
                "status": "open",
                "first_seen_key": reconciliation_key,
                "last_seen_key": reconciliation_key,
            }
        )
    if inserts:
        connection.execute(recon_breaks.insert(), inserts)
    seen_again = [i for i in ids if i in existing]
    if seen_again:
        connection.execute(
            recon_breaks.update()
            .where(recon_breaks.c.break_id == sa.bindparam("b_id"))
            .values(status="open", last_seen_key=reconciliation_key, resolved_key=None),
            [{"b_id": i} for i in seen_again],
        )
    # Resolve open breaks that this run looked for and did not find: partitions compared in full, and
    # issuers whose export was read.
    current = set(ids)
    bounds = [(c.bucket_lo, c.bucket_hi) for c in checks if c.state in ("matched", "breaks")]
    open_rows = connection.execute(
        sa.select(
            recon_breaks.c.break_id, recon_breaks.c.user_bucket, recon_breaks.c.break_class, recon_breaks.c.issuer
        ).where(recon_breaks.c.campaign_key == campaign_key, recon_breaks.c.status == "open")
    ).all()

    def looked_for(bucket: int, break_class: str, issuer: str | None) -> bool:
        if break_class in ISSUER_BREAK_CLASSES:
            return issuer in compared_issuers
        return any(lo <= bucket <= hi for lo, hi in bounds)

    resolved = [
        str(b) for b, bucket, cls, issuer in open_rows if str(b) not in current and looked_for(int(bucket), cls, issuer)
    ]
    if resolved:
        connection.execute(
            recon_breaks.update()
            .where(recon_breaks.c.break_id == sa.bindparam("b_id"))
            .values(status="resolved", resolved_key=reconciliation_key),
            [{"b_id": i} for i in resolved],
        )
    first_seen = {i: existing.get(i, reconciliation_id) for i in ids}
    return first_seen, len(resolved)


def _instant(value: int | None) -> dt.datetime | None:
    return None if value is None else ledger.from_epoch_us(int(value))


def _breaks_export(breaks: pl.DataFrame | None, first_seen: dict[str, str]) -> pl.DataFrame:
    columns: dict[str, Any] = {
        "break_id": pl.String,
        "break_class": pl.String,
        "user_id": pl.Int64,
        "user_bucket": pl.Int64,
        "item_key": pl.Int32,
        "item_sku": pl.String,
        "issue_no": pl.Int32,
        "partition_id": pl.Int32,
        "expected_amount_krw": pl.Int64,
        "expected_valid_from": pl.Datetime("us", "UTC"),
        "expected_valid_until": pl.Datetime("us", "UTC"),
        "ledger_amount_krw": pl.Int64,
        "ledger_valid_from": pl.Datetime("us", "UTC"),
        "ledger_valid_until": pl.Datetime("us", "UTC"),
        "detail": pl.String,
        "first_seen_in": pl.String,
        "issuer": pl.String,
    }
    if breaks is None or breaks.height == 0:
        return pl.DataFrame(schema=columns)
    ids = list(first_seen)
    if "issuer" not in breaks.columns:
        breaks = breaks.with_columns(pl.lit(None, dtype=pl.String).alias("issuer"))
    frame = breaks.with_columns(
        pl.Series("break_id", ids, dtype=pl.String),
        pl.Series("first_seen_in", [first_seen[i] for i in ids], dtype=pl.String),
    )
    stamp = [c for c, t in columns.items() if isinstance(t, pl.Datetime)]
    frame = frame.with_columns([pl.col(c).cast(pl.Datetime("us")).dt.replace_time_zone("UTC") for c in stamp])
    return frame.select([pl.col(c).cast(t) for c, t in columns.items()]).sort(
        ["partition_id", "user_bucket", "user_id", "item_key", "break_class"]
    )


def load_result(pipeline: runs.Pipeline, reconciliation_id: str | None = None) -> dict[str, Any]:
    """The stored result document of a reconciliation (default: the campaign's latest)."""
    query = sa.select(recon_runs.c.reconciliation_id, recon_runs.c.export_dir).where(
        recon_runs.c.campaign_key == pipeline.keys.campaign_key
    )
    if reconciliation_id is not None:
        query = query.where(recon_runs.c.reconciliation_id == reconciliation_id)
    with pipeline.engine.connect() as connection:
        row = connection.execute(query.order_by(recon_runs.c.reconciliation_key.desc()).limit(1)).first()
    if row is None:
        which = f"no reconciliation {reconciliation_id!r}" if reconciliation_id else "no reconciliation yet"
        raise SnapshotError(
            f"campaign {pipeline.campaign.campaign_id!r} has {which} in the ledger; run `entitle reconcile`"
        )
    path = Path(str(row.export_dir)) / EXPORT_FILE_RESULT
    try:
        document: dict[str, Any] = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise SnapshotError(
            f"{path}: the result of reconciliation {row.reconciliation_id} cannot be read ({exc}); "
            "run `entitle reconcile` again"
        ) from exc
    return document
