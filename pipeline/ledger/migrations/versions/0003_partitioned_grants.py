"""Schema version 3: on PostgreSQL, grants is partitioned by campaign, then by bucket range.

The existing grants table becomes the default child as it is (no rows are copied);
each pipeline partition granted from now on gets its own child table (see
pipeline/ledger/pgcopy.py). SQLite has no table partitioning: only the version changes,
so both backends stay on the same schema version.

Revision ID: 0003
Revises: 0002
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import drop_views_and_triggers, run_frozen_sql, set_schema_version

revision = "0003"
down_revision = "0002"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Partition grants (PostgreSQL)."""
    drop_views_and_triggers()
    run_frozen_sql(revision)
    set_schema_version(3)
