"""Task bodies of the ``merchant_cash`` DAG: each DAG task is one call here.

They take and return small plain values (paths, counts, verdicts) that fit in
XCom and never import Airflow.  Settings come from the environment through the
composition root (:func:`pipeline.config.load_settings`); the program file from
ENTITLE_MERCHANT_PROGRAM, else the bundled one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import Settings, load_settings
from pipeline.errors import ReconciliationBreaksError
from pipeline.programs.merchant_cash import claims, reconciliation
from pipeline.programs.merchant_cash.claims import CLAIM_FILE_SUFFIXES, OpenProgram


class ClaimsFilesRefusedError(claims.ClaimsInputError):
    """Some incoming claims files were refused (the others were ingested and paid); exit 3."""


def _open() -> OpenProgram:
    """The configured program, registered: every task of the DAG writes."""
    settings: Settings = load_settings()
    op = claims.open_program(settings, settings.merchant_program_file)
    claims.register(op)
    return op


def incoming_dir(op: OpenProgram) -> Path:
    """Where the daily run looks for new claims files: ``$ENTITLE_HOME/incoming/<program id>/``."""
    return op.settings.home / "incoming" / op.program.program_id


def ingest_claims() -> dict[str, Any]:
    """Ingest every claims file in the incoming folder (files already ingested change nothing).

    A refused file does not stop the others: its error is returned, and :func:`check` fails the run
    after the payable cases are paid.
    """
    with _open() as op:
        folder = incoming_dir(op)
        files = sorted(p for p in folder.glob("*") if p.is_file() and p.name.lower().endswith(CLAIM_FILE_SUFFIXES))
        reports: list[dict[str, Any]] = []
        refused: list[str] = []
        for path in files:
            try:
                reports.append(claims.ingest_file(op, path).as_dict())
            except claims.ClaimsInputError as exc:
                refused.append(str(exc))
        return {
            "folder": str(folder),
            "files": len(files),
            "claims_new": sum(r["claims_new"] for r in reports),
            "quarantined_rows": sum(r["quarantined_rows"] for r in reports),
            "refused": refused,
        }


def assign_tiers() -> dict[str, Any]:
    """Re-derive every undecided case from its claims and the tier table."""
    with _open() as op:
        return {"cases_changed": claims.assign_cases(op)}


def pay(run_id: str) -> dict[str, Any]:
    """Pay every payable case once; the Airflow run id is the ledger run id (retries share it)."""
    with _open() as op:
        return claims.pay(op, f"merchant_cash__{run_id}", trigger="airflow").as_dict()


def reconcile() -> dict[str, Any]:
    """Reconcile payouts against claims and decisions; the verdict and counts (breaks listed by the CLI)."""
    with _open() as op:
        result = reconciliation.reconcile(op)
    return {
        "verdict": result.verdict,
        "explanation": result.explanation,
        "breaks": len(result.breaks),
        "tiers": [
            {"tier": t.tier, "due": t.expected_payouts, "paid": t.paid, "paid_krw": t.paid_krw} for t in result.tiers
        ],
    }


def check(ingested: dict[str, Any], reconciled: dict[str, Any]) -> None:
    """Fail the run, after everything payable was paid, when a file was refused or payouts do not reconcile."""
    if ingested["refused"]:
        raise ClaimsFilesRefusedError(
            f"{len(ingested['refused'])} claims file(s) refused; the rest were ingested and paid: "
            + " | ".join(ingested["refused"])
        )
    if reconciled["verdict"] != "RECONCILED":
        raise ReconciliationBreaksError(
            f"merchant payouts: reconciliation verdict {reconciled['verdict']}: {reconciled['explanation']}; "
            "run `entitle claims reconcile` for the list"
        )
