"""Merchant cash claims: intake from CSV or Parquet, one case per merchant, payouts as ledger grants.

Intake validates every row (a malformed field goes to a quarantine Parquet file
naming the row, the field and the reason; a file with too large a bad share is
refused whole, nothing recorded), records each claim once under its claim id
with its intake status (``accepted``, ``outside_intake_window``,
``below_minimum_loss``, ``after_decision``) and re-derives the case of every
merchant it touched, in one transaction.  A case merges a merchant's accepted
claims: identical content (loss and evidence) is one case with every claim id
kept; differing content sends the case to review (``conflicting_claims``).
The tier comes from the program file.

Payouts are grants of the program's cash item (``user_id`` = merchant id,
``issue_no`` 0, the amount on the row): the ledger's primary key makes a second
payout to a merchant impossible, and each batch of payouts and the cases it marks
``paid`` commit together, so a crash and a rerun pay exactly the planned cases.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import IntegrityError

from pipeline import ledger, schemas
from pipeline.campaigns import Campaign
from pipeline.config import Settings
from pipeline.errors import EntitleError, SnapshotError, invariant
from pipeline.grants.partitioning import user_bucket
from pipeline.ledger import (
    CampaignKeys,
    grant_voids,
    grants,
    merchant_cases,
    merchant_claims,
    merchant_intake_files,
    pgcopy,
    write_transaction,
)
from pipeline.programs.merchant_cash.program import LOSS_KRW_MAX, Program, load_program

CLAIM_COLUMNS = ("claim_id", "merchant_id", "submitted_at", "loss_krw")
CLAIM_ID_CHARS_MAX = 64
CLAIM_FILE_ROWS_MAX = 2_000_000
INT64_MAX = 2**63 - 1
EXAMPLES_IN_MESSAGE_MAX = 5
SQL_IN_CHUNK_MAX = 500  # ids per IN (...) list: well under SQLite's and psycopg's parameter limits
PAYOUT_BATCH_CASES_MAX = 5_000  # payouts per transaction
PAYOUT_PARTITION_ID = 0  # payouts are not partitioned: every one is recorded under partition 0
PAYOUT_SNAPSHOT_ID = "claims"  # runs record a snapshot id; a payout run pays decided cases, not a snapshot
CLAIM_FILE_SUFFIXES = (".csv", ".parquet", ".pq")
DECIDED_STATES = ("approved", "rejected", "paid")
PAYABLE_STATES = ("auto_tier", "approved")
REVIEW_CONFLICTING = "conflicting_claims"
REVIEW_INCOMPLETE = "incomplete_evidence"
REVIEW_TIER = "tier_review"
_CLAIM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_WHOLE = re.compile(r"^[+-]?[0-9]+$")
_YES = frozenset({"yes", "y", "true", "1"})
_NO = frozenset({"no", "n", "false", "0"})
_LOCK_PAYOUTS = -2  # second key of the PostgreSQL advisory lock that serialises a program's writers


class ClaimsInputError(SnapshotError):
    """A claims file cannot be read, lacks a column, or has too large a share of malformed rows (exit 3)."""


@dataclass(frozen=True)
class OpenProgram:
    """An open merchant program: settings, the validated program, the ledger engine and its keys."""

    settings: Settings
    program: Program
    engine: Engine
    keys: CampaignKeys

    @property
    def campaign_key(self) -> int:
        """The program's campaign key in the ledger."""
        return self.keys.campaign_key

    @property
    def item_key(self) -> int:
        """The key of the program's cash item."""
        return self.keys.item_keys[self.program.item_sku]

    @property
    def campaign(self) -> Campaign:
        """The program as the ledger's campaign (its one item is the cash payout)."""
        return self.program.campaign()

    @property
    def folder(self) -> Path:
        """Where the program's quarantine files go: ``$ENTITLE_HOME/programs/<id>``."""
        return self.settings.home / "programs" / self.program.program_id


def open_program(settings: Settings, program_file: Path | None) -> OpenProgram:
    """Validate the program, create the ledger schema if needed and register the program as a campaign."""
    program = load_program(program_file)
    settings.home.mkdir(parents=True, exist_ok=True)
    engine = ledger.create_ledger_engine(settings.ledger_url)
    ledger.create_schema(engine)
    keys = ledger.register_campaign(engine, program.campaign(), settings.clock())
    return OpenProgram(settings, program, engine, keys)


def case_id(merchant_id: int) -> str:
    """The case id reviewers type: ``mc-<merchant id>`` (one case per merchant and program)."""
    return f"mc-{merchant_id}"


def parse_case_id(text: str) -> int | None:
    """The merchant id of a case id (``mc-123`` or ``123``), or None when it is neither."""
    value = text.strip().lower().removeprefix("mc-")
    return int(value) if value.isdigit() and 0 < int(value) <= INT64_MAX else None


# --------------------------------------------------------------------------- reading a claims file


@dataclass(frozen=True)
class Claim:
    """One valid claim row."""

    claim_id: str
    merchant_id: int
    submitted_at: dt.datetime
    loss_krw: int
    evidence_provided: tuple[str, ...]
    evidence_missing: tuple[str, ...]
    row_number: int

    @property
    def content(self) -> tuple[int, tuple[str, ...], tuple[str, ...]]:
        """What makes two claims of a merchant the same case: the loss and the evidence."""
        return (self.loss_krw, self.evidence_provided, self.evidence_missing)

    def content_sha256(self) -> str:
        """Digest of everything the claim says (same claim id, same digest, or the id was reused)."""
        text = (
            f"{self.merchant_id}|{ledger.to_epoch_us(self.submitted_at)}|{self.loss_krw}|"
            f"{','.join(self.evidence_provided)}|{','.join(self.evidence_missing)}"
        )
        return hashlib.sha256(text.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class Problem:
    """One malformed field of one row."""

    row_number: int
    claim_id: str | None
    field: str
    raw_value: str | None
    reason: str


@dataclass
class ClaimsFile:
    """A claims file read and validated: its valid claims and its problems."""

    path: Path
    sha256: str
    rows_read: int
    claims: list[Claim] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    duplicate_rows: int = 0

    @property
    def bad_rows(self) -> int:
        """Rows with at least one problem."""
        return len({p.row_number for p in self.problems})


def read_claims_file(path: Path, program: Program) -> ClaimsFile:
    """Read and validate every row of a claims file (CSV or Parquet); never writes anything."""
    if not path.is_file():
        raise ClaimsInputError(f"{path}: no such file; give a .csv or .parquet claims file")
    if not path.name.lower().endswith(CLAIM_FILE_SUFFIXES):
        raise ClaimsInputError(f"{path}: unknown file type; use .csv or .parquet")
    content = path.read_bytes()
    try:
        if path.name.lower().endswith(".csv"):
            frame = pl.read_csv(content, infer_schema=False)
        else:
            frame = pl.read_parquet(content)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise ClaimsInputError(f"{path}: not a readable claims file ({exc}); is it truncated?") from exc
    required = (*CLAIM_COLUMNS, *program.evidence)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise ClaimsInputError(
            f"{path}: missing column(s) {missing}; a claims file needs {list(required)} (found {frame.columns[:20]})"
        )
    if frame.height == 0:
        raise ClaimsInputError(f"{path}: the file has no data rows")
    if frame.height > CLAIM_FILE_ROWS_MAX:
        raise ClaimsInputError(f"{path}: {frame.height:,} rows; split it into files of at most {CLAIM_FILE_ROWS_MAX:,}")
    result = ClaimsFile(path, hashlib.sha256(content).hexdigest(), frame.height)
    first_row: dict[str, Claim] = {}
    for number, row in enumerate(frame.select(required).iter_rows(named=True), start=1):
        claim = _parse_row(program, number, row, result.problems)
        if claim is None:
            continue
        earlier = first_row.get(claim.claim_id)
        if earlier is None:
            first_row[claim.claim_id] = claim
            result.claims.append(claim)
        elif earlier.content_sha256() == claim.content_sha256():
            result.duplicate_rows += 1  # the same claim twice in one file: recorded once
        else:
            result.problems.append(
                Problem(
                    number,
                    claim.claim_id,
                    "claim_id",
                    claim.claim_id,
                    f"claim id repeated with different content (first at row {earlier.row_number}); a changed claim "
                    "needs a new claim id",
                )
            )
    return result


def _parse_row(program: Program, number: int, row: dict[str, Any], problems: list[Problem]) -> Claim | None:
    raw_claim_id = None if row["claim_id"] is None else str(row["claim_id"]).strip()
    found: list[Problem] = []

    def bad(column: str, reason: str) -> None:
        found.append(Problem(number, raw_claim_id, column, _text(row[column]), reason))

    claim_id = raw_claim_id or None
    if claim_id is None:
        bad("claim_id", "missing")
    elif len(claim_id) > CLAIM_ID_CHARS_MAX or not _CLAIM_ID.match(claim_id):
        bad("claim_id", f"must be 1-{CLAIM_ID_CHARS_MAX} letters, digits, '_', '.', ':' or '-'")
    merchant_id, reason = _whole_number(row["merchant_id"])
    if reason is not None:
        bad("merchant_id", reason)
    elif merchant_id is None or not 0 < merchant_id <= INT64_MAX:
        bad("merchant_id", "out of range: a merchant id is a positive 64-bit integer")
    loss, reason = _whole_number(row["loss_krw"])
    if reason is not None:
        bad("loss_krw", reason)
    elif loss is None or loss < 0:
        bad("loss_krw", "negative: a reported loss is 0 or more won")
    elif loss > LOSS_KRW_MAX:
        bad("loss_krw", f"above {LOSS_KRW_MAX:,} won: a typo?")
    submitted_at, reason = _instant(row["submitted_at"], program)
    if reason is not None:
        bad("submitted_at", reason)
    provided: list[str] = []
    lacking: list[str] = []
    for kind in program.evidence:
        answer, reason = _yes_no(row[kind])
        if reason is not None:
            bad(kind, reason)
        elif answer:
            provided.append(kind)
        else:
            lacking.append(kind)
    if found:
        problems.extend(found)
        return None
    invariant(claim_id is not None and merchant_id is not None and loss is not None, "row checked above")
    invariant(submitted_at is not None, "row checked above")
    assert claim_id is not None and merchant_id is not None and loss is not None and submitted_at is not None  # mypy
    return Claim(claim_id, merchant_id, submitted_at, loss, tuple(sorted(provided)), tuple(sorted(lacking)), number)


def _text(value: Any) -> str | None:
    return None if value is None else str(value)


def _whole_number(value: Any) -> tuple[int | None, str | None]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "missing"
    if isinstance(value, bool):
        return None, "not a whole number"
    if isinstance(value, int):
        return value, None
    if isinstance(value, float):
        return (int(value), None) if value.is_integer() and abs(value) < 2.0**63 else (None, "not a whole number")
    text = str(value).strip()
    if not _WHOLE.match(text):
        return None, "not a whole number (digits only, no separators or currency signs)"
    return int(text), None


def _instant(value: Any, program: Program) -> tuple[dt.datetime | None, str | None]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "missing"
    if isinstance(value, dt.datetime):
        moment = value
    elif isinstance(value, dt.date):
        return None, "a date without a time; give the submission instant (2022-10-20T14:03:00+09:00)"
    else:
        try:
            moment = dt.datetime.fromisoformat(str(value).strip())
        except ValueError:
            return None, "not an ISO 8601 timestamp such as 2022-10-20T14:03:00+09:00"
    # A timestamp without offset is local time of the program's zone (Asia/Seoul).
    return (moment if moment.tzinfo is not None else moment.replace(tzinfo=program.zone)), None


def _yes_no(value: Any) -> tuple[bool | None, str | None]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None, "missing: say yes or no"
    if isinstance(value, bool):
        return value, None
    text = str(value).strip().lower()
    if text in _YES:
        return True, None
    if text in _NO:
        return False, None
    return None, "unknown value: use yes or no"


# --------------------------------------------------------------------------- ingest


@dataclass(frozen=True)
class IngestReport:
    """What ingesting one claims file did."""

    source_file: str
    file_sha256: str
    already_ingested: bool
    rows_read: int
    claims_new: int
    claims_known: int
    duplicate_rows: int
    quarantined_rows: int
    quarantine_file: str | None
    by_status: dict[str, int]
    cases_changed: int
    after_decision: list[str]  # case ids that got a claim after their decision: look at them

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json and XCom."""
        return asdict(self)


def ingest_file(op: OpenProgram, path: Path) -> IngestReport:
    """Validate a claims file and record its new claims and the cases they touch, in one transaction.

    Re-ingesting a file (same bytes) changes nothing; a claim id already recorded with the
    same content is known, with different content it is quarantined.
    """
    read = read_claims_file(path, op.program)
    now = op.settings.clock()
    recorded = _recorded_file(op, read.sha256)
    if recorded is not None:
        return recorded
    program = op.program
    with write_transaction(op.engine) as connection:
        _lock(connection, op.campaign_key)
        stored = _stored_claims(connection, op.campaign_key, [c.claim_id for c in read.claims])
        new: list[Claim] = []
        known = 0
        for claim in read.claims:
            before = stored.get(claim.claim_id)
            if before is None:
                new.append(claim)
            elif before[0] == claim.content_sha256():
                known += 1
            else:
                read.problems.append(
                    Problem(
                        claim.row_number,
                        claim.claim_id,
                        "claim_id",
                        claim.claim_id,
                        f"claim id already recorded with different content (from {before[1]} row {before[2]}); a "
                        "changed claim needs a new claim id",
                    )
                )
        quarantine = _quarantine_frame(read)
        share = read.bad_rows / read.rows_read
        if share > program.rejected_share_max:
            failed = op.folder / "rejected" / f"{path.name}.{read.sha256[:12]}.quarantine.parquet"
            schemas.write_parquet(quarantine, "merchant_quarantine", failed)
            examples = "; ".join(
                f"row {p.row_number} {p.field}: {p.reason}" for p in read.problems[:EXAMPLES_IN_MESSAGE_MAX]
            )
            raise ClaimsInputError(
                f"{path}: {read.bad_rows:,} of {read.rows_read:,} rows are malformed ({share:.2%}), more than the "
                f"program allows ({program.rejected_share_max:.2%}); nothing was recorded. First: {examples}. All: "
                f"{failed}. Fix the file and ingest it again."
            )
        decided = _decided_merchants(connection, op.campaign_key, {c.merchant_id for c in new})
        rows: list[dict[str, Any]] = []
        by_status: dict[str, int] = {}
        after_decision: set[int] = set()
        for claim in new:
            window = program.window_of(claim.submitted_at)
            if window is None:
                status = "outside_intake_window"
            elif claim.loss_krw < program.loss_min_krw:
                status = "below_minimum_loss"
            elif claim.merchant_id in decided:
                status = "after_decision"
                after_decision.add(claim.merchant_id)
            else:
                status = "accepted"
            by_status[status] = by_status.get(status, 0) + 1
            rows.append(
                {
                    "campaign_key": op.campaign_key,
                    "claim_id": claim.claim_id,
                    "merchant_id": claim.merchant_id,
                    "submitted_at": claim.submitted_at,
                    "loss_krw": claim.loss_krw,
                    "evidence_provided": ",".join(claim.evidence_provided),
                    "evidence_missing": ",".join(claim.evidence_missing),
                    "content_sha256": claim.content_sha256(),
                    "status": status,
                    "intake_window": None if window is None else window.name,
                    "source_file": str(path),
                    "source_row": claim.row_number,
                    "ingested_at": now,
                }
            )
        if rows:
            connection.execute(merchant_claims.insert(), rows)
        touched = sorted({r["merchant_id"] for r in rows if r["status"] == "accepted"})
        changed = refresh_cases(connection, op, touched, now)
        quarantine_file = None
        if quarantine.height:
            target = op.folder / "quarantine" / f"{path.name}.{read.sha256[:12]}.quarantine.parquet"
            schemas.write_parquet(quarantine, "merchant_quarantine", target)
            quarantine_file = str(target)
        report = IngestReport(
            source_file=str(path),
            file_sha256=read.sha256,
            already_ingested=False,
            rows_read=read.rows_read,
            claims_new=len(rows),
            claims_known=known,
            duplicate_rows=read.duplicate_rows,
            quarantined_rows=read.bad_rows,
            quarantine_file=quarantine_file,
            by_status=dict(sorted(by_status.items())),
            cases_changed=changed,
            after_decision=[case_id(m) for m in sorted(after_decision)],
        )
        connection.execute(
            merchant_intake_files.insert().values(
                campaign_key=op.campaign_key,
                file_sha256=read.sha256,
                source_file=str(path),
                rows_read=read.rows_read,
                claims_new=len(rows),
                claims_known=known,
                duplicate_rows=read.duplicate_rows,
                quarantined_rows=read.bad_rows,
                quarantine_file=quarantine_file,
                ingested_at=now,
            )
        )
    return report


def _recorded_file(op: OpenProgram, sha256: str) -> IngestReport | None:
    """The report of an earlier ingest of the same bytes, or None."""
    with op.engine.connect() as connection:
        row = connection.execute(
            sa.select(merchant_intake_files).where(
                merchant_intake_files.c.campaign_key == op.campaign_key,
                merchant_intake_files.c.file_sha256 == sha256,
            )
        ).first()
    if row is None:
        return None
    return IngestReport(
        source_file=str(row.source_file),
        file_sha256=sha256,
        already_ingested=True,
        rows_read=int(row.rows_read),
        claims_new=0,
        claims_known=int(row.claims_new) + int(row.claims_known),
        duplicate_rows=int(row.duplicate_rows),
        quarantined_rows=int(row.quarantined_rows),
        quarantine_file=row.quarantine_file,
        by_status={},
        cases_changed=0,
        after_decision=[],
    )


def _quarantine_frame(read: ClaimsFile) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "source_file": [str(read.path)] * len(read.problems),
            "row_number": [p.row_number for p in read.problems],
            "claim_id": [p.claim_id for p in read.problems],
            "field": [p.field for p in read.problems],
            "raw_value": [p.raw_value for p in read.problems],
            "reason": [p.reason for p in read.problems],
        },
        schema={
            "source_file": pl.String,
            "row_number": pl.Int64,
            "claim_id": pl.String,
            "field": pl.String,
            "raw_value": pl.String,
            "reason": pl.String,
        },
    ).sort("row_number", "field", maintain_order=True)


def _chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    for start in range(0, len(values), SQL_IN_CHUNK_MAX):
        yield values[start : start + SQL_IN_CHUNK_MAX]


def _stored_claims(connection: Connection, campaign_key: int, claim_ids: list[str]) -> dict[str, tuple[str, str, int]]:
    """Recorded claims by id: (content digest, source file, source row)."""
    found: dict[str, tuple[str, str, int]] = {}
    for chunk in _chunks(claim_ids):
        rows = connection.execute(
            sa.select(
                merchant_claims.c.claim_id,
                merchant_claims.c.content_sha256,
                merchant_claims.c.source_file,
                merchant_claims.c.source_row,
            ).where(merchant_claims.c.campaign_key == campaign_key, merchant_claims.c.claim_id.in_(chunk))
        )
        for claim_id, digest, source, row in rows:
            found[str(claim_id)] = (str(digest), str(source), int(row))
    return found


def _decided_merchants(connection: Connection, campaign_key: int, merchant_ids: set[int]) -> set[int]:
    decided: set[int] = set()
    for chunk in _chunks(sorted(merchant_ids)):
        decided.update(
            int(m)
            for m in connection.execute(
                sa.select(merchant_cases.c.merchant_id).where(
                    merchant_cases.c.campaign_key == campaign_key,
                    merchant_cases.c.merchant_id.in_(chunk),
                    merchant_cases.c.state.in_(DECIDED_STATES),
                )
            ).scalars()
        )
    return decided


def _lock(connection: Connection, campaign_key: int) -> None:
    """Serialise a program's writers (SQLite's BEGIN IMMEDIATE already does)."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:c, :k)"), {"c": campaign_key, "k": _LOCK_PAYOUTS})


# --------------------------------------------------------------------------- cases


@dataclass(frozen=True)
class CasePlan:
    """What a merchant's accepted claims say the case is, before any decision."""

    state: str  # auto_tier | needs_review
    tier: str
    loss_krw: int
    amount_krw: int | None
    review_reason: str | None
    claim_count: int


def plan_case(program: Program, contents: Sequence[tuple[int, tuple[str, ...], tuple[str, ...]]]) -> CasePlan:
    """Classify a merchant's accepted claims (their loss and evidence) by the program's rules."""
    invariant(len(contents) > 0, "a case needs at least one accepted claim")
    loss = max(c[0] for c in contents)
    tier = program.tier_for(loss)
    if len(set(contents)) > 1:
        return CasePlan("needs_review", tier.name, loss, None, REVIEW_CONFLICTING, len(contents))
    if contents[0][2]:
        return CasePlan("needs_review", tier.name, loss, None, REVIEW_INCOMPLETE, len(contents))
    if tier.review or tier.amount_krw is None:
        return CasePlan("needs_review", tier.name, loss, None, REVIEW_TIER, len(contents))
    return CasePlan("auto_tier", tier.name, loss, tier.amount_krw, None, len(contents))


def accepted_contents(
    connection: Connection, campaign_key: int, merchant_ids: Sequence[int] | None
) -> dict[int, list[tuple[int, tuple[str, ...], tuple[str, ...]]]]:
    """Each merchant's accepted claims as (loss, evidence provided, evidence missing); all merchants for None."""
    query = sa.select(
        merchant_claims.c.merchant_id,
        merchant_claims.c.loss_krw,
        merchant_claims.c.evidence_provided,
        merchant_claims.c.evidence_missing,
    ).where(merchant_claims.c.campaign_key == campaign_key, merchant_claims.c.status == "accepted")
    batches = (
        [query]
        if merchant_ids is None
        else [query.where(merchant_claims.c.merchant_id.in_(c)) for c in _chunks(merchant_ids)]
    )
    found: dict[int, list[tuple[int, tuple[str, ...], tuple[str, ...]]]] = {}
    for batch in batches:
        for merchant, loss, provided, lacking in connection.execute(batch):
            found.setdefault(int(merchant), []).append((int(loss), _kinds(provided), _kinds(lacking)))
    return found


def _kinds(text: str) -> tuple[str, ...]:
    return tuple(k for k in str(text).split(",") if k)


def refresh_cases(connection: Connection, op: OpenProgram, merchant_ids: Sequence[int] | None, now: dt.datetime) -> int:
    """Create or update the undecided cases of these merchants (all for None) from their claims; returns changes."""
    contents = accepted_contents(connection, op.campaign_key, merchant_ids)
    existing: dict[int, Any] = {}
    for chunk in _chunks(sorted(contents)):
        for row in connection.execute(
            sa.select(merchant_cases).where(
                merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.merchant_id.in_(chunk)
            )
        ):
            existing[int(row.merchant_id)] = row
    changed = 0
    new_cases: list[dict[str, Any]] = []
    for merchant, claims in sorted(contents.items()):
        plan = plan_case(op.program, claims)
        values = {
            "state": plan.state,
            "tier": plan.tier,
            "loss_krw": plan.loss_krw,
            "amount_krw": plan.amount_krw,
            "review_reason": plan.review_reason,
            "claim_count": plan.claim_count,
        }
        case_row = existing.get(merchant)
        if case_row is None:
            new_cases.append(
                {
                    "campaign_key": op.campaign_key,
                    "merchant_id": merchant,
                    "opened_at": now,
                    "updated_at": now,
                    **values,
                }
            )
        elif case_row.state not in DECIDED_STATES and any(getattr(case_row, k) != v for k, v in values.items()):
            connection.execute(
                merchant_cases.update()
                .where(merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.merchant_id == merchant)
                .values(updated_at=now, **values)
            )
            changed += 1
    if new_cases:
        connection.execute(merchant_cases.insert(), new_cases)  # one executemany
    return changed + len(new_cases)


def assign_cases(op: OpenProgram) -> int:
    """Re-derive every undecided case from its claims and the program's tiers (idempotent); returns changes."""
    with write_transaction(op.engine) as connection:
        _lock(connection, op.campaign_key)
        return refresh_cases(connection, op, None, op.settings.clock())


# --------------------------------------------------------------------------- payouts


@dataclass(frozen=True)
class PayReport:
    """What one ``entitle claims pay`` did."""

    run_id: str
    paid: int
    paid_krw: int
    already_granted: int
    batches: int

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json and XCom."""
        return asdict(self)


def pay(
    op: OpenProgram,
    run_id: str | None = None,
    trigger: str = "cli",
    batch_cases_max: int = PAYOUT_BATCH_CASES_MAX,
    after_batch: Callable[[int], None] | None = None,
) -> PayReport:
    """Grant every payable case (auto tier or approved) its amount, at most once per merchant; idempotent.

    Each batch's grants and the cases it marks paid commit together; ``after_batch``
    (tests: a crash between batches) is called with the batch number after each commit.
    """
    invariant(batch_cases_max > 0, "batch_cases_max must be positive")
    now = op.settings.clock()
    if op.engine.dialect.name == "postgresql":
        pgcopy.ensure_campaign_table(op.engine, op.campaign_key)
    run_id = run_id or f"{trigger}__claims-pay__{now:%Y%m%dT%H%M%SZ}"
    paid = paid_krw = already = batches = 0
    if not _payable_count(op):
        return PayReport(run_id, paid, paid_krw, already, batches)  # nothing to pay: no run row either
    run_key = ledger.register_run(op.engine, run_id, op.campaign_key, PAYOUT_SNAPSHOT_ID, trigger, now)
    while True:
        with write_transaction(op.engine) as connection:
            _lock(connection, op.campaign_key)
            cases = connection.execute(
                sa.select(merchant_cases.c.merchant_id, merchant_cases.c.amount_krw)
                .where(merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.state.in_(PAYABLE_STATES))
                .order_by(merchant_cases.c.merchant_id)
                .limit(batch_cases_max)
            ).all()
            if not cases:
                break
            merchants = [int(m) for m, _ in cases]
            granted = _granted(connection, op, merchants)
            rows: list[dict[str, Any]] = []
            for merchant, amount in cases:
                invariant(amount is not None and int(amount) > 0, f"payable case {case_id(merchant)} has no amount")
                if int(merchant) in granted:
                    already += 1  # a grant exists already: the reconciliation compares its amount
                    continue
                rows.append(
                    {
                        "campaign_key": op.campaign_key,
                        "user_bucket": user_bucket(int(merchant)),
                        "user_id": int(merchant),
                        "item_key": op.item_key,
                        "issue_no": 0,
                        "partition_id": PAYOUT_PARTITION_ID,
                        "run_key": run_key,
                        "amount_krw": int(amount),
                        "valid_from": op.program.starts_at,
                        "valid_until": None,
                        "granted_at": now,
                    }
                )
            try:
                if rows:
                    connection.execute(grants.insert(), rows)
            except IntegrityError as exc:  # only if someone bypassed the program's lock
                raise EntitleError(
                    f"a payout of program {op.program.program_id!r} was written by another process meanwhile; "
                    "nothing of this batch was written: run `entitle claims pay` again"
                ) from exc
            for chunk in _chunks(merchants):
                connection.execute(
                    merchant_cases.update()
                    .where(merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.merchant_id.in_(chunk))
                    .values(state="paid", updated_at=now)
                )
            paid += len(rows)
            paid_krw += sum(int(r["amount_krw"]) for r in rows)
        batches += 1
        if after_batch is not None:
            after_batch(batches)
    return PayReport(run_id, paid, paid_krw, already, batches)


def _payable_count(op: OpenProgram) -> int:
    with op.engine.connect() as connection:
        return int(
            connection.execute(
                sa.select(sa.func.count()).where(
                    merchant_cases.c.campaign_key == op.campaign_key, merchant_cases.c.state.in_(PAYABLE_STATES)
                )
            ).scalar_one()
        )


def _granted(connection: Connection, op: OpenProgram, merchants: Sequence[int]) -> set[int]:
    """Merchants that already hold a grant of the program's item (live or voided)."""
    found: set[int] = set()
    for chunk in _chunks(list(merchants)):
        found.update(
            int(u)
            for u in connection.execute(
                sa.select(grants.c.user_id).where(
                    grants.c.campaign_key == op.campaign_key,
                    grants.c.item_key == op.item_key,
                    grants.c.user_bucket.in_([user_bucket(m) for m in chunk]),
                    grants.c.user_id.in_(chunk),
                )
            ).scalars()
        )
    return found


def live_payouts(connection: Connection, op: OpenProgram) -> dict[int, list[int]]:
    """Live (not voided) payout amounts per merchant."""
    voided = sa.exists().where(ledger.void_of_grant())
    found: dict[int, list[int]] = {}
    for user, amount in connection.execute(
        sa.select(grants.c.user_id, grants.c.amount_krw).where(
            grants.c.campaign_key == op.campaign_key, grants.c.item_key == op.item_key, ~voided
        )
    ):
        found.setdefault(int(user), []).append(int(amount or 0))
    return found


def voided_payouts(connection: Connection, op: OpenProgram) -> dict[int, int]:
    """The amount of each merchant's voided payout (who, when and why are in grant_voids and grant_history)."""
    found: dict[int, int] = {}
    for user, amount in connection.execute(
        sa.select(grants.c.user_id, grants.c.amount_krw)
        .select_from(grants.join(grant_voids, ledger.void_of_grant()))
        .where(grants.c.campaign_key == op.campaign_key, grants.c.item_key == op.item_key)
    ):
        found[int(user)] = found.get(int(user), 0) + int(amount or 0)
    return found
