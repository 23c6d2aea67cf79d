"""Delivering partitions to every issuer, and reading back how each partition's latest delivery went."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.delivery.outbox import (
    OUTCOME_COUNTS,
    REPORT_COLUMNS,
    DeliveryContext,
    DeliveryReport,
    deliver_partition,
    record_partition_end,
)
from pipeline.delivery.revocation import revoke_voided
from pipeline.delivery.transport import IssuerRuntime
from pipeline.errors import DeliveryConflictError, DeliveryFailedError
from pipeline.grants.partitioning import PartitionEntry
from pipeline.ledger import delivery_partitions

REPORT_TOTALS = ("planned", *OUTCOME_COUNTS, "sent", "revoked", "revoke_failed")


def deliver(
    context: DeliveryContext,
    runtimes: dict[str, IssuerRuntime],
    entries: Iterable[PartitionEntry],
    on_batch: Callable[[int], None] | None = None,
    on_report: Callable[[DeliveryReport], None] | None = None,
) -> list[DeliveryReport]:
    """Deliver the partitions to every issuer in ``runtimes``; a failed partition does not stop the others."""
    reports = []
    for entry in entries:
        for runtime in runtimes.values():
            delivered = deliver_partition(context, runtime, entry, on_batch)
            report = revoke_voided(context, runtime, entry, delivered)
            if report.status != delivered.status:
                record_partition_end(context, report)  # failed revocations: `deliver --only-failed` picks it up
            reports.append(report)
            if on_report is not None:
                on_report(report)
    return reports


def report_totals(reports: Sequence[DeliveryReport]) -> dict[str, int]:
    """The sums of the reports' counts: planned, each outcome, sent, revoked and revoke_failed."""
    return {c: sum(getattr(r, c) for r in reports) for c in REPORT_TOTALS}


def partition_states(engine: Engine, campaign_key: int) -> dict[tuple[str, int], dict[str, Any]]:
    """The latest delivery report per (issuer, partition id)."""
    p = delivery_partitions
    with engine.connect() as connection:
        rows = connection.execute(sa.select(p).where(p.c.campaign_key == campaign_key)).all()
    return {(str(r.issuer), int(r.partition_id)): dict(r._mapping) for r in rows}


def issuer_totals(engine: Engine, campaign_key: int, snapshot_id: str) -> dict[str, dict[str, int]]:
    """Per issuer, the sums of its partitions' latest reports for a snapshot (and partitions by status)."""
    totals: dict[str, dict[str, int]] = {}
    for (issuer, _partition), row in partition_states(engine, campaign_key).items():
        if row["snapshot_id"] != snapshot_id:
            continue
        total = totals.setdefault(
            issuer, {"planned": 0, **dict.fromkeys(OUTCOME_COUNTS, 0), "partitions_done": 0, "partitions_failed": 0}
        )
        total["planned"] += int(row["planned"] or 0)
        for count, column in REPORT_COLUMNS.items():
            total[count] += int(row[column] or 0)
        if row["status"] == "done":
            total["partitions_done"] += 1
        else:
            total["partitions_failed"] += 1
    return totals


def require_delivered(reports: Sequence[DeliveryReport]) -> None:
    """Raise for partitions left undelivered (exit 7), else for conflicts (exit 10)."""
    failed = [r for r in reports if r.status != "done"]
    if failed:
        listed = "; ".join(
            f"part-{r.partition_id:04d} → {r.issuer}: {r.failed + r.not_attempted:,} left"
            + (f", {r.revoke_failed:,} revocation(s) failed" if r.revoke_failed else "")
            + f" ({r.error})"
            for r in failed[:10]
        )
        raise DeliveryFailedError(
            f"{len(failed)} partition delivery(ies) unfinished: {listed}. Fix the cause (is the issuer up?), "
            "then `entitle deliver --only-failed`."
        )
    conflicts = [r for r in reports if r.conflict]
    if conflicts:
        total = sum(r.conflict for r in conflicts)
        raise DeliveryConflictError(
            f"{total:,} grant(s) in {len(conflicts)} partition(s) answered conflict: the issuer holds a different "
            "payload under the same grant id. Nothing was overwritten; list them with "
            "`entitle query delivery_conflicts` and decide with the issuer's owners."
        )
