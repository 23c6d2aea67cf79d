"""Payouts of merchant cash cases as ledger grants, at most one per merchant.

Payouts are grants of the program's cash item (``user_id`` = merchant id,
``issue_no`` 0, the amount on the row): the ledger's primary key makes a second
payout to a merchant impossible, and each batch of payouts and the cases it marks
``paid`` commit together, so a crash and a rerun pay exactly the planned cases.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from pipeline import ledger
from pipeline.errors import EntitleError, invariant
from pipeline.grants.partitioning import user_bucket
from pipeline.ledger import grant_voids, grants, merchant_cases, pgcopy, write_transaction
from pipeline.programs.merchant_cash.cases import case_id
from pipeline.programs.merchant_cash.context import OpenProgram, chunks, lock_program

PAYOUT_BATCH_CASES_MAX = 5_000  # payouts per transaction
PAYOUT_PARTITION_ID = 0  # payouts are not partitioned: every one is recorded under partition 0
PAYOUT_SNAPSHOT_ID = "claims"  # runs record a snapshot id; a payout run pays decided cases, not a snapshot
PAYABLE_STATES = ("auto_tier", "approved")


@dataclass(frozen=True)
class PayReport:
    """What one ``entitle claims pay`` did."""

    run_id: str
    paid: int
    paid_krw: int
    already_granted: int
    batches: int

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json and XCom."""
        return asdict(self)


def pay(
    op: OpenProgram,
    run_id: str | None = None,
    trigger: str = "cli",
    batch_cases_max: int = PAYOUT_BATCH_CASES_MAX,
    after_batch: Callable[[int], None] | None = None,
) -> PayReport:
    """Grant every payable case (auto tier or approved) its amount, at most once per merchant; idempotent.

    Each batch's grants and the cases it marks paid commit together; ``after_batch``
    (tests: a crash between batches) is called with the batch number after each commit.
    """
    invariant(batch_cases_max > 0, "batch_cases_max must be positive")
    now = op.settings.clock()
    if op.engine.dialect.name == "postgresql":
        pgcopy.ensure_campaign_table(op.engine, op.campaign_key)
    run_id = run_id or f"{trigger}__claims-pay__{now:%Y%m%dT%H%M%SZ}"
    paid = paid_krw = already = batches = 0
    if not _payable_count(op):
        return PayReport(run_id, paid, paid_krw, already, batches)  # nothing to pay: no run row either
    run_key = ledger.register_run(op.engine, run_id, op.campaign_key, PAYOUT_SNAPSHOT_ID, trigger, now)
    while True:
        with write_transaction(op.engine) as connection:
            lock_program(connection, op.campaign_key)
            cases = connection.execute(
                sa.select(merchant_cases.c.merchant_id, merchant_cases.c.amount_krw)
                .where(merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.state.in_(PAYABLE_STATES))
                .order_by(merchant_cases.c.merchant_id)
                .limit(batch_cases_max)
            ).all()
            if not cases:
                break
            merchants = [int(m) for m, _ in cases]
            granted = _granted(connection, op, merchants)
            rows: list[dict[str, Any]] = []
            for merchant, amount in cases:
                invariant(amount is not None and int(amount) > 0, f"payable case {case_id(merchant)} has no amount")
                if int(merchant) in granted:
                    already += 1  # a grant exists already: the reconciliation compares its amount
                    continue
                rows.append(
                    {
                        "campaign_key": op.campaign_key,
                        "user_bucket": user_bucket(int(merchant)),
                        "user_id": int(merchant),
                        "item_key": op.item_key,
                        "issue_no": 0,
                        "partition_id": PAYOUT_PARTITION_ID,
                        "run_key": run_key,
                        "amount_krw": int(amount),
                        "valid_from": op.program.starts_at,
                        "valid_until": None,
                        "granted_at": now,
                    }
                )
            try:
                if rows:
                    connection.execute(grants.insert(), rows)
            except IntegrityError as exc:  # only if someone bypassed the program's lock
                raise EntitleError(
                    f"a payout of program {op.program.program_id!r} was written by another process meanwhile; "
                    "nothing of this batch was written: run `entitle claims pay` again"
                ) from exc
            for chunk in chunks(merchants):
                connection.execute(
                    merchant_cases.update()
                    .where(merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.merchant_id.in_(chunk))
                    .values(state="paid", updated_at=now)
                )
            paid += len(rows)
            paid_krw += sum(int(r["amount_krw"]) for r in rows)
        batches += 1
        if after_batch is not None:
            after_batch(batches)
    return PayReport(run_id, paid, paid_krw, already, batches)


def _payable_count(op: OpenProgram) -> int:
    with op.engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count()).where(
                    merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.state.in_(PAYABLE_STATES)
                )
            ).scalar_one()
        )


def _granted(connection: Connection, op: OpenProgram, merchants: Sequence[int]) -> set[int]:
    """Merchants that already hold a grant of the program's item (live or voided)."""
    found: set[int] = set()
    for chunk in chunks(list(merchants)):
        found.update(
            int(u)
            for u in connection.execute(
                sa.select(grants.c.user_id).where(
                    grants.c.campaign_key == op.campaign_key,
                    grants.c.item_key == op.item_key,
                    grants.c.user_bucket.in_([user_bucket(m) for m in chunk]),
                    grants.c.user_id.in_(chunk),
                )
            ).scalars()
        )
    return found


def live_payouts(connection: Connection, op: OpenProgram) -> dict[int, list[int]]:
    """Live (not voided) payout amounts per merchant."""
    voided = sa.exists().where(ledger.void_of_grant())
    found: dict[int, list[int]] = {}
    for user, amount in connection.execute(
        sa.select(grants.c.user_id, grants.c.amount_krw).where(
            grants.c.campaign_key == op.campaign_key, grants.c.item_key == op.item_key, ~voided
        )
    ):
        found.setdefault(int(user), []).append(int(amount or 0))
    return found


def voided_payouts(connection: Connection, op: OpenProgram) -> dict[int, int]:
    """The amount of each merchant's voided payout (who, when and why are in grant_voids and grant_history)."""
    found: dict[int, int] = {}
    for user, amount in connection.execute(
        sa.select(grants.c.user_id, grants.c.amount_krw)
        .select_from(grants.join(grant_voids, ledger.void_of_grant()))
        .where(grants.c.campaign_key == op.campaign_key, grants.c.item_key == op.item_key)
    ):
        found[int(user)] = found.get(int(user), 0) + int(amount or 0)
    return found
