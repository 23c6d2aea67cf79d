"""Schema version 7: merchant cash programs (claims, cases, review decisions, ingested files).

New tables only; grants, voids and the views are untouched (the decisions' append-only
triggers live in views.sql, which the ledger re-applies after every upgrade).

Revision ID: 0007
Revises: 0006
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import run_frozen_sql, set_schema_version

revision = "0007"
down_revision = "0006"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the merchant cash tables."""
    run_frozen_sql(revision)
    set_schema_version(7)
