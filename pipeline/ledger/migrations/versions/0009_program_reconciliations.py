"""Schema version 9: stored reconciliations of the pass and merchant cash programs.

A new table only; everything else is untouched.

Revision ID: 0009
Revises: 0008
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import run_frozen_sql, set_schema_version

revision = "0009"
down_revision = "0008"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create program_recon_runs."""
    run_frozen_sql(revision)
    set_schema_version(9)
