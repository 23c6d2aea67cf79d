"""Schema version 5: three-way reconciliation (breaks against an issuer's export).

recon_breaks takes two more classes, ``issuer_missing`` and ``issuer_unexpected``
(the class column widens to 24 characters) and an ``issuer`` column; recon_runs
counts both per reconciliation. On SQLite the CHECK constraint can only change by
rebuilding recon_breaks, so the views that name it are dropped first (the ledger
re-applies views.sql after upgrading). grants and voids are untouched.

Revision ID: 0005
Revises: 0004
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import drop_views_and_triggers, run_frozen_sql, set_schema_version

revision = "0005"
down_revision = "0004"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Widen recon_breaks, add the issuer counts to recon_runs."""
    drop_views_and_triggers()
    run_frozen_sql(revision)
    set_schema_version(5)
