"""Schema version 10: the issuers' rate budgets, shared by every process delivering from the ledger.

A new table only; everything else is untouched.

Revision ID: 0010
Revises: 0009
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import run_frozen_sql, set_schema_version

revision = "0010"
down_revision = "0009"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create issuer_budgets."""
    run_frozen_sql(revision)
    set_schema_version(10)
