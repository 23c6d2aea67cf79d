"""Schema version 11: pass_applications without its (campaign_key, applied_at) index.

Maintaining that index was half of the pass intake's time on PostgreSQL; allocation
sorts its whole window by (applied_at, user_bucket, user_id) with or without it. The
drop is the only change.

Revision ID: 0011
Revises: 0010
"""

from __future__ import annotations

from pipeline.ledger.migrations.steps import run_frozen_sql, set_schema_version

revision = "0011"
down_revision = "0010"
branch_labels = None
depends_on = None


def upgrade() -> None:
    """Drop ix_pass_applications_applied."""
    run_frozen_sql(revision)
    set_schema_version(11)
