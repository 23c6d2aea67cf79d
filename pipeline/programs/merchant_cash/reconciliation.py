"""Reconcile a merchant cash program: payouts in the ledger against claims, tiers and decisions.

The expected payout of every merchant is derived again from the data alone —
the accepted claims, the program's tier table and the reviewers' decisions —
without trusting the case table's state; then compared with the live grants
of the program's cash item.  Every auto-tier case must be paid exactly its
tier amount, every approved case its approved amount, nothing may be paid for
a rejected, pending or outside-window claim, and no merchant more than once.
A payout voided on purpose (`entitle claims void`: who, when and why are in
the ledger) is an explained difference, counted as ``voided``, not a break,
as a voided grant is in a campaign's reconciliation; the case is never paid
again. Anything else is a break with its class and detail.

The verdict (:class:`pipeline.reconciliation.verdict.Verdict`) bridges the money: KRW
due - unpaid - voided on purpose (due) + wrong amounts (paid minus due) + unexpected +
duplicate = KRW paid in live payouts; its breaks are the breaks counted by class.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa

from pipeline import ledger
from pipeline.ledger import merchant_cases, merchant_claims, merchant_decisions
from pipeline.programs.merchant_cash.claims import (
    OpenProgram,
    accepted_contents,
    case_id,
    live_payouts,
    plan_case,
    voided_payouts,
)
from pipeline.reconciliation.verdict import BREAKS, INCOMPLETE, Bridge, Judged, Step, Verdict, judge

BREAK_CLASSES = ("unpaid", "wrong_amount", "unexpected", "duplicate", "case_state")
KRW_STEPS = {  # the bridge's steps from KRW due to KRW paid, in order, with their labels
    "unpaid": "unpaid",
    "voided_due": "voided on purpose (due)",
    "wrong_amount": "wrong_amount: paid minus due",
    "unexpected": "unexpected",
    "duplicate": "duplicate",
}
APPROVED, REJECTED, PENDING, NO_CLAIM = "review-approved", "review-rejected", "review-pending", "no-accepted-claim"


@dataclass(frozen=True)
class PayoutBreak:
    """One difference between what should have been paid and what the ledger holds."""

    break_class: str
    case_id: str
    merchant_id: int
    expected_krw: int | None
    paid_krw: list[int]
    detail: str


@dataclass
class TierLine:
    """Cases, expected payouts and paid payouts of one tier (or review outcome)."""

    tier: str
    cases: int = 0
    expected_payouts: int = 0
    expected_krw: int = 0
    paid: int = 0
    paid_krw: int = 0
    voided: int = 0  # paid, then voided on purpose (no live payout left): explained, never paid again
    voided_krw: int = 0
    voided_due: int = 0  # of those, payouts that were due


@dataclass
class MerchantReconciliation(Judged):
    """The verdict and its evidence."""

    program_id: str
    outcome: Verdict  # status and explanation are the document's "verdict" and "explanation"
    claims_by_status: dict[str, int]
    tiers: list[TierLine] = field(default_factory=list)
    breaks: list[PayoutBreak] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json and XCom; the whole verdict comes last, as ``outcome``."""
        return {
            "program_id": self.program_id,
            "verdict": self.verdict,
            "explanation": self.explanation,
            "claims_by_status": dict(self.claims_by_status),
            "tiers": [asdict(t) for t in self.tiers],
            "breaks": [asdict(b) for b in self.breaks],
            "outcome": self.outcome.as_dict(),
        }


def _break(merchant: int, expected: int | None, paid: list[int], break_class: str, detail: str) -> PayoutBreak:
    return PayoutBreak(break_class, case_id(merchant), merchant, expected, list(paid), detail)


def reconcile(op: OpenProgram) -> MerchantReconciliation:
    """Compare the program's live payouts with what its claims, tiers and decisions call for; store the result."""
    started = op.settings.clock()
    result = _compare(op)
    ledger.record_program_reconciliation(
        op.engine, op.campaign_key, "merchant_cash", result.as_dict(), started, op.settings.clock()
    )
    return result


def _compare(op: OpenProgram) -> MerchantReconciliation:
    """Compare the program's live payouts with the payouts its claims, tiers and decisions call for."""
    program = op.program
    with op.engine.connect() as connection, connection.begin():
        contents = accepted_contents(connection, op.campaign_key, None)
        decisions = {
            int(m): (str(d), None if a is None else int(a))
            for m, d, a in connection.execute(
                sa.select(
                    merchant_decisions.c.merchant_id, merchant_decisions.c.decision, merchant_decisions.c.amount_krw
                ).where(merchant_decisions.c.campaign_key == op.campaign_key)
            )
        }
        states = {
            int(m): str(s)
            for m, s in connection.execute(
                sa.select(merchant_cases.c.merchant_id, merchant_cases.c.state).where(
                    merchant_cases.c.campaign_key == op.campaign_key
                )
            )
        }
        by_status = {
            str(s): int(n)
            for s, n in connection.execute(
                sa.select(merchant_claims.c.status, sa.func.count())
                .where(merchant_claims.c.campaign_key == op.campaign_key)
                .group_by(merchant_claims.c.status)
            )
        }
        payouts = live_payouts(connection, op)
        voids = voided_payouts(connection, op)
    lines = {t.name: TierLine(t.name) for t in program.tiers}
    for extra in (APPROVED, REJECTED, PENDING, NO_CLAIM):
        lines[extra] = TierLine(extra)
    breaks: list[PayoutBreak] = []
    krw = dict.fromkeys(KRW_STEPS, 0)  # the bridge's steps, KRW by kind of difference
    for merchant in sorted(set(contents) | set(decisions) | set(payouts) | set(states)):
        expected: int | None
        decision = decisions.get(merchant)
        if decision is not None:
            line = APPROVED if decision[0] == "approve" else REJECTED
            expected = decision[1] if decision[0] == "approve" else None
        elif merchant in contents:
            plan = plan_case(program, contents[merchant])
            line = plan.tier if plan.state == "auto_tier" else PENDING
            expected = plan.amount_krw if plan.state == "auto_tier" else None
        else:
            line, expected = NO_CLAIM, None
        paid = payouts.get(merchant, [])
        tally = lines[line]
        tally.cases += 1
        if expected is not None:
            tally.expected_payouts += 1
            tally.expected_krw += expected
        tally.paid += len(paid)
        tally.paid_krw += sum(paid)
        name = case_id(merchant)
        void = voids.get(merchant) if not paid else None  # the amount taken back; explained by the void
        if void is not None:
            tally.voided += 1
            tally.voided_krw += void
            tally.voided_due += expected is not None
        _bridge_steps(krw, expected, paid, void)

        if len(paid) > 1:
            breaks.append(
                _break(merchant, expected, paid, "duplicate", f"{len(paid)} live payouts: all but one must be voided")
            )
        if expected is not None and not paid and void is None:
            breaks.append(
                _break(
                    merchant,
                    expected,
                    paid,
                    "unpaid",
                    f"{line}: {expected:,} KRW due and not paid: run `entitle claims pay`",
                )
            )
        elif expected is None and paid:
            breaks.append(
                _break(merchant, expected, paid, "unexpected", f"{line}: nothing is due but {sum(paid):,} KRW was paid")
            )
        elif expected is not None and paid and paid[0] != expected:
            breaks.append(
                _break(merchant, expected, paid, "wrong_amount", f"{line}: paid {paid[0]:,} KRW, due {expected:,} KRW")
            )
        state = states.get(merchant)
        # A paid case holds a live payout, or one voided on purpose; no other case holds a live payout.
        unpaid_case = state == "paid" and not paid and void is None
        if state is not None and (unpaid_case or (state != "paid" and bool(paid))):
            breaks.append(
                _break(
                    merchant,
                    expected,
                    paid,
                    "case_state",
                    f"case {name} is {state} but the ledger holds {len(paid)} live payout(s)",
                )
            )
    used = [line for line in lines.values() if line.cases or line.tier in {t.name for t in program.tiers}]
    verdict = _judge(list(lines.values()), breaks, krw)
    return MerchantReconciliation(program.program_id, verdict, dict(sorted(by_status.items())), used, breaks)


def _bridge_steps(krw: dict[str, int], expected: int | None, paid: list[int], void: int | None) -> None:
    """Add one merchant's difference between due and paid to the bridge's steps."""
    if expected is not None and not paid:
        krw["unpaid" if void is None else "voided_due"] -= expected
    elif expected is not None and paid:
        krw["wrong_amount"] += paid[0] - expected
    elif paid:
        krw["unexpected"] += paid[0]
    krw["duplicate"] += sum(paid[1:])


def _judge(lines: list[TierLine], breaks: list[PayoutBreak], krw: dict[str, int]) -> Verdict:
    """The program's verdict: the KRW bridge from due to paid, the breaks by class."""
    bridge = Bridge(
        "KRW",
        Step("due: claims, tiers and decisions", sum(line.expected_krw for line in lines)),
        tuple(Step(KRW_STEPS[name], krw[name]) for name in KRW_STEPS),
        Step("paid: live payouts", sum(line.paid_krw for line in lines)),
    )
    by_class = {name: sum(1 for b in breaks if b.break_class == name) for name in BREAK_CLASSES}

    def explain(status: str, reasons: tuple[str, ...]) -> str:
        if status == INCOMPLETE:
            return "; ".join(reasons)
        if status == BREAKS:
            classes = sorted({b.break_class for b in breaks})
            return f"{len(breaks)} break(s) ({', '.join(classes)}); each names the case and what to do"
        due = sum(line.expected_payouts for line in lines)
        voided = sum(line.voided for line in lines)
        voided_due = sum(line.voided_due for line in lines)
        if not voided:
            return f"every one of {due:,} due payouts is paid exactly once with its amount, nothing else is paid"
        return (
            f"every one of {due - voided_due:,} due payouts is paid exactly once with its amount, nothing else is "
            f"live; voided on purpose: {voided:,} payout(s), {voided_due:,} of them due "
            "(`entitle query voids_by_actor`)"
        )

    return judge(bridge, by_class, explain=explain)
