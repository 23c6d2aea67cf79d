"""A merchant's case: one per merchant and program, derived from the merchant's accepted claims.

A case merges a merchant's accepted claims: identical content (loss and evidence) is
one case with every claim id kept; differing content sends the case to review
(``conflicting_claims``), and so does missing evidence (``incomplete_evidence``) or a
tier that needs a person (``tier_review``); otherwise the program's tier sets the
amount (``auto_tier``). A decided case (approved, rejected, paid) is never re-derived.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline.errors import invariant
from pipeline.ledger import merchant_cases, merchant_claims, write_transaction
from pipeline.programs.merchant_cash.context import OpenProgram, chunks, lock_program
from pipeline.programs.merchant_cash.program import Program

INT64_MAX = 2**63 - 1
DECIDED_STATES = ("approved", "rejected", "paid")
REVIEW_CONFLICTING = "conflicting_claims"
REVIEW_INCOMPLETE = "incomplete_evidence"
REVIEW_TIER = "tier_review"


def case_id(merchant_id: int) -> str:
    """The case id reviewers type: ``mc-<merchant id>`` (one case per merchant and program)."""
    return f"mc-{merchant_id}"


def parse_case_id(text: str) -> int | None:
    """The merchant id of a case id (``mc-123`` or ``123``), or None when it is neither."""
    value = text.strip().lower().removeprefix("mc-")
    return int(value) if value.isdigit() and 0 < int(value) <= INT64_MAX else None


@dataclass(frozen=True)
class CasePlan:
    """What a merchant's accepted claims say the case is, before any decision."""

    state: str  # auto_tier | needs_review
    tier: str
    loss_krw: int
    amount_krw: int | None
    review_reason: str | None
    claim_count: int


def plan_case(program: Program, contents: Sequence[tuple[int, tuple[str, ...], tuple[str, ...]]]) -> CasePlan:
    """Classify a merchant's accepted claims (their loss and evidence) by the program's rules."""
    invariant(len(contents) > 0, "a case needs at least one accepted claim")
    loss = max(c[0] for c in contents)
    tier = program.tier_for(loss)
    if len(set(contents)) > 1:
        return CasePlan("needs_review", tier.name, loss, None, REVIEW_CONFLICTING, len(contents))
    if contents[0][2]:
        return CasePlan("needs_review", tier.name, loss, None, REVIEW_INCOMPLETE, len(contents))
    if tier.review or tier.amount_krw is None:
        return CasePlan("needs_review", tier.name, loss, None, REVIEW_TIER, len(contents))
    return CasePlan("auto_tier", tier.name, loss, tier.amount_krw, None, len(contents))


def accepted_contents(
    connection: Connection, campaign_key: int, merchant_ids: Sequence[int] | None
) -> dict[int, list[tuple[int, tuple[str, ...], tuple[str, ...]]]]:
    """Each merchant's accepted claims as (loss, evidence provided, evidence missing); all merchants for None."""
    query = sa.select(
        merchant_claims.c.merchant_id,
        merchant_claims.c.loss_krw,
        merchant_claims.c.evidence_provided,
        merchant_claims.c.evidence_missing,
    ).where(merchant_claims.c.campaign_key == campaign_key, merchant_claims.c.status == "accepted")
    batches = (
        [query]
        if merchant_ids is None
        else [query.where(merchant_claims.c.merchant_id.in_(c)) for c in chunks(merchant_ids)]
    )
    found: dict[int, list[tuple[int, tuple[str, ...], tuple[str, ...]]]] = {}
    for batch in batches:
        for merchant, loss, provided, lacking in connection.execute(batch):
            found.setdefault(int(merchant), []).append((int(loss), _kinds(provided), _kinds(lacking)))
    return found


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(k for k in str(text).split(",") if k)


def refresh_cases(connection: Connection, op: OpenProgram, merchant_ids: Sequence[int] | None, now: dt.datetime) -> int:
    """Create or update the undecided cases of these merchants (all for None) from their claims; returns changes."""
    contents = accepted_contents(connection, op.campaign_key, merchant_ids)
    existing: dict[int, Any] = {}
    for chunk in chunks(sorted(contents)):
        for row in connection.execute(
            sa.select(merchant_cases).where(
                merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.merchant_id.in_(chunk)
            )
        ):
            existing[int(row.merchant_id)] = row
    changed = 0
    new_cases: list[dict[str, Any]] = []
    for merchant, claims in sorted(contents.items()):
        plan = plan_case(op.program, claims)
        values = {
            "state": plan.state,
            "tier": plan.tier,
            "loss_krw": plan.loss_krw,
            "amount_krw": plan.amount_krw,
            "review_reason": plan.review_reason,
            "claim_count": plan.claim_count,
        }
        case_row = existing.get(merchant)
        if case_row is None:
            new_cases.append(
                {
                    "campaign_key": op.campaign_key,
                    "merchant_id": merchant,
                    "opened_at": now,
                    "updated_at": now,
                    **values,
                }
            )
        elif case_row.state not in DECIDED_STATES and any(getattr(case_row, k) != v for k, v in values.items()):
            connection.execute(
                merchant_cases.update()
                .where(merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.merchant_id == merchant)
                .values(updated_at=now, **values)
            )
            changed += 1
    if new_cases:
        connection.execute(merchant_cases.insert(), new_cases)  # one executemany
    return changed + len(new_cases)


def assign_cases(op: OpenProgram) -> int:
    """Re-derive every undecided case from its claims and the program's tiers (idempotent); returns changes."""
    with write_transaction(op.engine) as connection:
        lock_program(connection, op.campaign_key)
        return refresh_cases(connection, op, None, op.settings.clock())
