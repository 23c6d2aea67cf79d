"""The ``entitle claims`` and ``entitle review`` commands of merchant cash programs.

``pipeline.cli`` calls :func:`register` to add them; the handlers here turn
arguments into calls of :mod:`pipeline.programs.merchant_cash.claims`, :mod:`pipeline.programs.merchant_cash.review`
and :mod:`pipeline.programs.merchant_cash.reconciliation`, and print text or one JSON document.
The program file is ``--program FILE``, else ENTITLE_MERCHANT_PROGRAM, else the
bundled merchant-cash-2022 program.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from pipeline.config import Settings
from pipeline.errors import CorrectionError
from pipeline.grants import corrections
from pipeline.programs.merchant_cash import claims as merchant_claims
from pipeline.programs.merchant_cash import reconciliation
from pipeline.programs.merchant_cash import review as merchant_review
from pipeline.programs.merchant_cash.claims import OpenProgram

EXIT_BREAKS = 8
OPEN_REVIEWS_SHOWN_MAX = 50

Command = Callable[[str, str], argparse.ArgumentParser]


def register(command: Command) -> None:
    """Add ``claims`` and ``review`` (with their actions) through cli.py's ``command(name, help)``."""
    claims = command(
        "claims",
        "merchant cash claims: `ingest` a CSV/Parquet claims file, `assign` tiers, `pay` decided cases, "
        "`void` a payout, `reconcile` payouts (exit 0 RECONCILED, 8 BREAKS)",
    )
    actions = claims.add_subparsers(dest="claims_action", metavar="ACTION", required=True)
    p = _action(actions, "ingest", "validate a claims file, quarantine bad rows, record new claims and their cases")
    p.add_argument("--from", dest="from_file", type=Path, required=True, help="claims file (.csv or .parquet)")
    p.set_defaults(handler=cmd_claims_ingest)
    p = _action(actions, "assign", "re-derive every undecided case from its claims and the tier table (idempotent)")
    p.set_defaults(handler=cmd_claims_assign)
    p = _action(actions, "pay", "pay every auto-tier and approved case once, as ledger grants (idempotent)")
    p.add_argument("--run-id", help="run id to record (default: cli__claims-pay__<time>)")
    p.add_argument(
        "--batch-cases",
        type=_batch_cases,
        default=merchant_claims.PAYOUT_BATCH_CASES_MAX,
        help=f"payouts per transaction (default {merchant_claims.PAYOUT_BATCH_CASES_MAX:,})",
    )
    p.set_defaults(handler=cmd_claims_pay)
    p = _action(actions, "reconcile", "payouts per tier against claims and decisions; exit 0 RECONCILED, 8 BREAKS")
    p.set_defaults(handler=cmd_claims_reconcile)
    p = _action(
        actions,
        "void",
        "take back the payout of one or more cases by a compensating entry (never a delete); all-or-nothing; "
        "the case is never paid again and the reconciliation counts it as voided",
    )
    p.add_argument("cases", nargs="+", metavar="CASE", help="case id, e.g. mc-1234")
    p.add_argument("--actor", required=True, help="who voids (recorded)")
    p.add_argument("--reason", required=True, help="why (recorded), e.g. 'fraud case 118'")
    p.set_defaults(handler=cmd_claims_void)

    review = command(
        "review",
        "merchant cases in review: `list` the queue, `approve CASE --amount KRW` or `reject CASE`, each with "
        "--actor and --reason (audited; a different second decision is refused with exit 5)",
    )
    actions = review.add_subparsers(dest="review_action", metavar="ACTION", required=True)
    p = _action(actions, "list", "cases waiting for a decision, oldest first, with reason and age")
    p.set_defaults(handler=cmd_review_list)
    for name, verb in (("approve", "approve a case in review with an amount"), ("reject", "reject a case in review")):
        p = _action(actions, name, f"{verb}; recorded with who, when and why")
        p.add_argument("case", help="case id, e.g. mc-1234 (see `entitle review list`)")
        if name == "approve":
            p.add_argument("--amount", type=int, required=True, help="amount to pay in KRW (whole won)")
        p.add_argument("--actor", required=True, help="who decides (recorded)")
        p.add_argument("--reason", required=True, help="why (recorded)")
        p.set_defaults(handler=cmd_review_decide, decision=name)


def _batch_cases(text: str) -> int:
    try:
        value = int(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from exc
    if not 1 <= value <= merchant_claims.PAYOUT_BATCH_CASES_MAX:
        raise argparse.ArgumentTypeError(f"--batch-cases {value}: give 1 to {merchant_claims.PAYOUT_BATCH_CASES_MAX:,}")
    return value


def _action(actions: Any, name: str, help_text: str) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = actions.add_parser(name, help=help_text, description=help_text)
    # SUPPRESS: `entitle claims --json pay` keeps the parent's --json instead of this parser's default.
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS, help="print one JSON document")
    p.add_argument(
        "--program",
        type=Path,
        help="program file (default: ENTITLE_MERCHANT_PROGRAM, else the bundled merchant-cash-2022 program)",
    )
    return p


def _open(args: argparse.Namespace, settings: Settings, write: bool = True) -> OpenProgram:
    """The program on the ledger; a command that writes registers it first (``write``)."""
    program_file = args.program if args.program is not None else settings.merchant_program_file
    op = merchant_claims.open_program(settings, program_file)
    if write:
        merchant_claims.register(op)
    return op


def _emit(args: argparse.Namespace, document: dict[str, Any], lines: list[str]) -> None:
    if getattr(args, "json", False):
        print(json.dumps(document, default=str, indent=2))
    else:
        print("\n".join(lines))


def cmd_claims_ingest(args: argparse.Namespace, settings: Settings) -> int:
    """Ingest one claims file."""
    with _open(args, settings) as op:
        report = merchant_claims.ingest_file(op, args.from_file)
    if report.already_ingested:
        lines = [f"{report.source_file}: already ingested (same bytes); nothing changed"]
    else:
        statuses = ", ".join(f"{s} {n:,}" for s, n in report.by_status.items()) or "none"
        lines = [
            f"{report.source_file}: {report.rows_read:,} rows, {report.claims_new:,} new claims ({statuses}), "
            f"{report.claims_known:,} already recorded, {report.duplicate_rows:,} duplicate rows, "
            f"{report.cases_changed:,} cases opened or changed",
        ]
        if report.quarantined_rows:
            lines.append(f"  {report.quarantined_rows:,} malformed rows quarantined: {report.quarantine_file}")
        if report.after_decision:
            lines.append(
                f"  claims for already decided cases (not merged; look at them): {', '.join(report.after_decision)}"
            )
    _emit(args, report.as_dict(), lines)
    return 0


def cmd_claims_assign(args: argparse.Namespace, settings: Settings) -> int:
    """Re-derive undecided cases."""
    with _open(args, settings) as op:
        changed = merchant_claims.assign_cases(op)
    _emit(args, {"cases_changed": changed}, [f"{changed:,} cases opened or changed"])
    return 0


def cmd_claims_pay(args: argparse.Namespace, settings: Settings) -> int:
    """Pay the payable cases."""
    with _open(args, settings) as op:
        report = merchant_claims.pay(op, args.run_id, batch_cases_max=args.batch_cases)
    lines = [
        f"run {report.run_id}: paid {report.paid:,} cases, {report.paid_krw:,} KRW in {report.batches} batch(es); "
        f"{report.already_granted:,} already held a payout"
    ]
    _emit(args, report.as_dict(), lines)
    return 0


def cmd_claims_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Reconcile payouts; exit 8 on breaks."""
    with _open(args, settings) as op:
        result = reconciliation.reconcile(op)
    lines = [f"{result.verdict}: {result.explanation}", f"program {result.program_id}"]
    lines.append("  claims: " + (", ".join(f"{s} {n:,}" for s, n in result.claims_by_status.items()) or "none"))
    lines.append(
        f"  {'tier':<20} {'cases':>8} {'due':>8} {'due KRW':>14} {'paid':>8} {'paid KRW':>14} {'voided':>7} "
        f"{'voided KRW':>12}"
    )
    for t in result.tiers:
        lines.append(
            f"  {t.tier:<20} {t.cases:>8,} {t.expected_payouts:>8,} {t.expected_krw:>14,} {t.paid:>8,} "
            f"{t.paid_krw:>14,} {t.voided:>7,} {t.voided_krw:>12,}"
        )
    for b in result.breaks[:OPEN_REVIEWS_SHOWN_MAX]:
        lines.append(f"  {b.break_class:<12} {b.case_id}: {b.detail}")
    _emit(args, result.as_dict(), lines)
    if result.verdict == "RECONCILED":
        return 0
    print(f"entitle: error: {result.verdict}: {result.explanation}", file=sys.stderr)  # why the exit is not 0
    return EXIT_BREAKS


def cmd_claims_void(args: argparse.Namespace, settings: Settings) -> int:
    """Void the payouts of the named cases (exit 5, nothing written, when one of them has none)."""
    requests = []
    for text in args.cases:
        merchant = merchant_claims.parse_case_id(text)
        if merchant is None:
            raise CorrectionError(f"{text!r} is not a case id; case ids look like mc-1234; nothing was voided")
        requests.append(
            corrections.VoidRequest(args.reason, merchant, None, source=f"case {merchant_claims.case_id(merchant)}")
        )
    with _open(args, settings) as op:
        voided = corrections.void_grants(op, requests, args.actor, settings.clock())
    lines = [f"voided {len(voided):,} payout(s) of program {op.program.program_id} by {args.actor}:"]
    lines += [
        f"  case {merchant_claims.case_id(v.user_id)}: {v.amount_krw or 0:,} KRW taken back: {v.reason}" for v in voided
    ]
    lines.append("  these cases are not paid again; `entitle claims reconcile` counts them as voided")
    _emit(args, {"voided": [v.as_dict() for v in voided], "actor": args.actor}, lines)
    return 0


def cmd_review_list(args: argparse.Namespace, settings: Settings) -> int:
    """List open reviews."""
    with _open(args, settings, write=False) as op:
        reviews = merchant_review.open_reviews(op)
    lines = [f"{len(reviews):,} case(s) in review"]
    for r in reviews[:OPEN_REVIEWS_SHOWN_MAX]:
        lines.append(
            f"  {r.case_id:<24} {r.review_reason or '-':<20} tier {r.tier or '-':<12} loss {r.loss_krw:>14,} KRW  "
            f"{r.claim_count} claim(s)  {r.age_days:.1f} days old"
        )
    if len(reviews) > OPEN_REVIEWS_SHOWN_MAX:
        lines.append(f"  ... {len(reviews) - OPEN_REVIEWS_SHOWN_MAX:,} more: --json, or entitle query open_reviews")
    _emit(args, {"open_reviews": [r.as_dict() for r in reviews]}, lines)
    return 0


def cmd_review_decide(args: argparse.Namespace, settings: Settings) -> int:
    """Approve or reject a case."""
    with _open(args, settings) as op:
        result = merchant_review.decide(
            op, args.case, args.decision, getattr(args, "amount", None), args.actor, args.reason
        )
    amount = f" {result.amount_krw:,} KRW" if result.amount_krw is not None else ""
    if result.already_recorded:
        line = f"case {result.case_id}: this decision was already recorded at {result.decided_at.isoformat()}"
    else:
        line = f"case {result.case_id}: {result.decision}d{amount} by {result.actor}; `entitle claims pay` pays it"
        if result.decision == "reject":
            line = f"case {result.case_id}: rejected by {result.actor}"
    _emit(args, result.as_dict(), [line])
    return 0
