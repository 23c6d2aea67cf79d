"""The ledger's tables (SQLAlchemy Core) for the core campaign and every program.

One row in ``grants`` per (campaign, item, user, issue).  Its primary key is the grant key
(:mod:`pipeline.ledger.grant_key`) and a CHECK constraint pins ``user_bucket`` to the partition
function of ``user_id`` (see :mod:`pipeline.grants.partitioning`), so a duplicate grant is impossible
at the database level while one pipeline partition's grants stay one contiguous range of the key.
The ledger is append-only: triggers (``sql/<dialect>/views.sql``) refuse UPDATE and DELETE of grants
and voids; corrections are new rows in ``grant_voids``.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Dialect

from pipeline.campaigns import ITEM_KINDS
from pipeline.errors import invariant
from pipeline.grants.partitioning import BUCKET_MODULUS, BUCKET_MULTIPLIER
from pipeline.ledger.grant_key import GRANT_KEY, grant_key_columns

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
    # "<ENTITLE_WORKER_NAME or host name>:<pid>" of the process that made the attempt (null before version 12).
    sa.Column("worker", sa.String(255), nullable=True),
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
    # (docs/how-to/operate-the-pass-program.md). No index on applied_at (dropped in schema version 11):
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

delivery_answers = sa.Table(
    "delivery_answers",
    metadata,
    # The grant's ledger key: "what is left to deliver in partition P" is one range scan of
    # grants merged with one range scan of this table.
    *grant_key_columns(),
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

# Revocations at the issuer (schema version 8): `entitle deliver` revokes every voided grant of an
# issuer's items (except one the issuer answered conflict for); one row per such grant.
REVOCATION_OUTCOMES = ("revoked", "already_revoked", "not_found", "failed")

delivery_revocations = sa.Table(
    "delivery_revocations",
    metadata,
    *grant_key_columns(),
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


def void_of_grant() -> sa.ColumnElement[bool]:
    """The join condition of a grant and its void: equal on every column of the grant key."""
    return sa.and_(*(grant_voids.c[column] == grants.c[column] for column in GRANT_KEY))
