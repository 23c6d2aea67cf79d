"""Campaigns as data: load, validate and derive each item's grant terms.

A campaign file is TOML.  Every term a grant carries (amount, valid_from,
valid_until) is computed here from the file alone, never from the clock, so a
grant written weeks later by a rerun is identical to the first attempt.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import re
import tomllib
from dataclasses import dataclass, field, replace
from importlib import resources
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from pipeline.credentials import Secret
from pipeline.errors import CampaignError, CampaignNotStartedError

ITEM_KINDS = ("emoticon", "coupon", "pass", "cash")
LEDGER_ISSUER = "ledger"  # the default issuer: the ledger entry is the entitlement, nothing to deliver
ISSUER_KINDS = ("http", "python")
ISSUERS_PER_CAMPAIGN_MAX = 16
ISSUER_REQUESTS_PER_S_MAX = 10_000.0
ISSUER_CONCURRENCY_MAX = 64
ISSUER_BATCH_SIZE_MAX = 1_000  # the reference service's batch limit
ISSUER_TIMEOUT_S_MAX = 600.0
ISSUER_ATTEMPTS_MAX = 100
ISSUER_BREAKER_FAILURES_MAX = 1_000
ISSUER_COOLDOWN_S_MAX = 3_600.0
KINDS_WITH_AMOUNT = frozenset({"coupon", "cash"})
ITEMS_PER_CAMPAIGN_MAX = 64
AMOUNT_KRW_MAX = 100_000_000
VALIDITY_DAYS_MAX = 3650
DEFAULT_CAMPAIGN_RESOURCE = "kakao_outage_2022.toml"
# Campaign files shipped in pipeline/campaigns, by campaign id (ENTITLE_CAMPAIGN may name one).
BUNDLED_CAMPAIGNS = {
    "kakao-outage-2022": DEFAULT_CAMPAIGN_RESOURCE,
    "channel-credit-2022": "channel_credit_2022.toml",
}

_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{0,62}$")
_COLUMN_PATTERN = re.compile(r"^[a-z][a-z0-9_]{0,62}$")
ID_COLUMN_DEFAULT = "user_id"
_VALIDITY_PATTERN = re.compile(r"^(\d{1,5})d$")


@dataclass(frozen=True)
class Item:
    """One thing every eligible user receives, with its fixed terms."""

    sku: str
    kind: str
    amount_krw: int | None
    validity_days: int | None  # None = permanent
    valid_from: dt.datetime
    valid_until: dt.datetime | None
    # Who delivers the grant; not a term (what the user receives does not depend on it).
    issuer: str = LEDGER_ISSUER

    def terms(self) -> dict[str, Any]:
        """The terms a grant of this item carries, as plain JSON-able values."""
        return {
            "sku": self.sku,
            "kind": self.kind,
            "amount_krw": self.amount_krw,
            "valid_from": self.valid_from.isoformat(),
            "valid_until": None if self.valid_until is None else self.valid_until.isoformat(),
        }

    def terms_hash(self) -> str:
        """A short digest of :meth:`terms`; equal digests mean identical grants."""
        canonical = json.dumps(self.terms(), sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode()).hexdigest()[:16]


@dataclass(frozen=True)
class IssuerSpec:
    """A downstream service that receives a campaign's grants (``[issuers.NAME]`` in the campaign file)."""

    name: str
    kind: str  # http | python
    url: str | None = None  # http: the service's base URL (ENTITLE_ISSUER_<NAME>_URL overrides it)
    factory: str | None = None  # python: "package.module:callable" taking this spec, returning an Issuer
    requests_per_s: float = 50.0
    concurrency: int = 4
    batch_size: int = 1_000
    timeout_s: float = 10.0
    max_attempts: int = 8
    breaker_failures: int = 5
    breaker_cooldown_s: float = 30.0
    backoff_base_s: float = 0.2
    backoff_cap_s: float = 30.0
    auth: str = "none"  # http: none | bearer (the token never sits in the file: pipeline.credentials)
    ca_bundle: str | None = None  # http: a PEM file of CAs to verify an https url against (default: the system's)
    token: Secret | None = field(default=None, repr=False, compare=False)  # attached from the deployment


@dataclass(frozen=True)
class Campaign:
    """A validated campaign: identity, time zone, start instant and items."""

    campaign_id: str
    name: str
    time_zone: str
    starts_at: dt.datetime  # aware, in the campaign's time zone
    items: tuple[Item, ...]
    source: str
    issuers: tuple[IssuerSpec, ...] = ()
    # The id column of the campaign's input file: user_id, or e.g. merchant_id for a program over
    # merchants. In partitions and in the ledger the subject's id is always user_id.
    id_column: str = ID_COLUMN_DEFAULT

    def issuer(self, name: str) -> IssuerSpec:
        """The declared issuer called ``name``; :class:`CampaignError` if there is none."""
        for spec in self.issuers:
            if spec.name == name:
                return spec
        raise CampaignError(f"campaign {self.campaign_id!r} declares no issuer {name!r}")

    def items_of(self, issuer: str) -> tuple[Item, ...]:
        """The items delivered by ``issuer``."""
        return tuple(i for i in self.items if i.issuer == issuer)

    def with_deployment(self, urls: dict[str, str], tokens: dict[str, Secret]) -> Campaign:
        """This campaign with the deployment's issuer URLs replaced and tokens attached, by issuer name."""
        if not urls and not tokens:
            return self
        issuers = tuple(
            replace(s, url=urls.get(s.name, s.url), token=tokens.get(s.name, s.token)) for s in self.issuers
        )
        return replace(self, issuers=issuers)

    def item(self, sku: str) -> Item:
        """The item with this sku; :class:`CampaignError` if there is none."""
        for item in self.items:
            if item.sku == sku:
                return item
        known = ", ".join(i.sku for i in self.items)
        raise CampaignError(f"campaign {self.campaign_id!r} has no item {sku!r} (items: {known})")

    def require_started(self, now: dt.datetime) -> None:
        """Refuse to grant before the campaign's start instant."""
        if now < self.starts_at:
            raise CampaignNotStartedError(
                f"campaign {self.campaign_id!r} starts at {self.starts_at.isoformat()}; "
                f"it is now {now.astimezone(self.starts_at.tzinfo).isoformat()}. "
                "Nothing is granted before the start; run again after it."
            )


def load_campaign(path: Path | None = None) -> Campaign:
    """Load and validate a campaign file; ``None`` loads the bundled default, a bundled id that campaign."""
    bundled = None if path is None else BUNDLED_CAMPAIGNS.get(str(path))
    if path is not None and bundled is not None and not Path(path).exists():
        path = None  # the bundled campaign of that id (a file of the same name wins)
    return parse_campaign(*read_definition(path, bundled or DEFAULT_CAMPAIGN_RESOURCE, "campaign file"))


def read_definition(path: Path | None, bundled: str, what: str) -> tuple[str, str]:
    """(text, source) of a definition file: ``path``, or the bundled resource ``bundled`` when None."""
    if path is None:
        text = resources.files("pipeline.campaigns").joinpath(bundled).read_text(encoding="utf-8")
        return text, f"<bundled {bundled}>"
    try:
        return Path(path).read_text(encoding="utf-8"), str(path)
    except OSError as exc:
        raise CampaignError(f"{path}: cannot read the {what} ({exc.strerror})") from exc


def parse_toml(text: str, source: str) -> dict[str, Any]:
    """TOML text as a document; :class:`CampaignError` naming ``source`` when it is not valid TOML."""
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise CampaignError(f"{source}: not valid TOML: {exc}") from exc


def parse_campaign(text: str, source: str) -> Campaign:
    """Validate campaign TOML text; errors name ``source`` and the field."""
    document = parse_toml(text, source)
    section = document.get("campaign")
    if not isinstance(section, dict):
        raise CampaignError(f"{source}: missing the [campaign] table")
    _reject_unknown(source, "campaign", section, {"id", "name", "time_zone", "start", "id_column"})
    campaign_id = _required_str(source, "campaign.id", section.get("id"))
    if not _ID_PATTERN.match(campaign_id):
        raise CampaignError(f"{source}: campaign.id {campaign_id!r} must be 1-63 lowercase letters, digits, '-' or '_'")
    name = _required_str(source, "campaign.name", section.get("name"))
    time_zone = _required_str(source, "campaign.time_zone", section.get("time_zone"))
    try:
        zone = ZoneInfo(time_zone)
    except (ZoneInfoNotFoundError, ValueError) as exc:
        raise CampaignError(
            f"{source}: campaign.time_zone {time_zone!r} is not a known IANA time zone (for example 'Asia/Seoul')"
        ) from exc
    starts_at = _parse_start(source, section.get("start"), zone)
    id_column = section.get("id_column", ID_COLUMN_DEFAULT)
    if not isinstance(id_column, str) or not _COLUMN_PATTERN.match(id_column):
        raise CampaignError(
            f"{source}: campaign.id_column {id_column!r} must be a column name: lowercase letters, digits and '_', "
            "starting with a letter (for example 'merchant_id')"
        )

    raw_items = document.get("items")
    if not isinstance(raw_items, list) or not raw_items:
        raise CampaignError(f"{source}: needs at least one [[items]] table")
    if len(raw_items) > ITEMS_PER_CAMPAIGN_MAX:
        raise CampaignError(f"{source}: {len(raw_items)} items; at most {ITEMS_PER_CAMPAIGN_MAX}")
    extra = set(document) - {"campaign", "items", "issuers"}
    if extra:
        raise CampaignError(f"{source}: unknown top-level key(s) {sorted(extra)}")
    issuers = _parse_issuers(source, document.get("issuers", {}))
    items = tuple(_parse_item(source, index, raw, starts_at) for index, raw in enumerate(raw_items))
    declared = {s.name for s in issuers}
    for index, item in enumerate(items):
        if item.issuer != LEDGER_ISSUER and item.issuer not in declared:
            raise CampaignError(
                f"{source}: items[{index}].issuer {item.issuer!r} is not declared; declare [issuers.{item.issuer}] "
                f"or use {LEDGER_ISSUER!r} (declared: {sorted(declared) or 'none'})"
            )
    seen: set[str] = set()
    for index, item in enumerate(items):
        if item.sku in seen:
            raise CampaignError(f"{source}: items[{index}].sku {item.sku!r} is a duplicate sku")
        seen.add(item.sku)
    return Campaign(campaign_id, name, time_zone, starts_at, items, source, issuers, id_column)


_ISSUER_KEYS = {
    "kind",
    "url",
    "factory",
    "requests_per_s",
    "concurrency",
    "batch_size",
    "timeout_s",
    "max_attempts",
    "breaker_failures",
    "breaker_cooldown_s",
    "backoff_base_s",
    "backoff_cap_s",
    "auth",
    "ca_bundle",
}
ISSUER_AUTH = ("none", "bearer")


def _parse_issuers(source: str, raw: object) -> tuple[IssuerSpec, ...]:
    if not isinstance(raw, dict):
        raise CampaignError(f"{source}: issuers must be tables such as [issuers.shop]")
    if len(raw) > ISSUERS_PER_CAMPAIGN_MAX:
        raise CampaignError(f"{source}: {len(raw)} issuers; at most {ISSUERS_PER_CAMPAIGN_MAX}")
    return tuple(_parse_issuer(source, name, table) for name, table in raw.items())


def _parse_issuer(source: str, name: str, table: object) -> IssuerSpec:
    where = f"issuers.{name}"
    if not _ID_PATTERN.match(name):
        raise CampaignError(f"{source}: issuer name {name!r} must be 1-63 lowercase letters, digits, '-' or '_'")
    if name == LEDGER_ISSUER:
        raise CampaignError(f"{source}: {where}: {LEDGER_ISSUER!r} is the built-in issuer and cannot be declared")
    if not isinstance(table, dict):
        raise CampaignError(f"{source}: {where} must be a table")
    _reject_unknown(source, where, table, _ISSUER_KEYS)
    kind = _required_str(source, f"{where}.kind", table.get("kind"))
    if kind not in ISSUER_KINDS:
        raise CampaignError(f"{source}: {where}.kind {kind!r} is unknown; use one of {', '.join(ISSUER_KINDS)}")
    url = table.get("url")
    factory = table.get("factory")
    if kind == "http":
        url = _required_str(source, f"{where}.url", url)
        if not re.match(r"^https?://[^\s/]+", url):
            raise CampaignError(f"{source}: {where}.url {url!r} must be an http:// or https:// URL")
        url = url.rstrip("/")
        if factory is not None:
            raise CampaignError(f'{source}: {where}.factory is only for kind = "python"')
    else:
        factory = _required_str(source, f"{where}.factory", factory)
        if not re.match(r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", factory):
            raise CampaignError(f"{source}: {where}.factory {factory!r} must look like 'package.module:callable'")
        if url is not None:
            url = _required_str(source, f"{where}.url", url)

    auth = table.get("auth", "none")
    if auth not in ISSUER_AUTH:
        raise CampaignError(
            f"{source}: {where}.auth {auth!r} is unknown; use one of {', '.join(ISSUER_AUTH)} "
            "(the token itself never goes in this file)"
        )
    if auth != "none" and kind != "http":
        raise CampaignError(f'{source}: {where}.auth is only for kind = "http"')
    ca_bundle = table.get("ca_bundle")
    if ca_bundle is not None:
        ca_bundle = _required_str(source, f"{where}.ca_bundle", ca_bundle)
        if kind != "http" or not str(url).startswith("https://"):
            raise CampaignError(f"{source}: {where}.ca_bundle is only for an https:// url")

    def number(key: str, default: float, low: float, high: float, whole: bool) -> Any:
        value = table.get(key, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or (whole and not isinstance(value, int)):
            raise CampaignError(f"{source}: {where}.{key} must be a {'whole ' if whole else ''}number, got {value!r}")
        if not low <= value <= high:
            raise CampaignError(f"{source}: {where}.{key} {value} must be between {low:g} and {high:g}")
        return value

    return IssuerSpec(
        name=name,
        kind=kind,
        url=url,
        factory=factory,
        requests_per_s=float(number("requests_per_s", 50.0, 0.01, ISSUER_REQUESTS_PER_S_MAX, False)),
        concurrency=number("concurrency", 4, 1, ISSUER_CONCURRENCY_MAX, True),
        batch_size=number("batch_size", 1_000, 1, ISSUER_BATCH_SIZE_MAX, True),
        timeout_s=float(number("timeout_s", 10.0, 0.01, ISSUER_TIMEOUT_S_MAX, False)),
        max_attempts=number("max_attempts", 8, 1, ISSUER_ATTEMPTS_MAX, True),
        breaker_failures=number("breaker_failures", 5, 1, ISSUER_BREAKER_FAILURES_MAX, True),
        breaker_cooldown_s=float(number("breaker_cooldown_s", 30.0, 0.0, ISSUER_COOLDOWN_S_MAX, False)),
        backoff_base_s=float(number("backoff_base_s", 0.2, 0.0, 60.0, False)),
        backoff_cap_s=float(number("backoff_cap_s", 30.0, 0.0, 3_600.0, False)),
        auth=str(auth),
        ca_bundle=ca_bundle,
    )


def _parse_start(source: str, value: object, zone: ZoneInfo) -> dt.datetime:
    field = "campaign.start"
    if isinstance(value, str):
        try:
            value = dt.datetime.fromisoformat(value) if "T" in value else dt.date.fromisoformat(value)
        except ValueError as exc:
            raise CampaignError(
                f"{source}: {field} {value!r} is not a date (2023-01-05) or local date-time (2023-01-05T00:00:00)"
            ) from exc
    if isinstance(value, dt.datetime):
        if value.tzinfo is not None:
            raise CampaignError(
                f"{source}: {field} must be a local date-time without offset; the zone comes from campaign.time_zone"
            )
        return value.replace(tzinfo=zone)
    if isinstance(value, dt.date):
        return dt.datetime.combine(value, dt.time(0, 0), tzinfo=zone)
    raise CampaignError(f"{source}: {field} is required: a date such as 2023-01-05")


def _parse_item(source: str, index: int, raw: object, starts_at: dt.datetime) -> Item:
    where = f"items[{index}]"
    if not isinstance(raw, dict):
        raise CampaignError(f"{source}: {where} must be a table")
    _reject_unknown(source, where, raw, {"sku", "kind", "amount_krw", "validity", "issuer"})
    issuer = raw.get("issuer", LEDGER_ISSUER)
    if not isinstance(issuer, str) or not issuer:
        raise CampaignError(f"{source}: {where}.issuer must be {LEDGER_ISSUER!r} or the name of a declared issuer")
    sku = _required_str(source, f"{where}.sku", raw.get("sku"))
    if not _ID_PATTERN.match(sku):
        raise CampaignError(f"{source}: {where}.sku {sku!r} must be 1-63 lowercase letters, digits, '-' or '_'")
    kind = _required_str(source, f"{where}.kind", raw.get("kind"))
    if kind not in ITEM_KINDS:
        raise CampaignError(f"{source}: {where}.kind {kind!r} is unknown; use one of {', '.join(ITEM_KINDS)}")
    amount = raw.get("amount_krw")
    if kind in KINDS_WITH_AMOUNT:
        if isinstance(amount, bool) or not isinstance(amount, int):
            raise CampaignError(f"{source}: {where}.amount_krw is required for a {kind}: whole won")
        if amount <= 0 or amount > AMOUNT_KRW_MAX:
            raise CampaignError(f"{source}: {where}.amount_krw {amount} must be between 1 and {AMOUNT_KRW_MAX:,}")
    elif amount is not None:
        raise CampaignError(f"{source}: {where}.amount_krw is not allowed for a {kind}")
    validity = raw.get("validity")
    validity_days: int | None
    if validity == "permanent":
        validity_days = None
    else:
        match = _VALIDITY_PATTERN.match(validity) if isinstance(validity, str) else None
        if match is None:
            raise CampaignError(
                f'{source}: {where}.validity {validity!r} must be "permanent" or a day count such as "90d"'
            )
        validity_days = int(match.group(1))
        if not 1 <= validity_days <= VALIDITY_DAYS_MAX:
            raise CampaignError(f"{source}: {where}.validity {validity!r} must be between 1d and {VALIDITY_DAYS_MAX}d")
    # Calendar days in the campaign's zone, anchored at the start: never the clock.
    valid_until = None if validity_days is None else starts_at + dt.timedelta(days=validity_days)
    return Item(sku, kind, amount if kind in KINDS_WITH_AMOUNT else None, validity_days, starts_at, valid_until, issuer)


def _required_str(source: str, field: str, value: object) -> str:
    if not isinstance(value, str) or not value.strip():
        raise CampaignError(f"{source}: {field} is required and must be a non-empty string")
    return value


def _reject_unknown(source: str, where: str, table: dict[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise CampaignError(f"{source}: {where} has unknown key(s) {unknown}; allowed: {sorted(allowed)}")
