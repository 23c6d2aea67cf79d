"""Schema version 8: revocations at the issuers (a grant voided after delivery is revoked there).

A new table only; grants, voids, the delivery tables and the views are untouched.

Revision ID: 0008
Revises: 0007
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import run_frozen_sql, set_schema_version

revision = "0008"
down_revision = "0007"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create delivery_revocations."""
    run_frozen_sql(revision)
    set_schema_version(8)
