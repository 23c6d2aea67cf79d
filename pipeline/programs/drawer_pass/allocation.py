"""The first-come-first-served pass: open a program's ledger, allocate passes, report the stock, reconcile.

Order
    Applications are served strictly in the order ``(applied_at, user_bucket, user_id)``:
    earlier first; at the same microsecond, the lower :func:`~pipeline.grants.partitioning.user_bucket`
    (a fixed, well-mixed function of the user id) first; equal buckets by user id. Ties are
    therefore decided by a documented, reproducible rule that does not favour old (low) ids.

Windows
    Allocation takes a cut-off ``through`` (default: now minus the program's intake lag) and
    serves every application with ``allocated_through < applied_at <= through`` in one
    transaction, then moves the program's watermark ``allocated_through`` to ``through``.
    Intake refuses (as ``late``) any application at or before the watermark, under the same
    lock, so once a window is allocated nothing can join it: an application's outcome never
    depends on which process ran first, and the earliest-first property holds across every
    batch and every process.

Atomicity
    The program row is locked (PostgreSQL: ``SELECT … FOR UPDATE``; SQLite: ``BEGIN
    IMMEDIATE``); the pass grants (``grants``, item kind ``pass``, ``valid_from`` = the grant
    instant, ``valid_until`` = one calendar month later), the stock counter, the watermark,
    the run row and the allocation row are written in that one transaction. A crash at any
    point leaves nothing; a rerun with the same cut-off finds the window closed and changes
    nothing. A CHECK constraint keeps ``granted <= stock_cap`` in the database itself.

Outcomes are derived, not copied: an application at or before the watermark is ``granted``
when the ledger holds its pass and ``sold_out`` otherwise; later ones are ``pending``.
:mod:`pipeline.programs.drawer_pass.reconciliation` checks that this reading agrees with the
counters and the order (:mod:`pipeline.programs.drawer_pass.reconciliation`).
"""

from __future__ import annotations

import datetime as dt
from dataclasses import asdict, dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline import ledger
from pipeline.campaigns import Campaign
from pipeline.config import Settings
from pipeline.errors import ConfigError, TermsChangedError, invariant
from pipeline.ledger import (
    CampaignKeys,
    CampaignSession,
    Instant,
    pass_allocations,
    pass_applications,
    pass_programs,
    pgcopy,
    write_transaction,
)
from pipeline.programs.drawer_pass.program import PassProgram

# Applications start after this when a program has no watermark yet (intake refuses anything
# before the program opens, so no application is this old).
EPOCH = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
PASS_PARTITION_ID = 0  # pass grants belong to no snapshot partition
PASS_SNAPSHOT_ID = "pass-intake"  # runs.snapshot_id of allocation runs
RUN_TRIGGER = "pass-allocate"
FUTURE_CUTOFF_TOLERANCE_S = 0  # a cut-off after now could close a window applications may still join
OUTCOMES = ("granted", "sold_out", "pending")


@dataclass(eq=False)
class PassContext(CampaignSession):
    """An open pass program: settings, the program and the ledger engine; use it in ``with``."""

    settings: Settings
    program: PassProgram
    engine: Engine
    registered: CampaignKeys | None = None

    def ledger_campaign(self) -> Campaign:
        """The program as a campaign."""
        return self.program.campaign()

    @property
    def campaign_key(self) -> int:
        """The program's campaign key in the ledger."""
        return self.keys.campaign_key

    @property
    def item_key(self) -> int:
        """The key of the program's pass item."""
        return self.keys.item_keys[self.program.sku]


def open_pass(settings: Settings, program: PassProgram) -> PassContext:
    """Open the ledger for a validated pass program: reads and writes nothing (see :func:`register`)."""
    return PassContext(settings, program, ledger.create_ledger_engine(settings.ledger_url))


def register(context: PassContext) -> CampaignKeys:
    """The write step before any other: the ledger's schema if absent, the program as a campaign, its stock row."""
    keys = context.register_campaign()
    program, engine = context.program, context.engine
    _register_program(engine, program, keys.campaign_key, keys.item_keys[program.sku], context.settings.clock())
    if engine.dialect.name == "postgresql":
        pgcopy.ensure_campaign_table(engine, keys.campaign_key)
    return keys


def _register_program(engine: Engine, program: PassProgram, campaign_key: int, item_key: int, now: dt.datetime) -> None:
    """Insert the stock row; refuse a changed cap or validity once any window was allocated."""
    wanted = (program.stock_cap, program.validity_months)
    with engine.connect() as connection:
        row = _program_row(connection, campaign_key)
    if row is not None and (int(row.stock_cap), int(row.validity_months)) == wanted:
        return
    with write_transaction(engine) as connection:
        row = _program_row(connection, campaign_key)
        if row is None:
            connection.execute(
                pass_programs.insert().values(
                    campaign_key=campaign_key,
                    item_key=item_key,
                    stock_cap=program.stock_cap,
                    validity_months=program.validity_months,
                    granted=0,
                    allocated_through=None,
                    registered_at=now,
                )
            )
            return
        if (int(row.stock_cap), int(row.validity_months)) == wanted:
            return
        if row.allocated_through is not None:
            raise TermsChangedError(
                f"{program.source}: pass program {program.program_id!r} was allocated through "
                f"{row.allocated_through.isoformat()} with stock_cap={int(row.stock_cap):,} and "
                f"validity_months={int(row.validity_months)}; the file now says stock_cap={program.stock_cap:,}, "
                f"validity_months={program.validity_months}. The stock and a pass's terms cannot change once "
                "passes were handed out (later applicants were told sold_out): restore the old values, or start a "
                "new program with a new id."
            )
        connection.execute(
            pass_programs.update()
            .where(pass_programs.c.campaign_key == campaign_key)
            .values(stock_cap=program.stock_cap, validity_months=program.validity_months)
        )


def _program_row(connection: Connection, campaign_key: int, lock: str = "") -> Any:
    statement = sa.select(pass_programs).where(pass_programs.c.campaign_key == campaign_key)
    if lock == "update":
        statement = statement.with_for_update()
    elif lock == "share":
        statement = statement.with_for_update(read=True)
    row = connection.execute(statement).first()
    return row


def lock_program(connection: Connection, campaign_key: int, exclusive: bool) -> Any:
    """The program row, locked: exclusively for allocation, shared for intake (PostgreSQL; SQLite's
    ``BEGIN IMMEDIATE`` already serializes every writer)."""
    row = _program_row(connection, campaign_key, "update" if exclusive else "share")
    invariant(row is not None, f"pass program {campaign_key} is not registered")
    return row


@dataclass(frozen=True)
class AllocationReport:
    """What one ``allocate`` did."""

    program_id: str
    allocated: bool  # False: the window was already allocated (a rerun), nothing written
    previous_through: dt.datetime | None
    through: dt.datetime
    run_id: str | None
    granted_at: dt.datetime | None
    valid_until: dt.datetime | None
    considered: int
    granted: int
    sold_out: int
    stock_cap: int
    stock_granted: int

    @property
    def remaining(self) -> int:
        """Passes still in stock after this allocation."""
        return self.stock_cap - self.stock_granted

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json and XCom."""
        values = asdict(self)
        for key in ("previous_through", "through", "granted_at", "valid_until"):
            values[key] = None if values[key] is None else values[key].isoformat()
        values["remaining"] = self.remaining
        return values


def default_cutoff(context: PassContext) -> dt.datetime:
    """Now minus the program's intake lag: the latest instant every batch is assumed to have reached."""
    return context.settings.clock() - dt.timedelta(seconds=context.program.intake_lag_s)


def allocate(context: PassContext, through: dt.datetime | None = None) -> AllocationReport:
    """Serve every application up to ``through`` in order, up to the stock, in one transaction."""
    now = context.settings.clock()
    cutoff = default_cutoff(context) if through is None else through
    invariant(cutoff.tzinfo is not None, "allocation cut-off must be timezone-aware")
    if cutoff > now + dt.timedelta(seconds=FUTURE_CUTOFF_TOLERANCE_S):
        raise ConfigError(
            f"allocation cut-off {cutoff.isoformat()} is in the future (now {now.isoformat()}): applications up to "
            "it may still arrive. Give a cut-off that every application batch has already passed."
        )
    program = context.program
    with write_transaction(context.engine) as connection:
        row = lock_program(connection, context.campaign_key, exclusive=True)
        previous = row.allocated_through
        cap, granted_before = int(row.stock_cap), int(row.granted)
        if previous is not None and cutoff <= previous:
            return AllocationReport(
                program.program_id, False, previous, cutoff, None, None, None, 0, 0, 0, cap, granted_before
            )
        after = EPOCH if previous is None else previous
        considered = _count_window(connection, context.campaign_key, after, cutoff)
        run_id = f"pass__{program.program_id}__{cutoff.astimezone(dt.UTC):%Y%m%dT%H%M%S%fZ}"
        run_key = _register_run(connection, context.campaign_key, run_id, now)
        valid_until = program.valid_until(now)
        to_grant = min(cap - granted_before, considered)
        written = _insert_passes(connection, context, run_key, after, cutoff, to_grant, now, valid_until)
        invariant(written == to_grant, f"allocation wrote {written} passes, planned {to_grant}")
        _advance_stock(connection, context.campaign_key, written, cutoff)
        _record_allocation(
            connection,
            {
                "campaign_key": context.campaign_key,
                "run_key": run_key,
                "previous_through": previous,
                "through": cutoff,
                "granted_at": now,
                "valid_until": valid_until,
                "considered": considered,
                "granted": written,
                "sold_out": considered - written,
                "stock_after": granted_before + written,
            },
        )
    return AllocationReport(
        program.program_id,
        True,
        previous,
        cutoff,
        run_id,
        now,
        valid_until,
        considered,
        written,
        considered - written,
        cap,
        granted_before + written,
    )


def _count_window(connection: Connection, campaign_key: int, after: dt.datetime, through: dt.datetime) -> int:
    a = pass_applications
    return int(
        connection.execute(
            sa.select(sa.func.count()).where(
                a.c.campaign_key == campaign_key, a.c.applied_at > after, a.c.applied_at <= through
            )
        ).scalar_one()
    )


def _register_run(connection: Connection, campaign_key: int, run_id: str, now: dt.datetime) -> int:
    """The allocation's run row (grants.run_key names it), inside the allocation's transaction."""
    return int(
        connection.execute(
            ledger.runs.insert().values(
                run_id=run_id,
                campaign_key=campaign_key,
                snapshot_id=PASS_SNAPSHOT_ID,
                trigger=RUN_TRIGGER,
                started_at=now,
            )
        ).inserted_primary_key[0]  # type: ignore[index]
    )


_INSERT_PASSES = sa.text(
    "INSERT INTO grants (campaign_key, user_bucket, user_id, item_key, issue_no, partition_id, run_key, amount_krw, "
    "valid_from, valid_until, granted_at) "
    "SELECT a.campaign_key, a.user_bucket, a.user_id, :item_key, 0, :partition_id, :run_key, NULL, :granted_at, "
    ":valid_until, :granted_at FROM pass_applications AS a "
    "WHERE a.campaign_key = :c AND a.applied_at > :after AND a.applied_at <= :through "
    "ORDER BY a.applied_at, a.user_bucket, a.user_id LIMIT :take"
).bindparams(
    sa.bindparam("granted_at", type_=Instant()),
    sa.bindparam("valid_until", type_=Instant()),
    sa.bindparam("after", type_=Instant()),
    sa.bindparam("through", type_=Instant()),
)


def _insert_passes(
    connection: Connection,
    context: PassContext,
    run_key: int,
    after: dt.datetime,
    through: dt.datetime,
    take: int,
    granted_at: dt.datetime,
    valid_until: dt.datetime,
) -> int:
    """Grant a pass to the first ``take`` applications of the window, in the documented order."""
    if take <= 0:
        return 0
    result = connection.execute(
        _INSERT_PASSES,
        {
            "item_key": context.item_key,
            "partition_id": PASS_PARTITION_ID,
            "run_key": run_key,
            "granted_at": granted_at,
            "valid_until": valid_until,
            "c": context.campaign_key,
            "after": after,
            "through": through,
            "take": take,
        },
    )
    return int(result.rowcount)


def _advance_stock(connection: Connection, campaign_key: int, granted: int, through: dt.datetime) -> None:
    """Add the window's passes to the stock counter and move the watermark (CHECK: never above the cap)."""
    connection.execute(
        pass_programs.update()
        .where(pass_programs.c.campaign_key == campaign_key)
        .values(granted=pass_programs.c.granted + granted, allocated_through=through)
    )


def _record_allocation(connection: Connection, values: dict[str, Any]) -> None:
    connection.execute(pass_allocations.insert().values(**values))


# --------------------------------------------------------------------------- stock and status


@dataclass(frozen=True)
class StockReport:
    """A program's stock and applications at a glance."""

    program_id: str
    item_sku: str
    stock_cap: int
    granted: int
    remaining: int
    sold_out: int
    pending: int
    applications: int
    allocated_through: dt.datetime | None
    allocations: int
    batches: int

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json."""
        values = asdict(self)
        at = values["allocated_through"]
        values["allocated_through"] = None if at is None else at.isoformat()
        return values


def stock(context: PassContext) -> StockReport:
    """Cap, granted, remaining, sold-out and pending counts of the program."""
    key = context.campaign_key
    with context.engine.connect() as connection:
        row = _program_row(connection, key)
        totals = connection.execute(
            sa.select(sa.func.count(), sa.func.coalesce(sa.func.sum(pass_allocations.c.sold_out), 0)).where(
                pass_allocations.c.campaign_key == key
            )
        ).one()
        applications = int(
            connection.execute(
                sa.select(sa.func.count()).select_from(pass_applications).where(pass_applications.c.campaign_key == key)
            ).scalar_one()
        )
        after = row.allocated_through or EPOCH
        pending = int(
            connection.execute(
                sa.select(sa.func.count()).where(
                    pass_applications.c.campaign_key == key, pass_applications.c.applied_at > after
                )
            ).scalar_one()
        )
        batches = int(
            connection.execute(sa.select(sa.func.count()).where(ledger.pass_batches.c.campaign_key == key)).scalar_one()
        )
    cap, granted = int(row.stock_cap), int(row.granted)
    return StockReport(
        context.program.program_id,
        context.program.sku,
        cap,
        granted,
        cap - granted,
        int(totals[1]),
        pending,
        applications,
        row.allocated_through,
        int(totals[0]),
        batches,
    )


_USER_STATUS = sa.text(
    "SELECT a.user_id, a.applied_at, a.user_bucket, b.source_file, g.valid_from, g.valid_until, g.run_key, "
    f"(SELECT count(*) FROM grant_voids AS v WHERE {ledger.same_grant('v')}) AS voided "
    "FROM pass_applications AS a JOIN pass_batches AS b ON b.batch_key = a.batch_key "
    "LEFT JOIN grants AS g ON g.campaign_key = a.campaign_key AND g.user_bucket = a.user_bucket "
    " AND g.user_id = a.user_id AND g.item_key = :item_key AND g.issue_no = 0 "
    "WHERE a.campaign_key = :c AND a.user_id = :u"
).columns(
    sa.column("user_id", sa.BigInteger),
    sa.column("applied_at", Instant()),
    sa.column("user_bucket", sa.BigInteger),
    sa.column("source_file", sa.Text),
    sa.column("valid_from", Instant()),
    sa.column("valid_until", Instant()),
    sa.column("run_key", sa.Integer),
    sa.column("voided", sa.Integer),
)

_POSITION = sa.text(
    "SELECT count(*) FROM pass_applications AS a WHERE a.campaign_key = :c AND (a.applied_at < :t "
    "OR (a.applied_at = :t AND (a.user_bucket < :b OR (a.user_bucket = :b AND a.user_id < :u))))"
).bindparams(sa.bindparam("t", type_=Instant()))


def user_status(context: PassContext, user_id: int) -> dict[str, Any]:
    """One user's application, place in the order, outcome and pass (if any)."""
    key = context.campaign_key
    with context.engine.connect() as connection:
        program = _program_row(connection, key)
        row = connection.execute(_USER_STATUS, {"item_key": context.item_key, "c": key, "u": user_id}).first()
        if row is None:
            return {
                "program_id": context.program.program_id,
                "user_id": user_id,
                "applied": False,
                "outcome": None,
                "detail": "no application on record (a refused row is in its batch's quarantine file)",
            }
        position = 1 + int(
            connection.execute(
                _POSITION, {"c": key, "t": row.applied_at, "b": row.user_bucket, "u": user_id}
            ).scalar_one()
        )
    through = program.allocated_through
    outcome = "pending" if through is None or row.applied_at > through else "granted" if row.valid_from else "sold_out"
    return {
        "program_id": context.program.program_id,
        "user_id": user_id,
        "applied": True,
        "applied_at": row.applied_at.isoformat(),
        "batch_file": row.source_file,
        "position": position,
        "outcome": outcome,
        "voided": bool(row.voided),
        "valid_from": None if row.valid_from is None else row.valid_from.isoformat(),
        "valid_until": None if row.valid_until is None else row.valid_until.isoformat(),
        "auto_renew": False,
    }
