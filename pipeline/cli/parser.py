"""The ``entitle`` argument parser: every command with its flags, and the handler each one calls."""

from __future__ import annotations

import argparse
from pathlib import Path

from pipeline import __version__
from pipeline.cli.analysis import cmd_query, cmd_report
from pipeline.cli.db import cmd_db
from pipeline.cli.deliver import cmd_deliver
from pipeline.cli.grants import cmd_demo_users, cmd_grant, cmd_plan, cmd_run, cmd_status, cmd_summary
from pipeline.cli.notices import cmd_notices
from pipeline.cli.reconcile import cmd_reconcile, cmd_repair, cmd_void
from pipeline.grants.notices import REMINDER_DAYS_DEFAULT
from pipeline.programs.drawer_pass import cli as pass_cli
from pipeline.programs.merchant_cash import cli as merchant_cli

WRITERS_MAX = 16  # ledger writer threads of one grant process


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every sub-command."""
    parser = argparse.ArgumentParser(
        prog="entitle",
        description="Grant every eligible user a campaign's items exactly once, recorded in an SQL ledger.",
        epilog="Settings come from ENTITLE_HOME, ENTITLE_LEDGER_URL, ENTITLE_CAMPAIGN, ENTITLE_PARTITIONS, "
        "ENTITLE_REJECTED_SHARE_MAX and, for partitions on S3, ENTITLE_DATA_URI (docs/reference/configuration.md). "
        "Exit codes (docs/reference/exit-codes.md): 0 ok, "
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
    p.add_argument(
        "--format",
        choices=("table", "csv", "json", "ndjson", "parquet"),
        default="table",
        help="output format: json is one array of records ({column: value}), ndjson one record a line",
    )
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
