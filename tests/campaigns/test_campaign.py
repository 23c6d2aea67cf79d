"""pipeline.campaigns: the bundled campaign, validation errors that name the field, the start rule."""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Callable
from pathlib import Path

import pytest
from support import REPO_ROOT

from pipeline.campaigns import Campaign, load_campaign, parse_campaign
from pipeline.errors import CampaignError, CampaignNotStartedError

SEOUL = dt.timezone(dt.timedelta(hours=9))
START = dt.datetime(2023, 1, 5, 0, 0, tzinfo=SEOUL)
NINETY_DAYS_LATER = dt.datetime(2023, 4, 5, 0, 0, tzinfo=SEOUL)

# A valid campaign the bad-file cases below start from (one edit each).
VALID_TOML = """
[campaign]
id = "test-campaign"
name = "Test"
time_zone = "Asia/Seoul"
start = 2023-01-05T00:00:00

[[items]]
sku = "emoticon-permanent"
kind = "emoticon"
validity = "permanent"

[[items]]
sku = "emoticon-90d"
kind = "emoticon"
validity = "90d"

[[items]]
sku = "coupon-2000"
kind = "coupon"
amount_krw = 2000
validity = "90d"
"""


def test_valid_toml_used_by_the_bad_cases_parses() -> None:
    campaign = parse_campaign(VALID_TOML, "valid.toml")
    assert [i.sku for i in campaign.items] == ["emoticon-permanent", "emoticon-90d", "coupon-2000"]


# --------------------------------------------------------------------------- the bundled campaign


@pytest.fixture(scope="module")
def bundled() -> Campaign:
    return load_campaign()


def test_bundled_campaign_identity_and_start(bundled: Campaign) -> None:
    assert bundled.campaign_id == "kakao-outage-2022"
    assert bundled.time_zone == "Asia/Seoul"
    assert bundled.starts_at == START
    assert bundled.starts_at.isoformat() == "2023-01-05T00:00:00+09:00"
    assert bundled.starts_at.utcoffset() == dt.timedelta(hours=9)


def test_bundled_campaign_has_five_items_with_the_announced_terms(bundled: Campaign) -> None:
    assert len(bundled.items) == 5
    by_sku = {i.sku: i for i in bundled.items}
    assert len(by_sku) == 5, "skus are distinct"

    emoticons = [i for i in bundled.items if i.kind == "emoticon"]
    coupons = [i for i in bundled.items if i.kind == "coupon"]
    assert len(emoticons) == 3 and len(coupons) == 2

    permanent = [i for i in emoticons if i.validity_days is None]
    ninety = [i for i in emoticons if i.validity_days == 90]
    assert len(permanent) == 1 and len(ninety) == 2
    assert permanent[0].valid_until is None
    assert all(i.amount_krw is None for i in emoticons)

    assert sorted(i.amount_krw for i in coupons) == [2000, 3000]  # type: ignore[type-var]
    assert by_sku["coupon-2000"].amount_krw == 2000
    assert by_sku["coupon-3000"].amount_krw == 3000

    for item in bundled.items:
        assert item.valid_from == START
    for item in ninety + coupons:
        assert item.validity_days == 90
        assert item.valid_until == NINETY_DAYS_LATER
        assert item.terms()["valid_until"] == "2023-04-05T00:00:00+09:00"
    assert sum(i.amount_krw or 0 for i in bundled.items) == 5000


def test_bundled_terms_hashes_are_pinned(bundled: Campaign) -> None:
    # Golden values: ledgers in the field store these hashes. If the hashing or the terms' encoding
    # changes, every existing ledger would report "terms changed" for granted items.
    assert {i.sku: i.terms_hash() for i in bundled.items} == {
        "emoticon-permanent": "2774cd1596c308f5",
        "emoticon-90d-a": "fd60121461a3d2a0",
        "emoticon-90d-b": "f9d3054488c5d220",
        "coupon-2000": "23536396b321ad60",
        "coupon-3000": "6e81d950aad4ce9c",
    }


def test_terms_come_from_the_file_not_the_clock(bundled: Campaign, tmp_path: Path) -> None:
    again = load_campaign()
    assert [i.terms_hash() for i in again.items] == [i.terms_hash() for i in bundled.items]
    assert again.items == bundled.items

    # The same file loaded from disk under another path carries the same terms.
    copy = tmp_path / "copy.toml"
    copy.write_text(
        (REPO_ROOT / "pipeline" / "campaigns" / "kakao_outage_2022.toml").read_text(
            encoding="utf-8"
        ),
        encoding="utf-8",
    )
    from_disk = load_campaign(copy)
    assert [i.terms_hash() for i in from_disk.items] == [i.terms_hash() for i in bundled.items]
    assert from_disk.source == str(copy)


def test_item_lookup_by_sku(bundled: Campaign) -> None:
    assert bundled.item("coupon-3000").amount_krw == 3000
    with pytest.raises(CampaignError, match=r"no item 'coupon-9999'.*coupon-2000"):
        bundled.item("coupon-9999")


def test_validity_counts_calendar_days_in_the_campaign_zone() -> None:
    # 30 days across the US spring-forward: same wall-clock time, 30 days minus one hour elapsed.
    text = VALID_TOML.replace('"Asia/Seoul"', '"America/New_York"').replace("2023-01-05T00:00:00", "2023-03-01")
    text = text.replace('"90d"', '"30d"')
    campaign = parse_campaign(text, "ny.toml")
    item = campaign.item("emoticon-90d")
    assert item.valid_from.isoformat() == "2023-03-01T00:00:00-05:00"
    assert item.valid_until is not None
    assert item.valid_until.isoformat() == "2023-03-31T00:00:00-04:00"
    assert item.valid_until - item.valid_from == dt.timedelta(days=30)  # wall clock
    assert item.valid_until.astimezone(dt.UTC) - item.valid_from.astimezone(dt.UTC) == dt.timedelta(days=30, hours=-1)


# --------------------------------------------------------------------------- bad campaign files


BAD_CAMPAIGNS = [
    pytest.param(
        lambda t: t.replace('kind = "emoticon"\nvalidity = "90d"', 'kind = "sticker"\nvalidity = "90d"'),
        [r"items\[1\]\.kind", "'sticker'", "emoticon, coupon"],
        id="unknown-kind",
    ),
    pytest.param(
        lambda t: t.replace("amount_krw = 2000", "amount_krw = -2000"),
        [r"items\[2\]\.amount_krw", "-2000", "between 1 and"],
        id="negative-amount",
    ),
    pytest.param(
        lambda t: t.replace("amount_krw = 2000", "amount_krw = 0"),
        [r"items\[2\]\.amount_krw", "between 1 and"],
        id="zero-amount",
    ),
    pytest.param(
        lambda t: t.replace('sku = "coupon-2000"', 'sku = "emoticon-90d"'),
        [r"items\[2\]\.sku", "'emoticon-90d'", "duplicate"],
        id="duplicate-sku",
    ),
    pytest.param(
        lambda t: t.replace('"Asia/Seoul"', '"Mars/Olympus_Mons"'),
        [r"campaign\.time_zone", "Mars/Olympus_Mons", "IANA"],
        id="unknown-time-zone",
    ),
    pytest.param(
        lambda t: t.replace("start = 2023-01-05T00:00:00", 'start = "2023-13-45"'),
        [r"campaign\.start", "2023-13-45", "not a date"],
        id="malformed-date",
    ),
    pytest.param(
        lambda t: t.replace("start = 2023-01-05T00:00:00", 'start = "5 January 2023"'),
        [r"campaign\.start", "5 January 2023"],
        id="malformed-date-words",
    ),
    pytest.param(
        lambda t: t.replace("start = 2023-01-05T00:00:00", "start = 2023-01-05T00:00:00+09:00"),
        [r"campaign\.start", "without offset"],
        id="start-with-offset",
    ),
    pytest.param(
        lambda t: t.replace("start = 2023-01-05T00:00:00\n", ""),
        [r"campaign\.start is required"],
        id="missing-start",
    ),
    pytest.param(
        lambda t: t.replace("[campaign]", "[campaing]"),
        [r"missing the \[campaign\] table"],
        id="missing-campaign-table",
    ),
    pytest.param(
        lambda t: t.replace(
            'kind = "emoticon"\nvalidity = "permanent"', 'kind = "emoticon"\namount_krw = 500\nvalidity = "permanent"'
        ),
        [r"items\[0\]\.amount_krw", "not allowed for a emoticon"],
        id="amount-on-emoticon",
    ),
    pytest.param(
        lambda t: t.replace("amount_krw = 2000\n", ""),
        [r"items\[2\]\.amount_krw is required for a coupon"],
        id="coupon-without-amount",
    ),
    pytest.param(
        lambda t: t.replace('validity = "permanent"', 'validity = "forever"'),
        [r"items\[0\]\.validity", "'forever'", "90d"],
        id="bad-validity",
    ),
    pytest.param(
        lambda t: t.replace('sku = "coupon-2000"', 'sku = "coupon-2000"\ncolour = "red"'),
        [r"items\[2\] has unknown key\(s\) \['colour'\]"],
        id="unknown-item-key",
    ),
    pytest.param(
        lambda t: t.replace('sku = "coupon-2000"', 'sku = "Coupon 2000"'),
        [r"items\[2\]\.sku", "'Coupon 2000'", "lowercase"],
        id="bad-sku",
    ),
    pytest.param(
        lambda t: t.split("[[items]]")[0],
        [r"at least one \[\[items\]\]"],
        id="no-items",
    ),
    pytest.param(
        lambda t: t.replace("[campaign]", "[campaign\n"),
        ["not valid TOML"],
        id="not-toml",
    ),
    pytest.param(
        lambda t: t.replace('time_zone = "Asia/Seoul"', 'time_zone = "Asia/Seoul"\nid_column = "Merchant ID"'),
        [r"campaign\.id_column 'Merchant ID' must be a column name", "merchant_id"],
        id="bad-id-column",
    ),
]


@pytest.mark.parametrize(("edit", "patterns"), BAD_CAMPAIGNS)
def test_bad_campaign_file_names_the_field(edit: Callable[[str], str], patterns: list[str], tmp_path: Path) -> None:
    text = edit(VALID_TOML)
    assert text != VALID_TOML, "the edit must change the file"
    path = tmp_path / "bad.toml"
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CampaignError) as caught:
        load_campaign(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: "), "the message names the file"
    for pattern in patterns:
        assert re.search(pattern, message), f"{pattern!r} not in {message!r}"
    assert caught.value.exit_code == 3


def test_missing_campaign_file_is_a_campaign_error(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    with pytest.raises(CampaignError, match="cannot read the campaign file"):
        load_campaign(missing)


# --------------------------------------------------------------------------- the start rule


def test_require_started_refuses_before_the_start(bundled: Campaign) -> None:
    one_microsecond_early = START - dt.timedelta(microseconds=1)
    with pytest.raises(CampaignNotStartedError) as caught:
        bundled.require_started(one_microsecond_early)
    message = str(caught.value)
    assert "2023-01-05T00:00:00+09:00" in message
    assert "kakao-outage-2022" in message
    assert caught.value.exit_code == 6


def test_require_started_compares_instants_not_wall_clocks(bundled: Campaign) -> None:
    # 14:59:59 UTC on the 4th is 23:59:59 in Seoul: still before the start.
    with pytest.raises(CampaignNotStartedError):
        bundled.require_started(dt.datetime(2023, 1, 4, 14, 59, 59, tzinfo=dt.UTC))
    bundled.require_started(dt.datetime(2023, 1, 4, 15, 0, 0, tzinfo=dt.UTC))  # the start instant itself


def test_require_started_passes_at_and_after_the_start(bundled: Campaign) -> None:
    bundled.require_started(START)
    bundled.require_started(START + dt.timedelta(days=1))
    bundled.require_started(dt.datetime.now(dt.UTC))


# --------------------------------------------------------------------------- other bundled campaigns


def test_channel_credit_is_bundled_by_id_and_reads_merchant_ids() -> None:
    campaign = load_campaign(Path("channel-credit-2022"))
    assert campaign.campaign_id == "channel-credit-2022"
    assert campaign.id_column == "merchant_id"
    (item,) = campaign.items
    assert (item.sku, item.kind, item.amount_krw, item.valid_until) == ("channel-credit-50000", "cash", 50_000, None)
    assert item.valid_from == START
    assert load_campaign(Path("kakao-outage-2022")).id_column == "user_id", "the default input column"


def test_a_file_named_like_a_bundled_campaign_wins(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "channel-credit-2022").write_text(VALID_TOML, encoding="utf-8")
    assert load_campaign(Path("channel-credit-2022")).campaign_id != "channel-credit-2022"
