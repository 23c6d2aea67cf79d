"""First-come-first-served pass programs as data: load and validate a program file, derive a pass's validity.

A program file is TOML (see ``pipeline/campaigns/drawer_pass_2022.toml``)::

    [program]
    id = "drawer-pass-2022"            # also its campaign id in the ledger
    name = "..."
    time_zone = "Asia/Seoul"
    opens = 2023-01-05T00:00:00        # local; applications before it are refused
    closes = 2023-02-05T00:00:00       # optional, local, exclusive; applications from it are refused

    [pass]
    sku = "drawer-plus-1m"
    stock_cap = 3_000_000              # exactly this many passes, never more
    validity_months = 1                # calendar months from the grant instant, in time_zone
    reminder_days = 7                  # expiry reminder lead time (default of `entitle pass reminders`)
    intake_lag_s = 600                 # default allocation cut-off: now minus this

Nothing here reads the clock: a pass's window is computed from its stored grant instant.
"""

from __future__ import annotations

import calendar
import datetime as dt
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pipeline.campaigns import Campaign, Item, parse_toml, read_definition
from pipeline.errors import CampaignError

DEFAULT_PROGRAM_RESOURCE = "drawer_pass_2022.toml"
PASS_KIND = "pass"
STOCK_CAP_MAX = 100_000_000
VALIDITY_MONTHS_MAX = 24
REMINDER_DAYS_MAX = 28  # a reminder must fall inside a one-month pass
INTAKE_LAG_S_MAX = 7 * 86_400
REMINDER_DAYS_DEFAULT = 7
INTAKE_LAG_S_DEFAULT = 600
_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_PROGRAM_KEYS = {"id", "name", "time_zone", "opens", "closes"}
_PASS_KEYS = {"sku", "stock_cap", "validity_months", "reminder_days", "intake_lag_s"}


@dataclass(frozen=True)
class PassProgram:
    """A validated first-come-first-served pass program."""

    program_id: str
    name: str
    time_zone: str
    opens: dt.datetime  # aware, in time_zone
    closes: dt.datetime | None  # aware, exclusive
    sku: str
    stock_cap: int
    validity_months: int
    reminder_days: int
    intake_lag_s: int
    source: str

    @property
    def zone(self) -> ZoneInfo:
        """The program's time zone."""
        return ZoneInfo(self.time_zone)

    def campaign(self) -> Campaign:
        """The program as a ledger campaign with one item of kind ``pass``.

        The item's ``valid_from`` is the opening instant and it has no fixed ``valid_until``:
        each pass's window starts at its own grant instant (see :meth:`valid_until`).
        """
        item = Item(self.sku, PASS_KIND, None, None, self.opens, None)
        return Campaign(self.program_id, self.name, self.time_zone, self.opens, (item,), self.source)

    def valid_until(self, granted_at: dt.datetime) -> dt.datetime:
        """The end (exclusive) of a pass granted at ``granted_at``: ``validity_months`` calendar months later.

        Same wall-clock time, same day of the month in the program's time zone; a day the
        target month lacks becomes its last day (granted 31 January, valid until 28 February).
        """
        return add_months(granted_at, self.validity_months, self.zone)

    def terms(self) -> dict[str, Any]:
        """The rules that fix every pass's terms and the stock (stored in ``pass_programs``)."""
        return {"stock_cap": self.stock_cap, "validity_months": self.validity_months}


def add_months(instant: dt.datetime, months: int, zone: ZoneInfo) -> dt.datetime:
    """``instant`` plus ``months`` calendar months in ``zone`` (day clamped to the month's end), as UTC."""
    local = instant.astimezone(zone)
    month_index = local.month - 1 + months
    year, month = local.year + month_index // 12, month_index % 12 + 1
    day = min(local.day, calendar.monthrange(year, month)[1])
    return local.replace(year=year, month=month, day=day).astimezone(dt.UTC)


def load_program(path: Path | None = None) -> PassProgram:
    """Load and validate a program file; ``None`` loads the bundled drawer pass."""
    return parse_program(*read_definition(path, DEFAULT_PROGRAM_RESOURCE, "pass program file"))


def parse_program(text: str, source: str) -> PassProgram:
    """Validate program TOML text; errors name ``source`` and the field."""
    document = parse_toml(text, source)
    extra = sorted(set(document) - {"program", "pass"})
    if extra:
        raise CampaignError(f"{source}: unknown top-level key(s) {extra}; a pass program has [program] and [pass]")
    program = _table(source, document, "program", _PROGRAM_KEYS)
    pass_table = _table(source, document, "pass", _PASS_KEYS)
    program_id = _identifier(source, "program.id", program.get("id"))
    name = program.get("name")
    if not isinstance(name, str) or not name.strip():
        raise CampaignError(f"{source}: program.name is required and must be a non-empty string")
    time_zone = program.get("time_zone")
    if not isinstance(time_zone, str):
        raise CampaignError(f"{source}: program.time_zone is required, for example 'Asia/Seoul'")
    zone = check_zone(time_zone, f"{source}: program.time_zone")
    opens = _local_instant(source, "program.opens", program.get("opens"), zone)
    if opens is None:
        raise CampaignError(f"{source}: program.opens is required: a local date-time such as 2023-01-05T00:00:00")
    closes = _local_instant(source, "program.closes", program.get("closes"), zone)
    if closes is not None and closes <= opens:
        raise CampaignError(f"{source}: program.closes {closes.isoformat()} must be after program.opens")
    return PassProgram(
        program_id=program_id,
        name=name,
        time_zone=time_zone,
        opens=opens,
        closes=closes,
        sku=_identifier(source, "pass.sku", pass_table.get("sku")),
        stock_cap=_whole(source, pass_table, "stock_cap", None, 1, STOCK_CAP_MAX),
        validity_months=_whole(source, pass_table, "validity_months", None, 1, VALIDITY_MONTHS_MAX),
        reminder_days=_whole(source, pass_table, "reminder_days", REMINDER_DAYS_DEFAULT, 0, REMINDER_DAYS_MAX),
        intake_lag_s=_whole(source, pass_table, "intake_lag_s", INTAKE_LAG_S_DEFAULT, 0, INTAKE_LAG_S_MAX),
        source=source,
    )


def _identifier(source: str, field: str, value: object) -> str:
    if not isinstance(value, str) or not _ID_PATTERN.match(value):
        raise CampaignError(f"{source}: {field} {value!r} must be 1-63 lowercase letters, digits, '-' or '_'")
    return value


def _table(source: str, document: dict[str, Any], name: str, allowed: set[str]) -> dict[str, Any]:
    table = document.get(name)
    if not isinstance(table, dict):
        raise CampaignError(f"{source}: missing the [{name}] table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise CampaignError(f"{source}: [{name}] has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
    return table


def _whole(source: str, table: dict[str, Any], key: str, default: int | None, low: int, high: int) -> int:
    value = table.get(key, default)
    if value is None:
        raise CampaignError(f"{source}: pass.{key} is required: a whole number from {low:,} to {high:,}")
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise CampaignError(f"{source}: pass.{key} {value!r} must be a whole number from {low:,} to {high:,}")
    return value


def _local_instant(source: str, field: str, value: object, zone: ZoneInfo) -> dt.datetime | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime) and value.tzinfo is None:
        return value.replace(tzinfo=zone)
    if isinstance(value, dt.date) and not isinstance(value, dt.datetime):
        return dt.datetime.combine(value, dt.time(0, 0), tzinfo=zone)
    raise CampaignError(f"{source}: {field} must be a local date-time without offset, such as 2023-02-05T00:00:00")


def check_zone(name: str, where: str) -> ZoneInfo:
    """The zone called ``name``; :class:`CampaignError` naming ``where`` if it is unknown."""
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CampaignError(f"{where} {name!r} is not a known IANA time zone (for example 'Asia/Seoul')") from exc
