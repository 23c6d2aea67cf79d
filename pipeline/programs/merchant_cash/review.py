"""Review of merchant cases: the open queue, and decisions recorded with who, when and why.

A case goes to review when its loss is in a review tier, its claims conflict or
its evidence is incomplete.  A reviewer approves it with an amount or rejects it
with a reason.  Decisions are append-only (the database refuses updates and
deletes) and there is at most one per case (a unique key): a second, different
decision is refused naming who decided and when; the same decision repeated (a
retried command) is reported as already recorded and writes nothing.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.exc import IntegrityError

from pipeline.errors import LedgerError
from pipeline.ledger import merchant_cases, merchant_claims, merchant_decisions, write_transaction
from pipeline.programs.merchant_cash.claims import OpenProgram, case_id, parse_case_id

ACTOR_CHARS_MAX = 128
REASON_CHARS_MAX = 1_000
DECISIONS = ("approve", "reject")
SECONDS_PER_DAY = 86_400


class ReviewRefusedError(LedgerError):
    """A review decision was refused (unknown case, not in review, already decided, bad amount); exit 5."""


@dataclass(frozen=True)
class OpenReview:
    """One case waiting for a reviewer."""

    case_id: str
    merchant_id: int
    tier: str | None
    loss_krw: int
    review_reason: str | None
    claim_count: int
    claim_ids: list[str]
    opened_at: dt.datetime
    age_days: float

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json."""
        values = asdict(self)
        values["opened_at"] = self.opened_at.isoformat()
        return values


def open_reviews(op: OpenProgram) -> list[OpenReview]:
    """Every case in review, oldest first, with its claims and age."""
    now = op.settings.clock()
    with op.engine.connect() as connection:
        cases = connection.execute(
            sa.select(merchant_cases)
            .where(merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.state == "needs_review")
            .order_by(merchant_cases.c.opened_at, merchant_cases.c.merchant_id)
        ).all()
        claim_ids: dict[int, list[str]] = {}
        for merchant, claim in connection.execute(
            sa.select(merchant_claims.c.merchant_id, merchant_claims.c.claim_id)
            .join(
                merchant_cases,
                sa.and_(
                    merchant_cases.c.campaign_key == merchant_claims.c.campaign_key,
                    merchant_cases.c.merchant_id == merchant_claims.c.merchant_id,
                ),
            )
            .where(
                merchant_claims.c.campaign_key == op.campaign_key,
                merchant_claims.c.status == "accepted",
                merchant_cases.c.state == "needs_review",
            )
            .order_by(merchant_claims.c.claim_id)
        ):
            claim_ids.setdefault(int(merchant), []).append(str(claim))
    return [
        OpenReview(
            case_id=case_id(int(c.merchant_id)),
            merchant_id=int(c.merchant_id),
            tier=c.tier,
            loss_krw=int(c.loss_krw),
            review_reason=c.review_reason,
            claim_count=int(c.claim_count),
            claim_ids=claim_ids.get(int(c.merchant_id), []),
            opened_at=c.opened_at,
            age_days=round((now - c.opened_at).total_seconds() / SECONDS_PER_DAY, 2),
        )
        for c in cases
    ]


@dataclass(frozen=True)
class DecisionResult:
    """A recorded decision (or the earlier identical one, when ``already_recorded``)."""

    case_id: str
    decision: str
    amount_krw: int | None
    actor: str
    reason: str
    decided_at: dt.datetime
    already_recorded: bool

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json."""
        values = asdict(self)
        values["decided_at"] = self.decided_at.isoformat()
        return values


def _text(value: str, name: str, limit: int) -> str:
    text = value.strip()
    if not text:
        raise ReviewRefusedError(
            f"--{name} is empty; say {'who decides' if name == 'actor' else 'why'} (it is audited)"
        )
    if len(text) > limit:
        raise ReviewRefusedError(f"--{name} has {len(text)} characters; at most {limit}")
    return text


def decide(
    op: OpenProgram, case: str, decision: str, amount_krw: int | None, actor: str, reason: str
) -> DecisionResult:
    """Record a reviewer's decision on a case in review, in one transaction; refuse anything else."""
    if decision not in DECISIONS:
        raise ReviewRefusedError(f"unknown decision {decision!r}; use one of {', '.join(DECISIONS)}")
    actor = _text(actor, "actor", ACTOR_CHARS_MAX)
    reason = _text(reason, "reason", REASON_CHARS_MAX)
    merchant = parse_case_id(case)
    if merchant is None:
        raise ReviewRefusedError(f"{case!r} is not a case id; case ids look like mc-1234 (see `entitle review list`)")
    now = op.settings.clock()
    try:
        with write_transaction(op.engine) as connection:
            return _decide(connection, op, merchant, decision, amount_krw, actor, reason, now)
    except IntegrityError:
        # Another reviewer's decision committed between our read and our insert: report theirs.
        with write_transaction(op.engine) as connection:
            return _decide(connection, op, merchant, decision, amount_krw, actor, reason, now)


def _decide(
    connection: Connection,
    op: OpenProgram,
    merchant: int,
    decision: str,
    amount_krw: int | None,
    actor: str,
    reason: str,
    now: dt.datetime,
) -> DecisionResult:
    name = case_id(merchant)
    earlier = connection.execute(
        sa.select(merchant_decisions).where(
            merchant_decisions.c.campaign_key == op.campaign_key, merchant_decisions.c.merchant_id == merchant
        )
    ).first()
    if earlier is not None:
        same = (earlier.decision, earlier.amount_krw, earlier.actor, earlier.reason) == (
            decision,
            amount_krw,
            actor,
            reason,
        )
        if same:
            return DecisionResult(name, decision, amount_krw, actor, reason, earlier.decided_at, True)
        what = f"{earlier.decision}d" + (f" {earlier.amount_krw:,} KRW" if earlier.amount_krw is not None else "")
        raise ReviewRefusedError(
            f"case {name} was already decided: {what} by {earlier.actor} at {earlier.decided_at.isoformat()} "
            f"({earlier.reason!r}); decisions are final and nothing was recorded"
        )
    case = connection.execute(
        sa.select(merchant_cases).where(
            merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.merchant_id == merchant
        )
    ).first()
    if case is None:
        raise ReviewRefusedError(f"program {op.program.program_id!r} has no case {name}; see `entitle review list`")
    if case.state != "needs_review":
        raise ReviewRefusedError(
            f"case {name} is {case.state}, not in review"
            + (
                f" (paid by its tier {case.tier}: {case.amount_krw:,} KRW)"
                if case.state in ("auto_tier", "paid")
                else ""
            )
            + "; only cases in review take decisions"
        )
    if decision == "approve":
        cap = min(op.program.approve_max_krw, int(case.loss_krw))
        if amount_krw is None or not 1 <= amount_krw <= cap:
            raise ReviewRefusedError(
                f"approve case {name}: --amount {amount_krw} must be between 1 and {cap:,} KRW (the case's reported "
                f"loss {int(case.loss_krw):,} and the program's approve_max_krw {op.program.approve_max_krw:,})"
            )
    elif amount_krw is not None:
        raise ReviewRefusedError(f"reject case {name}: a rejection has no --amount")
    connection.execute(
        merchant_decisions.insert().values(
            campaign_key=op.campaign_key,
            merchant_id=merchant,
            decision=decision,
            amount_krw=amount_krw,
            actor=actor,
            reason=reason,
            decided_at=now,
        )
    )
    connection.execute(
        merchant_cases.update()
        .where(merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.merchant_id == merchant)
        .values(
            state="approved" if decision == "approve" else "rejected",
            amount_krw=amount_krw,
            updated_at=now,
        )
    )
    return DecisionResult(name, decision, amount_krw, actor, reason, now, False)
