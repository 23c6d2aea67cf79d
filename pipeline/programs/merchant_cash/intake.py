"""Intake of merchant cash claims from CSV or Parquet files, with a quarantine for malformed rows.

Intake validates every row (a malformed field goes to a quarantine Parquet file
naming the row, the field and the reason; a file with too large a bad share is
refused whole, nothing recorded), records each claim once under its claim id
with its intake status (``accepted``, ``outside_intake_window``,
``below_minimum_loss``, ``after_decision``) and re-derives the case of every
merchant it touched, in one transaction. Ingesting the same file again changes nothing.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Connection

from pipeline import ledger, schemas
from pipeline.errors import SnapshotError, invariant
from pipeline.ledger import merchant_cases, merchant_claims, merchant_intake_files, write_transaction
from pipeline.programs.merchant_cash.cases import DECIDED_STATES, INT64_MAX, case_id, refresh_cases
from pipeline.programs.merchant_cash.context import OpenProgram, chunks, lock_program
from pipeline.programs.merchant_cash.program import LOSS_KRW_MAX, Program

CLAIM_COLUMNS = ("claim_id", "merchant_id", "submitted_at", "loss_krw")
CLAIM_ID_CHARS_MAX = 64
CLAIM_FILE_ROWS_MAX = 2_000_000
EXAMPLES_IN_MESSAGE_MAX = 5
CLAIM_FILE_SUFFIXES = (".csv", ".parquet", ".pq")
_CLAIM_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.:-]*$")
_WHOLE = re.compile(r"^[+-]?[0-9]+$")
_YES = frozenset({"yes", "y", "true", "1"})
_NO = frozenset({"no", "n", "false", "0"})


class ClaimsInputError(SnapshotError):
    """A claims file cannot be read, lacks a column, or has too large a share of malformed rows (exit 3)."""


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
        lock_program(connection, op.campaign_key)
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


def _stored_claims(connection: Connection, campaign_key: int, claim_ids: list[str]) -> dict[str, tuple[str, str, int]]:
    """Recorded claims by id: (content digest, source file, source row)."""
    found: dict[str, tuple[str, str, int]] = {}
    for chunk in chunks(claim_ids):
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
    for chunk in chunks(sorted(merchant_ids)):
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
