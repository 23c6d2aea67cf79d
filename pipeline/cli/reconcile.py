"""``entitle reconcile``, ``repair`` and ``void``: find the breaks between snapshot and ledger, and correct them."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from pipeline import reconciliation
from pipeline.cli.output import emit, explain_exit, say
from pipeline.config import Settings
from pipeline.errors import ReconciliationBreaksError, ReconciliationIncompleteError, UsageError
from pipeline.grants import corrections, runs
from pipeline.progress import Progress
from pipeline.reconciliation.verdict import VOID_BREAK_COMMAND


def cmd_reconcile(args: argparse.Namespace, settings: Settings) -> int:
    """Reconcile and print the verdict and the bridge."""
    with runs.open_pipeline(settings) as pipeline:
        runs.register(pipeline)
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
        emit(args, document, _reconciliation_lines(document))
        return _verdict_exit(result.verdict, result.explanation)


def _verdict_exit(verdict: str, explanation: str) -> int:
    """0 when RECONCILED; else 8 (BREAKS) or 9 (INCOMPLETE), saying why on standard error."""
    if verdict == reconciliation.RECONCILED:
        return 0
    code = {reconciliation.BREAKS: ReconciliationBreaksError, reconciliation.INCOMPLETE: ReconciliationIncompleteError}
    return explain_exit(code[verdict].exit_code, f"{verdict}: {explanation}")


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
    with runs.open_pipeline(settings) as pipeline:
        runs.register(pipeline)
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
                f"  not repaired, needs a decision: {listed}; void them with `{VOID_BREAK_COMMAND}` if they "
                "should not exist"
            )
        if done.needs_decision.get("issuer_unexpected"):
            lines.append(
                f"  not repaired, needs a decision: {done.needs_decision['issuer_unexpected']:,} issuer_unexpected; "
                "the issuer holds grants the ledger does not (list: `entitle query open_breaks --param "
                "break_class=issuer_unexpected`); revoke them at the issuer if they should not exist"
            )
        if args.no_reconcile:
            emit(args, document, [*lines, "next: entitle reconcile"])
            return 0
        say(args, *lines)
        partition_count = int(runs.snapshot_row(pipeline, None)["partition_count"])
        bar = Progress("reconcile", partition_count, enabled=not args.no_progress)
        result = reconciliation.reconcile(pipeline, on_partition=lambda _check: bar.advance(1))
        bar.close()
        document["reconciliation"] = result.as_dict()
        emit(args, document, _reconciliation_lines(document["reconciliation"]))
        return _verdict_exit(result.verdict, result.explanation)


def cmd_void(args: argparse.Namespace, settings: Settings) -> int:
    """Void grants."""
    if args.from_file is not None and args.item:
        raise UsageError("--item goes with --user; in a file, use an item_sku column")
    if args.from_file is None and not args.reason:
        raise UsageError("--reason is required: say why (it is audited)")
    if args.break_id and args.item:
        raise UsageError("--item goes with --user; a break names its item already")
    with runs.open_pipeline(settings) as pipeline:
        runs.register(pipeline)
        if args.from_file is not None:
            requests = corrections.read_void_file(args.from_file, args.reason)
        else:
            request = corrections.VoidRequest(args.reason, args.user, args.item, args.break_id, source="command line")
            requests = [request]
        voided = corrections.void_grants(pipeline, requests, args.actor, settings.clock())
        lines = [f"voided {len(voided):,} grant(s) by {args.actor}:"]
        lines += [f"  user {v.user_id} {v.item_sku} (issue {v.issue_no}): {v.reason}" for v in voided[:20]]
        if len(voided) > 20:
            lines.append(f"  ... and {len(voided) - 20:,} more")
        lines.append("they stay in grant_history; run `entitle reconcile` to see the effect")
        emit(args, {"voided": [v.as_dict() for v in voided], "actor": args.actor}, lines)
        return 0
