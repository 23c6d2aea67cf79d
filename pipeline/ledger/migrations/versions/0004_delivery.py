"""Schema version 4: delivery to issuers (outbox batches, per-grant answers, per-partition reports).

New tables only; grants, voids and the views are untouched.

Revision ID: 0004
Revises: 0003
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import run_frozen_sql, set_schema_version

revision = "0004"
down_revision = "0003"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the delivery tables."""
    run_frozen_sql(revision)
    set_schema_version(4)
