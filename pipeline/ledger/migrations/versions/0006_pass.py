"""Schema version 6: the first-come-first-served pass (programs, application batches, applications, allocations).

New tables only; grants, voids and the views are untouched. The passes are rows of grants.

Revision ID: 0006
Revises: 0005
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import run_frozen_sql, set_schema_version

revision = "0006"
down_revision = "0005"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Create the pass tables."""
    run_frozen_sql(revision)
    set_schema_version(6)
