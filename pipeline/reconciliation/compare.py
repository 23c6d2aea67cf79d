"""One partition of a campaign against the ledger, and the partitions' findings added up.

:func:`check_partition` runs in a worker process (by module path, see
:mod:`pipeline.worker_processes`) with a picklable :class:`PartitionTask` and returns a
:class:`PartitionCheck`:

1. The partition's checksums (:mod:`pipeline.reconciliation.checksums`), expected
   against the database's, voided rows taken out on both sides. Equal: the partition
   matches without reading a row.
2. Otherwise the partition is checksummed again as :data:`SEGMENTS_PER_PARTITION` key
   ranges, and only the ranges that differ (or every range, with ``method="rows"``) are
   compared row by row: the ledger rows and the expected rows are joined on (user, item)
   and every difference is classified ``missing``, ``unexpected``, ``terms_mismatch`` or
   ``duplicate``, with a detail saying what to do. An expected grant voided on purpose
   (and not reissued) is ``voided``: explained, not a break.

Per partition, expected = matched + terms_mismatch + missing + voided and live =
matched + terms_mismatch + unexpected + duplicate; what the counts leave over is the
partition's residual. :class:`Tally` adds up the partitions and the issuers' checks.
"""

from __future__ import annotations

import dataclasses
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline import ledger, schemas, storage
from pipeline.errors import EntitleError, InvariantViolation, LedgerError
from pipeline.grants.partitioning import PartitionEntry, read_partition, user_bucket, user_bucket_expr
from pipeline.reconciliation.checksums import (
    ItemTerms,
    LedgerChecksums,
    TouchedIssue,
    expected_checksum,
    ledger_checksums,
    row_hashes,
)
from pipeline.reconciliation.three_way import ISSUER_BREAK_CLASSES, IssuerCheck
from pipeline.reconciliation.verdict import REPAIR_COMMAND, VOID_BREAK_COMMAND

BREAK_CLASSES = ("missing", "unexpected", "terms_mismatch", "duplicate")
COUNT_NAMES = ("expected", "live", "matched", "terms_mismatch", "missing", "voided", "unexpected", "duplicate")
BREAKS_ITEMIZED_MAX = 1_000_000  # break rows itemized per reconciliation; counts stay exact beyond it
ROW_FETCH_CHUNK_ROWS = 100_000
SEGMENTS_PER_PARTITION = 64  # key ranges checksummed separately once a partition's checksum differs


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


# --------------------------------------------------------------------------- one partition (worker)

_ENGINES: dict[str, Engine] = {}


def _engine(url: str) -> Engine:
    # One engine per worker process and URL: a reconciliation checks many partitions per worker.
    engine = _ENGINES.get(url)
    if engine is None:
        engine = ledger.create_ledger_engine(url)
        _ENGINES[url] = engine
    return engine


def dispose_engines() -> None:
    """Close this process's ledger engines (in-process checks must not outlive the reconciliation)."""
    while _ENGINES:
        _ENGINES.popitem()[1].dispose()


def check_partition(task: PartitionTask) -> PartitionCheck:
    """Check one partition against the ledger (runs in a worker process)."""
    started = time.monotonic()
    engine = _engine(task.ledger_url)
    entry = task.entry
    try:
        with engine.connect() as connection:
            side = ledger_checksums(connection, task.campaign_key, entry.bucket_lo, entry.bucket_hi)
            try:
                users = read_partition(entry)
            except (EntitleError, OSError) as exc:
                counts: dict[str, int | None] = dict.fromkeys(COUNT_NAMES)
                counts["live"] = side.live_count
                return PartitionCheck(
                    entry.partition_id,
                    "unreadable",
                    "none",
                    counts,
                    {},
                    0,
                    side.live_count,
                    entry.bucket_lo,
                    entry.bucket_hi,
                    error=str(exc),
                    duration_s=time.monotonic() - started,
                )
            result = _compare(connection, task, users, side, rows_allowed=False)
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
        side = ledger_checksums(connection, task.campaign_key, lo, hi)
        check = _compare(connection, segment, segment_users, side, rows_allowed=True)
        if check is None:
            raise InvariantViolation("a segment is always compared (rows_allowed=True)")
        checks.append(check)
    per_item = merge_per_item(checks, {})
    totals = sum_counts(per_item.values())
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


def _voided_keys(touched: Iterable[TouchedIssue]) -> set[tuple[int, int, int]]:
    """(bucket, user, item) keys whose every issue is voided: deliberately taken away, not reissued."""
    live: set[tuple[int, int, int]] = set()
    seen: set[tuple[int, int, int]] = set()
    for bucket, user_id, item_key, _issue, voided in touched:
        seen.add((bucket, user_id, item_key))
        if not voided:
            live.add((bucket, user_id, item_key))
    return seen - live


def _compare(
    connection: Connection, task: PartitionTask, users: pl.DataFrame, side: LedgerChecksums, rows_allowed: bool
) -> PartitionCheck | None:
    """Matched by checksum, else compared row by row, or ``None`` when rows are not allowed (too many)."""
    items_by_key = {i.item_key: i for i in task.items}
    expected_fp = expected_checksum(users, task.items)
    voided_keys = _voided_keys(side.touched)
    user_set = set(users["user_id"].to_list()) if voided_keys else set()
    voided_expected = [
        (u, k) for b, u, k in sorted(voided_keys) if k in items_by_key and b == user_bucket(u) and u in user_set
    ]
    adjusted = list(expected_fp)
    for user_id, item_key in voided_expected:
        h1, h2 = row_hashes(user_id, items_by_key[item_key])
        adjusted[0] -= 1
        adjusted[1] -= h1
        adjusted[2] -= h2
    if task.method == "checksum" and side.live == tuple(adjusted):
        per_item: dict[int, dict[str, int]] = {}
        for item in task.items:
            voided = sum(1 for _, k in voided_expected if k == item.item_key)
            matched = users.height - voided
            per_item[item.item_key] = counts_of(expected=users.height, live=matched, matched=matched, voided=voided)
        counts = sum_counts(per_item.values())
        state = "matched" if task.granted else "not_granted"
        return PartitionCheck(
            task.entry.partition_id,
            state,
            "checksum",
            dict(counts),
            per_item,
            counts["expected"] - (counts["matched"] + counts["voided"]),
            side.live_count - counts["matched"],
        )
    if not rows_allowed:
        return None
    return _compare_rows(connection, task, users, voided_keys, side.live_count)


def _compared_state(task: PartitionTask, totals: dict[str, int]) -> str:
    """not_granted before the partition's grant is done (differences are work to do), else breaks or matched."""
    if not task.granted:
        return "not_granted"
    return "breaks" if any(totals[c] for c in BREAK_CLASSES) else "matched"


def merge_per_item(checks: Iterable[PartitionCheck], into: dict[int, dict[str, int]]) -> dict[int, dict[str, int]]:
    """Per-item counts of several checks added up (``into`` is filled and returned)."""
    for check in checks:
        for item_key, counts in check.per_item.items():
            target = into.setdefault(item_key, counts_of())
            for name in COUNT_NAMES:
                target[name] += counts[name]
    return into


def counts_of(**values: int) -> dict[str, int]:
    """Every count of :data:`COUNT_NAMES`, 0 unless given."""
    return {name: int(values.get(name, 0)) for name in COUNT_NAMES}


def sum_counts(rows: Iterable[dict[str, int]]) -> dict[str, int]:
    """The counts of several rows added up."""
    total = counts_of()
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

    per_item: dict[int, dict[str, int]] = {i.item_key: counts_of(expected=users.height) for i in task.items}
    for frame in (joined, forged, extra):
        for item_key, outcome, n in frame.group_by(["item_key", "outcome"]).len().iter_rows():
            counts = per_item.setdefault(int(item_key), counts_of())
            counts[str(outcome)] += int(n)
            if outcome != "missing" and outcome != "voided":
                counts["live"] += int(n)
    totals = sum_counts(per_item.values())
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
            f"AND g.item_key = :i AND {ledger.LIVE_GRANT_SQL} LIMIT 1"
        ),
        {"ck": task.campaign_key, "b": real_bucket, "u": int(row["user_id"]), "i": int(row["item_key"])},
    ).first()
    return "duplicate" if found is not None else "unexpected"


# --------------------------------------------------------------------------- break rows


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
        return f"{sku} was never granted to this eligible user; `{REPAIR_COMMAND}` grants it"
    if cls == "terms_mismatch":
        diffs = []
        for name, label in (("amount_krw", "amount_krw"), ("valid_from", "valid_from"), ("valid_until", "valid_until")):
            want, got = row[f"expected_{name}"], row[f"ledger_{name}"]
            if want != got:
                if name != "amount_krw":
                    want, got = _iso(want), _iso(got)
                diffs.append(f"{label} {got} in the ledger, {want} in the campaign")
        repair = f"`{REPAIR_COMMAND}` voids it and reissues it with the campaign's terms"
        return f"{sku}: " + "; ".join(diffs) + f"; {repair}"
    if cls == "duplicate":
        return (
            f"a second live grant of {sku} for this user (bucket {row['user_bucket']}, issue {row['issue_no']}); "
            f"void it: `{VOID_BREAK_COMMAND}`"
        )
    if int(row["item_key"]) not in campaign_items:
        why = f"{sku} is not an item of the campaign"
    elif int(row["user_id"]) in excluded:
        why = f"the user is on the exclusion list of snapshot {snapshot_id}"
    elif row["user_bucket"] != user_bucket(int(row["user_id"])):
        why = "the row's user_bucket does not belong to its user id"
    else:
        why = f"the user is not in snapshot {snapshot_id}"
    return f"granted but not expected: {why}; void it if it should not exist (`{VOID_BREAK_COMMAND}`)"


def _iso(value: int | None) -> str:
    if value is None:
        return "permanent"
    return ledger.from_epoch_us(int(value)).isoformat().replace("+00:00", "Z")


# --------------------------------------------------------------------------- the whole campaign


@dataclass(frozen=True)
class Tally:
    """Every partition's check and every issuer's comparison of one reconciliation, added up."""

    checks: list[PartitionCheck]
    issuer_checks: list[IssuerCheck]
    stray: int  # grants whose user_bucket lies outside every partition (only with the CHECK bypassed)
    per_item: dict[int, dict[str, int]]
    totals: dict[str, int]  # the per-item counts added up
    breaks: pl.DataFrame | None  # itemized break rows, partitions' then issuers', at most BREAKS_ITEMIZED_MAX

    @classmethod
    def of(
        cls, checks: list[PartitionCheck], issuer_checks: list[IssuerCheck], stray: int, items: Iterable[ItemTerms]
    ) -> Tally:
        """Add up the checks (every campaign item gets a line, found or not)."""
        per_item = merge_per_item(checks, {i.item_key: counts_of() for i in items})
        frames = [c.breaks for c in checks if c.breaks is not None and c.breaks.height]
        frames += [i.breaks for i in issuer_checks if i.breaks is not None and i.breaks.height]
        breaks = pl.concat(frames, how="diagonal_relaxed") if frames else None
        if breaks is not None and breaks.height > BREAKS_ITEMIZED_MAX:
            breaks = breaks.head(BREAKS_ITEMIZED_MAX)
        return cls(checks, issuer_checks, stray, per_item, sum_counts(per_item.values()), breaks)

    @property
    def unreadable(self) -> list[PartitionCheck]:
        """Partitions whose file could not be read: their ledger rows were not compared."""
        return [c for c in self.checks if c.state == "unreadable"]

    @property
    def not_granted(self) -> list[PartitionCheck]:
        """Partitions whose grant is not done: their differences are work to do, not breaks."""
        return [c for c in self.checks if c.state == "not_granted"]

    @property
    def unreadable_live(self) -> int:
        """Live ledger grants in the unreadable partitions' key ranges."""
        return sum(int(c.counts.get("live") or 0) for c in self.unreadable)

    @property
    def itemized(self) -> int:
        """Break rows itemized (the open breaks, up to BREAKS_ITEMIZED_MAX)."""
        return 0 if self.breaks is None else self.breaks.height

    def open_by_class(self) -> dict[str, int]:
        """Open breaks per class: partitions compared after their grant, and the issuers (when there are any)."""
        found = {
            name: sum(int(c.counts.get(name) or 0) for c in self.checks if c.state == "breaks")
            for name in BREAK_CLASSES
        }
        if self.issuer_checks:
            found |= {name: sum(int(getattr(i, name)) for i in self.issuer_checks) for name in ISSUER_BREAK_CLASSES}
        return found

    def bridge_document(self) -> dict[str, int]:
        """The result document's ``bridge``: both sides' counts, their residuals and the issuers' breaks."""
        totals = self.totals
        return {
            "expected": totals["expected"],
            "matched": totals["matched"],
            "terms_mismatch": totals["terms_mismatch"],
            "missing": totals["missing"],
            "voided": totals["voided"],
            "ledger": totals["live"] + self.unreadable_live + self.stray,
            "unexpected": totals["unexpected"],
            "duplicate": totals["duplicate"],
            "residual_expected": sum(c.residual_expected for c in self.checks),
            "residual_ledger": sum(c.residual_ledger for c in self.checks) + self.stray,
            **{name: sum(int(getattr(i, name)) for i in self.issuer_checks) for name in ISSUER_BREAK_CLASSES},
        }
