"""``entitle demo-users``, ``plan``, ``run``, ``grant``, ``status``, ``summary``: granting a campaign, and its state.

``run`` freezes and partitions a user file and grants every partition; ``grant`` grants the current snapshot's
partitions (all, chosen, or the failed ones); ``plan`` validates a user file and counts what would be granted and
delivered, writing nothing.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from pipeline import delivery, ledger
from pipeline.cli.deliver import delivery_lines, delivery_plan_lines
from pipeline.cli.output import emit, explain_exit, say
from pipeline.config import Settings
from pipeline.errors import GrantFailedError
from pipeline.grants import runs, snapshot
from pipeline.grants.demo_users import refuse_replacing_granted_users, write_demo_users
from pipeline.grants.granting import PartitionOutcome
from pipeline.progress import Progress

FAILED_NAMED_MAX = 5  # failed partitions named in the one-line reason on standard error


def cmd_demo_users(args: argparse.Namespace, settings: Settings) -> int:
    """Write synthetic users, unless they would replace the users of the file the ledger was granted from."""
    result = write_demo_users(
        args.count, args.out, args.seed, lambda users: refuse_replacing_granted_users(settings, args.out, users)
    )
    emit(
        args,
        vars(result),
        [
            f"wrote {result.rows:,} rows to {result.path}: {result.distinct_valid_users:,} distinct valid users, "
            f"{result.duplicate_rows:,} duplicate rows and {result.bad_rows:,} bad rows (for validation to catch)"
        ],
    )
    return 0


def cmd_plan(args: argparse.Namespace, settings: Settings) -> int:
    """Dry run."""
    campaign = settings.campaign()
    report = snapshot.freeze_snapshot(
        settings.location(args.users),
        settings.data_root,
        campaign.campaign_id,
        settings.location(args.exclude) if args.exclude else None,
        settings.rejected_share_max,
        dry_run=True,
        id_column=campaign.id_column,
    )
    items = runs.plan_items(campaign, report.eligible_users)
    document = {
        "campaign_id": campaign.campaign_id,
        "snapshot": report.as_dict(),
        "items": [vars(i) for i in items],
        "total_grants": sum(i.grants for i in items),
        "total_face_value_krw": sum(i.face_value_krw for i in items),
        "written": False,
    }
    deliveries = delivery.plan_delivery(campaign, report.eligible_users)
    document["issuers"] = [d.as_dict() for d in deliveries]
    lines = [
        f"plan for campaign {campaign.campaign_id} (dry run: nothing written)",
        *_snapshot_lines(report),
        *_item_lines(items),
        *delivery_plan_lines(deliveries),
    ]
    emit(args, document, lines)
    return 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Freeze, partition, grant."""
    with runs.open_pipeline(settings) as pipeline:
        runs.register(pipeline)
        pipeline.campaign.require_started(settings.clock())
        report = runs.freeze(pipeline, args.users, args.exclude)
        say(args, *_snapshot_lines(report))
        bar = Progress("partition", settings.partitions_for(report.eligible_users), enabled=not args.no_progress)
        prepared = runs.partition(pipeline, report, bar.advance)
        bar.close()
        run = runs.start_run(pipeline, args.run_id, prepared.report.snapshot_id)
        return _grant_and_report(args, pipeline, run, list(run.entries), {"snapshot": prepared.as_dict()})


def cmd_grant(args: argparse.Namespace, settings: Settings) -> int:
    """Grant chosen partitions."""
    with runs.open_pipeline(settings) as pipeline:
        runs.register(pipeline)
        pipeline.campaign.require_started(settings.clock())
        run = runs.start_run(pipeline, args.run_id, args.snapshot)
        entries = runs.select_partitions(pipeline, run, args.partitions, args.only_failed)
        if not entries:
            document = {"run_id": run.run_id, "partitions": 0, "outcomes": []}
            emit(args, document, ["nothing to do: no partition selected"])
            return 0
        return _grant_and_report(args, pipeline, run, entries, {})


def _grant_and_report(
    args: argparse.Namespace,
    pipeline: runs.Pipeline,
    run: runs.RunHandle,
    entries: list[Any],
    extra: dict[str, Any],
) -> int:
    bar = Progress("grant", sum(e.rows for e in entries), enabled=not args.no_progress)
    failures: list[PartitionOutcome] = []

    def on_outcome(outcome: PartitionOutcome) -> None:
        bar.advance(outcome.planned // max(len(pipeline.campaign.items), 1))
        if outcome.status != "done":
            failures.append(outcome)

    writers = args.writers or (2 if pipeline.engine.dialect.name == "postgresql" else 1)
    outcomes = runs.grant(pipeline, run, entries, args.verify, on_outcome, writers)
    bar.close()
    written = sum(o.written for o in outcomes)
    present = sum(o.already_present for o in outcomes)
    planned = sum(o.planned for o in outcomes)
    document = {
        **extra,
        "run_id": run.run_id,
        "snapshot_id": run.snapshot_id,
        "ledger": pipeline.settings.describe_ledger(),
        "partitions": len(outcomes),
        "failed_partitions": [o.as_dict() for o in failures],
        "planned": planned,
        "written": written,
        "already_present": present,
    }
    lines = [
        f"run {run.run_id}: {len(outcomes) - len(failures)}/{len(outcomes)} partitions done; "
        f"{written:,} grants written, {present:,} already present, {planned:,} planned",
        f"ledger: {pipeline.settings.describe_ledger()}",
    ]
    for failure in failures:
        lines.append(f"FAILED part-{failure.partition_id:04d}: {failure.error}")
    emit(args, document, lines)
    if not failures:
        return 0
    labels = ", ".join(f"part-{f.partition_id:04d}" for f in failures[:FAILED_NAMED_MAX])
    more = f" and {len(failures) - FAILED_NAMED_MAX:,} more" if len(failures) > FAILED_NAMED_MAX else ""
    return explain_exit(
        GrantFailedError.exit_code,
        f"{len(failures)} of {len(outcomes)} partitions failed ({labels}{more}; the others are granted): "
        "fix the cause, then: entitle grant --only-failed",
    )


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Partition states."""
    with runs.open_pipeline(settings) as pipeline:
        report = runs.status(pipeline, args.snapshot)
        lines = [
            f"campaign {report.campaign_id}, snapshot {report.snapshot_id}, {report.partition_count} partitions: "
            f"{report.done} done, {report.failed} failed, {report.running} running or interrupted, "
            f"{report.pending} pending"
        ]
        pending: list[int] = []
        for part in report.partitions:
            if part["status"] == "pending":  # never attempted: no run, no error; listed as ranges below
                pending.append(int(part["partition_id"]))
            elif args.all or part["status"] != "done":
                error = f"  error: {part['error']}" if part["error"] else ""
                lines.append(f"  part-{part['partition_id']:04d}  {part['status']:<8} run {part['run_id']}{error}")
        if pending:
            lines.append(f"  pending (never attempted; `entitle grant` grants them): {partition_ranges(pending)}")
        document = report.as_dict()
        document["delivery"] = delivery.issuer_totals(pipeline.engine, pipeline.keys.campaign_key, report.snapshot_id)
        lines += delivery_lines(pipeline.campaign, document["delivery"])
        emit(args, document, lines)
        return 0


def cmd_summary(args: argparse.Namespace, settings: Settings) -> int:
    """Ledger totals."""
    with runs.open_pipeline(settings) as pipeline:
        totals = runs.ledger_totals(pipeline)
        document: dict[str, Any] = {
            "campaign_id": pipeline.campaign.campaign_id,
            "ledger": settings.describe_ledger(),
            "items": [vars(t) for t in totals],
            "total_grants": sum(t.grants for t in totals),
            "total_face_value_krw": sum(t.face_value_krw for t in totals),
        }
        lines = [f"campaign {pipeline.campaign.campaign_id}, ledger {settings.describe_ledger()}", *_item_lines(totals)]
        current = ledger.current_snapshot(pipeline.engine, pipeline.keys.campaign_key)
        if current is not None:
            document["delivery"] = delivery.issuer_totals(
                pipeline.engine, pipeline.keys.campaign_key, str(current["snapshot_id"])
            )
            lines += delivery_lines(pipeline.campaign, document["delivery"])
        emit(args, document, lines)
        return 0


def partition_ranges(partition_ids: Sequence[int]) -> str:
    """``part-0003..part-0127, part-0200`` for partition ids: consecutive ids as one range."""
    spans: list[str] = []
    ordered = sorted(partition_ids)
    start = previous = ordered[0] if ordered else 0
    for current in [*ordered[1:], None]:
        if current is not None and current == previous + 1:
            previous = current
            continue
        first, last = f"part-{start:04d}", f"part-{previous:04d}"
        spans.append(first if start == previous else f"{first}..{last}")
        if current is not None:
            start = previous = current
    return ", ".join(spans) if ordered else ""


def _snapshot_lines(report: snapshot.SnapshotReport) -> list[str]:
    return [
        f"snapshot {report.snapshot_id}: {report.rows_read:,} rows read from {report.source_file}",
        f"  eligible users {report.eligible_users:,}; rejected: null {report.null_rows:,}, not an integer "
        f"{report.not_integer_rows:,}, out of range {report.out_of_range_rows:,} ({report.rejected_share:.4%}); "
        f"duplicates removed {report.duplicate_rows:,}; excluded {report.excluded_users:,}",
        f"  quarantine: {report.quarantine_file}",
    ]


def _item_lines(items: Sequence[runs.ItemTotal]) -> list[str]:
    lines = [f"  {'item':<20} {'kind':<9} {'grants':>14} {'face value (KRW)':>20}"]
    for i in items:
        lines.append(f"  {i.item_sku:<20} {i.item_kind:<9} {i.grants:>14,} {i.face_value_krw:>20,}")
    lines.append(
        f"  {'total':<20} {'':<9} {sum(i.grants for i in items):>14,} {sum(i.face_value_krw for i in items):>20,}"
    )
    return lines
