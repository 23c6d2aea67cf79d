"""Schema version 2: issue_no in the grant and void keys; reconciliation tables.

Existing grants and voids become issue 0. On SQLite the two tables are rebuilt
(a primary key cannot be altered in place); on PostgreSQL they are altered.

Revision ID: 0002
Revises: 0001
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import drop_views_and_triggers, run_frozen_sql, set_schema_version

revision = "0002"
down_revision = "0001"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Add issue_no and the reconciliation tables."""
    drop_views_and_triggers()
    run_frozen_sql(revision)
    set_schema_version(2)
