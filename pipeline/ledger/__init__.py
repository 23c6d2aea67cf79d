"""The grant ledger: SQLAlchemy Core tables, engine set-up and registration of campaigns and runs.

One row in ``grants`` per (campaign, item, user).  Its primary key is
``(campaign_key, user_bucket, user_id, item_key)`` and a CHECK constraint pins
``user_bucket`` to the partition function of ``user_id`` (see
:mod:`pipeline.grants.partitioning`), so the key is unique on (campaign, item, user):
a duplicate grant is impossible at the database level, while one pipeline
partition's grants stay one contiguous range of the key.  The ledger is
append-only: triggers refuse UPDATE and DELETE of grants and voids;
corrections are new rows in ``grant_voids``.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Dialect, Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline.campaigns import ITEM_KINDS, Campaign, Item
from pipeline.errors import ConfigError, LedgerError, TermsChangedError, invariant
from pipeline.grants.partitioning import BUCKET_MODULUS, BUCKET_MULTIPLIER

# 2: issue_no, reconciliation tables; 3: grants partitioned (PostgreSQL); 4: delivery tables;
# 5: three-way reconciliation; 6: first-come-first-served pass tables; 7: merchant cash claims, cases,
# decisions and intake files; 8: revocations at the issuers; 9: program reconciliations; 10: the issuers'
# shared rate budgets; 11: no applied_at index on pass_applications. pipeline/ledger/migrations
SCHEMA_VERSION = 11
MIGRATIONS_DIR = Path(str(resources.files("pipeline.ledger.migrations")))
# The views of sql/<dialect>/views.sql; migrations drop them and create_schema re-applies the file.
LEDGER_VIEWS = (
    "grant_ledger",
    "grant_history",
    "reconciliation_runs",
    "reconciliation_breaks",
    "campaign_coverage",
    "partition_status",
)
# The repository's sql/ folder, shipped in the package as pipeline.sql.
SQL_DIR = Path(str(resources.files("pipeline.sql")))
SQLITE_BUSY_TIMEOUT_MS = 120_000
SQLITE_CACHE_KIB = 262_144
UTC = dt.UTC


class Instant(sa.types.TypeDecorator[dt.datetime]):
    """A timezone-aware instant: TIMESTAMPTZ on PostgreSQL, UTC epoch microseconds on SQLite."""

    impl = sa.BigInteger
    cache_ok = True

    def load_dialect_impl(self, dialect: Dialect) -> sa.types.TypeEngine[Any]:
        """TIMESTAMPTZ where the database has one, BIGINT microseconds elsewhere."""
        if dialect.name == "postgresql":
            return dialect.type_descriptor(sa.TIMESTAMP(timezone=True))
        return dialect.type_descriptor(sa.BigInteger())

    def process_bind_param(self, value: dt.datetime | None, dialect: Dialect) -> Any:
        """Refuse naive datetimes; convert to the storage form."""
        if value is None:
            return None
        invariant(value.tzinfo is not None, f"naive datetime {value!r} reached the ledger")
        if dialect.name == "postgresql":
            return value
        return to_epoch_us(value)

    def process_result_value(self, value: Any, dialect: Dialect) -> dt.datetime | None:
        """Return an aware datetime in UTC."""
        if value is None:
            return None
        if isinstance(value, dt.datetime):
            return value.astimezone(UTC)
        return from_epoch_us(int(value))


def to_epoch_us(value: dt.datetime) -> int:
    """Microseconds since 1970-01-01T00:00Z of an aware datetime."""
    delta = value - dt.datetime(1970, 1, 1, tzinfo=UTC)
    return (delta.days * 86_400 + delta.seconds) * 1_000_000 + delta.microseconds


def from_epoch_us(value: int) -> dt.datetime:
    """The aware UTC datetime of epoch microseconds."""
    return dt.datetime(1970, 1, 1, tzinfo=UTC) + dt.timedelta(microseconds=value)


metadata = sa.MetaData()

ledger_meta = sa.Table(
    "ledger_meta",
    metadata,
    sa.Column("meta_key", sa.String(64), primary_key=True),
    sa.Column("meta_value", sa.String(256), nullable=False),
)

campaigns = sa.Table(
    "campaigns",
    metadata,
    sa.Column("campaign_key", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("campaign_id", sa.String(63), nullable=False, unique=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("time_zone", sa.String(64), nullable=False),
    sa.Column("starts_at", Instant, nullable=False),
    sa.Column("registered_at", Instant, nullable=False),
)

campaign_items = sa.Table(
    "campaign_items",
    metadata,
    sa.Column("item_key", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), nullable=False),
    sa.Column("item_sku", sa.String(63), nullable=False),
    sa.Column("item_kind", sa.String(16), nullable=False),
    sa.Column("amount_krw", sa.BigInteger, nullable=True),
    sa.Column("validity_days", sa.Integer, nullable=True),
    sa.Column("valid_from", Instant, nullable=False),
    sa.Column("valid_until", Instant, nullable=True),
    sa.Column("terms_hash", sa.String(16), nullable=False),
    sa.UniqueConstraint("campaign_key", "item_sku", name="uq_campaign_items_sku"),
    sa.CheckConstraint("item_kind IN (" + ", ".join(f"'{k}'" for k in ITEM_KINDS) + ")", name="ck_item_kind"),
    sa.CheckConstraint("amount_krw IS NULL OR amount_krw > 0", name="ck_item_amount_positive"),
)

snapshots = sa.Table(
    "snapshots",
    metadata,
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), primary_key=True),
    sa.Column("snapshot_id", sa.String(16), primary_key=True),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("snapshot_dir", sa.Text, nullable=False),
    sa.Column("eligible_users", sa.BigInteger, nullable=False),
    sa.Column("rejected_rows", sa.BigInteger, nullable=False),
    sa.Column("duplicate_rows", sa.BigInteger, nullable=False),
    sa.Column("excluded_users", sa.BigInteger, nullable=False),
    sa.Column("partition_count", sa.Integer, nullable=False),
    sa.Column("registered_at", Instant, nullable=False),
)

runs = sa.Table(
    "runs",
    metadata,
    sa.Column("run_key", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(250), nullable=False, unique=True),
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), nullable=False),
    sa.Column("snapshot_id", sa.String(16), nullable=False),
    sa.Column("trigger", sa.String(32), nullable=False),
    sa.Column("started_at", Instant, nullable=False),
)

grants = sa.Table(
    "grants",
    metadata,
    sa.Column("campaign_key", sa.Integer, primary_key=True),
    sa.Column("user_bucket", sa.BigInteger, primary_key=True),
    sa.Column("user_id", sa.BigInteger, primary_key=True),
    sa.Column("item_key", sa.Integer, primary_key=True),
    # 0 for the first grant; a grant voided for wrong terms is reissued as 1, 2, … (a trigger
    # admits issue n only when issue n-1 exists and is voided, so at most one issue is live).
    sa.Column("issue_no", sa.SmallInteger, primary_key=True, autoincrement=False, server_default="0"),
    sa.Column("partition_id", sa.SmallInteger, nullable=False),
    sa.Column("run_key", sa.Integer, nullable=False),
    sa.Column("amount_krw", sa.BigInteger, nullable=True),
    sa.Column("valid_from", Instant, nullable=False),
    sa.Column("valid_until", Instant, nullable=True),
    sa.Column("granted_at", Instant, nullable=False),
    sa.CheckConstraint("user_id > 0", name="ck_grants_user_id_positive"),
    sa.CheckConstraint("issue_no >= 0", name="ck_grants_issue_no"),
    sa.CheckConstraint(
        f"user_bucket = (user_id % {BUCKET_MODULUS}) * {BUCKET_MULTIPLIER} % {BUCKET_MODULUS}",
        name="ck_grants_user_bucket",
    ),
    sqlite_with_rowid=False,
    # PostgreSQL: one table per campaign, one child per pipeline partition: see pipeline/ledger/pgcopy.py.
    postgresql_partition_by="LIST (campaign_key)",
)

grant_voids = sa.Table(
    "grant_voids",
    metadata,
    sa.Column("campaign_key", sa.Integer, primary_key=True),
    sa.Column("user_bucket", sa.BigInteger, primary_key=True),
    sa.Column("user_id", sa.BigInteger, primary_key=True),
    sa.Column("item_key", sa.Integer, primary_key=True),
    sa.Column("issue_no", sa.SmallInteger, primary_key=True, autoincrement=False, server_default="0"),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("voided_at", Instant, nullable=False),
    sqlite_with_rowid=False,
)

partition_attempts = sa.Table(
    "partition_attempts",
    metadata,
    sa.Column("attempt_key", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_key", sa.Integer, sa.ForeignKey("runs.run_key"), nullable=False),
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), nullable=False),
    sa.Column("snapshot_id", sa.String(16), nullable=False),
    sa.Column("partition_count", sa.Integer, nullable=False),
    sa.Column("partition_id", sa.Integer, nullable=False),
    sa.Column("content_sha256", sa.String(64), nullable=False),
    sa.Column("items_signature", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("verified", sa.Boolean, nullable=False),
    sa.Column("planned", sa.BigInteger, nullable=False),
    sa.Column("written", sa.BigInteger, nullable=True),
    sa.Column("already_present", sa.BigInteger, nullable=True),
    sa.Column("duration_s", sa.Float, nullable=True),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("started_at", Instant, nullable=False),
    sa.Column("finished_at", Instant, nullable=True),
    sa.CheckConstraint("status IN ('running', 'done', 'failed')", name="ck_attempt_status"),
    sa.Index("ix_partition_attempts_lookup", "campaign_key", "snapshot_id", "partition_id", "attempt_key"),
    sa.Index("ix_partition_attempts_content", "campaign_key", "content_sha256", "items_signature", "status"),
)


# Reconciliation results. The analyst views reconciliation_runs and reconciliation_breaks
# (sql/<dialect>/views.sql) present these tables with campaign ids, skus and readable times.
recon_runs = sa.Table(
    "recon_runs",
    metadata,
    sa.Column("reconciliation_key", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("reconciliation_id", sa.String(64), nullable=False, unique=True),
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), nullable=False),
    sa.Column("snapshot_id", sa.String(16), nullable=False),
    sa.Column("partition_count", sa.Integer, nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("explanation", sa.Text, nullable=False),
    *(
        sa.Column(name, sa.BigInteger, nullable=False)
        for name in (
            "expected",
            "matched",
            "terms_mismatch",
            "missing",
            "voided",
            "ledger_live",
            "unexpected",
            "duplicate",
            "residual_expected",
            "residual_ledger",
            "open_breaks",
            "breaks_itemized",
        )
    ),
    sa.Column("export_dir", sa.Text, nullable=True),
    sa.Column("started_at", Instant, nullable=False),
    sa.Column("finished_at", Instant, nullable=False),
    # Three-way reconciliation (schema version 5): ledger grants not at their issuer, and the reverse.
    sa.Column("issuer_missing", sa.BigInteger, nullable=False, server_default="0"),
    sa.Column("issuer_unexpected", sa.BigInteger, nullable=False, server_default="0"),
    sa.CheckConstraint("verdict IN ('RECONCILED', 'BREAKS', 'INCOMPLETE')", name="ck_recon_verdict"),
    sa.Index("ix_recon_runs_campaign", "campaign_key", "reconciliation_key"),
)

_RECON_COUNTS = ("expected", "live", "matched", "terms_mismatch", "missing", "voided", "unexpected", "duplicate")

recon_items = sa.Table(
    "recon_items",
    metadata,
    sa.Column("reconciliation_key", sa.Integer, sa.ForeignKey("recon_runs.reconciliation_key"), primary_key=True),
    sa.Column("item_key", sa.Integer, primary_key=True),
    sa.Column("item_sku", sa.String(63), nullable=False),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in _RECON_COUNTS),
)

recon_partitions = sa.Table(
    "recon_partitions",
    metadata,
    sa.Column("reconciliation_key", sa.Integer, sa.ForeignKey("recon_runs.reconciliation_key"), primary_key=True),
    sa.Column("partition_id", sa.Integer, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("method", sa.String(16), nullable=False),
    *(sa.Column(name, sa.BigInteger, nullable=True) for name in _RECON_COUNTS),
    sa.Column("error", sa.Text, nullable=True),
    sa.CheckConstraint("state IN ('matched', 'breaks', 'not_granted', 'unreadable')", name="ck_recon_partition_state"),
)

recon_breaks = sa.Table(
    "recon_breaks",
    metadata,
    sa.Column("break_id", sa.String(24), primary_key=True),
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), nullable=False),
    sa.Column("break_class", sa.String(24), nullable=False),
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column("user_bucket", sa.BigInteger, nullable=False),
    sa.Column("item_key", sa.Integer, nullable=False),
    sa.Column("item_sku", sa.String(63), nullable=True),
    sa.Column("issue_no", sa.SmallInteger, nullable=True),
    sa.Column("partition_id", sa.Integer, nullable=False),
    sa.Column("expected_amount_krw", sa.BigInteger, nullable=True),
    sa.Column("expected_valid_from", Instant, nullable=True),
    sa.Column("expected_valid_until", Instant, nullable=True),
    sa.Column("ledger_amount_krw", sa.BigInteger, nullable=True),
    sa.Column("ledger_valid_from", Instant, nullable=True),
    sa.Column("ledger_valid_until", Instant, nullable=True),
    sa.Column("detail", sa.Text, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("first_seen_key", sa.Integer, sa.ForeignKey("recon_runs.reconciliation_key"), nullable=False),
    sa.Column("last_seen_key", sa.Integer, sa.ForeignKey("recon_runs.reconciliation_key"), nullable=False),
    sa.Column("resolved_key", sa.Integer, sa.ForeignKey("recon_runs.reconciliation_key"), nullable=True),
    # Three-way reconciliation (schema version 5): the issuer that holds, or should hold, the grant.
    sa.Column("issuer", sa.String(63), nullable=True),
    sa.CheckConstraint(
        "break_class IN ('missing', 'unexpected', 'terms_mismatch', 'duplicate', 'issuer_missing', "
        "'issuer_unexpected')",
        name="ck_recon_break_class",
    ),
    sa.CheckConstraint("status IN ('open', 'resolved')", name="ck_recon_break_status"),
    sa.Index("ix_recon_breaks_open", "campaign_key", "status", "user_bucket"),
)


# First-come-first-served pass (pipeline/programs/drawer_pass/allocation.py, migration 0006). Applications are
# intake, not ledger: the passes themselves are ordinary rows of grants (item kind "pass").
# pass_programs holds each program's stock counter and its allocation watermark
# (allocated_through): every application at or before it has had its turn, and intake refuses
# new ones at or before it, so an application's outcome never depends on which process won.
pass_programs = sa.Table(
    "pass_programs",
    metadata,
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), primary_key=True),
    sa.Column("item_key", sa.Integer, nullable=False),
    sa.Column("stock_cap", sa.BigInteger, nullable=False),
    sa.Column("validity_months", sa.Integer, nullable=False),
    sa.Column("granted", sa.BigInteger, nullable=False),
    sa.Column("allocated_through", Instant, nullable=True),
    sa.Column("registered_at", Instant, nullable=False),
    sa.CheckConstraint("stock_cap > 0", name="ck_pass_programs_cap_positive"),
    sa.CheckConstraint("granted >= 0 AND granted <= stock_cap", name="ck_pass_programs_within_cap"),
)

pass_batches = sa.Table(
    "pass_batches",
    metadata,
    sa.Column("batch_key", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), nullable=False),
    sa.Column("content_sha256", sa.String(64), nullable=False),
    sa.Column("source_file", sa.Text, nullable=False),
    *(
        sa.Column(name, sa.BigInteger, nullable=False)
        for name in ("rows_read", "malformed", "refused", "duplicate_rows", "new_applications", "earlier_repeats")
    ),
    sa.Column("quarantine_file", sa.Text, nullable=True),
    sa.Column("ingested_at", Instant, nullable=False),
    sa.UniqueConstraint("campaign_key", "content_sha256", name="uq_pass_batches_content"),
)

pass_applications = sa.Table(
    "pass_applications",
    metadata,
    sa.Column("campaign_key", sa.Integer, primary_key=True),
    sa.Column("user_id", sa.BigInteger, primary_key=True),
    sa.Column("user_bucket", sa.BigInteger, nullable=False),
    sa.Column("applied_at", Instant, nullable=False),
    sa.Column("batch_key", sa.Integer, nullable=False),
    sa.CheckConstraint("user_id > 0", name="ck_pass_applications_user_id_positive"),
    # Allocation windows are applied_at ranges; ties within one are sorted by (user_bucket, user_id)
    # (README "First-come-first-served pass"). No index on applied_at (dropped in schema version 11):
    # maintaining it was half of PostgreSQL's intake time, and allocation sorts its whole window anyway
    # (PostgreSQL read it by bitmap scan and sorted it with the index too; bench/bench_pass.py).
    sqlite_with_rowid=False,
)

pass_allocations = sa.Table(
    "pass_allocations",
    metadata,
    sa.Column("allocation_key", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), nullable=False),
    sa.Column("run_key", sa.Integer, sa.ForeignKey("runs.run_key"), nullable=False, unique=True),
    # The window (previous_through, through]: the applications in it had their turn here.
    sa.Column("previous_through", Instant, nullable=True),
    sa.Column("through", Instant, nullable=False),
    sa.Column("granted_at", Instant, nullable=False),
    sa.Column("valid_until", Instant, nullable=False),
    *(sa.Column(name, sa.BigInteger, nullable=False) for name in ("considered", "granted", "sold_out", "stock_after")),
    sa.Index("ix_pass_allocations_campaign", "campaign_key", "through"),
)
# Merchant cash programs (pipeline/programs/merchant_cash/claims.py, merchant_review.py). Claims as received,
# one case per merchant and program (a working table: its state is re-derived from claims and
# decisions, and the reconciliation checks it), the reviewers' decisions (append-only: triggers in
# views.sql, at most one per case) and each ingested file. Payouts are ordinary grants.
MERCHANT_CLAIM_STATUSES = ("accepted", "outside_intake_window", "below_minimum_loss", "after_decision")
MERCHANT_CASE_STATES = ("auto_tier", "needs_review", "approved", "rejected", "paid")

merchant_claims = sa.Table(
    "merchant_claims",
    metadata,
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), primary_key=True),
    sa.Column("claim_id", sa.String(64), primary_key=True),
    sa.Column("merchant_id", sa.BigInteger, nullable=False),
    sa.Column("submitted_at", Instant, nullable=False),
    sa.Column("loss_krw", sa.BigInteger, nullable=False),
    # Evidence kinds the claim says yes to / no to, sorted and comma-separated ('' for none).
    sa.Column("evidence_provided", sa.Text, nullable=False),
    sa.Column("evidence_missing", sa.Text, nullable=False),
    sa.Column("content_sha256", sa.String(16), nullable=False),
    sa.Column("status", sa.String(24), nullable=False),
    sa.Column("intake_window", sa.String(63), nullable=True),
    sa.Column("source_file", sa.Text, nullable=False),
    sa.Column("source_row", sa.Integer, nullable=False),
    sa.Column("ingested_at", Instant, nullable=False),
    sa.CheckConstraint("merchant_id > 0", name="ck_merchant_claims_merchant_id"),
    sa.CheckConstraint("loss_krw >= 0", name="ck_merchant_claims_loss"),
    sa.CheckConstraint(
        "status IN (" + ", ".join(f"'{s}'" for s in MERCHANT_CLAIM_STATUSES) + ")", name="ck_merchant_claims_status"
    ),
    sa.Index("ix_merchant_claims_merchant", "campaign_key", "merchant_id"),
)

merchant_cases = sa.Table(
    "merchant_cases",
    metadata,
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), primary_key=True),
    sa.Column("merchant_id", sa.BigInteger, primary_key=True),
    sa.Column("state", sa.String(16), nullable=False),
    sa.Column("tier", sa.String(63), nullable=True),
    sa.Column("loss_krw", sa.BigInteger, nullable=False),  # the largest loss among the case's claims
    sa.Column("amount_krw", sa.BigInteger, nullable=True),  # to pay: the tier's or the approved amount
    sa.Column("review_reason", sa.String(32), nullable=True),
    sa.Column("claim_count", sa.Integer, nullable=False),
    sa.Column("opened_at", Instant, nullable=False),
    sa.Column("updated_at", Instant, nullable=False),
    sa.CheckConstraint(
        "state IN (" + ", ".join(f"'{s}'" for s in MERCHANT_CASE_STATES) + ")", name="ck_merchant_cases_state"
    ),
    sa.CheckConstraint("amount_krw IS NULL OR amount_krw > 0", name="ck_merchant_cases_amount"),
    sa.Index("ix_merchant_cases_state", "campaign_key", "state"),
)

merchant_decisions = sa.Table(
    "merchant_decisions",
    metadata,
    sa.Column("decision_key", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), nullable=False),
    sa.Column("merchant_id", sa.BigInteger, nullable=False),
    sa.Column("decision", sa.String(16), nullable=False),
    sa.Column("amount_krw", sa.BigInteger, nullable=True),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("decided_at", Instant, nullable=False),
    # One decision per case, enforced by the database: a second one is refused, never stacked.
    sa.UniqueConstraint("campaign_key", "merchant_id", name="uq_merchant_decisions_case"),
    sa.CheckConstraint(
        "(decision = 'approve' AND amount_krw > 0) OR (decision = 'reject' AND amount_krw IS NULL)",
        name="ck_merchant_decisions_amount",
    ),
)

merchant_intake_files = sa.Table(
    "merchant_intake_files",
    metadata,
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), primary_key=True),
    sa.Column("file_sha256", sa.String(64), primary_key=True),
    sa.Column("source_file", sa.Text, nullable=False),
    *(
        sa.Column(name, sa.BigInteger, nullable=False)
        for name in ("rows_read", "claims_new", "claims_known", "duplicate_rows", "quarantined_rows")
    ),
    sa.Column("quarantine_file", sa.Text, nullable=True),
    sa.Column("ingested_at", Instant, nullable=False),
)
# End of merchant cash programs.


# Delivery to issuers (pipeline/delivery/__init__.py). grants stays append-only; what an issuer answered
# lives here. delivery_batches is the outbox: a batch's row commits before its request is sent.
DELIVERY_OUTCOMES = ("created", "exists", "conflict", "failed")
FINAL_OUTCOMES = ("created", "exists", "conflict")  # never sent again, never overwritten

delivery_batches = sa.Table(
    "delivery_batches",
    metadata,
    sa.Column("batch_key", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), nullable=False),
    sa.Column("issuer", sa.String(63), nullable=False),
    sa.Column("partition_id", sa.Integer, nullable=False),
    sa.Column("grant_count", sa.Integer, nullable=False),
    # The batch's first and last grant in ledger key order (its grants lie between them).
    sa.Column("first_user_bucket", sa.BigInteger, nullable=False),
    sa.Column("first_user_id", sa.BigInteger, nullable=False),
    sa.Column("last_user_bucket", sa.BigInteger, nullable=False),
    sa.Column("last_user_id", sa.BigInteger, nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("started_at", Instant, nullable=False),
    sa.Column("finished_at", Instant, nullable=True),
    sa.CheckConstraint("status IN ('in_flight', 'answered', 'failed')", name="ck_delivery_batch_status"),
    sa.Index("ix_delivery_batches_partition", "campaign_key", "issuer", "partition_id", "batch_key"),
)


GRANT_KEY = ("campaign_key", "user_bucket", "user_id", "item_key", "issue_no")


def same_grant(alias: str, grant_alias: str = "g") -> str:
    """SQL: the row ``alias`` is about the grant ``grant_alias`` (equal on every column of the grant key)."""
    return " AND ".join(f"{alias}.{column} = {grant_alias}.{column}" for column in GRANT_KEY)


# SQL, with ``grants AS g``: the grant is live (no void names it).
LIVE_GRANT_SQL = f"NOT EXISTS (SELECT 1 FROM grant_voids AS v WHERE {same_grant('v')})"


def _grant_key_columns() -> list[sa.Column[Any]]:
    """A grant's ledger key as the primary key of a table that records something per grant."""
    return [
        sa.Column("campaign_key", sa.Integer, primary_key=True),
        sa.Column("user_bucket", sa.BigInteger, primary_key=True),
        sa.Column("user_id", sa.BigInteger, primary_key=True),
        sa.Column("item_key", sa.Integer, primary_key=True),
        sa.Column("issue_no", sa.SmallInteger, primary_key=True, autoincrement=False),
    ]


delivery_answers = sa.Table(
    "delivery_answers",
    metadata,
    # The grant's ledger key: "what is left to deliver in partition P" is one range scan of
    # grants merged with one range scan of this table.
    *_grant_key_columns(),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("batch_key", sa.Integer, nullable=False),
    sa.Column("answered_at", Instant, nullable=False),
    sa.CheckConstraint(
        "outcome IN (" + ", ".join(f"'{o}'" for o in DELIVERY_OUTCOMES) + ")", name="ck_delivery_outcome"
    ),
    sqlite_with_rowid=False,
)

# Reconciliations of the programs that have no snapshot (schema version 9): the pass program and the
# merchant cash programs store each run's verdict and its whole result document here.
PROGRAM_RECON_PROGRAMS = ("pass", "merchant_cash")
program_recon_runs = sa.Table(
    "program_recon_runs",
    metadata,
    sa.Column("program_recon_key", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), nullable=False),
    sa.Column("program", sa.String(32), nullable=False),
    sa.Column("verdict", sa.String(16), nullable=False),
    sa.Column("explanation", sa.Text, nullable=False),
    sa.Column("breaks", sa.BigInteger, nullable=False),
    sa.Column("result_json", sa.Text, nullable=False),
    sa.Column("started_at", Instant, nullable=False),
    sa.Column("finished_at", Instant, nullable=False),
    sa.CheckConstraint("verdict IN ('RECONCILED', 'BREAKS')", name="ck_program_recon_verdict"),
    sa.CheckConstraint(
        "program IN (" + ", ".join(f"'{p}'" for p in PROGRAM_RECON_PROGRAMS) + ")", name="ck_program_recon_program"
    ),
    sa.Index("ix_program_recon_runs_campaign", "campaign_key", "program_recon_key"),
)


def record_program_reconciliation(
    engine: Engine,
    campaign_key: int,
    program: str,
    result: dict[str, Any],
    started_at: dt.datetime,
    finished_at: dt.datetime,
) -> None:
    """Store one program reconciliation (``result`` has verdict, explanation and a list of breaks)."""
    invariant(program in PROGRAM_RECON_PROGRAMS, f"unknown program kind {program!r}")
    with write_transaction(engine) as connection:
        connection.execute(
            program_recon_runs.insert().values(
                campaign_key=campaign_key,
                program=program,
                verdict=result["verdict"],
                explanation=result["explanation"],
                breaks=len(result["breaks"]),
                result_json=json.dumps(result, default=str, sort_keys=True),
                started_at=started_at,
                finished_at=finished_at,
            )
        )


# The issuers' rate budgets (schema version 10), shared by every process that delivers from this
# ledger: one row per issuer name holding the instant (µs since the epoch; on PostgreSQL by the
# database's clock, so that workers on several machines agree) before which no further request may
# start. Each request reserves the next free slot with one upsert (take_issuer_slot).
issuer_budgets = sa.Table(
    "issuer_budgets",
    metadata,
    sa.Column("issuer", sa.String(63), primary_key=True),
    sa.Column("next_at_us", sa.BigInteger, nullable=False),
)


def _budget_upsert(engine: Engine, new_value: str, update: str, returning: str = "") -> str:
    """The upsert on an issuer's budget row; ``{now}`` and ``{greatest}`` are filled in per dialect."""
    postgres = engine.dialect.name == "postgresql"
    now = "CAST(EXTRACT(EPOCH FROM clock_timestamp()) * 1000000 AS BIGINT)" if postgres else ":now"
    sql = (
        f"INSERT INTO issuer_budgets (issuer, next_at_us) VALUES (:issuer, {new_value}) "
        f"ON CONFLICT (issuer) DO UPDATE SET next_at_us = {update}" + (f" RETURNING {returning}" if returning else "")
    )
    return sql.format(now=now, greatest="GREATEST" if postgres else "MAX")


def take_issuer_slot(engine: Engine, issuer: str, interval_s: float, wait_max_s: float = float("inf")) -> float:
    """Reserve the issuer's next request slot, ``interval_s`` after the previous one; seconds to wait for it.

    A wait above ``wait_max_s`` cannot come from the budget or a Retry-After (the clock went
    back, or the row was edited by hand): the row restarts from now and the request goes at once.
    """
    step = max(1, round(interval_s * 1_000_000))
    sql = _budget_upsert(
        engine,
        "{now} + :step",
        "{greatest}(issuer_budgets.next_at_us, {now}) + :step",
        "issuer_budgets.next_at_us - :step - {now}",
    )
    now = int(time.time() * 1_000_000)
    with write_transaction(engine) as connection:
        wait_us = int(connection.execute(sa.text(sql), {"issuer": issuer, "step": step, "now": now}).scalar_one())
        if wait_us > wait_max_s * 1_000_000:
            restart = _budget_upsert(engine, "{now} + :step", "{now} + :step")
            connection.execute(sa.text(restart), {"issuer": issuer, "step": step, "now": now})
            return 0.0
    return max(0.0, wait_us / 1_000_000)


def hold_issuer(engine: Engine, issuer: str, seconds: float) -> None:
    """Let no request to the issuer start for ``seconds`` (its Retry-After), from any process."""
    sql = _budget_upsert(engine, "{now} + :hold", "{greatest}(issuer_budgets.next_at_us, {now} + :hold)")
    with write_transaction(engine) as connection:
        connection.execute(
            sa.text(sql),
            {"issuer": issuer, "hold": round(seconds * 1_000_000), "now": int(time.time() * 1_000_000)},
        )


# Revocations at the issuer (schema version 8): `entitle deliver` revokes every voided grant of an
# issuer's items (except one the issuer answered conflict for); one row per such grant.
REVOCATION_OUTCOMES = ("revoked", "already_revoked", "not_found", "failed")
delivery_revocations = sa.Table(
    "delivery_revocations",
    metadata,
    *_grant_key_columns(),
    sa.Column("issuer", sa.String(63), nullable=False),
    sa.Column("outcome", sa.String(16), nullable=False),
    sa.Column("detail", sa.Text, nullable=True),
    sa.Column("attempts", sa.Integer, nullable=False),
    sa.Column("answered_at", Instant, nullable=False),
    sa.CheckConstraint(
        "outcome IN (" + ", ".join(f"'{o}'" for o in REVOCATION_OUTCOMES) + ")", name="ck_delivery_revocation_outcome"
    ),
    sqlite_with_rowid=False,
)

delivery_partitions = sa.Table(
    "delivery_partitions",
    metadata,
    sa.Column("campaign_key", sa.Integer, sa.ForeignKey("campaigns.campaign_key"), primary_key=True),
    sa.Column("issuer", sa.String(63), primary_key=True),
    sa.Column("partition_id", sa.Integer, primary_key=True),
    sa.Column("snapshot_id", sa.String(16), nullable=False),
    sa.Column("status", sa.String(16), nullable=False),
    *(
        sa.Column(name, sa.BigInteger, nullable=True)
        for name in ("planned", "created", "existed", "conflicts", "failed", "not_attempted", "sent")
    ),
    sa.Column("error", sa.Text, nullable=True),
    sa.Column("duration_s", sa.Float, nullable=True),
    sa.Column("started_at", Instant, nullable=False),
    sa.Column("finished_at", Instant, nullable=True),
    sa.CheckConstraint("status IN ('running', 'done', 'failed')", name="ck_delivery_partition_status"),
)


@dataclass(frozen=True)
class CampaignKeys:
    """A registered campaign's surrogate keys: the campaign and each item by sku."""

    campaign_key: int
    item_keys: dict[str, int]

    def items_signature(self, campaign: Campaign) -> str:
        """Digest of (item_key, terms_hash) pairs: equal means the same grants are planned per user."""
        parts = ",".join(
            f"{self.item_keys[i.sku]}:{i.terms_hash()}" for i in sorted(campaign.items, key=lambda i: i.sku)
        )
        return hashlib.sha256(parts.encode()).hexdigest()[:16]


def void_of_grant() -> sa.ColumnElement[bool]:
    """The join condition of a grant and its void (the same campaign, user, item and issue)."""
    return sa.and_(
        grant_voids.c.campaign_key == grants.c.campaign_key,
        grant_voids.c.user_bucket == grants.c.user_bucket,
        grant_voids.c.user_id == grants.c.user_id,
        grant_voids.c.item_key == grants.c.item_key,
        grant_voids.c.issue_no == grants.c.issue_no,
    )


def epoch_us_sql(column: str, dialect: str) -> str:
    """An instant column as UTC epoch microseconds in SQL (SQLite stores them so already)."""
    if dialect == "postgresql":
        # date_part is float8 (EXTRACT is numeric since PostgreSQL 14, and about 4x slower here).
        # The float8 seconds times 10^6 stay within half a microsecond of the true value until about
        # the year 2100, so rounding gives the exact integer.
        return f"CAST(round(date_part('epoch', {column}) * 1000000) AS BIGINT)"
    return column


def create_ledger_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, full sync, a busy timeout and explicit BEGINs."""
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _configure_sqlite(engine)
        return engine
    return sa.create_engine(url, pool_pre_ping=True)


def _configure_sqlite(engine: Engine) -> None:
    @sa.event.listens_for(engine, "connect")
    def _on_connect(dbapi_connection: Any, _record: Any) -> None:
        # Hand transaction control to SQLAlchemy's "begin" event below (pysqlite's own is lazy).
        dbapi_connection.isolation_level = None
        cursor = dbapi_connection.cursor()
        for pragma in (
            "PRAGMA journal_mode=WAL",
            "PRAGMA synchronous=FULL",
            f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}",
            f"PRAGMA cache_size=-{SQLITE_CACHE_KIB}",
            "PRAGMA temp_store=MEMORY",
            "PRAGMA foreign_keys=ON",
        ):
            cursor.execute(pragma)
        cursor.close()

    @sa.event.listens_for(engine, "begin")
    def _on_begin(connection: Connection) -> None:
        # Writers take the write lock up front so two writers queue instead of failing to upgrade.
        mode = connection.get_execution_options().get("sqlite_begin", "DEFERRED")
        connection.exec_driver_sql(f"BEGIN {mode}")


# The PostgreSQL advisory lock (one-bigint key space, apart from the two-int locks keyed by campaign)
# that serialises the ledger's "read, then insert if absent" registrations: schema, campaign, snapshot, run.
_REGISTRATION_LOCK = 0x656E_7469_746C_65  # "entitle"


@contextmanager
def write_transaction(engine: Engine, serialized: bool = False) -> Iterator[Connection]:
    """One write transaction: BEGIN IMMEDIATE on SQLite, a normal one elsewhere.

    ``serialized`` makes concurrent registrations wait for each other on PostgreSQL too
    (SQLite's BEGIN IMMEDIATE already does): two Airflow tasks of one run start at the
    same instant, both find no run row, and without the lock the second insert fails
    on the unique key instead of reading the first one's row.
    """
    with engine.connect() as connection:
        writer = connection.execution_options(sqlite_begin="IMMEDIATE")
        with writer.begin():
            if serialized and engine.dialect.name == "postgresql":
                writer.execute(sa.text("SELECT pg_advisory_xact_lock(:k)"), {"k": _REGISTRATION_LOCK})
            yield writer


def create_schema(engine: Engine) -> None:
    """Create tables, views and append-only triggers if absent (idempotent); refuse other schema versions.

    A new ledger gets the current tables directly and is stamped with the newest
    migration; an older ledger is refused until ``entitle db upgrade`` migrates it.
    Every task opens the ledger, so the common case (schema and views current) is one
    read and no write: a schema write in SQLite also invalidates every other connection's
    prepared statements.
    """
    views_digest = hashlib.sha256(view_sql(engine.dialect.name).encode()).hexdigest()[:16]
    try:
        if _schema_is_current(engine, views_digest):
            return
        with write_transaction(engine, serialized=True) as connection:
            existing = _recorded_version(connection)
            if existing is None:
                metadata.create_all(connection)
                connection.execute(
                    ledger_meta.insert().values(meta_key="schema_version", meta_value=str(SCHEMA_VERSION))
                )
                _stamp_head(connection)
            elif existing < SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger schema version {existing}, this program needs {SCHEMA_VERSION}: back the ledger up, "
                    "then run `entitle db upgrade`"
                )
            elif existing > SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger schema version {existing}, this program needs {SCHEMA_VERSION}: the ledger was "
                    "upgraded by a newer release; run that release"
                )
            for statement in split_sql(view_sql(engine.dialect.name)):
                if engine.dialect.name == "postgresql":
                    statement = statement.replace("%", "%%")  # psycopg's paramstyle
                connection.exec_driver_sql(statement)
            connection.execute(ledger_meta.delete().where(ledger_meta.c.meta_key == "views_sha256"))
            connection.execute(ledger_meta.insert().values(meta_key="views_sha256", meta_value=views_digest))
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot create the ledger schema at {engine.url!r}: {exc}") from exc


def recorded_version(engine: Engine) -> int | None:
    """The schema version recorded in the ledger (None: an empty database)."""
    try:
        with engine.connect() as connection:
            return _recorded_version(connection)
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot read the ledger at {engine.url!r}: {getattr(exc, 'orig', exc)}") from exc


def _recorded_version(connection: Connection) -> int | None:
    """The ledger's schema version, or None for an empty database."""
    if not sa.inspect(connection).has_table("ledger_meta"):
        return None
    value = connection.execute(
        sa.select(ledger_meta.c.meta_value).where(ledger_meta.c.meta_key == "schema_version")
    ).scalar()
    return None if value is None else int(value)


def alembic_config(connection: Connection) -> Any:
    """Alembic's config for pipeline/ledger/migrations, running on ``connection`` (no alembic.ini, no URL)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _stamp_head(connection: Connection) -> None:
    """Record in Alembic's table that a new ledger is at the newest migration."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(connection))
    MigrationContext.configure(connection).stamp(script, "head")


@dataclass(frozen=True)
class UpgradeResult:
    """What ``entitle db upgrade`` did."""

    from_version: int | None
    to_version: int
    migrations: list[str]

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json."""
        return {"from_version": self.from_version, "to_version": self.to_version, "migrations": self.migrations}


def upgrade(engine: Engine) -> UpgradeResult:
    """Migrate the ledger to this program's schema version in one transaction (Alembic); idempotent.

    Ledgers made before Alembic (versions 1 and 2 recorded only in ledger_meta) are
    stamped with their version first. Views are re-applied afterwards, and on
    PostgreSQL the roles' rights too when the roles exist.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    try:
        with write_transaction(engine) as connection:
            before = _recorded_version(connection)
            applied: list[str] = []
            if before is not None:
                if before > SCHEMA_VERSION:
                    raise LedgerError(
                        f"ledger schema version {before} is newer than this program's {SCHEMA_VERSION}; "
                        "nothing was changed"
                    )
                config = alembic_config(connection)
                current = MigrationContext.configure(connection).get_current_revision()
                if current is None:
                    command.stamp(config, f"{before:04d}")
                applied = [f"{v:04d}" for v in range(before + 1, SCHEMA_VERSION + 1)]
                command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        raise LedgerError(
            f"cannot upgrade the ledger at {engine.url!r}: {getattr(exc, 'orig', exc)}; nothing was changed"
        ) from exc
    create_schema(engine)
    if engine.dialect.name == "postgresql" and before is not None and before < SCHEMA_VERSION and _roles_exist(engine):
        apply_roles(engine)
    return UpgradeResult(before, SCHEMA_VERSION, applied)


def _roles_exist(engine: Engine) -> bool:
    with engine.connect() as connection:
        found = connection.execute(
            sa.text("SELECT count(*) FROM pg_roles WHERE rolname = ANY(:names)"), {"names": list(LEDGER_ROLES)}
        ).scalar_one()
    return int(found) > 0


LEDGER_ROLES = ("entitle_writer", "entitle_operator", "entitle_analyst")


def apply_roles(engine: Engine) -> tuple[str, ...]:
    """Create the writer, operator and analyst roles and their rights (PostgreSQL; idempotent)."""
    if engine.dialect.name != "postgresql":
        raise ConfigError(
            f"roles are a PostgreSQL feature; an {engine.dialect.name} ledger has no users: protect the file "
            "with file permissions (and give analysts a read-only copy or a read-only mount)"
        )
    create_schema(engine)
    script = (SQL_DIR / "postgresql" / "roles.sql").read_text(encoding="utf-8")
    try:
        with write_transaction(engine) as connection:
            for statement in split_sql(script):
                connection.exec_driver_sql(statement.replace("%", "%%"))
    except SQLAlchemyError as exc:
        raise LedgerError(
            f"cannot apply sql/postgresql/roles.sql at {engine.url!r}: {getattr(exc, 'orig', exc)}. Run it as the "
            "ledger's owner, with the CREATEROLE right."
        ) from exc
    return LEDGER_ROLES


def _schema_is_current(engine: Engine, views_digest: str) -> bool:
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table("ledger_meta"):
            return False
        stored = {
            str(k): str(v) for k, v in connection.execute(sa.select(ledger_meta.c.meta_key, ledger_meta.c.meta_value))
        }
    return stored.get("schema_version") == str(SCHEMA_VERSION) and stored.get("views_sha256") == views_digest


def view_sql(dialect_name: str) -> str:
    """The views and triggers file for a dialect (``sql/<dialect>/views.sql``)."""
    folder = "postgresql" if dialect_name == "postgresql" else "sqlite"
    return (SQL_DIR / folder / "views.sql").read_text(encoding="utf-8")


def split_sql(script: str) -> list[str]:
    """Split a SQL script into statements, each ended by a line that is exactly ``-- end``.

    Trigger bodies contain semicolons, so semicolons cannot be the separator.
    """
    statements = [part.strip() for part in re.split(r"^-- end$", script, flags=re.MULTILINE)]
    return [s for s in statements if s and not all(line.startswith("--") for line in s.splitlines())]


def register_campaign(engine: Engine, campaign: Campaign, now: dt.datetime) -> CampaignKeys:
    """Record the campaign and its items; refuse changed terms for items that have grants."""
    registered = _registered_unchanged(engine, campaign)
    if registered is not None:
        return registered
    with write_transaction(engine, serialized=True) as connection:
        row = connection.execute(
            sa.select(campaigns.c.campaign_key).where(campaigns.c.campaign_id == campaign.campaign_id)
        ).first()
        if row is None:
            campaign_key = int(
                connection.execute(
                    campaigns.insert().values(
                        campaign_id=campaign.campaign_id,
                        name=campaign.name,
                        time_zone=campaign.time_zone,
                        starts_at=campaign.starts_at,
                        registered_at=now,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            )
        else:
            campaign_key = int(row[0])
            connection.execute(
                campaigns.update()
                .where(campaigns.c.campaign_key == campaign_key)
                .values(name=campaign.name, time_zone=campaign.time_zone, starts_at=campaign.starts_at)
            )
        item_keys = {item.sku: _register_item(connection, campaign, campaign_key, item) for item in campaign.items}
    return CampaignKeys(campaign_key, item_keys)


def _registered_unchanged(engine: Engine, campaign: Campaign) -> CampaignKeys | None:
    """The keys when the campaign and every item are already registered exactly as in the file."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.select(campaigns.c.campaign_key, campaigns.c.name, campaigns.c.time_zone, campaigns.c.starts_at).where(
                campaigns.c.campaign_id == campaign.campaign_id
            )
        ).first()
        if row is None or (row.name, row.time_zone, row.starts_at) != (
            campaign.name,
            campaign.time_zone,
            campaign.starts_at,
        ):
            return None
        stored = {
            r.item_sku: (int(r.item_key), r.terms_hash)
            for r in connection.execute(
                sa.select(campaign_items.c.item_sku, campaign_items.c.item_key, campaign_items.c.terms_hash).where(
                    campaign_items.c.campaign_key == row.campaign_key
                )
            )
        }
    keys: dict[str, int] = {}
    for item in campaign.items:
        found = stored.get(item.sku)
        if found is None or found[1] != item.terms_hash():
            return None
        keys[item.sku] = found[0]
    return CampaignKeys(int(row.campaign_key), keys)


def _register_item(connection: Connection, campaign: Campaign, campaign_key: int, item: Item) -> int:
    values = {
        "item_kind": item.kind,
        "amount_krw": item.amount_krw,
        "validity_days": item.validity_days,
        "valid_from": item.valid_from,
        "valid_until": item.valid_until,
        "terms_hash": item.terms_hash(),
    }
    row = connection.execute(
        sa.select(campaign_items.c.item_key, campaign_items.c.terms_hash).where(
            campaign_items.c.campaign_key == campaign_key, campaign_items.c.item_sku == item.sku
        )
    ).first()
    if row is None:
        return int(
            connection.execute(
                campaign_items.insert().values(campaign_key=campaign_key, item_sku=item.sku, **values)
            ).inserted_primary_key[0]  # type: ignore[index]
        )
    item_key, stored_hash = int(row[0]), str(row[1])
    if stored_hash == values["terms_hash"]:
        return item_key
    has_grants = connection.execute(
        sa.select(sa.literal(1))
        .select_from(grants)
        .where(grants.c.campaign_key == campaign_key, grants.c.item_key == item_key)
        .limit(1)
    ).first()
    if has_grants is not None:
        stored = connection.execute(sa.select(campaign_items).where(campaign_items.c.item_key == item_key)).one()
        raise TermsChangedError(
            f"{campaign.source}: item {item.sku!r} of campaign {campaign.campaign_id!r} already has grants with "
            f"amount_krw={stored.amount_krw}, valid_from={stored.valid_from.isoformat()}, "
            f"valid_until={None if stored.valid_until is None else stored.valid_until.isoformat()}; the file now "
            f"says amount_krw={item.amount_krw}, valid_from={item.valid_from.isoformat()}, "
            f"valid_until={None if item.valid_until is None else item.valid_until.isoformat()}. Terms of granted "
            "items cannot change: restore the old terms, or add a new item with a new sku."
        )
    connection.execute(campaign_items.update().where(campaign_items.c.item_key == item_key).values(**values))
    return item_key


def register_run(
    engine: Engine, run_id: str, campaign_key: int, snapshot_id: str, trigger: str, now: dt.datetime
) -> int:
    """The run's key, creating the run row on first use (retries of a run share it)."""
    with engine.connect() as connection:
        row = connection.execute(sa.select(runs.c.run_key, runs.c.snapshot_id).where(runs.c.run_id == run_id)).first()
    if row is not None and row[1] == snapshot_id:
        return int(row[0])
    with write_transaction(engine, serialized=True) as connection:
        row = connection.execute(sa.select(runs.c.run_key, runs.c.snapshot_id).where(runs.c.run_id == run_id)).first()
        if row is not None:
            if row[1] != snapshot_id:
                raise LedgerError(
                    f"run {run_id!r} already belongs to snapshot {row[1]}, not {snapshot_id}; use a new run id"
                )
            return int(row[0])
        return int(
            connection.execute(
                runs.insert().values(
                    run_id=run_id, campaign_key=campaign_key, snapshot_id=snapshot_id, trigger=trigger, started_at=now
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        )


def register_snapshot(
    engine: Engine,
    campaign_key: int,
    snapshot_id: str,
    values: dict[str, Any],
    now: dt.datetime,
) -> None:
    """Record a frozen snapshot (idempotent); the latest registered is the campaign's current one."""
    with write_transaction(engine, serialized=True) as connection:
        exists = connection.execute(
            sa.select(snapshots.c.snapshot_id).where(
                snapshots.c.campaign_key == campaign_key, snapshots.c.snapshot_id == snapshot_id
            )
        ).first()
        if exists is None:
            connection.execute(
                snapshots.insert().values(
                    campaign_key=campaign_key, snapshot_id=snapshot_id, registered_at=now, **values
                )
            )
        else:
            connection.execute(
                snapshots.update()
                .where(snapshots.c.campaign_key == campaign_key, snapshots.c.snapshot_id == snapshot_id)
                .values(
                    registered_at=now, snapshot_dir=values["snapshot_dir"], partition_count=values["partition_count"]
                )
            )


def current_snapshot(engine: Engine, campaign_key: int) -> dict[str, Any] | None:
    """The campaign's most recently registered snapshot row, or ``None``."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.select(snapshots)
            .where(snapshots.c.campaign_key == campaign_key)
            .order_by(snapshots.c.registered_at.desc())
            .limit(1)
        ).first()
    return None if row is None else dict(row._mapping)


def find_campaign_key(engine: Engine, campaign_id: str) -> int | None:
    """The campaign's key if it is registered in this ledger."""
    with engine.connect() as connection:
        value = connection.execute(
            sa.select(campaigns.c.campaign_key).where(campaigns.c.campaign_id == campaign_id)
        ).scalar()
    return None if value is None else int(value)
