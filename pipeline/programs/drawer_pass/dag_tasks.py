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
from pipeline.programs.drawer_pass import allocation, intake, notices
from pipeline.programs.drawer_pass.allocation import PassContext
from pipeline.programs.drawer_pass.program import load_program

BATCH_SUFFIXES = (".csv", ".parquet")


def _open() -> PassContext:
    settings = load_settings()
    return allocation.open_pass(settings, load_program(settings.pass_program_file))


def incoming_dir(context: PassContext) -> Path:
    """Where application batch files for the program are dropped."""
    return context.settings.home / "incoming" / "pass" / context.program.program_id


def list_batches() -> list[str]:
    """Every batch file in the incoming folder, in name order (stored ones are skipped by ingest)."""
    context = _open()
    try:
        folder = incoming_dir(context)
        folder.mkdir(parents=True, exist_ok=True)
        return [str(p) for p in sorted(folder.iterdir()) if p.is_file() and p.suffix.lower() in BATCH_SUFFIXES]
    finally:
        context.engine.dispose()


def ingest(path: str) -> dict[str, Any]:
    """Store one batch file; returns its intake report."""
    context = _open()
    try:
        return intake.ingest(context, Path(path)).as_dict()
    finally:
        context.engine.dispose()


def allocate() -> dict[str, Any]:
    """Allocate up to the default cut-off (now minus the intake lag)."""
    context = _open()
    try:
        return allocation.allocate(context).as_dict()
    finally:
        context.engine.dispose()


def reconcile() -> dict[str, Any]:
    """Reconcile the program; BREAKS fails the task (after logging the checks)."""
    context = _open()
    try:
        result = allocation.reconcile(context)
    finally:
        context.engine.dispose()
    document = result.as_dict()
    if result.verdict != "RECONCILED":
        raise ReconciliationBreaksError(f"pass reconciliation verdict {result.verdict}: breaks {document['breaks']}")
    return document


def reminders() -> dict[str, Any]:
    """Write the expiry reminder files (the program's lead days)."""
    context = _open()
    try:
        exports = notices.export_reminders(context)
    finally:
        context.engine.dispose()
    return {"exports": [e.as_dict() for e in exports]}
