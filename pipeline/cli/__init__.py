"""The ``entitle`` command line: demo users, plan, run, grant, deliver, status, summary, reconcile, repair,
void, report, query.

Exit codes: 0 success; 2 usage or configuration; 3 bad input (campaign or user
file); 4 partition files; 5 ledger refused (including a refused void or
repair); 6 campaign not started; 7 some partitions failed (the others
finished; for deliver: grants failed or not attempted); 8 reconciliation found
breaks; 9 reconciliation incomplete; 10 deliver: an issuer answered conflict;
70 internal error (a bug: please report).
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import datetime as dt
import json
import os
import sys
import traceback
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TextIO

from pipeline import __version__, delivery, ledger, reconciliation, schemas
from pipeline.config import Settings, load_settings
from pipeline.errors import (
    CorrectionError,
    DeliveryConflictError,
    DeliveryFailedError,
    EntitleError,
    QueryError,
)
from pipeline.grants import corrections, runs, snapshot
from pipeline.grants.demo_users import write_demo_users
from pipeline.grants.granting import PartitionOutcome
from pipeline.grants.notices import REMINDER_DAYS_DEFAULT
from pipeline.ledger import queries
from pipeline.programs.drawer_pass import cli as pass_cli
from pipeline.programs.merchant_cash import cli as merchant_cli
from pipeline.progress import Progress

EXIT_INTERNAL = 70
WRITERS_MAX = 16  # ledger writer threads of one grant process
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what shells report for a closed pipe


def main(argv: Sequence[str] | None = None) -> int:
    """Run the CLI; returns the process exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "command", None):
        parser.print_help()
        return 2
    try:
        settings = load_settings()
        result: int = args.handler(args, settings)
        return result
    except BrokenPipeError:
        # The reader went away (`entitle … | head`): not an error of ours, and nothing more to say.
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return EXIT_BROKEN_PIPE
    except EntitleError as exc:
        _fail(args, str(exc), exc.exit_code)
        return exc.exit_code
    except KeyboardInterrupt:
        _fail(args, "interrupted; every partition is all-or-nothing, so rerun the same command to finish", 130)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last line of defence: no traceback as the interface
        if os.environ.get("ENTITLE_DEBUG"):
            traceback.print_exc()
        _fail(
            args,
            f"internal error ({type(exc).__name__}: {exc}). This is a bug; rerun with ENTITLE_DEBUG=1 for the "
            "traceback and report it. The ledger is consistent: every partition is one transaction.",
            EXIT_INTERNAL,
        )
        return EXIT_INTERNAL


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="entitle",
        description="Grant every eligible user a campaign's items exactly once, recorded in an SQL ledger.",
        epilog="Settings come from ENTITLE_HOME, ENTITLE_LEDGER_URL, ENTITLE_CAMPAIGN, ENTITLE_PARTITIONS, "
        "ENTITLE_REJECTED_SHARE_MAX and, for partitions on S3, ENTITLE_DATA_URI (see README). Exit codes: 0 ok, "
        "2 usage/config (also an unreachable object store), 3 bad input, 4 partition files, 5 ledger refused, "
        "6 campaign not started, 7 partitions failed (deliver: grants failed or not attempted), 8 reconciliation "
        "breaks, 9 reconciliation incomplete, 10 deliver: an issuer answered conflict, 70 internal error. "
        "ENTITLE_ISSUER_<NAME>_URL overrides the url of [issuers.<name>].",
    )
    parser.add_argument("--version", action="version", version=f"entitle {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text, description=help_text)
        p.add_argument("--json", action="store_true", help="print one JSON document on stdout (for scripts)")
        return p

    p = command("demo-users", "write a synthetic user file with realistic ids and a few bad rows")
    p.add_argument("--count", type=int, default=1_000_000, help="distinct valid users (default 1,000,000)")
    p.add_argument("--out", type=Path, required=True, help="output file, .parquet or .csv")
    p.add_argument("--seed", type=int, default=20230105, help="random seed (same seed, same file)")
    p.set_defaults(handler=cmd_demo_users)

    p = command("plan", "dry run: validate a user file and show per-item counts and face value; writes nothing")
    _users_args(p)
    p.set_defaults(handler=cmd_plan)

    p = command("run", "freeze a user file, partition it and grant every partition, in one go")
    _users_args(p)
    _grant_args(p)
    p.set_defaults(handler=cmd_run)

    p = command("grant", "grant the partitions of the current snapshot (all, chosen, or only the failed ones)")
    p.add_argument("--partitions", type=_partition_list, help="comma-separated partition ids, e.g. 3,17")
    p.add_argument("--only-failed", action="store_true", help="only partitions whose last attempt failed or died")
    p.add_argument("--snapshot", help="snapshot id (default: the campaign's current snapshot)")
    _grant_args(p)
    p.set_defaults(handler=cmd_grant)

    p = command(
        "deliver",
        "send the ledger's grants to their issuers (items with issuer = NAME) and revoke voided ones there; "
        "exit 0 all delivered, 7 some grants or revocations failed or not attempted (rerun), 10 an issuer "
        "answered conflict",
    )
    p.add_argument("--partitions", type=_partition_list, help="comma-separated partition ids, e.g. 3,17")
    p.add_argument(
        "--only-failed", action="store_true", help="only partitions whose last delivery failed or was interrupted"
    )
    p.add_argument("--issuer", action="append", help="only this issuer (repeatable; default: every declared one)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")
    p.set_defaults(handler=cmd_deliver)

    p = command("status", "per partition of the current snapshot: done, failed (with the error), pending")
    p.add_argument("--snapshot", help="snapshot id (default: the campaign's current snapshot)")
    p.add_argument("--all", action="store_true", help="list every partition, not only those not done")
    p.set_defaults(handler=cmd_status)

    p = command("summary", "live grants per item and total face value, counted in the ledger")
    p.set_defaults(handler=cmd_summary)

    p = command(
        "reconcile",
        "compare the snapshot x campaign with the live ledger; exit 0 RECONCILED, 8 BREAKS, 9 INCOMPLETE",
    )
    p.add_argument("--snapshot", help="snapshot id (default: the campaign's current snapshot)")
    p.add_argument(
        "--method",
        choices=("checksum", "rows"),
        default="checksum",
        help="checksum: compare row-level only where a partition's checksums differ (default); rows: everywhere",
    )
    p.add_argument("--workers", type=int, help="reader processes (default ENTITLE_RECONCILE_WORKERS, else 2)")
    p.add_argument("--report", action="store_true", help="also write the HTML and PNG report")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")
    p.set_defaults(handler=cmd_reconcile)

    p = command(
        "repair",
        "grant what the latest reconciliation found missing, void and reissue grants with wrong terms, "
        "deliver again what an issuer lost (issuer_missing)",
    )
    p.add_argument("--actor", required=True, help="who repairs (recorded on every void)")
    p.add_argument("--run-id", help="run id to record (default: a new repair__... id)")
    p.add_argument("--no-reconcile", action="store_true", help="do not reconcile again afterwards")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")
    p.set_defaults(handler=cmd_repair)

    p = command("void", "void grants by compensating entries (never deletes); all-or-nothing")
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--user", type=int, help="the user whose live grants to void")
    target.add_argument("--break", dest="break_id", help="void the ledger row of an open break (unexpected, duplicate)")
    target.add_argument(
        "--from", dest="from_file", type=Path, help="CSV or Parquet with user_id[, item_sku][, reason] or break_id"
    )
    p.add_argument("--item", help="only this item sku (default: every item of the campaign the user holds)")
    p.add_argument("--reason", help="why (required unless the file has a reason column)")
    p.add_argument("--actor", required=True, help="who voids (recorded)")
    p.set_defaults(handler=cmd_void)

    p = command(
        "notices",
        "export users to notify (Parquet per partition): `granted` by a run, or `reminders` before items expire",
    )
    p.add_argument("kind", choices=("granted", "reminders"), help="which notices")
    p.add_argument("--run-id", help="granted: the run (default: the latest run that granted something)")
    p.add_argument(
        "--days",
        type=int,
        default=REMINDER_DAYS_DEFAULT,
        help=f"reminders: days before valid_until to remind (default {REMINDER_DAYS_DEFAULT})",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")
    p.set_defaults(handler=cmd_notices)

    p = command("report", "write the HTML page and PNG chart of a reconciliation (default: the latest)")
    p.add_argument("--reconciliation", help="reconciliation id (default: the campaign's latest)")
    p.add_argument("--out", type=Path, help="output folder (default: the reconciliation's export folder)")
    p.set_defaults(handler=cmd_report)

    p = command(
        "db",
        "ledger administration: `upgrade` migrates the ledger's schema, `version` shows it, "
        "`roles` creates the writer, operator and analyst roles (PostgreSQL)",
    )
    p.add_argument(
        "action",
        choices=("upgrade", "version", "roles"),
        help="upgrade: apply pending migrations in one transaction (back up first); version: the ledger's and "
        "this program's schema versions; roles: apply sql/postgresql/roles.sql (idempotent)",
    )
    p.set_defaults(handler=cmd_db)

    p = command("query", "run a named analyst query from sql/queries/ with bound parameters")
    p.add_argument("name", nargs="?", help="query name; omit (or --list) to list them")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUE", help="a query parameter")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table", help="output format")
    p.add_argument("--out", type=Path, help="write to this file instead of standard output (required for parquet)")
    p.add_argument("--list", action="store_true", help="list the named queries")
    p.set_defaults(handler=cmd_query)

    pass_cli.register(sub, command)
    merchant_cli.register(command)  # merchant cash programs: `entitle claims ...`, `entitle review ...`
    return parser


def _users_args(p: argparse.ArgumentParser) -> None:
    # Text, not Path: Path("s3://bucket/key") would lose a slash.
    p.add_argument(
        "--users", required=True, help="user file (.parquet or .csv, a path or s3://bucket/key) with a user_id column"
    )
    p.add_argument("--exclude", help="file of user ids to exclude (withdrawn or blocked accounts; path or s3:// URI)")


def _grant_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--verify", action="store_true", help="check every planned grant row by row after writing")
    p.add_argument("--run-id", help="run id to record (default: a new cli__… id)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar on standard error")
    p.add_argument(
        "--writers",
        type=_writer_count,
        help="partitions written at once (default: 2 on PostgreSQL, 1 on SQLite, which has one writer anyway)",
    )


def _writer_count(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
    if not 1 <= value <= WRITERS_MAX:
        raise argparse.ArgumentTypeError(f"--writers {value}: give 1 to {WRITERS_MAX}")
    return value


def _partition_list(text: str) -> list[int]:
    try:
        values = [int(part) for part in text.split(",") if part.strip()]
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of partition ids") from exc
    if not values:
        raise argparse.ArgumentTypeError("give at least one partition id")
    return values


def cmd_demo_users(args: argparse.Namespace, _settings: Settings) -> int:
    """Write synthetic users."""
    result = write_demo_users(args.count, args.out, args.seed)
    _emit(
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
    deliveries = _delivery_plan(campaign, report.eligible_users)
    document["issuers"] = deliveries
    lines = [
        f"plan for campaign {campaign.campaign_id} (dry run: nothing written)",
        *_snapshot_lines(report),
        *_item_lines(items),
        *_delivery_plan_lines(deliveries),
    ]
    _emit(args, document, lines)
    return 0


ASSUMED_ISSUER_LATENCY_S = 0.25  # one batch request's round trip, for plan's estimate only


def _delivery_plan(campaign: Any, users: int) -> list[dict[str, Any]]:
    """Per declared issuer: grants to deliver, requests, and the time its rate budget allows."""
    plans = []
    for spec in campaign.issuers:
        grants = users * len(campaign.items_of(spec.name))
        requests = -(-grants // spec.batch_size)
        # The budget allows requests_per_s; concurrency allows concurrency / latency per second.
        rate = min(spec.requests_per_s, spec.concurrency / ASSUMED_ISSUER_LATENCY_S)
        plans.append(
            {
                "issuer": spec.name,
                "url": spec.url,
                "items": [i.sku for i in campaign.items_of(spec.name)],
                "grants": grants,
                "requests": requests,
                "requests_per_s": spec.requests_per_s,
                "concurrency": spec.concurrency,
                "batch_size": spec.batch_size,
                "estimated_s": requests / rate,
                "assumed_latency_s": ASSUMED_ISSUER_LATENCY_S,
            }
        )
    return plans


def _delivery_plan_lines(plans: list[dict[str, Any]]) -> list[str]:
    if not plans:
        return ["  delivery: every item's issuer is the ledger; nothing to deliver"]
    lines = [f"  {'issuer':<12} {'grants':>14} {'requests':>10}  estimated delivery time"]
    for plan in plans:
        lines.append(
            f"  {plan['issuer']:<12} {plan['grants']:>14,} {plan['requests']:>10,}  {_duration(plan['estimated_s'])} "
            f"({plan['requests_per_s']:g} req/s × {plan['batch_size']:,} grants, {plan['concurrency']} in flight at "
            f"an assumed {plan['assumed_latency_s']:g} s per request)"
        )
    return lines


def _duration(seconds: float) -> str:
    if seconds < 120:
        return f"{seconds:.1f} s"
    if seconds < 7_200:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3_600:.1f} h"


def cmd_deliver(args: argparse.Namespace, settings: Settings) -> int:
    """Deliver grants to issuers."""
    pipeline = runs.open_pipeline(settings)
    context, entries = runs.delivery_selection(pipeline, args.partitions, args.only_failed)
    runtimes = delivery.open_issuers(pipeline.campaign, args.issuer, pipeline.engine)
    if not runtimes or not entries:
        reason = "no partition selected" if runtimes else "every item's issuer is the ledger (nothing to send)"
        _emit(args, {"snapshot_id": context.snapshot_id, "partitions": 0, "reports": []}, [f"nothing to do: {reason}"])
        return 0
    total = sum(e.rows * len(pipeline.campaign.items_of(name)) for e in entries for name in runtimes)
    bar = Progress("deliver", total, enabled=not args.no_progress)
    try:
        reports = delivery.deliver(context, runtimes, entries, on_report=lambda r: bar.advance(r.planned))
    finally:
        bar.close()
        for runtime in runtimes.values():
            runtime.close()
    budgets = {
        name: {
            "requests": len(r.budget.starts),
            "requests_per_s": r.budget.achieved_requests_per_s(),
            "budget_requests_per_s": r.spec.requests_per_s,
        }
        for name, r in runtimes.items()
    }
    unfinished = [r for r in reports if r.status != "done"]
    conflicts = sum(r.conflict for r in reports)
    t = {
        c: sum(getattr(r, c) for r in reports)
        for c in ("planned", *delivery.OUTCOME_COUNTS, "sent", "revoked", "revoke_failed")
    }
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
        f"deliveries done; planned {t['planned']:,} = created {t['created']:,} + exists {t['exists']:,} + conflict "
        f"{t['conflict']:,} + failed {t['failed']:,} + not attempted {t['not_attempted']:,}; sent {t['sent']:,} now",
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
        )
    for report in unfinished[:20]:
        lines.append(
            f"  UNFINISHED part-{report.partition_id:04d} → {report.issuer}: {report.failed:,} failed, "
            f"{report.not_attempted:,} not attempted: {report.error}"
        )
    if unfinished:
        lines.append("fix the cause (is the issuer up?), then: entitle deliver --only-failed")
    if conflicts:
        lines.append(
            f"  {conflicts:,} CONFLICT(S): the issuer holds a different payload under the grant id; nothing was "
            "overwritten. List them: entitle query delivery_conflicts"
        )
    _emit(args, document, lines)
    if unfinished:
        return DeliveryFailedError.exit_code
    return DeliveryConflictError.exit_code if conflicts else 0


def cmd_run(args: argparse.Namespace, settings: Settings) -> int:
    """Freeze, partition, grant."""
    pipeline = runs.open_pipeline(settings)
    pipeline.campaign.require_started(settings.clock())
    report = runs.freeze(pipeline, args.users, args.exclude)
    _say(args, *_snapshot_lines(report))
    bar = Progress("partition", settings.partitions_for(report.eligible_users), enabled=not args.no_progress)
    prepared = runs.partition(pipeline, report, bar.advance)
    bar.close()
    run = runs.start_run(pipeline, args.run_id, prepared.report.snapshot_id)
    return _grant_and_report(args, pipeline, run, list(run.entries), {"snapshot": prepared.as_dict()})


def cmd_grant(args: argparse.Namespace, settings: Settings) -> int:
    """Grant chosen partitions."""
    pipeline = runs.open_pipeline(settings)
    pipeline.campaign.require_started(settings.clock())
    run = runs.start_run(pipeline, args.run_id, args.snapshot)
    entries = runs.select_partitions(pipeline, run, args.partitions, args.only_failed)
    if not entries:
        _emit(args, {"run_id": run.run_id, "partitions": 0, "outcomes": []}, ["nothing to do: no partition selected"])
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
    if failures:
        lines.append("fix the cause, then: entitle grant --only-failed")
    _emit(args, document, lines)
    return 7 if failures else 0


def cmd_status(args: argparse.Namespace, settings: Settings) -> int:
    """Partition states."""
    pipeline = runs.open_pipeline(settings)
    report = runs.status(pipeline, args.snapshot)
    lines = [
        f"campaign {report.campaign_id}, snapshot {report.snapshot_id}, {report.partition_count} partitions: "
        f"{report.done} done, {report.failed} failed, {report.running} running or interrupted, {report.pending} pending"
    ]
    for part in report.partitions:
        if args.all or part["status"] != "done":
            error = f"  error: {part['error']}" if part["error"] else ""
            lines.append(f"  part-{part['partition_id']:04d}  {part['status']:<8} run {part['run_id']}{error}")
    document = report.as_dict()
    document["delivery"] = delivery.issuer_totals(pipeline.engine, pipeline.keys.campaign_key, report.snapshot_id)
    lines += _delivery_lines(pipeline.campaign, document["delivery"])
    _emit(args, document, lines)
    return 0


def cmd_summary(args: argparse.Namespace, settings: Settings) -> int:
    """Ledger totals."""
    pipeline = runs.open_pipeline(settings)
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
        lines += _delivery_lines(pipeline.campaign, document["delivery"])
    _emit(args, document, lines)
    return 0


def _delivery_lines(campaign: Any, totals: dict[str, dict[str, int]]) -> list[str]:
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
    return 0


def cmd_query(args: argparse.Namespace, settings: Settings) -> int:
    """Named queries."""
    if args.list or not args.name:
        names = queries.list_queries()
        described = [(n, queries.load_query(n, "sqlite")) for n in names]
        _emit(
            args,
            {
                "queries": [
                    {"name": n, "parameters": list(q.parameters), "description": q.description} for n, q in described
                ]
            },
            [f"{n:<22} params: {', '.join(q.parameters) or '-':<28} {q.description}" for n, q in described],
        )
        return 0
    params: dict[str, str] = {}
    for item in args.param:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise QueryError(f"--param {item!r} must look like KEY=VALUE")
        params[key] = value
    from sqlalchemy.engine import make_url

    from pipeline.ledger import create_ledger_engine

    url = make_url(settings.ledger_url)
    if url.get_backend_name() == "sqlite" and url.database and not Path(url.database).exists():
        raise QueryError(f"no ledger at {url.database} yet; run `entitle run --users FILE` first")
    fmt = "json" if args.json else args.format
    if fmt == "parquet" and args.out is None:
        raise QueryError("--format parquet writes a binary file: give --out FILE.parquet")
    engine = create_ledger_engine(settings.ledger_url)
    result = queries.run_query(engine, args.name, params)
    if fmt == "parquet":
        rows = queries.write_parquet(result, args.out)
        print(f"wrote {rows:,} rows to {args.out}", file=sys.stderr)
        return 0
    with _output(args.out) as stream:
        if fmt == "json":
            print(
                json.dumps({"columns": result.columns, "rows": [list(r) for r in result.rows]}, default=str),
                file=stream,
            )
        elif fmt == "csv":
            writer = csv.writer(stream)
            writer.writerow(result.columns)
            writer.writerows(result.rows)
        else:
            print(_table(result.columns, result.rows), file=stream)
    return 0


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[TextIO]:
    """Standard output, or a file written atomically."""
    if path is None:
        yield sys.stdout
        return
    with schemas.replaced_atomically(path) as temporary, open(temporary, "w", encoding="utf-8", newline="") as handle:
        yield handle


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Reconcile and print the verdict and the bridge."""
    pipeline = runs.open_pipeline(settings)
    partition_count = int(runs.snapshot_row(pipeline, args.snapshot)["partition_count"])
    bar = Progress("reconcile", partition_count, enabled=not args.no_progress)
    result = reconciliation.reconcile(
        pipeline, args.snapshot, args.method, args.workers, on_partition=lambda _check: bar.advance(1)
    )
    bar.close()
    document = result.as_dict()
    if args.report:
        from pipeline import report

        html, png = report.write_report(document, Path(result.export_dir))
        document["report_html"], document["report_png"] = str(html), str(png)
    _emit(args, document, _reconciliation_lines(document))
    return _verdict_exit(result.verdict)


def _verdict_exit(verdict: str) -> int:
    return {"RECONCILED": 0, "BREAKS": 8, "INCOMPLETE": 9}[verdict]


def _reconciliation_lines(document: dict[str, Any]) -> list[str]:
    b = document["bridge"]
    lines = [
        f"{document['verdict']}: {document['explanation']}",
        f"reconciliation {document['reconciliation_id']} of campaign {document['campaign_id']}, snapshot "
        f"{document['snapshot_id']} ({document['partition_count']} partitions: {document['checksum_partitions']} by "
        f"checksum, {document['row_partitions']} row by row) in {document['duration_s']:.1f} s",
        f"  expected {b['expected']:>14,} = matched {b['matched']:,} + terms_mismatch {b['terms_mismatch']:,} "
        f"+ missing {b['missing']:,} + voided {b['voided']:,}   (residual {b['residual_expected']:,})",
        f"  ledger   {b['ledger']:>14,} = matched {b['matched']:,} + terms_mismatch {b['terms_mismatch']:,} "
        f"+ unexpected {b['unexpected']:,} + duplicate {b['duplicate']:,}   (residual {b['residual_ledger']:,})",
        *(
            f"  issuer {i['issuer']}: ledger {i['ledger_live']:,} = matched {i['matched']:,} + issuer_missing "
            f"{i['issuer_missing']:,}; held {i['issuer_held']:,} = matched {i['matched']:,} + issuer_unexpected "
            f"{i['issuer_unexpected']:,}"
            if i["state"] == "compared"
            else f"  issuer {i['issuer']}: not compared: {i['error']}"
            for i in document.get("issuers", [])
        ),
        f"  {'item':<20} {'expected':>12} {'live':>12} {'missing':>9} {'unexpected':>10} {'terms':>7} {'voided':>7}",
    ]
    for i in document["items"]:
        lines.append(
            f"  {i['item_sku']:<20} {i['expected']:>12,} {i['live']:>12,} {i['missing']:>9,} {i['unexpected']:>10,} "
            f"{i['terms_mismatch']:>7,} {i['voided']:>7,}"
        )
    for brk in document["top_breaks"][:10]:
        lines.append(
            f"  {brk['break_id']}  {brk['break_class']:<14} user {brk['user_id']} {brk['item_sku']}: {brk['detail']}"
        )
    if document["open_breaks"] > 10:
        lines.append(f"  ... {document['open_breaks'] - 10:,} more: entitle query open_breaks")
    if document["resolved_breaks"]:
        lines.append(f"  {document['resolved_breaks']:,} earlier break(s) resolved")
    lines.append(f"  breaks: {document['breaks_file']}")
    if "report_html" in document:
        lines.append(f"  report: {document['report_html']} and {document['report_png']}")
    return lines


def cmd_repair(args: argparse.Namespace, settings: Settings) -> int:
    """Repair missing and wrong-terms grants found by the latest reconciliation."""
    pipeline = runs.open_pipeline(settings)
    pipeline.campaign.require_started(settings.clock())
    done = corrections.repair(pipeline, args.actor, args.run_id)
    document: dict[str, Any] = {"repair": done.as_dict()}
    lines = [
        f"repair of reconciliation {done.reconciliation_id} (run {done.run_id}): {done.granted_missing:,} missing "
        f"grants granted, {done.reissued:,} grants with wrong terms voided and reissued, {done.already_fixed:,} "
        f"already fixed, {len(done.partitions_granted)} ungranted partition(s) granted",
    ]
    if done.issuer_delivery is not None:
        d = done.issuer_delivery
        lines.append(
            f"  issuer_missing: {done.issuer_redriven:,} grant(s) delivered again; their partitions now: created "
            f"{d['created']:,}, exists {d['exists']:,}, conflict {d['conflict']:,}, failed {d['failed']:,}, not "
            f"attempted {d['not_attempted']:,}"
        )
    ledger_decisions = {c: n for c, n in done.needs_decision.items() if c != "issuer_unexpected"}
    if ledger_decisions:
        listed = ", ".join(f"{n:,} {c}" for c, n in sorted(ledger_decisions.items()))
        lines.append(
            f"  not repaired, needs a decision: {listed}; void them with `entitle void --break ID` if they should "
            "not exist"
        )
    if done.needs_decision.get("issuer_unexpected"):
        lines.append(
            f"  not repaired, needs a decision: {done.needs_decision['issuer_unexpected']:,} issuer_unexpected; "
            "the issuer holds grants the ledger does not (list: `entitle query open_breaks --param "
            "break_class=issuer_unexpected`); revoke them at the issuer if they should not exist"
        )
    if args.no_reconcile:
        _emit(args, document, [*lines, "next: entitle reconcile"])
        return 0
    _say(args, *lines)
    partition_count = int(runs.snapshot_row(pipeline, None)["partition_count"])
    bar = Progress("reconcile", partition_count, enabled=not args.no_progress)
    result = reconciliation.reconcile(pipeline, on_partition=lambda _check: bar.advance(1))
    bar.close()
    document["reconciliation"] = result.as_dict()
    _emit(args, document, _reconciliation_lines(document["reconciliation"]))
    return _verdict_exit(result.verdict)


def cmd_void(args: argparse.Namespace, settings: Settings) -> int:
    """Void grants."""
    pipeline = runs.open_pipeline(settings)
    if args.from_file is not None:
        if args.item:
            raise CorrectionError("--item goes with --user; in a file, use an item_sku column")
        requests = corrections.read_void_file(args.from_file, args.reason)
    else:
        if not args.reason:
            raise CorrectionError("--reason is required: say why (it is audited)")
        if args.break_id and args.item:
            raise CorrectionError("--item goes with --user; a break names its item already")
        requests = [corrections.VoidRequest(args.reason, args.user, args.item, args.break_id, source="command line")]
    voided = corrections.void_grants(pipeline, requests, args.actor, settings.clock())
    lines = [f"voided {len(voided):,} grant(s) by {args.actor}:"]
    lines += [f"  user {v.user_id} {v.item_sku} (issue {v.issue_no}): {v.reason}" for v in voided[:20]]
    if len(voided) > 20:
        lines.append(f"  ... and {len(voided) - 20:,} more")
    lines.append("they stay in grant_history; run `entitle reconcile` to see the effect")
    _emit(args, {"voided": [v.as_dict() for v in voided], "actor": args.actor}, lines)
    return 0


def cmd_db(args: argparse.Namespace, settings: Settings) -> int:
    """Ledger administration."""
    engine = ledger.create_ledger_engine(settings.ledger_url)
    where = settings.describe_ledger()
    try:
        if args.action == "roles":
            roles = ledger.apply_roles(engine)
            _emit(
                args,
                {"roles": list(roles), "ledger": where},
                [
                    f"roles applied on {where}: {', '.join(roles)}",
                    "give them to login users, e.g. GRANT entitle_analyst TO alice;",
                ],
            )
        elif args.action == "upgrade":
            done = ledger.upgrade(engine)
            if done.from_version is None:
                text = f"{where}: new ledger created at schema version {done.to_version}"
            elif done.migrations:
                text = (
                    f"{where}: upgraded from schema version {done.from_version} to {done.to_version} "
                    f"(migrations {', '.join(done.migrations)})"
                )
            else:
                text = f"{where}: already at schema version {done.to_version}; nothing to do"
            _emit(args, {"ledger": where, **done.as_dict()}, [text])
        else:
            found = ledger.recorded_version(engine)
            current = found == ledger.SCHEMA_VERSION
            advice = "up to date" if current else "run `entitle db upgrade`" if found is not None else "empty"
            _emit(
                args,
                {"ledger": where, "schema_version": found, "program_schema_version": ledger.SCHEMA_VERSION},
                [
                    f"{where}: schema version {found if found is not None else '-'}, this program "
                    f"{ledger.SCHEMA_VERSION} ({advice})"
                ],
            )
    finally:
        engine.dispose()
    return 0


def cmd_notices(args: argparse.Namespace, settings: Settings) -> int:
    """Export notices for the messaging system."""
    from pipeline.grants import notices

    pipeline = runs.open_pipeline(settings)
    partitions = int(runs.snapshot_row(pipeline, None)["partition_count"])
    if args.kind == "granted":
        bar = Progress("notices", partitions, enabled=not args.no_progress)
        exports = [notices.export_granted(pipeline, args.run_id, bar.advance)]
    else:
        expiries = len({i.valid_until for i in pipeline.campaign.items if i.valid_until is not None})
        bar = Progress("reminders", partitions * expiries, enabled=not args.no_progress)
        exports = notices.export_reminders(pipeline, args.days, bar.advance)
    bar.close()
    lines = [f"{e.kind}: {e.users:,} users in {e.partitions} partition files under {e.directory}" for e in exports]
    _emit(args, {"exports": [e.as_dict() for e in exports]}, lines or ["no time-limited items: nothing to remind"])
    return 0


def cmd_report(args: argparse.Namespace, settings: Settings) -> int:
    """Render a stored reconciliation as HTML and PNG."""
    from pipeline import report

    pipeline = runs.open_pipeline(settings)
    document = reconciliation.load_result(pipeline, args.reconciliation)
    out_dir = args.out or Path(document["export_dir"])
    html, png = report.write_report(document, out_dir)
    _emit(
        args,
        {"reconciliation_id": document["reconciliation_id"], "html": str(html), "png": str(png)},
        [f"report of {document['reconciliation_id']} ({document['verdict']}): {html}", f"chart: {png}"],
    )
    return 0


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


def _table(columns: list[str], rows: list[tuple[Any, ...]]) -> str:
    cells = [[_cell(v) for v in row] for row in rows]
    widths = [max([len(c)] + [len(r[i]) for r in cells]) for i, c in enumerate(columns)]
    out = ["  ".join(c.ljust(w) for c, w in zip(columns, widths, strict=True))]
    out.append("  ".join("-" * w for w in widths))
    out.extend("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)) for r in cells)
    out.append(f"({len(rows)} row{'s' if len(rows) != 1 else ''})")
    return "\n".join(out)


def _cell(value: Any) -> str:
    if value is None:
        return "NULL"
    if isinstance(value, dt.datetime):
        return value.isoformat()
    return str(value)


def _emit(args: argparse.Namespace, document: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(document, default=str, indent=2))
    else:
        print("\n".join(lines))


def _say(args: argparse.Namespace, *lines: str) -> None:
    """Progress narration: stdout for people, stderr when stdout carries JSON."""
    stream = sys.stderr if getattr(args, "json", False) else sys.stdout
    print("\n".join(lines), file=stream)


def _fail(args: argparse.Namespace, message: str, code: int) -> None:
    print(f"entitle: error: {message}", file=sys.stderr)
    if getattr(args, "json", False):
        try:
            print(json.dumps({"error": message, "exit_code": code}))
        except BrokenPipeError:
            pass


if __name__ == "__main__":
    sys.exit(main())
