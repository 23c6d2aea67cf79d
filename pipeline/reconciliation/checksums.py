"""Checksums of a partition's grants: the same count and hash sums computed in the database and in Polars.

A grant hashes to two 31-bit numbers: ``h1`` over its bucket, item and terms, ``h2``
over its user id and item. A key range of the ledger is summarised as (count, sum of
h1, sum of h2), computed by the database over the rows it holds
(:func:`ledger_checksums`, voided rows counted apart), and the expected grants of the
same range as the same three numbers computed by Polars from the partition file and
the campaign's items (:func:`expected_checksum`). Equal checksums mean the live rows
are exactly the expected rows (a chance collision needs both sums and the count to
agree at once); only a range whose checksums differ needs a row-level comparison.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import ledger
from pipeline.grants import runs
from pipeline.grants.partitioning import user_bucket, user_bucket_expr

CHECKSUM_MODULUS = 2_147_483_647  # 2^31 - 1: every product below stays under 2^62 in SQL and Polars
H1_BUCKET_FACTOR = 48_271
H1_ITEM_FACTOR = 69_621
H2_USER_MODULUS = 1_000_000_007
H2_ITEM_OFFSET = 16_807

Checksum = tuple[int, int, int]  # count, sum of h1, sum of h2
TouchedIssue = tuple[int, int, int, int, bool]  # user_bucket, user_id, item_key, issue_no, voided


@dataclass(frozen=True)
class ItemTerms:
    """One campaign item's key and terms, instants as UTC epoch microseconds."""

    item_key: int
    item_sku: str
    amount_krw: int | None
    valid_from_us: int
    valid_until_us: int | None


@dataclass(frozen=True)
class LedgerChecksums:
    """What the database says about one key range: every row, the voided rows, and the issues voids touch."""

    all_rows: Checksum
    voided: Checksum
    touched: tuple[TouchedIssue, ...]  # every issue of every (user, item) with a void in the range

    @property
    def live(self) -> Checksum:
        """The live rows' checksum (every row minus the voided ones)."""
        return (
            self.all_rows[0] - self.voided[0],
            self.all_rows[1] - self.voided[1],
            self.all_rows[2] - self.voided[2],
        )

    @property
    def live_count(self) -> int:
        """How many live grants the range holds, counted by the database."""
        return self.all_rows[0] - self.voided[0]


def item_terms(pipeline: runs.Pipeline) -> tuple[ItemTerms, ...]:
    """The campaign's items with their ledger keys and terms in epoch microseconds."""
    return tuple(
        ItemTerms(
            pipeline.keys.item_keys[i.sku],
            i.sku,
            i.amount_krw,
            ledger.to_epoch_us(i.valid_from),
            None if i.valid_until is None else ledger.to_epoch_us(i.valid_until),
        )
        for i in pipeline.campaign.items
    )


def hash_sql(dialect: str) -> tuple[str, str]:
    """The two row hashes over grants aliased ``g``, in SQL."""
    m = CHECKSUM_MODULUS
    until, since = ledger.epoch_us_sql("g.valid_until", dialect), ledger.epoch_us_sql("g.valid_from", dialect)
    h1 = (
        f"((g.user_bucket * {H1_BUCKET_FACTOR} + g.item_key * {H1_ITEM_FACTOR} + coalesce(g.amount_krw, 0) % {m} "
        f"+ coalesce({until}, 1) % {m} + {since} % {m}) % {m})"
    )
    h2 = f"((g.user_id % {H2_USER_MODULUS}) * (g.item_key + {H2_ITEM_OFFSET}) % {m})"
    return h1, h2


def _item_constant(item: ItemTerms) -> int:
    m = CHECKSUM_MODULUS
    until = 1 if item.valid_until_us is None else item.valid_until_us
    return item.item_key * H1_ITEM_FACTOR + (item.amount_krw or 0) % m + until % m + item.valid_from_us % m


def row_hashes(user_id: int, item: ItemTerms) -> tuple[int, int]:
    """The two row hashes of one expected grant, in Python (same values as the SQL)."""
    m = CHECKSUM_MODULUS
    h1 = (user_bucket(user_id) * H1_BUCKET_FACTOR + _item_constant(item)) % m
    h2 = (user_id % H2_USER_MODULUS) * (item.item_key + H2_ITEM_OFFSET) % m
    return h1, h2


def expected_checksum(users: pl.DataFrame, items: Sequence[ItemTerms]) -> Checksum:
    """Count and the two hash sums of users × items, computed in Polars."""
    m = CHECKSUM_MODULUS
    bucket = user_bucket_expr("user_id")
    user_part = pl.col("user_id") % H2_USER_MODULUS
    exprs: list[pl.Expr] = []
    for index, item in enumerate(items):
        exprs.append(((bucket * H1_BUCKET_FACTOR + _item_constant(item)) % m).sum().alias(f"h1_{index}"))
        exprs.append((user_part * (item.item_key + H2_ITEM_OFFSET) % m).sum().alias(f"h2_{index}"))
    if not exprs or users.height == 0:
        return 0, 0, 0
    sums = users.select(exprs).row(0)
    return users.height * len(items), int(sum(sums[0::2])), int(sum(sums[1::2]))


def ledger_checksums(connection: Connection, campaign_key: int, bucket_lo: int, bucket_hi: int) -> LedgerChecksums:
    """The database's checksums of the campaign's grants in a bucket range, read without moving rows."""
    dialect = connection.dialect.name
    h1, h2 = hash_sql(dialect)
    bounds = {"ck": campaign_key, "lo": bucket_lo, "hi": bucket_hi}
    # Voids are few: drive the join from them. SQLite's CROSS JOIN fixes that loop order (left
    # alone it scans the partition's grants and probes the voids for each).
    void_first = "CROSS JOIN" if dialect == "sqlite" else "JOIN"
    all_row = connection.execute(
        sa.text(
            f"SELECT count(*), coalesce(sum({h1}), 0), coalesce(sum({h2}), 0) FROM grants AS g "
            "WHERE g.campaign_key = :ck AND g.user_bucket BETWEEN :lo AND :hi"
        ),
        bounds,
    ).one()
    voided_row = connection.execute(
        sa.text(
            f"SELECT count(*), coalesce(sum({h1}), 0), coalesce(sum({h2}), 0) FROM grant_voids AS v "
            f"{void_first} grants AS g ON {ledger.same_grant('v')} "
            "WHERE v.campaign_key = :ck AND v.user_bucket BETWEEN :lo AND :hi"
        ),
        bounds,
    ).one()
    # Every issue of every (user, item) that has a void in this range, and whether that issue is voided.
    touched = connection.execute(
        sa.text(
            "SELECT g.user_bucket, g.user_id, g.item_key, g.issue_no, "
            "CASE WHEN w.user_id IS NULL THEN 0 ELSE 1 END AS voided "
            "FROM (SELECT DISTINCT user_bucket, user_id, item_key FROM grant_voids "
            "      WHERE campaign_key = :ck AND user_bucket BETWEEN :lo AND :hi) AS k "
            "JOIN grants AS g ON g.campaign_key = :ck AND g.user_bucket = k.user_bucket "
            "AND g.user_id = k.user_id AND g.item_key = k.item_key "
            f"LEFT JOIN grant_voids AS w ON {ledger.same_grant('w')}"
        ),
        bounds,
    ).all()

    def triple(row: Any) -> Checksum:
        return int(row[0]), int(row[1]), int(row[2])

    return LedgerChecksums(
        triple(all_row),
        triple(voided_row),
        tuple((int(r[0]), int(r[1]), int(r[2]), int(r[3]), bool(r[4])) for r in touched),
    )
