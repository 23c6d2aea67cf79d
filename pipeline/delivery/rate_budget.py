"""The issuers' shared rate budgets: one request slot at a time, across every delivering process.

One row per issuer in the ledger's ``issuer_budgets`` holds the instant (µs since the epoch; on
PostgreSQL by the database's clock, so that workers on several machines agree) before which no
further request may start. Each request reserves the next free slot with one upsert.
"""

from __future__ import annotations

import time

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline.ledger.engine import write_transaction


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
    return max(0.0, wait_us / 1_000_000 - (time.monotonic() - reserved_at))


def hold_issuer(engine: Engine, issuer: str, seconds: float) -> None:
    """Let no request to the issuer start for ``seconds`` (its Retry-After), from any process."""
    sql = _budget_upsert(engine, "{now} + :hold", "{greatest}(issuer_budgets.next_at_us, {now} + :hold)")
    with write_transaction(engine) as connection:
        connection.execute(
            sa.text(sql),
            {"issuer": issuer, "hold": round(seconds * 1_000_000), "now": int(time.time() * 1_000_000)},
        )
