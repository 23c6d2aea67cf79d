"""Schema version 1: campaigns, items, runs, snapshots, partition attempts, grants, voids.

Revision ID: 0001
Revises:
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import run_frozen_sql, set_schema_version

revision = "0001"
down_revision = None
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the version-1 tables from the frozen DDL."""
    run_frozen_sql(revision)
    set_schema_version(1)
