"""The issuers' rate budgets: request slots one interval apart, and the bound an issuer sees.

One row per issuer in the ledger's ``issuer_budgets`` holds the instant (µs since the epoch; on
PostgreSQL by the database's clock, so that workers on several machines agree) before which no
further request may start. Each request reserves the next free slot with one upsert that reads the
clock inside the transaction reserving it, so slots are at least ``1 / rate`` apart whichever process
took them (``rate`` is the issuer's ``requests_per_s``). A budget held in one process only
(``transport.RateBudget``) hands out its slots the same way.

A sender sleeps until its slot and goes only if it woke at most ``SLOT_LATE_S_MAX`` after it; a
sender woken later (a busy machine, a long commit) gives the slot up and reserves the next free one
(:func:`depart_in_slot`), so it never goes out beside the request of the slot after its own.
Requests therefore leave at most ``SLOT_LATE_S_MAX`` after slots ``1 / rate`` apart, and any span
of ``T`` seconds holds at most ``⌈rate × (T + SLOT_LATE_S_MAX)⌉`` departures: ``rate + 1`` in one
second (whole-number rates up to 50 req/s), whatever the load.

At the issuer each request arrives some time after it left: the rest of the sender's work, the
network, the issuer picking it up. If those delays differ by at most ``D``, a window of ``T``
seconds at the issuer holds at most ``⌈rate × (T + SLOT_LATE_S_MAX + D)⌉`` requests, which is
``rate + 1`` in one second while ``SLOT_LATE_S_MAX + D ≤ 1 / rate``. A stall longer than that on
either side (a sender descheduled after it left its slot, an issuer busy before it reads its
socket) can put a request beside the next ones in one window; over longer spans the rate stays
within the budget (the bound above). Only a sender that missed ``SLOT_MISSES_MAX`` slots in a row
goes however late, so that no request waits forever on a machine that cannot wake it on time.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.ledger.engine import write_transaction

SLOT_LATE_S_MAX = 0.020  # a sender woken later than this after its slot gives it up
SLOT_MISSES_MAX = 100  # slots given up in a row before a request goes however late


@dataclass(frozen=True)
class Departure:
    """When a request was let go (on the caller's clock) and how many slots it gave up first."""

    at: float
    slots_missed: int


def depart_in_slot(
    reserve: Callable[[], float],
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> Departure:
    """Reserve a slot with ``reserve`` (seconds until it), sleep until it and let the request go.

    A slot woken up to more than ``SLOT_LATE_S_MAX`` late is given up and the next free one
    reserved, up to ``SLOT_MISSES_MAX`` times in a row.
    """
    missed = 0
    while True:
        wait_s = reserve()
        slot = clock() + wait_s
        if wait_s > 0:
            sleep(wait_s)
        now = clock()
        if now - slot <= SLOT_LATE_S_MAX or missed == SLOT_MISSES_MAX:
            return Departure(now, missed)
        missed += 1


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
    """Reserve the issuer's next request slot, ``interval_s`` after the previous one; seconds until it.

    Negative when the slot passed while the reservation committed (the caller is that late). A
    wait above ``wait_max_s`` cannot come from the budget or a Retry-After (the clock went back,
    or the row was edited by hand): the row restarts from now and the request goes at once (0.0).
    """
    step = max(1, round(interval_s * 1_000_000))
    sql = _budget_upsert(
        engine,
        "{now} + :step",
        "{greatest}(issuer_budgets.next_at_us, {now}) + :step",
        "issuer_budgets.next_at_us - :step - {now}",
    )
    with write_transaction(engine) as connection:
        # The clock is read once the write lock is held (SQLite's BEGIN IMMEDIATE; PostgreSQL's upsert
        # reads its own clock after locking the row): a long wait for the lock moves the slot, instead
        # of reserving one in the past that the next request's slot would then follow too closely.
        reserved_at = time.monotonic()
        now = int(time.time() * 1_000_000)
        wait_us = int(connection.execute(sa.text(sql), {"issuer": issuer, "step": step, "now": now}).scalar_one())
        if wait_us > wait_max_s * 1_000_000:
            restart = _budget_upsert(engine, "{now} + :step", "{now} + :step")
            connection.execute(sa.text(restart), {"issuer": issuer, "step": step, "now": now})
            return 0.0
    # The slot is wait_us after the reservation; the commit took some of that time already.
    return wait_us / 1_000_000 - (time.monotonic() - reserved_at)


def hold_issuer(engine: Engine, issuer: str, seconds: float) -> None:
    """Let no request to the issuer start for ``seconds`` (its Retry-After), from any process."""
    sql = _budget_upsert(engine, "{now} + :hold", "{greatest}(issuer_budgets.next_at_us, {now} + :hold)")
    with write_transaction(engine) as connection:
        connection.execute(
            sa.text(sql),
            {"issuer": issuer, "hold": round(seconds * 1_000_000), "now": int(time.time() * 1_000_000)},
        )


def busiest_window(instants: Iterable[float], window_s: float = 1.0) -> int:
    """The most of ``instants`` (seconds) inside any half-open window of ``window_s``: what the bound above is about."""
    times = sorted(instants)
    return max((bisect.bisect_left(times, t + window_s) - i for i, t in enumerate(times)), default=0)
