"""The reference entitlement service's own store: one table ``issued_grants`` in SQLite or PostgreSQL.

A batch is one transaction: ``INSERT … ON CONFLICT (grant_id) DO NOTHING
RETURNING grant_id`` in one statement (multi-row VALUES on SQLite, ``unnest``
of arrays on PostgreSQL) says which grants were created; the payload hashes
of the others are read back in the same transaction to tell ``exists`` from
``conflict``. Nothing is ever updated: a conflicting payload is reported, never
written over.

SQLite runs in WAL mode with one writer at a time (a lock in this process);
readers (exports, counts) do not wait for it. Calls block, so the ASGI app runs
them in worker threads.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine, make_url
from sqlalchemy.exc import ArgumentError, OperationalError

from issuer_service.errors import ConfigError, invariant
from issuer_service.grants import BATCH_GRANTS_MAX, ID_CHARS_MAX, Grant, payload_differences

Status = Literal["created", "exists", "conflict"]
EXPORT_CHUNK_ROWS = 10_000
SQLITE_BUSY_TIMEOUT_MS = 30_000
SQLITE_WAL_CHECKPOINT_PAGES = 16_384  # pages of 4 KiB
PG_CONNECT_TIMEOUT_S = 10
PG_POOL_SIZE = 8
_SHA256_HEX_CHARS = 64

metadata = sa.MetaData()
issued_grants = sa.Table(
    "issued_grants",
    metadata,
    sa.Column("grant_id", sa.String(ID_CHARS_MAX), primary_key=True),
    sa.Column("campaign_id", sa.String(ID_CHARS_MAX), nullable=False),
    sa.Column("user_id", sa.BigInteger, nullable=False),
    sa.Column("item_sku", sa.String(ID_CHARS_MAX), nullable=False),
    sa.Column("issue_no", sa.BigInteger, nullable=False),
    sa.Column("payload_sha256", sa.String(_SHA256_HEX_CHARS), nullable=False),
    sa.Column("payload", sa.Text, nullable=False),  # canonical JSON of the hashed fields; sha256(payload) == hash
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
    sa.Index("ix_issued_grants_campaign_grant", "campaign_id", "grant_id"),
)

# Revocations (POST /v1/grants:revoke): a revoked grant stays in issued_grants (its id stays taken: it is
# never granted again) and leaves the export.
revoked_grants = sa.Table(
    "revoked_grants",
    metadata,
    sa.Column("grant_id", sa.String(ID_CHARS_MAX), primary_key=True),
    sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
)
REVOKE_STATUSES = ("revoked", "already_revoked", "not_found")

_COLUMNS = "grant_id, campaign_id, user_id, item_sku, issue_no, payload_sha256, payload, created_at"
_PG_INSERT = (
    f"INSERT INTO issued_grants ({_COLUMNS}) "
    "SELECT g.grant_id, g.campaign_id, g.user_id, g.item_sku, g.issue_no, g.payload_sha256, g.payload, %s "
    "FROM unnest(%b::text[], %b::text[], %b::bigint[], %b::text[], %b::bigint[], %b::text[], %b::text[]) "
    "AS g(grant_id, campaign_id, user_id, item_sku, issue_no, payload_sha256, payload) "
    "ON CONFLICT (grant_id) DO NOTHING RETURNING grant_id"
)
_PG_READ_HASHES = "SELECT grant_id, payload_sha256 FROM issued_grants WHERE grant_id = ANY(%b::text[])"
_PG_READ_PAYLOADS = "SELECT grant_id, payload FROM issued_grants WHERE grant_id = ANY(%b::text[])"


@dataclasses.dataclass(frozen=True, slots=True)
class Outcome:
    """What happened to one grant of a request: created, exists (same payload) or conflict (with the difference)."""

    grant_id: str
    status: Status
    detail: str | None = None


@dataclasses.dataclass(frozen=True, slots=True)
class ExportedGrant:
    """One stored grant as the export shows it."""

    grant_id: str
    campaign_id: str
    user_id: int
    item_sku: str
    issue_no: int
    payload_sha256: str
    created_at: dt.datetime


@dataclasses.dataclass(frozen=True)
class ExportLines:
    """One page of the JSON-lines export: its text, the last grant id on it (for the next page), its row count."""

    text: bytes
    last_grant_id: str | None
    rows: int


def store_url(text: str) -> sa.URL:
    """The SQLAlchemy URL of ``text``: a URL (sqlite:///…, postgresql+psycopg://…) or a path to an SQLite file."""
    if "://" not in text:
        return sa.URL.create("sqlite", database=str(Path(text).expanduser().resolve()))
    try:
        url = make_url(text)
    except ArgumentError as exc:
        raise ConfigError(f"--store {text!r} is not a database URL ({exc})") from None
    if url.get_backend_name() == "postgresql" and url.get_driver_name() in ("", "psycopg2"):
        url = url.set(drivername="postgresql+psycopg")  # psycopg 3 is the driver this project installs
    if url.get_backend_name() not in ("sqlite", "postgresql"):
        raise ConfigError(f"--store {text!r}: use an SQLite file (sqlite:///path) or PostgreSQL (postgresql://…)")
    if url.get_backend_name() == "sqlite" and url.database in (None, "", ":memory:"):
        raise ConfigError(f"--store {text!r}: the SQLite store must be a file, e.g. sqlite:///var/issuer/issuer.sqlite")
    return url


class IssuerStore:
    """The grants the reference service has issued; every method blocks (call it from a worker thread)."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self.is_sqlite = engine.dialect.name == "sqlite"
        # SQLite has one writer at a time; serialising here keeps writers from spinning on SQLITE_BUSY.
        self._writer: contextlib.AbstractContextManager[Any] = (
            threading.Lock() if self.is_sqlite else contextlib.nullcontext()
        )

    @classmethod
    def open(cls, url_text: str) -> IssuerStore:
        """Open (and create when missing) the store at ``url_text``; ConfigError when it cannot be reached."""
        url = store_url(url_text)
        if url.get_backend_name() == "sqlite":
            Path(url.database or "").parent.mkdir(parents=True, exist_ok=True)
            engine = sa.create_engine(url, connect_args={"check_same_thread": False})
            sa.event.listen(engine, "connect", _sqlite_pragmas)
        else:
            engine = sa.create_engine(
                url,
                pool_size=PG_POOL_SIZE,
                pool_pre_ping=True,
                connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S},
            )
        try:
            metadata.create_all(engine)
        except OperationalError as exc:
            engine.dispose()
            where = url.render_as_string(hide_password=True)
            raise ConfigError(f"the issuer store {where} cannot be opened: {' '.join(str(exc.orig).split())}") from None
        return cls(engine)

    def close(self) -> None:
        """Release the store's connections."""
        self.engine.dispose()

    @property
    def url(self) -> str:
        """The store's URL without its password."""
        return self.engine.url.render_as_string(hide_password=True)

    # ------------------------------------------------------------------ granting

    def grant(self, grants: Sequence[Grant], created_at: dt.datetime) -> list[Outcome]:
        """Grant ``grants`` in one transaction; their outcomes in order (a conflict is reported, never written)."""
        invariant(0 < len(grants) <= BATCH_GRANTS_MAX, f"a store call takes 1..{BATCH_GRANTS_MAX} grants")
        first_of: dict[str, Grant] = {}
        for grant in grants:
            first_of.setdefault(grant.grant_id, grant)
        # In key order, so that concurrent PostgreSQL transactions over the same keys lock them in the same order
        # (one waits for the other instead of deadlocking).
        unique = sorted(first_of.values(), key=_grant_key)
        with self._writer, self.engine.begin() as connection:
            inserted = self._insert(connection, unique, created_at)
            earlier = [g.grant_id for g in unique if g.grant_id not in inserted]
            stored_hash = {gid: first_of[gid].payload_sha256 for gid in inserted}
            stored_hash.update(self._read(connection, "payload_sha256", earlier) if earlier else {})
            invariant(
                len(stored_hash) == len(unique),
                f"{len(unique) - len(stored_hash)} grant ids neither inserted nor found in issued_grants",
            )
            revoked = self._revoked(connection, earlier) if earlier else {}
            conflicting = sorted({g.grant_id for g in grants if stored_hash[g.grant_id] != g.payload_sha256})
            earlier_set = set(earlier)
            stored_payload = {gid: first_of[gid].payload for gid in conflicting if gid not in earlier_set}
            conflicting_earlier = [gid for gid in conflicting if gid in earlier_set]
            if conflicting_earlier:
                stored_payload.update(self._read(connection, "payload", conflicting_earlier))
        outcomes: list[Outcome] = []
        for grant in grants:
            gid = grant.grant_id
            if gid in revoked:
                outcomes.append(
                    Outcome(gid, "conflict", f"grant {gid!r} was revoked ({revoked[gid]}); not granted again")
                )
            elif gid in inserted and first_of[gid] is grant:
                outcomes.append(Outcome(gid, "created"))
            elif stored_hash[gid] == grant.payload_sha256:
                outcomes.append(Outcome(gid, "exists"))
            else:
                detail = payload_differences(stored_payload[gid], grant.payload)
                outcomes.append(
                    Outcome(gid, "conflict", f"grant {gid!r} already exists with a different payload: {detail}")
                )
        return outcomes

    def _insert(self, connection: Connection, grants: Sequence[Grant], created_at: dt.datetime) -> set[str]:
        if self.is_sqlite:
            # SQLAlchemy's own DateTime text form on SQLite, so the typed export reads it back.
            created = created_at.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%S.%f")
            rows = ",".join(["(?,?,?,?,?,?,?,?)"] * len(grants))
            params: list[Any] = []
            for g in grants:
                params += (g.grant_id, g.campaign_id, g.user_id, g.item_sku, g.issue_no, g.payload_sha256, g.payload)
                params.append(created)
            sql = (
                f"INSERT INTO issued_grants ({_COLUMNS}) VALUES {rows} "
                "ON CONFLICT (grant_id) DO NOTHING RETURNING grant_id"
            )
            result = connection.exec_driver_sql(sql, tuple(params))
        else:
            columns = (
                created_at,
                [g.grant_id for g in grants],
                [g.campaign_id for g in grants],
                [g.user_id for g in grants],
                [g.item_sku for g in grants],
                [g.issue_no for g in grants],
                [g.payload_sha256 for g in grants],
                [g.payload for g in grants],
            )
            result = connection.exec_driver_sql(_PG_INSERT, columns)
        return {row[0] for row in result}

    def _read(self, connection: Connection, column: str, grant_ids: Sequence[str]) -> dict[str, str]:
        if self.is_sqlite:
            marks = ",".join("?" * len(grant_ids))
            sql = f"SELECT grant_id, {column} FROM issued_grants WHERE grant_id IN ({marks})"
            result = connection.exec_driver_sql(sql, tuple(grant_ids))
        else:
            sql = _PG_READ_HASHES if column == "payload_sha256" else _PG_READ_PAYLOADS
            result = connection.exec_driver_sql(sql, (list(grant_ids),))
        return {row[0]: row[1] for row in result}

    def _revoked(self, connection: Connection, grant_ids: Sequence[str]) -> dict[str, str]:
        """Of ``grant_ids``, the revoked ones and their reasons."""
        t = revoked_grants.c
        rows = connection.execute(sa.select(t.grant_id, t.reason).where(t.grant_id.in_(list(grant_ids)))).all()
        return {str(r.grant_id): str(r.reason) for r in rows}

    # ------------------------------------------------------------------ revoking

    def revoke(self, grant_ids: Sequence[str], reason: str, revoked_at: dt.datetime) -> list[tuple[str, str]]:
        """Revoke grants in one transaction: per id, in order, ``revoked``, ``already_revoked`` or ``not_found``."""
        invariant(0 < len(grant_ids) <= BATCH_GRANTS_MAX, f"a store call takes 1..{BATCH_GRANTS_MAX} grant ids")
        unique = sorted(set(grant_ids))
        with self._writer, self.engine.begin() as connection:
            issued = set(
                connection.execute(
                    sa.select(issued_grants.c.grant_id).where(issued_grants.c.grant_id.in_(unique))
                ).scalars()
            )
            before = set(self._revoked(connection, unique))
            new = [gid for gid in unique if gid in issued and gid not in before]
            if new:
                connection.execute(
                    revoked_grants.insert(), [{"grant_id": g, "revoked_at": revoked_at, "reason": reason} for g in new]
                )
        answered: dict[str, str] = {}
        results = []
        for gid in grant_ids:
            if gid not in issued:
                status = "not_found"
            elif gid in before or gid in answered:
                status = "already_revoked"
            else:
                status = "revoked"
            answered.setdefault(gid, status)
            results.append((gid, status))
        return results

    def count_revoked(self) -> int:
        """How many grants the store has revoked."""
        with self.engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(revoked_grants)).scalar_one())

    # ------------------------------------------------------------------ reading

    def count_grants(self) -> int:
        """How many grants the store holds."""
        with self.engine.connect() as connection:
            return int(connection.execute(sa.select(sa.func.count()).select_from(issued_grants)).scalar_one())

    def export_chunk(
        self, campaign_id: str, after_grant_id: str | None, rows_max: int = EXPORT_CHUNK_ROWS
    ) -> list[ExportedGrant]:
        """Up to ``rows_max`` grants of ``campaign_id`` in grant_id order, after ``after_grant_id`` (keyset paging)."""
        t = issued_grants.c
        query = (
            sa.select(t.grant_id, t.campaign_id, t.user_id, t.item_sku, t.issue_no, t.payload_sha256, t.created_at)
            .where(
                t.campaign_id == campaign_id,
                ~sa.exists().where(revoked_grants.c.grant_id == t.grant_id),  # a revoked grant is not held
            )
            .order_by(t.grant_id)
            .limit(rows_max)
        )
        if after_grant_id is not None:
            query = query.where(t.grant_id > after_grant_id)
        with self.engine.connect() as connection:
            rows = connection.execute(query).all()
        return [
            ExportedGrant(
                grant_id=r.grant_id,
                campaign_id=r.campaign_id,
                user_id=int(r.user_id),
                item_sku=r.item_sku,
                issue_no=int(r.issue_no),
                payload_sha256=r.payload_sha256,
                created_at=r.created_at if r.created_at.tzinfo else r.created_at.replace(tzinfo=dt.UTC),
            )
            for r in rows
        ]

    def export_lines(
        self, campaign_id: str, after_grant_id: str | None, rows_max: int = EXPORT_CHUNK_ROWS
    ) -> ExportLines:
        """The same page as :meth:`export_chunk`, as JSON lines the database writes (the JSON-lines export's path).

        SQLite's ``json_object`` and PostgreSQL's ``json_build_object`` build each line, so no row becomes a
        Python object: about four times the typed path's rate. ``created_at`` is written as
        :meth:`export_chunk`'s value in UTC, ``YYYY-MM-DDTHH:MM:SS.ffffffZ`` (the stored text on SQLite,
        which this store always writes in UTC with microseconds).
        """
        created = (
            "replace(g.created_at, ' ', 'T') || 'Z'"
            if self.is_sqlite
            else """to_char(g.created_at AT TIME ZONE 'UTC', 'YYYY-MM-DD"T"HH24:MI:SS.US"Z"')"""
        )
        build = "json_object" if self.is_sqlite else "json_build_object"
        cast = "" if self.is_sqlite else "::text"
        query = sa.text(
            f"SELECT g.grant_id, {build}('grant_id', g.grant_id, 'campaign_id', g.campaign_id, "
            "'user_id', g.user_id, 'item_sku', g.item_sku, 'issue_no', g.issue_no, "
            f"'payload_sha256', g.payload_sha256, 'created_at', {created}){cast} "
            "FROM issued_grants g WHERE g.campaign_id = :campaign_id AND g.grant_id > :after "
            "AND NOT EXISTS (SELECT 1 FROM revoked_grants r WHERE r.grant_id = g.grant_id) "
            "ORDER BY g.grant_id LIMIT :rows_max"
        )
        with self.engine.connect() as connection:
            rows = connection.execute(
                query, {"campaign_id": campaign_id, "after": after_grant_id or "", "rows_max": rows_max}
            ).all()
        if not rows:
            return ExportLines(b"", None, 0)
        text = "\n".join([line for _gid, line in rows]) + "\n"
        return ExportLines(text.encode(), rows[-1][0], len(rows))

    def export(self, campaign_id: str, rows_max: int = EXPORT_CHUNK_ROWS) -> Iterator[list[ExportedGrant]]:
        """Every grant of ``campaign_id`` in chunks of at most ``rows_max`` (grants added meanwhile may appear)."""
        after: str | None = None
        while True:
            chunk = self.export_chunk(campaign_id, after, rows_max)
            if not chunk:
                return
            yield chunk
            if len(chunk) < rows_max:
                return
            after = chunk[-1].grant_id


def _grant_key(grant: Grant) -> str:
    return grant.grant_id


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    # NORMAL in WAL mode: a commit survives a crash of this process; a power cut may lose the last commits.
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    # Checkpoint every 64 MiB of WAL rather than every 4 MiB (SQLite's default): fewer fsyncs, which a busy disk
    # makes slow (a benchmark under load: 9-14 instead of 16-70 ms per batch of 1,000 created).
    cursor.execute(f"PRAGMA wal_autocheckpoint={SQLITE_WAL_CHECKPOINT_PAGES}")
    cursor.close()
