"""Schema version 12: partition_attempts records the worker that made each attempt.

A nullable ``worker`` column ("<ENTITLE_WORKER_NAME or host name>:<pid>"); attempts made
before it stay null. The view partition_status shows it (the ledger re-applies views.sql
after upgrading). Nothing else changes.

Revision ID: 0012
Revises: 0011
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import run_frozen_sql, set_schema_version

revision = "0012"
down_revision = "0011"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add partition_attempts.worker."""
    run_frozen_sql(revision)
    set_schema_version(12)
