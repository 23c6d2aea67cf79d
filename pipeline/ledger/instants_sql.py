"""Instants as ISO-8601 text in SQL that both SQLite and DuckDB run, for the SQLite ledger's views.

The SQLite ledger stores instants as UTC epoch microseconds. Its views show them as text,
and outside tools (DuckDB's SQLite scanner) re-plan a view's SQL themselves, so the text
must come from what both engines share: integer arithmetic, ``CASE`` and ``printf``.
SQLite's ``strftime(…, 'unixepoch')`` is not among them.

``sql/sqlite/views.sql`` writes three macros that :func:`expand` replaces:

* ``ISO_UTC(expr)``: ``2023-01-04T15:00:00Z``
* ``ISO_UTC_MS(expr)``: ``2023-01-04T15:00:00.000Z``
* ``ISO_LOCAL(expr, offset_s)``: ``2023-01-05T00:00:00+09:00`` (the instant at that UTC offset)

Each argument is a plain column reference (no parentheses). The date comes from the
table ``calendar_days`` (day number since 1970-01-01 → ``YYYY-MM-DD``, 1970 to 2199,
filled by views.sql), the time of day from arithmetic; NULL in gives NULL out.
"""

from __future__ import annotations

import re

MACRO = re.compile(r"\b(ISO_UTC_MS|ISO_UTC|ISO_LOCAL)\(([^()]*)\)")
DAY_US = 86_400_000_000


def _div(a: str, b: int | str) -> str:
    """Integer division of non-negative values in both engines (DuckDB's ``/`` is real division)."""
    return f"CAST((({a}) - ({a}) % {b}) / {b} AS BIGINT)"


def _iso(micros: str, *, millis: bool, suffix: str) -> str:
    days = _div(micros, DAY_US)
    date = f"(SELECT cd.iso_date FROM calendar_days AS cd WHERE cd.day_number = {days})"
    of_day = f"(({micros}) % {DAY_US})"
    hour = _div(of_day, 3_600_000_000)
    minute = _div(f"{of_day} % 3600000000", 60_000_000)
    second = _div(f"{of_day} % 60000000", 1_000_000)
    if millis:
        fraction = _div(f"{of_day} % 1000000", 1000)
        clock = f"printf('T%02d:%02d:%02d.%03d', {hour}, {minute}, {second}, {fraction})"
    else:
        clock = f"printf('T%02d:%02d:%02d', {hour}, {minute}, {second})"
    return f"({date} || {clock} || {suffix})"


def _offset_text(offset_s: str) -> str:
    """``+09:00`` for 32400."""
    magnitude = f"abs({offset_s})"
    return (
        f"printf('%s%02d:%02d', CASE WHEN ({offset_s}) < 0 THEN '-' ELSE '+' END, "
        f"{_div(magnitude, 3600)}, {_div(f'{magnitude} % 3600', 60)})"
    )


def expand(sql: str) -> str:
    """Replace the ISO macros in ``sql`` by portable expressions."""

    def replace(match: re.Match[str]) -> str:
        name, args = match.group(1), [a.strip() for a in match.group(2).split(",")]
        if name == "ISO_UTC":
            return _iso(args[0], millis=False, suffix="'Z'")
        if name == "ISO_UTC_MS":
            return _iso(args[0], millis=True, suffix="'Z'")
        local = f"({args[0]} + CAST({args[1]} AS BIGINT) * 1000000)"
        return _iso(local, millis=False, suffix=_offset_text(args[1]))

    return MACRO.sub(replace, sql)
