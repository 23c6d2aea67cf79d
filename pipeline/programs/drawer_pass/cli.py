"""``entitle pass …``: the first-come-first-served pass program on the command line.

    entitle pass apply --from FILE [--from FILE …]   store application batches (CSV/Parquet)
    entitle pass allocate [--through INSTANT]          serve applications up to the cut-off, in order
    entitle pass status [--user ID]                    stock, or one user's application and outcome
    entitle pass reconcile                             ledger passes vs allocations, counter, order (exit 8: breaks)
    entitle pass reminders [--days N]                  expiry reminder export (nothing converts to paid)

The program file comes from ``--program FILE``, else ENTITLE_PASS_PROGRAM, else the bundled
``drawer_pass_2022.toml``. Exit codes are the ``entitle`` ones (see ``entitle --help``).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.programs.drawer_pass import allocation, intake, notices, reconciliation
from pipeline.programs.drawer_pass.allocation import PassContext
from pipeline.programs.drawer_pass.program import load_program

EXIT_BREAKS = 8
EXIT_USAGE = 2

CommandFactory = Callable[[str, str], argparse.ArgumentParser]


def register(sub: Any, command: CommandFactory) -> None:
    """Add ``entitle pass`` and its sub-commands to the top-level parser."""
    parent = command(
        "pass",
        "first-come-first-served pass: apply (store application batches), allocate (in applied_at order up to "
        "the stock cap), status, reconcile, reminders",
    )
    parent.set_defaults(handler=cmd_pass, pass_command=None)
    actions = parent.add_subparsers(dest="pass_command", metavar="ACTION")

    def action(name: str, help_text: str) -> argparse.ArgumentParser:
        p: argparse.ArgumentParser = actions.add_parser(name, help=help_text, description=help_text)
        # SUPPRESS: `entitle pass --json status` keeps the parent's --json.
        p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
        p.add_argument(
            "--program",
            type=Path,
            default=argparse.SUPPRESS,
            help="pass program file (default: $ENTITLE_PASS_PROGRAM, else the bundled drawer_pass_2022.toml)",
        )
        return p

    p = action(
        "apply",
        "validate application batch files (user_id, applied_at with offset) and store one application per user; "
        "bad rows go to a quarantine file; a file already stored is recognised and skipped",
    )
    p.add_argument(
        "--from",
        dest="files",
        type=Path,
        action="append",
        required=True,
        metavar="FILE",
        help="a .csv or .parquet batch (repeatable; each file is one transaction)",
    )
    p = action(
        "allocate",
        "serve every application up to the cut-off strictly in (applied_at, user_bucket, user_id) order: passes "
        "until the stock cap, sold_out after; one transaction; a rerun changes nothing",
    )
    p.add_argument(
        "--through",
        type=_instant,
        help="cut-off instant with offset, e.g. 2023-01-05T12:00:00+09:00 (default: now minus the program's "
        "intake_lag_s). Every batch with applications up to it must already be stored: later ones are refused as late",
    )
    p = action("status", "the stock (cap, granted, remaining, sold out, pending), or one user's outcome")
    p.add_argument("--user", type=int, help="one user's application, place in the order, outcome and pass")
    action(
        "reconcile",
        "check the ledger's passes against allocations, the stock counter and the order; exit 0 RECONCILED, 8 BREAKS",
    )
    p = action(
        "reminders",
        "export the holders of live passes to remind before their pass ends (auto_renew = false, "
        "converts_to_paid = false), one Parquet file per expiry day",
    )
    p.add_argument("--days", type=int, help="days before the end to remind (default: the program's reminder_days)")


def _instant(text: str) -> dt.datetime:
    try:
        value = dt.datetime.fromisoformat(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 instant such as 2023-01-05T12:00:00+09:00"
        ) from exc
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no offset; add one, e.g. +09:00 or Z")
    return value


def open_context(args: argparse.Namespace, settings: Settings) -> PassContext:
    """The program (``--program``, ENTITLE_PASS_PROGRAM or bundled) opened on the configured ledger."""
    override = getattr(args, "program", None)
    program = load_program(override if override is not None else settings.pass_program_file)
    return allocation.open_pass(settings, program)


def cmd_pass(args: argparse.Namespace, settings: Settings) -> int:
    """Dispatch ``entitle pass ACTION``."""
    handlers = {
        "apply": _apply,
        "allocate": _allocate,
        "status": _status,
        "reconcile": _reconcile,
        "reminders": _reminders,
    }
    if args.pass_command is None:
        print("entitle pass: give an action: " + ", ".join(handlers) + " (entitle pass --help)")
        return EXIT_USAGE
    with open_context(args, settings) as context:
        if args.pass_command != "status":  # every other action writes: register the program first
            allocation.register(context)
        return handlers[args.pass_command](args, context)


def _apply(args: argparse.Namespace, context: PassContext) -> int:
    reports = []
    lines = []
    for path in args.files:
        report = intake.ingest(context, path)
        reports.append(report.as_dict())
        lines.extend(_intake_lines(report))
    _emit(args, {"program_id": context.program.program_id, "batches": reports}, lines)
    return 0


def _intake_lines(report: intake.IntakeReport) -> list[str]:
    if report.already_ingested:
        return [f"{report.source_file}: already stored as batch {report.batch_key} (same content); nothing changed"]
    lines = [
        f"{report.source_file}: batch {report.batch_key}, {report.rows_read:,} rows: {report.new_applications:,} new "
        f"applications, {report.earlier_repeats:,} repeats that moved an application earlier, "
        f"{report.unchanged_repeats:,} repeats of an earlier application (unchanged)",
        f"  not stored: malformed {report.malformed:,}, refused {report.refused:,}, duplicate in file "
        f"{report.duplicate_rows:,}" + (f" -> {report.quarantine_file}" if report.quarantine_file else ""),
    ]
    if report.reasons:
        lines.append("  by reason: " + ", ".join(f"{k} {v:,}" for k, v in report.reasons.items()))
    if report.reasons.get("late"):
        lines.append(
            f"  {report.reasons['late']:,} late: applied at or before the allocation cut-off "
            f"{report.allocated_through.isoformat() if report.allocated_through else '?'}; that window was already "
            "served in order, so they cannot be served fairly. Deliver batches before allocating past them."
        )
    return lines


def _allocate(args: argparse.Namespace, context: PassContext) -> int:
    report = allocation.allocate(context, args.through)
    if not report.allocated:
        lines = [
            f"nothing to do: {report.program_id} is already allocated through "
            f"{report.previous_through.isoformat() if report.previous_through else '?'} (cut-off "
            f"{report.through.isoformat()}); stock {report.stock_granted:,} of {report.stock_cap:,} granted"
        ]
    else:
        lines = [
            f"allocated {report.program_id} through {report.through.isoformat()} (run {report.run_id}): "
            f"{report.considered:,} applications -> {report.granted:,} passes, {report.sold_out:,} sold_out",
            f"  passes valid {report.granted_at.isoformat() if report.granted_at else '-'} until "
            f"{report.valid_until.isoformat() if report.valid_until else '-'} (exclusive); stock "
            f"{report.stock_granted:,} of {report.stock_cap:,} granted, {report.remaining:,} remaining",
        ]
    _emit(args, report.as_dict(), lines)
    return 0


def _status(args: argparse.Namespace, context: PassContext) -> int:
    if args.user is not None:
        document = allocation.user_status(context, args.user)
        if not document["applied"]:
            lines = [f"user {args.user}: {document['detail']}"]
        else:
            lines = [
                f"user {args.user}: applied {document['applied_at']} (batch {document['batch_file']}), place "
                f"{document['position']:,} in the order: {document['outcome']}"
                + (" (voided)" if document["voided"] else "")
            ]
            if document["valid_from"]:
                lines.append(f"  pass valid {document['valid_from']} until {document['valid_until']}; no auto-renewal")
        _emit(args, document, lines)
        return 0
    report = allocation.stock(context)
    through = report.allocated_through.isoformat() if report.allocated_through else "never"
    lines = [
        f"{report.program_id} ({report.item_sku}): cap {report.stock_cap:,}, granted {report.granted:,}, remaining "
        f"{report.remaining:,}, sold_out {report.sold_out:,}",
        f"  {report.applications:,} applications in {report.batches:,} batches; allocated through {through} in "
        f"{report.allocations:,} allocations; {report.pending:,} pending",
    ]
    _emit(args, report.as_dict(), lines)
    return 0


def _reconcile(args: argparse.Namespace, context: PassContext) -> int:
    result = reconciliation.reconcile(context)
    lines = [
        f"{result.verdict}: pass program {result.program_id}: ledger {result.ledger_passes:,} passes, stock counter "
        f"{result.counter_granted:,}, allocations {result.allocations_granted:,}, cap {result.stock_cap:,}; "
        f"{result.allocated_applications:,} applications served ({result.sold_out:,} sold_out), "
        f"{result.voided:,} passes voided",
    ]
    lines += [f"  {'BREAK' if c.count else 'ok':<5} {c.name:<26} {c.count:>10,}  {c.meaning}" for c in result.checks]
    _emit(args, result.as_dict(), lines)
    if result.verdict != "BREAKS":
        return 0
    print(f"entitle: error: {result.verdict}: {result.explanation}", file=sys.stderr)  # why the exit is not 0
    return EXIT_BREAKS


def _reminders(args: argparse.Namespace, context: PassContext) -> int:
    exports = notices.export_reminders(context, args.days)
    lines = [
        f"{e.users:,} users to remind on {e.detail['remind_on']} (passes ending {e.detail['expiry_day']}; "
        f"auto_renew false, converts_to_paid false) -> {e.directory}"
        for e in exports
    ] or ["no live passes: nothing to remind"]
    _emit(args, {"program_id": context.program.program_id, "exports": [e.as_dict() for e in exports]}, lines)
    return 0


def _emit(args: argparse.Namespace, document: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(document, default=str, indent=2))
    else:
        print("\n".join(lines))
