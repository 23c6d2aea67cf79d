"""Merchant cash programs as data: intake windows, required evidence and the tier table.

A program file is TOML (``pipeline/campaigns/merchant_cash_2022.toml`` is the
bundled one).  Every rule a payout depends on is read from it, never from code:
which claims are inside an intake window, which tier a reported loss falls in,
whether that tier pays an amount or sends the case to review.  The program is
also a ledger campaign with one cash item, so its payouts are grants like any other.
"""

from __future__ import annotations

import datetime as dt
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pipeline.campaigns import (
    _ID_PATTERN,
    AMOUNT_KRW_MAX,
    Campaign,
    Item,
    _reject_unknown,
    _required_str,
    parse_toml,
    read_definition,
)
from pipeline.errors import CampaignError

DEFAULT_PROGRAM_RESOURCE = "merchant_cash_2022.toml"
TIERS_MAX = 32
INTAKE_WINDOWS_MAX = 16
EVIDENCE_KINDS_MAX = 16
LOSS_KRW_MAX = 10**12  # a reported loss above ₩1 trillion is a typo, not a claim
ONE_DAY = dt.timedelta(days=1)


@dataclass(frozen=True)
class Tier:
    """One row of the tier table: losses up to ``up_to_krw`` (inclusive) pay ``amount_krw`` or go to review."""

    name: str
    up_to_krw: int | None  # None: every larger loss (the last tier only)
    amount_krw: int | None  # None: the case goes to review
    review: bool


@dataclass(frozen=True)
class IntakeWindow:
    """A period in which claims are accepted: [opens_at, closes_at), aware instants."""

    name: str
    opens_at: dt.datetime
    closes_at: dt.datetime

    def contains(self, instant: dt.datetime) -> bool:
        """Whether a claim submitted at ``instant`` is inside this window."""
        return self.opens_at <= instant < self.closes_at


@dataclass(frozen=True)
class Program:
    """A validated merchant cash program."""

    program_id: str
    name: str
    time_zone: str
    item_sku: str
    loss_min_krw: int
    approve_max_krw: int
    rejected_share_max: float
    evidence: tuple[str, ...]
    windows: tuple[IntakeWindow, ...]
    tiers: tuple[Tier, ...]
    source: str

    @property
    def zone(self) -> ZoneInfo:
        """The program's time zone."""
        return ZoneInfo(self.time_zone)

    @property
    def starts_at(self) -> dt.datetime:
        """When the first intake window opens: the program's (and its cash item's) start."""
        return self.windows[0].opens_at

    @property
    def ends_at(self) -> dt.datetime:
        """When the last intake window closes."""
        return self.windows[-1].closes_at

    def window_of(self, submitted_at: dt.datetime) -> IntakeWindow | None:
        """The intake window a submission instant falls in, or None (outside every window)."""
        for window in self.windows:
            if window.contains(submitted_at):
                return window
        return None

    def tier_for(self, loss_krw: int) -> Tier:
        """The tier of a reported loss (at least ``loss_min_krw``); boundaries are inclusive upper bounds."""
        for tier in self.tiers:
            if tier.up_to_krw is None or loss_krw <= tier.up_to_krw:
                return tier
        raise CampaignError(f"{self.source}: no tier covers a loss of {loss_krw:,} KRW")  # unreachable once validated

    def tier(self, name: str) -> Tier:
        """The tier called ``name``."""
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise CampaignError(f"{self.source}: no tier named {name!r}")

    def campaign(self) -> Campaign:
        """The ledger campaign of this program: one cash item whose amount each payout carries."""
        item = Item(
            sku=self.item_sku,
            kind="cash",
            amount_krw=None,  # per payout: the tier's or the approved amount
            validity_days=None,
            valid_from=self.starts_at,
            valid_until=None,
        )
        return Campaign(self.program_id, self.name, self.time_zone, self.starts_at, (item,), self.source)


def load_program(path: Path | None = None) -> Program:
    """Load and validate a program file; ``None`` loads the bundled merchant cash program."""
    return parse_program(*read_definition(path, DEFAULT_PROGRAM_RESOURCE, "program file"))


def parse_program(text: str, source: str) -> Program:
    """Validate program TOML text; errors name ``source`` and the field."""
    document = parse_toml(text, source)
    extra = sorted(set(document) - {"program", "intake", "tiers"})
    if extra:
        raise CampaignError(f"{source}: unknown top-level key(s) {extra}; allowed: [program], [[intake]], [[tiers]]")
    section = document.get("program")
    if not isinstance(section, dict):
        raise CampaignError(f"{source}: missing the [program] table")
    _reject_unknown(
        source,
        "program",
        section,
        {
            "id",
            "name",
            "time_zone",
            "item_sku",
            "loss_min_krw",
            "approve_max_krw",
            "rejected_share_max",
            "evidence",
        },
    )
    program_id = _identifier(source, "program.id", section.get("id"))
    name = _required_str(source, "program.name", section.get("name"))
    time_zone = _required_str(source, "program.time_zone", section.get("time_zone"))
    try:
        zone = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CampaignError(f"{source}: program.time_zone {time_zone!r} is not a known IANA time zone") from exc
    item_sku = _identifier(source, "program.item_sku", section.get("item_sku"))
    loss_min = _whole(source, "program.loss_min_krw", section.get("loss_min_krw", 1), 0, LOSS_KRW_MAX)
    approve_max = _whole(source, "program.approve_max_krw", section.get("approve_max_krw"), 1, AMOUNT_KRW_MAX)
    share = section.get("rejected_share_max", 0.0)
    if isinstance(share, bool) or not isinstance(share, int | float) or not 0.0 <= share <= 1.0:
        raise CampaignError(f"{source}: program.rejected_share_max {share!r} must be a share between 0 and 1")
    evidence = _evidence(source, section.get("evidence"))
    windows = _windows(source, document.get("intake"), zone)
    tiers = _tiers(source, document.get("tiers"), loss_min)
    return Program(
        program_id, name, time_zone, item_sku, loss_min, approve_max, float(share), evidence, windows, tiers, source
    )


def _identifier(source: str, field: str, value: object) -> str:
    text = _required_str(source, field, value)
    if not _ID_PATTERN.match(text):
        raise CampaignError(f"{source}: {field} {text!r} must be 1-63 lowercase letters, digits, '-' or '_'")
    return text


def _whole(source: str, field: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise CampaignError(f"{source}: {field} is required: a whole number of won, got {value!r}")
    if not low <= value <= high:
        raise CampaignError(f"{source}: {field} {value:,} must be between {low:,} and {high:,}")
    return value


def _evidence(source: str, value: object) -> tuple[str, ...]:
    if not isinstance(value, list) or not value or not all(isinstance(v, str) for v in value):
        raise CampaignError(f"{source}: program.evidence must be a non-empty list of column names")
    if len(value) > EVIDENCE_KINDS_MAX:
        raise CampaignError(f"{source}: program.evidence has {len(value)} kinds; at most {EVIDENCE_KINDS_MAX}")
    for kind in value:
        if not kind.replace("_", "").isalnum() or not kind.islower():
            raise CampaignError(f"{source}: program.evidence {kind!r} must be lowercase letters, digits and '_'")
    if len(set(value)) != len(value):
        raise CampaignError(f"{source}: program.evidence lists a kind twice: {value}")
    return tuple(value)


def _windows(source: str, raw: object, zone: ZoneInfo) -> tuple[IntakeWindow, ...]:
    if not isinstance(raw, list) or not raw:
        raise CampaignError(f"{source}: needs at least one [[intake]] window (name, opens, closes)")
    if len(raw) > INTAKE_WINDOWS_MAX:
        raise CampaignError(f"{source}: {len(raw)} intake windows; at most {INTAKE_WINDOWS_MAX}")
    windows: list[IntakeWindow] = []
    for index, table in enumerate(raw):
        where = f"intake[{index}]"
        if not isinstance(table, dict):
            raise CampaignError(f"{source}: {where} must be a table")
        _reject_unknown(source, where, table, {"name", "opens", "closes"})
        name = _identifier(source, f"{where}.name", table.get("name"))
        opens, closes = (_local_date(source, f"{where}.{key}", table.get(key)) for key in ("opens", "closes"))
        if closes < opens:
            raise CampaignError(f"{source}: {where} closes ({closes}) before it opens ({opens})")
        # Both days included: the window ends at midnight after its last day, in the program's zone.
        opens_at = dt.datetime.combine(opens, dt.time(0, 0), tzinfo=zone)
        closes_at = dt.datetime.combine(closes + ONE_DAY, dt.time(0, 0), tzinfo=zone)
        if windows and opens_at < windows[-1].closes_at:
            raise CampaignError(
                f"{source}: {where} opens {opens}, before {windows[-1].name!r} closes; list windows in order, "
                "without overlap"
            )
        windows.append(IntakeWindow(name, opens_at, closes_at))
    names = [w.name for w in windows]
    if len(set(names)) != len(names):
        raise CampaignError(f"{source}: intake window names repeat: {names}")
    return tuple(windows)


def _local_date(source: str, field: str, value: object) -> dt.date:
    if isinstance(value, dt.datetime) or not isinstance(value, dt.date):
        raise CampaignError(f"{source}: {field} must be a date such as 2022-10-19 (got {value!r})")
    return value


def _tiers(source: str, raw: object, loss_min_krw: int) -> tuple[Tier, ...]:
    if not isinstance(raw, list) or not raw:
        raise CampaignError(f"{source}: needs [[tiers]] rows (name, up_to_krw, amount_krw or review = true)")
    if len(raw) > TIERS_MAX:
        raise CampaignError(f"{source}: {len(raw)} tiers; at most {TIERS_MAX}")
    tiers: list[Tier] = []
    for index, table in enumerate(raw):
        where = f"tiers[{index}]"
        last = index == len(raw) - 1
        if not isinstance(table, dict):
            raise CampaignError(f"{source}: {where} must be a table")
        _reject_unknown(source, where, table, {"name", "up_to_krw", "amount_krw", "review"})
        name = _identifier(source, f"{where}.name", table.get("name"))
        up_to = table.get("up_to_krw")
        if last and up_to is not None:
            raise CampaignError(
                f"{source}: {where} is the last tier and must have no up_to_krw: it takes every larger loss, so "
                "no claim falls outside the table"
            )
        if not last:
            up_to = _whole(source, f"{where}.up_to_krw", up_to, loss_min_krw, LOSS_KRW_MAX)
            previous = tiers[-1].up_to_krw if tiers else None
            if previous is not None and up_to <= previous:
                raise CampaignError(
                    f"{source}: {where}.up_to_krw {up_to:,} is not above the previous tier's {previous:,}; list tiers "
                    "in ascending order without overlap"
                )
        review = table.get("review", False)
        if not isinstance(review, bool):
            raise CampaignError(f"{source}: {where}.review must be true or false")
        amount = table.get("amount_krw")
        if review and amount is not None:
            raise CampaignError(f"{source}: {where} has both review = true and amount_krw; choose one")
        if not review:
            amount = _whole(source, f"{where}.amount_krw", amount, 1, AMOUNT_KRW_MAX)
        tiers.append(Tier(name, up_to, amount, review))
    names = [t.name for t in tiers]
    if len(set(names)) != len(names):
        raise CampaignError(f"{source}: tier names repeat: {names}")
    return tuple(tiers)


def describe_tiers(program: Program) -> list[dict[str, Any]]:
    """The tier table as plain values (loss range and outcome), for --json and the docs."""
    rows: list[dict[str, Any]] = []
    low = program.loss_min_krw
    for tier in program.tiers:
        rows.append(
            {
                "tier": tier.name,
                "loss_from_krw": low,
                "loss_up_to_krw": tier.up_to_krw,
                "amount_krw": tier.amount_krw,
                "review": tier.review,
            }
        )
        if tier.up_to_krw is not None:
            low = tier.up_to_krw + 1
    return rows
