"""Ledger engines and write transactions, and the differences between SQLite and PostgreSQL they hide."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline.errors import LedgerUnreachableError

SQLITE_BUSY_TIMEOUT_MS = 120_000

SQLITE_CACHE_KIB = 262_144
CONNECT_TIMEOUT_S = 10  # PostgreSQL: give up on an unreachable server after this long


def epoch_us_sql(column: str, dialect: str) -> str:
    """An instant column as UTC epoch microseconds in SQL (SQLite stores them so already)."""
    if dialect == "postgresql":
        # date_part is float8 (EXTRACT is numeric since PostgreSQL 14, and about 4x slower here).
        # The float8 seconds times 10^6 stay within half a microsecond of the true value until about
        # the year 2100, so rounding gives the exact integer.
        return f"CAST(round(date_part('epoch', {column}) * 1000000) AS BIGINT)"
    return column


def create_ledger_engine(url: str) -> Engine:
    """An engine for ``url``; SQLite gets WAL, full sync, a busy timeout and explicit BEGINs.

    A PostgreSQL server that cannot be reached (wrong host or port, refused credentials, a
    database that does not exist) raises :class:`LedgerUnreachableError`, a configuration error
    (exit 2) naming the host and database, wherever the first connection is made.
    """
    if url.startswith("sqlite"):
        engine = sa.create_engine(url, connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000})
        _configure_sqlite(engine)
        return engine
    engine = sa.create_engine(url, pool_pre_ping=True, connect_args={"connect_timeout": CONNECT_TIMEOUT_S})
    sa.event.listen(engine, "handle_error", _unreachable)
    return engine


def _unreachable(context: Any) -> BaseException | None:
    """Turn a failure to connect into a configuration error that says where and what, without a library link."""
    if context.connection is not None or context.is_pre_ping:
        return None  # a statement failed on an open connection: not a question of reaching the server
    url = context.engine.url if context.engine is not None else None
    where = "the ledger database"
    if url is not None:
        where += f" {url.database!r} on {url.host}:{url.port or 5432}"
    reason = " ".join(str(context.original_exception).split())
    return LedgerUnreachableError(
        f"cannot connect to {where} ({reason}). Check ENTITLE_LEDGER_URL (or the Airflow connection "
        "entitle_ledger): the host, port, user, password and database, and that the server is running"
    )


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
