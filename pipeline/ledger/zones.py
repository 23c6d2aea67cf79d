"""Campaign time zones' UTC offsets over time, for the SQLite ledger's local-time columns.

SQLite has no time zone database, so the ledger writes each campaign zone's offsets
(from Python's ``zoneinfo``) into ``time_zone_offsets`` as ranges ``[from_us, until_us)``
of UTC epoch microseconds, and ``grant_ledger`` joins them. PostgreSQL converts with
``AT TIME ZONE`` itself and has no such table.
"""

from __future__ import annotations

import datetime as dt
from zoneinfo import ZoneInfo

import sqlalchemy as sa
from sqlalchemy.engine import Connection

FIRST_DAY = dt.datetime(1970, 1, 1, tzinfo=dt.UTC)
LAST_DAY = dt.datetime(2200, 1, 1, tzinfo=dt.UTC)
OPEN_START_US = -(2**62)  # the ranges cover every instant: the first starts and the last ends far away
OPEN_END_US = 2**62


def offset_ranges(time_zone: str) -> list[tuple[int, int, int]]:
    """``(from_us, until_us, utc_offset_s)`` ranges covering all instants, changes located to the second."""
    zone = ZoneInfo(time_zone)

    def offset_at(seconds: int) -> int:
        instant = dt.datetime.fromtimestamp(seconds, dt.UTC)
        delta = instant.astimezone(zone).utcoffset()
        return int(delta.total_seconds()) if delta is not None else 0

    ranges: list[tuple[int, int, int]] = []
    start_us, current = OPEN_START_US, offset_at(int(FIRST_DAY.timestamp()))
    day, last = int(FIRST_DAY.timestamp()), int(LAST_DAY.timestamp())
    while day < last:
        following = day + 86_400
        if offset_at(following) != current:
            low, high = day, following  # offset_at(low) == current != offset_at(high)
            while high - low > 1:
                middle = (low + high) // 2
                low, high = (middle, high) if offset_at(middle) == current else (low, middle)
            ranges.append((start_us, high * 1_000_000, current))
            start_us, current = high * 1_000_000, offset_at(high)
        day = following
    ranges.append((start_us, OPEN_END_US, current))
    return ranges


def record_time_zones(connection: Connection) -> None:
    """Write the offsets of every campaign zone not yet in ``time_zone_offsets`` (SQLite only; idempotent)."""
    if connection.dialect.name != "sqlite":
        return
    missing = connection.execute(
        sa.text(
            "SELECT DISTINCT c.time_zone FROM campaigns AS c "
            "WHERE NOT EXISTS (SELECT 1 FROM time_zone_offsets AS z WHERE z.time_zone = c.time_zone)"
        )
    ).scalars()
    rows = [
        {"zone": zone, "from_us": start, "until_us": end, "offset_s": offset}
        for zone in list(missing)
        for start, end, offset in offset_ranges(zone)
    ]
    if rows:
        connection.execute(
            sa.text(
                "INSERT INTO time_zone_offsets (time_zone, from_us, until_us, utc_offset_s) "
                "VALUES (:zone, :from_us, :until_us, :offset_s)"
            ),
            rows,
        )
