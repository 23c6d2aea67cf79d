"""Revoking at the issuers the grants voided in the ledger after they were delivered.

Every voided grant is revoked once, and each issuer's answer is recorded in
``delivery_revocations`` (a failed revocation is tried again by the next delivery).
A grant the issuer answered ``conflict`` for is never revoked: the grant it holds
under that id is not ours.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from dataclasses import replace

import sqlalchemy as sa
from sqlalchemy.dialects.postgresql import insert as postgresql_insert
from sqlalchemy.dialects.sqlite import insert as sqlite_insert
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.delivery.outbox import DeliveryContext, DeliveryReport, GrantKey, delivery_transaction
from pipeline.delivery.transport import BatchResult, IssuerRuntime, grant_id, send_batch
from pipeline.grants.partitioning import PartitionEntry

# Voided grants still to revoke at their issuer: never revoked, or the revocation failed; a grant
# the issuer answered ``conflict`` for is never revoked (the grant it holds under that id is not ours).
_TO_REVOKE = (
    "FROM grants AS g "
    f"JOIN grant_voids AS v ON {ledger.same_grant('v')} "
    f"LEFT JOIN delivery_answers AS a ON {ledger.same_grant('a')} "
    f"LEFT JOIN delivery_revocations AS r ON {ledger.same_grant('r')} "
    "WHERE g.campaign_key = :c "
    "AND (a.outcome IS NULL OR a.outcome <> 'conflict') AND (r.outcome IS NULL OR r.outcome = 'failed') "
)
_REVOCABLE = (
    f"SELECT g.user_bucket, g.user_id, g.item_key, g.issue_no {_TO_REVOKE}"
    "AND g.user_bucket BETWEEN :lo AND :hi AND g.item_key IN :item_keys "
    "ORDER BY g.user_bucket, g.user_id, g.item_key, g.issue_no"
)


def partitions_with_pending_revocations(
    engine: Engine, campaign_key: int, entries: Sequence[PartitionEntry]
) -> set[int]:
    """Of ``entries``, the partitions holding a voided grant not revoked at the issuers yet (or that failed to)."""
    if not entries:
        return set()
    statement = sa.text(f"SELECT DISTINCT g.user_bucket {_TO_REVOKE}")
    with engine.connect() as connection:
        buckets = [int(row[0]) for row in connection.execute(statement, {"c": campaign_key})]
    return {e.partition_id for e in entries if any(e.bucket_lo <= b <= e.bucket_hi for b in buckets)}


def revoke_voided(
    context: DeliveryContext, runtime: IssuerRuntime, entry: PartitionEntry, report: DeliveryReport
) -> DeliveryReport:
    """Revoke at the issuer the partition's voided grants of its items; record each outcome.

    Every voided grant is revoked once, whatever delivery knew of it: a grant whose delivery
    "failed" may have been committed before its answer was lost (the issuer answers
    ``not_found`` for one it never got). A grant the issuer answered ``conflict`` for is never
    revoked: the grant it holds under that id is not ours. Revocation is idempotent at the
    issuer, so a rerun after a lost answer is safe.
    """
    spec = runtime.spec
    skus = {context.keys.item_keys[i.sku]: i.sku for i in context.campaign.items_of(spec.name)}
    statement = sa.text(_REVOCABLE).bindparams(sa.bindparam("item_keys", expanding=True))
    with context.engine.connect() as connection:
        keys = [
            GrantKey(int(r[0]), int(r[1]), int(r[2]), int(r[3]))
            for r in connection.execute(
                statement,
                {"c": context.keys.campaign_key, "lo": entry.bucket_lo, "hi": entry.bucket_hi, "item_keys": list(skus)},
            )
        ]
    if not keys:
        return report
    revoked = failed = 0
    error: str | None = None
    campaign_id = context.campaign.campaign_id
    reason = f"voided in the ledger of campaign {campaign_id}"
    for start in range(0, len(keys), spec.batch_size):
        batch = keys[start : start + spec.batch_size]
        ids = [grant_id(campaign_id, k.user_id, skus[k.item_key], k.issue_no) for k in batch]
        result = send_batch(runtime, [], functools.partial(runtime.issuer.revoke, ids, reason))
        _record_revocations(context, spec.name, batch, result)
        if result.answers is None:
            failed += len(batch)
            error = error or f"revocation: {result.error}"
        else:
            revoked += sum(1 for a in result.answers if a.status in ("revoked", "already_revoked"))
        if result.circuit_open:
            failed += len(keys) - start - len(batch)
            break
    if not failed:
        return replace(report, revoked=revoked)
    return replace(report, status="failed", revoked=revoked, revoke_failed=failed, error=report.error or error)


def _record_revocations(context: DeliveryContext, issuer: str, keys: list[GrantKey], result: BatchResult) -> None:
    """One row per grant: the issuer's answer, or failed with the error (a final answer is never replaced)."""
    now = context.clock()
    answers = result.answers
    rows = [
        {
            "campaign_key": context.keys.campaign_key,
            "user_bucket": k.user_bucket,
            "user_id": k.user_id,
            "item_key": k.item_key,
            "issue_no": k.issue_no,
            "issuer": issuer,
            "outcome": "failed" if answers is None else answers[i].status,
            "detail": (result.error if answers is None else answers[i].detail),
            "attempts": result.attempts,
            "answered_at": now,
        }
        for i, k in enumerate(keys)
    ]
    table = ledger.delivery_revocations
    insert = (sqlite_insert if context.engine.dialect.name == "sqlite" else postgresql_insert)(table).values(rows)
    upsert = insert.on_conflict_do_update(
        index_elements=list(ledger.GRANT_KEY),
        set_={c: insert.excluded[c] for c in ("issuer", "outcome", "detail", "attempts", "answered_at")},
        where=table.c.outcome == "failed",
    )
    with delivery_transaction(context.engine) as connection:
        connection.execute(upsert)
