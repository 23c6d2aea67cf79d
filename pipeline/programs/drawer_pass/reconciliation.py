"""Reconcile a pass program: the ledger's passes against the allocations, the stock counter and the order.

Nine checks, each counting offending rows (0 = fine): passes beyond the stock cap
(``over_cap``), the ledger's passes against the program's stock counter
(``counter_mismatch``) and against the passes the allocations recorded
(``allocations_mismatch``), passes without an application
(``grant_without_application``) or whose application is after the allocation
watermark (``grant_not_allocated``), users holding two passes (``duplicate_user``),
passes whose window is not their allocation's (``terms_mismatch``), sold-out
applications served before one that got a pass (``out_of_order``), and applications at
or before the watermark that the allocations did not count (``window_mismatch``).

The verdict (:class:`pipeline.reconciliation.verdict.Verdict`) bridges applications to
passes: applications at or before the watermark + window_mismatch (counted by the
allocations minus applied) - sold_out = granted by the allocations +
allocations_mismatch (in the ledger minus granted) = passes in the ledger; its breaks
are the checks' counts. Every result is stored in ``program_reconciliations``.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import ledger
from pipeline.ledger import Instant, pass_allocations
from pipeline.programs.drawer_pass.allocation import EPOCH, PassContext, _program_row
from pipeline.reconciliation.verdict import BREAKS, INCOMPLETE, Bridge, Judged, Step, Verdict, judge


@dataclass(frozen=True)
class PassCheck:
    """One reconciliation check: the count of offending rows (0 = fine) and what it means."""

    name: str
    count: int
    meaning: str


@dataclass(frozen=True)
class PassReconciliation(Judged):
    """The pass program's reconciliation: verdict, the figures compared and every check."""

    program_id: str
    stock_cap: int
    counter_granted: int
    allocations_granted: int
    ledger_passes: int
    voided: int
    allocated_applications: int
    allocations_considered: int
    sold_out: int
    checks: tuple[PassCheck, ...]
    outcome: Verdict  # status and explanation are the document's "verdict" and "explanation"

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json; the whole verdict comes last, as ``outcome``."""
        values = asdict(self)
        values.pop("outcome")
        document = {"program_id": values.pop("program_id"), "verdict": self.verdict, **values}
        document["breaks"] = [c.name for c in self.checks if c.count]
        document["explanation"] = self.explanation
        document["outcome"] = self.outcome.as_dict()
        return document


def reconcile(context: PassContext) -> PassReconciliation:
    """Compare the ledger's passes with the allocations, the counter and the application order; store the result."""
    started = context.settings.clock()
    result = _compare(context)
    ledger.record_program_reconciliation(
        context.engine, context.campaign_key, "pass", result.as_dict(), started, context.settings.clock()
    )
    return result


def _compare(context: PassContext) -> PassReconciliation:
    """Compare the ledger's passes with the allocations, the stock counter and the application order."""
    key, item = context.campaign_key, context.item_key
    params = {"c": key, "i": item}
    with context.engine.connect() as connection:
        program = _program_row(connection, key)
        through = program.allocated_through or EPOCH
        allocated_params = {**params, "through": through}

        def scalar(sql: str, values: dict[str, Any] | None = None) -> int:
            statement = (
                sa.text(sql).bindparams(sa.bindparam("through", type_=Instant())) if ":through" in sql else sa.text(sql)
            )
            return int(connection.execute(statement, values or params).scalar_one() or 0)

        ledger_passes = scalar("SELECT count(*) FROM grants AS g WHERE g.campaign_key = :c AND g.item_key = :i")
        voided = scalar("SELECT count(*) FROM grant_voids AS v WHERE v.campaign_key = :c AND v.item_key = :i")
        granted, considered, sold_out = (
            int(n)
            for n in connection.execute(
                sa.select(
                    sa.func.coalesce(sa.func.sum(pass_allocations.c.granted), 0),
                    sa.func.coalesce(sa.func.sum(pass_allocations.c.considered), 0),
                    sa.func.coalesce(sa.func.sum(pass_allocations.c.sold_out), 0),
                ).where(pass_allocations.c.campaign_key == key)
            ).one()
        )
        allocated = scalar(
            "SELECT count(*) FROM pass_applications AS a WHERE a.campaign_key = :c AND a.applied_at <= :through",
            allocated_params,
        )
        checks = (
            PassCheck(
                "over_cap",
                max(0, ledger_passes - int(program.stock_cap)),
                "passes in the ledger beyond the stock cap",
            ),
            PassCheck(
                "counter_mismatch",
                abs(ledger_passes - int(program.granted)),
                "difference between the ledger's passes and the program's stock counter",
            ),
            PassCheck(
                "allocations_mismatch",
                abs(ledger_passes - granted),
                "difference between the ledger's passes and the passes the allocations recorded",
            ),
            PassCheck(
                "grant_without_application",
                scalar(
                    "SELECT count(*) FROM grants AS g WHERE g.campaign_key = :c AND g.item_key = :i AND NOT EXISTS "
                    "(SELECT 1 FROM pass_applications AS a WHERE a.campaign_key = g.campaign_key "
                    "AND a.user_id = g.user_id)"
                ),
                "passes whose user has no application",
            ),
            PassCheck(
                "grant_not_allocated",
                scalar(
                    "SELECT count(*) FROM grants AS g JOIN pass_applications AS a ON a.campaign_key = g.campaign_key "
                    "AND a.user_id = g.user_id WHERE g.campaign_key = :c AND g.item_key = :i "
                    "AND a.applied_at > :through",
                    allocated_params,
                ),
                "passes whose application is after the allocation watermark (not yet allocated)",
            ),
            PassCheck(
                "duplicate_user",
                scalar(
                    "SELECT count(*) - count(DISTINCT g.user_id) FROM grants AS g "
                    "WHERE g.campaign_key = :c AND g.item_key = :i"
                ),
                "users holding more than one pass",
            ),
            PassCheck(
                "terms_mismatch",
                scalar(
                    "SELECT count(*) FROM grants AS g LEFT JOIN pass_allocations AS l ON l.run_key = g.run_key "
                    "AND l.campaign_key = g.campaign_key WHERE g.campaign_key = :c AND g.item_key = :i AND "
                    "(l.run_key IS NULL OR g.valid_from <> l.granted_at OR g.valid_until <> l.valid_until "
                    "OR g.granted_at <> l.granted_at OR g.amount_krw IS NOT NULL)"
                ),
                "passes whose window is not their allocation's (or that no allocation wrote)",
            ),
            PassCheck(
                "out_of_order",
                _out_of_order(connection, key, item, through),
                "sold-out applications ordered before an application that got a pass",
            ),
            PassCheck(
                "window_mismatch",
                abs(allocated - considered),
                "difference between the applications at or before the watermark and those the allocations counted",
            ),
        )
    return PassReconciliation(
        program_id=context.program.program_id,
        stock_cap=int(program.stock_cap),
        counter_granted=int(program.granted),
        allocations_granted=granted,
        ledger_passes=ledger_passes,
        voided=voided,
        allocated_applications=allocated,
        allocations_considered=considered,
        sold_out=sold_out,
        checks=checks,
        outcome=_judge(
            checks,
            allocated=allocated,
            considered=considered,
            granted=granted,
            ledger_passes=ledger_passes,
            stock_cap=int(program.stock_cap),
            sold_out=sold_out,
        ),
    )


def _judge(
    checks: tuple[PassCheck, ...],
    *,
    allocated: int,
    considered: int,
    granted: int,
    ledger_passes: int,
    stock_cap: int,
    sold_out: int,
) -> Verdict:
    """The verdict: applications at or before the watermark bridged to the ledger's passes, the checks' counts."""
    bridge = Bridge(
        "applications (one pass each)",
        Step("applications at or before the watermark", allocated),
        (
            Step("window_mismatch: counted by the allocations minus applied", considered - allocated),
            Step("sold_out", -(considered - granted)),
            Step("granted by the allocations", granted, checkpoint=True),
            Step("allocations_mismatch: in the ledger minus granted", ledger_passes - granted),
        ),
        Step("passes in the ledger", ledger_passes),
    )

    def explain(status: str, reasons: tuple[str, ...]) -> str:
        if status == INCOMPLETE:
            return "; ".join(reasons)
        if status == BREAKS:
            failed = [f"{c.name} ({c.count:,}: {c.meaning})" for c in checks if c.count]
            return f"{len(failed)} check(s) found breaks: " + "; ".join(failed)
        return (
            f"{ledger_passes:,} live passes = the stock counter = the allocations' records, within the cap of "
            f"{stock_cap:,}, to the earliest applicants in order; {sold_out:,} sold_out"
        )

    return judge(bridge, {c.name: c.count for c in checks}, explain=explain)


def _out_of_order(connection: Connection, campaign_key: int, item_key: int, through: dt.datetime) -> int:
    """Allocated applications without a pass that come before the last application with one."""
    last = connection.execute(
        sa.text(
            "SELECT a.applied_at, a.user_bucket, a.user_id FROM pass_applications AS a JOIN grants AS g "
            "ON g.campaign_key = a.campaign_key AND g.user_bucket = a.user_bucket AND g.user_id = a.user_id "
            "AND g.item_key = :i WHERE a.campaign_key = :c "
            "ORDER BY a.applied_at DESC, a.user_bucket DESC, a.user_id DESC LIMIT 1"
        ).columns(sa.column("applied_at", Instant()), sa.column("user_bucket"), sa.column("user_id")),
        {"c": campaign_key, "i": item_key},
    ).first()
    if last is None:
        return 0
    statement = sa.text(
        "SELECT count(*) FROM pass_applications AS a WHERE a.campaign_key = :c AND a.applied_at <= :through "
        "AND (a.applied_at < :t OR (a.applied_at = :t AND (a.user_bucket < :b OR (a.user_bucket = :b "
        "AND a.user_id < :u)))) AND NOT EXISTS (SELECT 1 FROM grants AS g WHERE g.campaign_key = a.campaign_key "
        "AND g.user_bucket = a.user_bucket AND g.user_id = a.user_id AND g.item_key = :i)"
    ).bindparams(sa.bindparam("t", type_=Instant()), sa.bindparam("through", type_=Instant()))
    values = {"c": campaign_key, "i": item_key, "through": through, "t": last[0], "b": last[1], "u": last[2]}
    return int(connection.execute(statement, values).scalar_one())
