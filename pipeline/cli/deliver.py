"""``entitle deliver``: send the ledger's grants to their issuers and revoke voided ones there.

Also the lines that show a delivery's plan (``entitle plan``) and its counts per issuer (``status``, ``summary``).
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from pipeline import delivery
from pipeline.campaigns import Campaign
from pipeline.cli.output import emit, explain_exit
from pipeline.config import Settings
from pipeline.errors import DeliveryConflictError, DeliveryFailedError
from pipeline.grants import runs
from pipeline.progress import Progress


def cmd_deliver(args: argparse.Namespace, settings: Settings) -> int:
    """Deliver grants to issuers."""
    with runs.open_pipeline(settings) as pipeline:
        runs.register(pipeline)
        context, entries = runs.delivery_selection(pipeline, args.partitions, args.only_failed)
        runtimes = delivery.open_issuers(pipeline.campaign, args.issuer, pipeline.engine)
        if not runtimes or not entries:
            reason = "no partition selected" if runtimes else "every item's issuer is the ledger (nothing to send)"
            document = {"snapshot_id": context.snapshot_id, "partitions": 0, "reports": []}
            emit(args, document, [f"nothing to do: {reason}"])
            return 0
        total = delivery.grants_to_deliver(pipeline.campaign, entries, runtimes)
        bar = Progress("deliver", total, enabled=not args.no_progress)
        try:
            reports = delivery.deliver(context, runtimes, entries, on_report=lambda r: bar.advance(r.planned))
        finally:
            bar.close()
            for runtime in runtimes.values():
                runtime.close()
        budgets = delivery.budget_usage(runtimes)
        unfinished = [r for r in reports if r.status != "done"]
        conflicts = sum(r.conflict for r in reports)
        t = delivery.report_totals(reports)
        document = {
            "snapshot_id": context.snapshot_id,
            "ledger": settings.describe_ledger(),
            "partitions": len(entries),
            "reports": [r.as_dict() for r in reports],
            "totals": t,
            "budgets": budgets,
            "unfinished": len(unfinished),
        }
        lines = [
            f"deliver snapshot {context.snapshot_id}: {len(reports) - len(unfinished)}/{len(reports)} partition "
            f"deliveries done; planned {t['planned']:,} = created {t['created']:,} + exists {t['exists']:,} + "
            f"conflict {t['conflict']:,} + failed {t['failed']:,} + not attempted {t['not_attempted']:,}; "
            f"sent {t['sent']:,} now",
        ]
        if t["revoked"] or t["revoke_failed"]:
            lines.append(
                f"  voided grants revoked at the issuers: {t['revoked']:,}; revocations failed: {t['revoke_failed']:,}"
                + (" (rerun `entitle deliver`)" if t["revoke_failed"] else "")
            )
        for name, budget in budgets.items():
            rate = budget["requests_per_s"]
            lines.append(
                f"  {name}: {budget['requests']:,} requests"
                + (f" at {rate:.1f} req/s (budget {budget['budget_requests_per_s']:g})" if rate else "")
                + (
                    f"; slots given up (their sender woke too late to keep the budget): {budget['slots_missed']:,}"
                    if budget["slots_missed"]
                    else ""
                )
            )
        for report in unfinished[:20]:
            lines.append(
                f"  UNFINISHED part-{report.partition_id:04d} → {report.issuer}: {report.failed:,} failed, "
                f"{report.not_attempted:,} not attempted: {report.error}"
            )
        if conflicts:
            lines.append(
                f"  {conflicts:,} CONFLICT(S): the issuer holds a different payload under the grant id; nothing was "
                "overwritten. List them: entitle query delivery_conflicts"
            )
        emit(args, document, lines)
        if unfinished:
            return explain_exit(
                DeliveryFailedError.exit_code,
                f"{len(unfinished)} of {len(reports)} partition deliveries unfinished ({t['failed']:,} grants failed, "
                f"{t['not_attempted']:,} not attempted): fix the cause (is the issuer up?), then: "
                "entitle deliver --only-failed",
            )
        if conflicts:
            return explain_exit(
                DeliveryConflictError.exit_code,
                f"an issuer answered conflict for {conflicts:,} grant(s): it holds a different payload under their "
                "grant ids and nothing was overwritten; a person decides. List them: entitle query delivery_conflicts",
            )
        return 0


def delivery_plan_lines(plans: Sequence[delivery.IssuerPlan]) -> list[str]:
    """The plan's delivery per issuer: grants, requests and the estimated time."""
    if not plans:
        return ["  delivery: every item's issuer is the ledger; nothing to deliver"]
    lines = [f"  {'issuer':<12} {'grants':>14} {'requests':>10}  estimated delivery time"]
    for plan in plans:
        lines.append(
            f"  {plan.issuer:<12} {plan.grants:>14,} {plan.requests:>10,}  {_duration(plan.estimated_s)} "
            f"({plan.requests_per_s:g} req/s × {plan.batch_size:,} grants, {plan.concurrency} in flight at "
            f"an assumed {plan.assumed_latency_s:g} s per request)"
        )
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7_200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3_600:.1f} h"


def delivery_lines(campaign: Campaign, totals: dict[str, dict[str, int]]) -> list[str]:
    """Delivery counts per issuer (sums of each partition's latest delivery report)."""
    if not campaign.issuers:
        return []
    lines = [
        f"  delivery  {'issuer':<12} {'planned':>12} {'created':>12} {'exists':>10} {'conflict':>9} {'failed':>9} "
        f"{'not sent':>10}  partitions done/unfinished"
    ]
    for spec in campaign.issuers:
        t = totals.get(spec.name)
        if t is None:
            lines.append(f"  delivery  {spec.name:<12} not delivered yet: entitle deliver")
            continue
        lines.append(
            f"  delivery  {spec.name:<12} {t['planned']:>12,} {t['created']:>12,} {t['exists']:>10,} "
            f"{t['conflict']:>9,} {t['failed']:>9,} {t['not_attempted']:>10,}  "
            f"{t['partitions_done']}/{t['partitions_failed']}"
        )
    return lines
