"""PostgreSQL fast path: a partition's first grant is one binary COPY into a new child table.

``grants`` is partitioned by list on ``campaign_key``: each campaign has its own
``grants_c<campaign>``, itself partitioned by range on ``user_bucket`` (plus a
``grants_c<campaign>_default`` and, for campaigns without a table, ``grants_default``).
A lookup by user names the bucket but not the campaign, and two single-column
levels let the planner pick the one child per campaign by binary search (a
two-column range key made it test every child: about 3 ms per lookup at 128).

When a pipeline partition is granted for the first time — its bucket range has
no child table and no grants — the transaction:

1. creates ``grants_c<campaign>_<lo>_<hi>`` like ``grants``, without indexes or checks;
2. streams the planned grants into it with ``COPY … (FORMAT BINARY)``, in key order,
   encoded here from the partition's user ids with NumPy (no per-row Python);
3. adds the table's CHECK constraints and a range check in one validating scan,
   builds the primary key over the already sorted rows and gathers statistics;
4. attaches it as the partition for exactly that range (the range check spares
   PostgreSQL a second scan).

All four steps are in the partition's transaction: a crash leaves no table and no
grant.  Everything else — reruns, repairs, reissues, a writer that does not own
``grants``, a range that overlaps a child made for another partition count — takes
the ordinary ``INSERT … SELECT`` path (see :mod:`pipeline.grants.granting`), and in every
case the primary key, not this module's checks, is what refuses a second grant.
"""

from __future__ import annotations

import datetime as dt
import re
import struct
import weakref
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline import ledger
from pipeline.errors import invariant
from pipeline.ledger import to_epoch_us, write_transaction

_PG_EPOCH_US = to_epoch_us(dt.datetime(2000, 1, 1, tzinfo=dt.UTC))
_HEADER = b"PGCOPY\n\xff\r\n\x00" + struct.pack(">ii", 0, 0)
_TRAILER = struct.pack(">h", -1)
_NULL = struct.pack(">i", -1)
COLUMNS = (
    "campaign_key",
    "user_bucket",
    "user_id",
    "item_key",
    "issue_no",
    "partition_id",
    "run_key",
    "amount_krw",
    "valid_from",
    "valid_until",
    "granted_at",
)
USERS_PER_CHUNK = 65_536  # about 32 MB of COPY data for five items
SORT_MEMORY = "256MB"  # maintenance_work_mem for the primary-key build of one child
_CHECKS = tuple(f"{c.name} CHECK ({c.sqltext})" for c in ledger.grants.constraints if isinstance(c, sa.CheckConstraint))


@dataclass(frozen=True)
class ItemTerms:
    """One campaign item as it is written into every grant row."""

    item_key: int
    amount_krw: int | None
    valid_from: dt.datetime
    valid_until: dt.datetime | None


@dataclass(frozen=True)
class RowConstants:
    """The values that are the same in every grant row of one partition's write."""

    campaign_key: int
    partition_id: int
    run_key: int
    granted_at: dt.datetime
    items: Sequence[ItemTerms]


def campaign_table(campaign_key: int) -> str:
    """The table holding one campaign's grants (partitioned by bucket range)."""
    return f"grants_c{campaign_key}"


def child_name(campaign_key: int, bucket_lo: int, bucket_hi: int) -> str:
    """The child table holding one campaign's grants for one bucket range."""
    return f"grants_c{campaign_key}_{bucket_lo}_{bucket_hi}"


_CHILD_NAME = re.compile(r"^grants_c(\d+)_(\d+)_(\d+)$")


def is_range_child(name: str) -> bool:
    """Whether a table name is one of the per-partition children this module makes."""
    return _CHILD_NAME.match(name) is not None


def ensure_campaign_table(engine: Engine, campaign_key: int) -> bool:
    """Create ``grants_c<campaign>`` (and its default child) if absent; True when it exists afterwards.

    Its own short transaction, once per campaign: it locks ``grants`` briefly, so it must not
    happen inside a partition's transaction. Not possible (False) for a writer that does not own
    ``grants``, or when grants of the campaign already sit in ``grants_default`` (a ledger
    upgraded from schema version 2): that campaign's grants then take the INSERT path.
    """
    known = _CAMPAIGN_TABLES.setdefault(engine, set())
    if campaign_key in known:
        return True  # tables are never dropped by the pipeline: one check per engine and campaign
    exists = _make_campaign_table(engine, campaign_key)
    if exists:
        known.add(campaign_key)
    return exists


# Campaigns whose table an engine has seen; weak, so a disposed engine's entry goes with it.
_CAMPAIGN_TABLES: weakref.WeakKeyDictionary[Engine, set[int]] = weakref.WeakKeyDictionary()


def _make_campaign_table(engine: Engine, campaign_key: int) -> bool:
    table = campaign_table(campaign_key)
    with write_transaction(engine) as connection:
        if _table_exists(connection, table):
            return True
        if not _owns_grants(connection):
            return False
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:c, -1)"), {"c": campaign_key})
        if _table_exists(connection, table):
            return True  # another writer made it while we waited
        stranded = connection.execute(
            sa.text("SELECT 1 FROM grants_default WHERE campaign_key = :c LIMIT 1"), {"c": campaign_key}
        ).first()
        if stranded is not None:
            return False
        _ddl(
            connection,
            f"CREATE TABLE {table} PARTITION OF grants FOR VALUES IN ({campaign_key}) PARTITION BY RANGE (user_bucket)",
        )
        _ddl(connection, f"CREATE TABLE {table}_default PARTITION OF {table} DEFAULT")
        return True


def load_new_range(
    connection: Connection, constants: RowConstants, bucket_lo: int, bucket_hi: int, users: pl.DataFrame
) -> int | None:
    """Write a never-granted range through a new child table; ``None`` when the range needs the INSERT path.

    The child is loaded without touching the campaign's table; only then are attaches
    serialized (SHARE UPDATE EXCLUSIVE on ``grants_c<campaign>``, which blocks neither
    readers nor INSERTs) and the range checked again, so two writers never wait on each
    other's partitions in opposite order.  If the range turns out to be taken, the child
    is rolled back.
    """
    key = constants.campaign_key
    if not _attachable(connection, key, bucket_lo, bucket_hi):
        return None
    name = child_name(key, bucket_lo, bucket_hi)
    parent = campaign_table(key)
    savepoint = connection.begin_nested()
    _ddl(connection, f"SET LOCAL maintenance_work_mem = '{SORT_MEMORY}'")
    _ddl(connection, f"CREATE TABLE {name} (LIKE grants INCLUDING DEFAULTS)")
    written = copy_rows(connection, name, constants, users)
    in_range = f"campaign_key = {key} AND user_bucket BETWEEN {bucket_lo} AND {bucket_hi}"
    checks = [*_CHECKS, f"ck_{name}_range CHECK ({in_range})"]
    _ddl(connection, f"ALTER TABLE {name} " + ", ".join(f"ADD CONSTRAINT {c}" for c in checks))
    _ddl(connection, f"ALTER TABLE {name} ADD CONSTRAINT {name}_pkey PRIMARY KEY ({', '.join(COLUMNS[:5])})")
    # A new table has no statistics: the planner would take a range scan of the whole child for a
    # few rows and read it through the index (about 4x slower for reconciliation's full scans).
    _ddl(connection, f"ANALYZE {name}")
    _ddl(connection, f"LOCK TABLE {parent} IN SHARE UPDATE EXCLUSIVE MODE")
    if not _attachable(connection, key, bucket_lo, bucket_hi, probe_rows=True):
        savepoint.rollback()
        return None
    _ddl(connection, f"ALTER TABLE {parent} ATTACH PARTITION {name} FOR VALUES FROM ({bucket_lo}) TO ({bucket_hi + 1})")
    # Children belong to the owner of grants, like the rest of the ledger, whoever loaded them.
    _ddl(
        connection,
        f"DO $$ BEGIN EXECUTE format('ALTER TABLE {name} OWNER TO %I', "
        "(SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'grants'::regclass)); END $$",
    )
    savepoint.commit()
    return written


def _table_exists(connection: Connection, table: str) -> bool:
    # A plain catalog query, not to_regclass: an advisory lock does not refresh the session's
    # catalog cache, and to_regclass could still miss a table another writer just committed.
    found = connection.execute(
        sa.text(
            "SELECT 1 FROM pg_class WHERE relname = :t "
            "AND relnamespace = (SELECT relnamespace FROM pg_class WHERE oid = 'grants'::regclass)"
        ),
        {"t": table},
    ).first()
    return found is not None


def _ddl(connection: Connection, statement: str) -> None:
    connection.exec_driver_sql(statement.replace("%", "%%"))  # psycopg's paramstyle


def _owns_grants(connection: Connection) -> bool:
    """grants is a partitioned table and the current user may attach to it (owner or member)."""
    row = connection.execute(
        sa.text(
            "SELECT c.relkind = 'p', pg_has_role(current_user, c.relowner, 'USAGE') "
            "FROM pg_class AS c WHERE c.oid = to_regclass('grants')"
        )
    ).first()
    return row is not None and bool(row[0]) and bool(row[1])


def _attachable(
    connection: Connection, campaign_key: int, bucket_lo: int, bucket_hi: int, probe_rows: bool = False
) -> bool:
    """The campaign's table exists and is ours; no child overlaps the range; (probe_rows) no grant is in it."""
    parent = connection.execute(
        sa.text("SELECT to_regclass(:t)::oid"), {"t": campaign_table(campaign_key)}
    ).scalar_one_or_none()
    if parent is None or not _owns_grants(connection):
        return False
    children = connection.execute(
        sa.text(
            "SELECT c.relname FROM pg_inherits AS i JOIN pg_class AS c ON c.oid = i.inhrelid WHERE i.inhparent = :p"
        ),
        {"p": parent},
    ).scalars()
    for existing in children:
        match = _CHILD_NAME.match(str(existing))
        if match is None or int(match.group(1)) != campaign_key:
            continue
        lo, hi = int(match.group(2)), int(match.group(3))
        if lo <= bucket_hi and bucket_lo <= hi:
            return False  # granted before, or claimed by a child made for another partition count
    if not probe_rows:
        return True
    occupied = connection.execute(
        sa.text("SELECT 1 FROM grants WHERE campaign_key = :c AND user_bucket BETWEEN :lo AND :hi LIMIT 1"),
        {"c": campaign_key, "lo": bucket_lo, "hi": bucket_hi},
    ).first()
    return occupied is None


def copy_rows(connection: Connection, table: str, constants: RowConstants, users: pl.DataFrame) -> int:
    """Binary-COPY users × items into ``table`` in key order; returns the rows written."""
    driver = connection.connection.driver_connection
    invariant(driver is not None, "a live DBAPI connection")
    written = 0
    with driver.cursor() as cursor:  # type: ignore[union-attr]
        with cursor.copy(f"COPY {table} ({', '.join(COLUMNS)}) FROM STDIN (FORMAT BINARY)") as copy:
            copy.write(_HEADER)
            for chunk, rows in encode(constants, users):
                copy.write(chunk)
                written += rows
            copy.write(_TRAILER)
    return written


def encode(constants: RowConstants, users: pl.DataFrame) -> Iterator[tuple[memoryview, int]]:
    """PostgreSQL binary COPY tuples for users × items, ordered by (bucket, user_id, item_key).

    Every user contributes one fixed-size block (one tuple per item); only the bucket
    and the user id differ between blocks, so a block template is broadcast and the
    two big-endian columns are written into it.
    """
    ordered = users.select("user_bucket", "user_id").sort("user_bucket", "user_id")
    buckets = ordered["user_bucket"].to_numpy()
    user_ids = ordered["user_id"].to_numpy()
    template, offsets = _block_template(constants)
    rows_per_user = len(constants.items)
    for start in range(0, len(buckets), USERS_PER_CHUNK):
        stop = min(start + USERS_PER_CHUNK, len(buckets))
        count = stop - start
        block = np.empty((count, len(template)), dtype=np.uint8)
        block[:] = template
        bucket_bytes = buckets[start:stop].astype(">i8").view(np.uint8).reshape(count, 8)
        user_bytes = user_ids[start:stop].astype(">i8").view(np.uint8).reshape(count, 8)
        for offset in offsets:
            block[:, offset : offset + 8] = bucket_bytes
            block[:, offset + 12 : offset + 20] = user_bytes
        yield block.reshape(-1).data, count * rows_per_user


def _block_template(constants: RowConstants) -> tuple[np.ndarray, list[int]]:
    """One user's tuples with zeroed bucket and user id, and where each tuple's bucket starts."""
    parts: list[bytes] = []
    offsets: list[int] = []
    position = 0
    head = struct.pack(">h", len(COLUMNS)) + _field(">i", constants.campaign_key)
    for item in sorted(constants.items, key=lambda i: i.item_key):
        tail = (
            _field(">i", item.item_key)
            + _field(">h", 0)
            + _field(">h", constants.partition_id)
            + _field(">i", constants.run_key)
            + (_NULL if item.amount_krw is None else _field(">q", item.amount_krw))
            + _field(">q", _pg_time(item.valid_from))
            + (_NULL if item.valid_until is None else _field(">q", _pg_time(item.valid_until)))
            + _field(">q", _pg_time(constants.granted_at))
        )
        record = head + _field(">q", 0) + _field(">q", 0) + tail
        offsets.append(position + len(head) + 4)
        position += len(record)
        parts.append(record)
    return np.frombuffer(b"".join(parts), dtype=np.uint8), offsets


def _field(fmt: str, value: int) -> bytes:
    return struct.pack(">i", struct.calcsize(fmt)) + struct.pack(fmt, value)


def _pg_time(value: dt.datetime) -> int:
    return to_epoch_us(value) - _PG_EPOCH_US
