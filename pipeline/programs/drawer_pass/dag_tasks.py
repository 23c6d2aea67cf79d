"""Task bodies of the ``drawer_pass`` DAG: each DAG task is one call here (no Airflow imports).

Batch files land in ``$ENTITLE_HOME/incoming/pass/<program id>/`` (``*.csv``, ``*.parquet``);
each run stores every file there (a file stored before is recognised by its content and
skipped), allocates up to now minus the program's intake lag, reconciles and writes the
expiry reminders. Only small plain values go back to Airflow.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pipeline.config import load_settings
from pipeline.errors import ReconciliationBreaksError
from pipeline.programs.drawer_pass import allocation, intake, notices, reconciliation
from pipeline.programs.drawer_pass.allocation import PassContext
from pipeline.programs.drawer_pass.program import load_program

BATCH_SUFFIXES = (".csv", ".parquet")


def _open() -> PassContext:
    """The configured program, registered: the DAG's tasks write."""
    settings = load_settings()
    context = allocation.open_pass(settings, load_program(settings.pass_program_file))
    allocation.register(context)
    return context


def incoming_dir(context: PassContext) -> Path:
    """Where application batch files for the program are dropped."""
    return context.settings.home / "incoming" / "pass" / context.program.program_id


def list_batches() -> list[str]:
    """Every batch file in the incoming folder, in name order (stored ones are skipped by ingest)."""
    with _open() as context:
        folder = incoming_dir(context)
        folder.mkdir(parents=True, exist_ok=True)
        return [str(p) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in BATCH_SUFFIXES]


def ingest(path: str) -> dict[str, Any]:
    """Store one batch file; returns its intake report."""
    with _open() as context:
        return intake.ingest(context, Path(path)).as_dict()


def allocate() -> dict[str, Any]:
    """Allocate up to the default cut-off (now minus the intake lag)."""
    with _open() as context:
        return allocation.allocate(context).as_dict()


def reconcile() -> dict[str, Any]:
    """Reconcile the program; BREAKS fails the task (after logging the checks)."""
    with _open() as context:
        result = reconciliation.reconcile(context)
    document = result.as_dict()
    if result.verdict != "RECONCILED":
        raise ReconciliationBreaksError(f"pass reconciliation verdict {result.verdict}: breaks {document['breaks']}")
    return document


def reminders() -> dict[str, Any]:
    """Write the expiry reminder files (the program's lead days)."""
    with _open() as context:
        exports = notices.export_reminders(context)
    return {"exports": [e.as_dict() for e in exports]}
