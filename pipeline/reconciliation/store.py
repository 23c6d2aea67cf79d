"""Where a campaign reconciliation is kept: its ledger rows, its break register, its exports.

In one ledger transaction :func:`store_run` writes the run (``reconciliations``: verdict,
explanation, both sides of the bridge), its per-item and per-partition counts, and
updates the break register (``reconciliation_breaks``): a break keeps its id (a hash
of what it is about) from the run that first found it until a run that looked for it
no longer finds it, and is then resolved. The itemized breaks are exported as Parquet
(``breaks.parquet``, schema ``breaks``) and the whole result as ``result.json`` in the
run's export folder; :func:`load_result` reads a stored result back.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import ledger, schemas
from pipeline.errors import SnapshotError
from pipeline.grants import runs
from pipeline.ledger import recon_breaks, recon_items, recon_partitions, recon_runs, write_transaction
from pipeline.reconciliation.compare import COUNT_NAMES, Tally
from pipeline.reconciliation.three_way import ISSUER_BREAK_CLASSES
from pipeline.reconciliation.verdict import Verdict

BREAK_ID_CHARS = 20
EXPORT_FILE_RESULT = "result.json"
EXPORT_FILE_BREAKS = "breaks.parquet"
_SQL_IN_CHUNK_ROWS = 500
BREAK_EXPORT_COLUMNS: dict[str, Any] = {
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


@dataclass(frozen=True)
class RunContext:
    """One reconciliation run: its id, the snapshot and method, when it started, where it exports, item names."""

    reconciliation_id: str
    snapshot_id: str
    partition_count: int
    method: str
    started: dt.datetime
    started_mono: float  # time.monotonic() at the start, for the duration
    export_dir: Path
    item_skus: dict[int, str]  # every item key the campaign registered, with its sku

    @property
    def breaks_file(self) -> Path:
        """The itemized breaks (Parquet)."""
        return self.export_dir / EXPORT_FILE_BREAKS

    @property
    def result_file(self) -> Path:
        """The result document (JSON)."""
        return self.export_dir / EXPORT_FILE_RESULT


@dataclass(frozen=True)
class StoredRun:
    """What storing gave back: when it finished, the exported break rows (ids, first sightings), breaks resolved."""

    finished: dt.datetime
    breaks: pl.DataFrame
    resolved: int


def store_run(pipeline: runs.Pipeline, run: RunContext, tally: Tally, verdict: Verdict) -> StoredRun:
    """Write the run, its counts and its breaks in one transaction, then export the breaks."""
    finished = pipeline.settings.clock()
    bridge = tally.bridge_document()
    with write_transaction(pipeline.engine) as connection:
        reconciliation_key = int(
            connection.execute(
                recon_runs.insert().values(
                    reconciliation_id=run.reconciliation_id,
                    campaign_key=pipeline.keys.campaign_key,
                    snapshot_id=run.snapshot_id,
                    partition_count=run.partition_count,
                    method=run.method,
                    verdict=verdict.status,
                    explanation=verdict.explanation,
                    expected=bridge["expected"],
                    matched=bridge["matched"],
                    terms_mismatch=bridge["terms_mismatch"],
                    missing=bridge["missing"],
                    voided=bridge["voided"],
                    ledger_live=bridge["ledger"],
                    unexpected=bridge["unexpected"],
                    duplicate=bridge["duplicate"],
                    residual_expected=bridge["residual_expected"],
                    residual_ledger=bridge["residual_ledger"],
                    issuer_missing=bridge["issuer_missing"],
                    issuer_unexpected=bridge["issuer_unexpected"],
                    open_breaks=verdict.open_breaks,
                    breaks_itemized=tally.itemized,
                    export_dir=str(run.export_dir),
                    started_at=run.started,
                    finished_at=finished,
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        )
        if tally.per_item:
            connection.execute(
                recon_items.insert(),
                [
                    {
                        "reconciliation_key": reconciliation_key,
                        "item_key": k,
                        "item_sku": run.item_skus.get(k, f"#{k}"),
                        **c,
                    }
                    for k, c in sorted(tally.per_item.items())
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
                for c in tally.checks
            ],
        )
        first_seen, resolved = _store_breaks(connection, pipeline, reconciliation_key, run.reconciliation_id, tally)
    export = _breaks_export(tally.breaks, first_seen)
    schemas.write_parquet(export, "breaks", run.breaks_file)
    return StoredRun(finished, export, resolved)


def write_result(run: RunContext, document: dict[str, Any]) -> None:
    """Export the result document next to the breaks."""
    schemas.write_json(run.result_file, document)


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
    tally: Tally,
) -> tuple[dict[str, str], int]:
    """Open or keep open this run's breaks, resolve the ones no longer found; returns {id: first seen in}."""
    campaign_key = pipeline.keys.campaign_key
    rows = [] if tally.breaks is None else list(tally.breaks.iter_rows(named=True))
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
    bounds = [(c.bucket_lo, c.bucket_hi) for c in tally.checks if c.state in ("matched", "breaks")]
    compared_issuers = {i.issuer for i in tally.issuer_checks if i.state == "compared"}
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
    columns = BREAK_EXPORT_COLUMNS
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
