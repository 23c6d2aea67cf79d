"""The grant key: the one definition of which columns name a grant, and SQL built from it.

A grant is (campaign, user bucket, user, item, issue number): ``issue_no`` is 0 for the first issue and
grows when ``entitle repair`` reissues a grant whose terms were wrong, so every join between grants and
what is recorded per grant (voids, delivery answers, revocations) is on all five columns.
"""

from __future__ import annotations

from typing import Any

import sqlalchemy as sa

GRANT_KEY = ("campaign_key", "user_bucket", "user_id", "item_key", "issue_no")


def same_grant(alias: str, grant_alias: str = "g") -> str:
    """SQL: the row ``alias`` is about the grant ``grant_alias`` (equal on every column of the grant key)."""
    return " AND ".join(f"{alias}.{column} = {grant_alias}.{column}" for column in GRANT_KEY)


# SQL, with ``grants AS g``: the grant is live (no void names it).
LIVE_GRANT_SQL = f"NOT EXISTS (SELECT 1 FROM grant_voids AS v WHERE {same_grant('v')})"


def grant_key_columns() -> list[sa.Column[Any]]:
    """A grant's ledger key as the primary key of a table that records something per grant."""
    return [
        sa.Column("campaign_key", sa.Integer, primary_key=True),
        sa.Column("user_bucket", sa.BigInteger, primary_key=True),
        sa.Column("user_id", sa.BigInteger, primary_key=True),
        sa.Column("item_key", sa.Integer, primary_key=True),
        sa.Column("issue_no", sa.SmallInteger, primary_key=True, autoincrement=False),
    ]
