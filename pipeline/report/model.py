"""What the report shows, taken from a reconciliation result: plain values, formatted once for both outputs.

A result is a JSON document (``Reconciliation.as_dict()`` or the stored
``result.json``), so every field is read defensively: a missing or odd value
shows as a dash or counts as zero, it never fails the report.

The campaign's time zone and the items' face values come from the result when
it carries them (``time_zone``; ``amount_krw`` per item). Results that do not
carry them take them from the bundled campaign definition of the same
``campaign_id``; failing that, times are shown in UTC and face values as a dash.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pipeline.report.style import SKU_LABEL_CHARS_MAX, WON_SIGN

DASH = "\u2014"
ELLIPSIS = "\u2026"
FALLBACK_TIME_ZONE = "UTC"


def text(value: object) -> str:
    """A display string for any JSON value; missing values show as a dash."""
    if value is None:
        return DASH
    return str(value)


def count(value: object) -> int:
    """An integer count from a JSON value; anything that is not an int counts as zero."""
    if isinstance(value, bool) or not isinstance(value, int):
        return 0
    return value


def is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def thousands(value: object) -> str:
    """1,234,567 for an int; anything else as text."""
    if is_int(value):
        return f"{value:,}"
    return text(value)


def won(amount: int | None) -> str:
    """A face value in Korean won: ₩2,000; a dash when there is none."""
    if amount is None:
        return DASH
    return f"{WON_SIGN}{amount:,}"


def compact(value: float) -> str:
    """A short axis label: 950, 9,500, 95K, 9.5M."""
    if abs(value) < 10_000:
        return f"{value:,.0f}"
    for limit, divisor, suffix in ((1_000_000, 1_000, "K"), (1_000_000_000, 1_000_000, "M")):
        if abs(value) < limit:
            return _trim_decimal(value / divisor) + suffix
    return _trim_decimal(value / 1_000_000_000) + "G"


def _trim_decimal(value: float) -> str:
    formatted = f"{value:.1f}"
    return formatted[:-2] if formatted.endswith(".0") else formatted


def shorten(value: str, limit: int) -> str:
    """value cut to limit characters by an ellipsis in the middle: both ends stay, as skus differ at either."""
    if len(value) <= limit:
        return value
    tail = (limit - 1) // 3
    return value[: limit - 1 - tail] + ELLIPSIS + value[len(value) - tail :]


# --------------------------------------------------------------------------- campaign: time zone, face values


@dataclass(frozen=True)
class CampaignTerms:
    """The campaign facts the report needs that are not counts."""

    time_zone: str
    zone: dt.tzinfo
    amounts_krw: Mapping[str, int]  # face value per sku, for the items that have one


def campaign_terms(result: Mapping[str, Any]) -> CampaignTerms:
    """The time zone and face values of the result's campaign (see the module docstring for where from)."""
    campaign_id = result.get("campaign_id")
    bundled = _bundled_terms(campaign_id if isinstance(campaign_id, str) else None)
    raw_zone = result.get("time_zone")
    name = raw_zone if isinstance(raw_zone, str) and raw_zone else bundled[0]
    try:
        zone: dt.tzinfo = ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        name, zone = FALLBACK_TIME_ZONE, dt.UTC
    amounts = dict(bundled[1])
    for item in _item_mappings(result):
        amount = item.get("amount_krw")
        if "amount_krw" in item:
            sku = text(item.get("item_sku"))
            if isinstance(amount, int) and not isinstance(amount, bool):
                amounts[sku] = amount
            else:
                amounts.pop(sku, None)  # the result says: no face value
    return CampaignTerms(name, zone, amounts)


@functools.cache
def _bundled_terms(campaign_id: str | None) -> tuple[str, tuple[tuple[str, int], ...]]:
    """(time zone, ((sku, amount_krw), ...)) of the bundled campaign with this id; UTC and none if there is none."""
    from pipeline.campaigns import BUNDLED_CAMPAIGNS, parse_campaign, read_definition
    from pipeline.errors import CampaignError

    resource = None if campaign_id is None else BUNDLED_CAMPAIGNS.get(campaign_id)
    if resource is None:
        return FALLBACK_TIME_ZONE, ()
    try:
        campaign = parse_campaign(*read_definition(None, resource, "campaign file"))
    except (CampaignError, OSError):
        return FALLBACK_TIME_ZONE, ()
    if campaign.campaign_id != campaign_id:
        return FALLBACK_TIME_ZONE, ()
    return campaign.time_zone, tuple((i.sku, i.amount_krw) for i in campaign.items if i.amount_krw is not None)


@dataclass(frozen=True)
class LocalTime:
    """An instant from the result, shown in the campaign's zone; iso is the machine-readable original."""

    shown: str
    iso: str | None


def local_time(value: object, zone: dt.tzinfo) -> LocalTime:
    """2026-11-29 03:00:00 KST (UTC+09:00) for an ISO-8601 instant; anything else as text."""
    if not isinstance(value, str):
        return LocalTime(text(value), None)
    try:
        instant = dt.datetime.fromisoformat(value)
    except ValueError:
        return LocalTime(value, None)
    if instant.tzinfo is None:
        instant = instant.replace(tzinfo=dt.UTC)  # the pipeline writes UTC instants
    local = instant.astimezone(zone)
    offset = local.strftime("%z")
    offset = f"{offset[:3]}:{offset[3:]}" if len(offset) == 5 else offset
    name = local.tzname() or ""
    suffix = f"{name} (UTC{offset})" if name and name != "UTC" else "UTC"
    return LocalTime(f"{local:%Y-%m-%d %H:%M:%S} {suffix}", instant.isoformat())


# --------------------------------------------------------------------------- items and partitions


@dataclass(frozen=True)
class ItemRow:
    """One item's figures and labels."""

    sku: str
    amount_krw: int | None
    expected: int
    live: int
    counts: Mapping[str, int]  # matched, missing, unexpected, terms_mismatch, duplicate, voided

    @property
    def face_value(self) -> str:
        return won(self.amount_krw)

    @property
    def chart_label(self) -> str:
        """The sku (cut when long) and, when the item has one, its face value: coupon-2000 (₩2,000)."""
        label = shorten(self.sku, SKU_LABEL_CHARS_MAX)
        return label if self.amount_krw is None else f"{label} ({self.face_value})"


ITEM_COUNT_NAMES = ("matched", "missing", "unexpected", "terms_mismatch", "duplicate", "voided")


def _item_mappings(result: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    raw = result.get("items")
    return [i for i in raw if isinstance(i, Mapping)] if isinstance(raw, list) else []


def item_rows(result: Mapping[str, Any], terms: CampaignTerms) -> list[ItemRow]:
    """The result's items in the order they came (the reconciliation orders them by item key)."""
    rows = []
    for item in _item_mappings(result):
        sku = text(item.get("item_sku"))
        rows.append(
            ItemRow(
                sku=sku,
                amount_krw=terms.amounts_krw.get(sku),
                expected=count(item.get("expected")),
                live=count(item.get("live")),
                counts={name: count(item.get(name)) for name in ITEM_COUNT_NAMES},
            )
        )
    return rows


@dataclass(frozen=True)
class PartitionRow:
    partition_id: int
    state: str
    expected: object
    live: object
    breaks: object
    error: object


def partition_rows(result: Mapping[str, Any]) -> list[PartitionRow]:
    """The result's partitions ordered by partition id, whatever order they came in."""
    raw = result.get("partitions")
    partitions: Sequence[Mapping[str, Any]] = (
        [p for p in raw if isinstance(p, Mapping)] if isinstance(raw, list) else []
    )
    rows = [
        PartitionRow(
            partition_id=count(p.get("partition_id")),
            state=str(p.get("state")),
            expected=p.get("expected"),
            live=p.get("live"),
            breaks=p.get("breaks"),
            error=p.get("error"),
        )
        for p in partitions
    ]
    return sorted(rows, key=lambda row: row.partition_id)
