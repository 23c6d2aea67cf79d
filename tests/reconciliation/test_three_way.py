"""pipeline.reconciliation.three_way: an issuer's export spilled by partition gives the same result however it is cut.

The export's keys go to a scratch folder in ENTITLE_HOME, one file per partition and spill, and
come back one partition at a time, in slices; these tests force many small spills, partitions
and slices on an export with every kind of row (matched, missing, voided, never granted, another
issuer's item, duplicates, rows that cannot be ledger grants) and check the counts against the
export as written, the break rows against the default cut, and that the folder is gone afterwards.
"""

from __future__ import annotations

import datetime as dt
import errno
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from hypothesis import given
from hypothesis import strategies as st
from support.delivery import CAMPAIGN, delivery_settings, write_campaign
from support.ledger_state import prepare_pipeline
from support.reconciliation import STRANGER, USERS

from pipeline.campaigns import IssuerSpec
from pipeline.config import Settings
from pipeline.delivery.issuers import Answer, IssuerUnavailable
from pipeline.errors import StorageError
from pipeline.grants import corrections, runs
from pipeline.grants.partitioning import BUCKET_MODULUS, partition_of, split_bucket_range
from pipeline.reconciliation import three_way

GRANTED = USERS[:200]  # each holds coupon-2000 and coupon-3000, delivered by issuer "shop"
EXPORTED = GRANTED[:150]  # the issuer holds both coupons of these; the other 50 users' are missing
COUPONS = ("coupon-2000", "coupon-3000")
CHUNK_ROWS = 7  # rows per frame the crafted issuer yields

CRAFTED: dict[str, Any] = {"export": [], "fail_after_chunks": None, "spilled_files": [], "home": None}


class CraftedIssuer:
    """A python issuer exporting CRAFTED["export"] in small frames (or failing part way through)."""

    def deliver(self, batch: Any) -> list[Answer]:
        return [Answer(g.grant_id, "created") for g in batch]

    def export(self, campaign_id: str) -> Iterator[dict[str, Any]]:
        for frame in self.export_frames(campaign_id):
            yield from frame.iter_rows(named=True)

    def export_frames(self, campaign_id: str) -> Iterator[pl.DataFrame]:
        rows = CRAFTED["export"]
        for number, start in enumerate(range(0, len(rows), CHUNK_ROWS)):
            if number == CRAFTED["fail_after_chunks"]:
                raise IssuerUnavailable("the shop went down in the middle of its export")
            # What is on disk while the export streams: the spill happens as it is read.
            CRAFTED["spilled_files"].append(len(spilled_files(CRAFTED["home"])))
            yield pl.DataFrame(rows[start : start + CHUNK_ROWS], schema=three_way.EXPORT_SCHEMA, orient="row")

    def close(self) -> None:
        pass


def make_crafted(spec: IssuerSpec) -> CraftedIssuer:
    """``factory = "test_three_way:make_crafted"``."""
    return CraftedIssuer()


def spilled_files(home: Path) -> list[Path]:
    """The comparison's spill files in ``home`` now."""
    return list(home.glob(f".{three_way.SPILL_PREFIX}-*/*.arrow"))


def scratch_folders(home: Path) -> list[Path]:
    return list(home.glob(f".{three_way.SPILL_PREFIX}-*"))


def exported(user: int, sku: str, issue_no: int = 0, grant_id: str | None = None) -> tuple[str, int, str, int]:
    """One export row, with the canonical grant id unless ``grant_id`` says otherwise."""
    return (grant_id or f"{CAMPAIGN}:{user}:{sku}:{issue_no}", user, sku, issue_no)


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def shop(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    write_users: Callable[..., Path],
    open_pipeline: Callable[..., Any],
) -> Iterator[runs.Pipeline]:
    """The delivery tests' campaign granted to GRANTED, its coupons at issuer "shop" (a CraftedIssuer)."""
    text = write_campaign(tmp_path / "c.toml").read_text(encoding="utf-8")
    text = text.replace(
        'kind = "http"\nurl = "http://127.0.0.1:9"', 'kind = "python"\nfactory = "test_three_way:make_crafted"'
    )
    campaign_file = tmp_path / "crafted.toml"
    campaign_file.write_text(text, encoding="utf-8")
    ledger_url = None if request.param == "sqlite" else str(request.getfixturevalue("pg_url"))
    settings: Settings = delivery_settings(tmp_path, ledger_url, campaign_file, "http://127.0.0.1:9")
    pipeline = open_pipeline(settings)
    prepared = prepare_pipeline(pipeline, write_users(tmp_path / "users.parquet", GRANTED))
    runs.require_all_done(runs.grant(pipeline, prepared.run, prepared.run.entries))
    CRAFTED["home"] = settings.home
    yield pipeline
    CRAFTED.update(export=[], fail_after_chunks=None, spilled_files=[], home=None)


def sorted_breaks(check: three_way.IssuerCheck, *, drop: tuple[str, ...] = ()) -> pl.DataFrame:
    """The break rows in one order (the comparison does not promise one), without the ``drop`` columns."""
    assert check.breaks is not None
    frame = check.breaks.drop(list(drop))
    return frame.sort(frame.columns, nulls_last=True)


def without_duration(check: three_way.IssuerCheck) -> dict[str, Any]:
    summary = check.summary()
    summary.pop("duration_s")
    return summary


def test_small_spills_and_many_partitions_give_exactly_the_result_of_the_default_cut(shop: runs.Pipeline) -> None:
    """Every class of export row, spilled every few rows into up to 64 partitions and compared a few keys at a
    time: the same counts and breaks."""
    corrections.void_grants(
        shop,
        [corrections.VoidRequest("refunded", user_id=EXPORTED[0], item_sku="coupon-2000")],
        "kim",
        dt.datetime.now(dt.UTC),
    )
    export = [exported(u, sku) for u in EXPORTED for sku in COUPONS]  # one of them voided in the ledger
    export += [exported(u, "coupon-3000") for u in EXPORTED[:20]]  # exported twice, far apart
    export += [
        exported(STRANGER, "coupon-2000"),  # canonical, the ledger never granted it
        exported(EXPORTED[1], "coupon-2000", issue_no=1),  # an issue the ledger never made
        exported(EXPORTED[2], "emoticon-permanent"),  # the campaign's item, not this issuer's
        exported(EXPORTED[3], "coupon-2000", grant_id="foreign-1"),  # not the canonical id of its fields
        exported(EXPORTED[3], "coupon-2000", grant_id="foreign-1"),  # ... twice
        exported(EXPORTED[4], "coupon-9999"),  # an sku the campaign does not know
        exported(-5, "coupon-2000"),  # a user id that is not positive
    ]
    export += [exported(u, "coupon-2000") for u in EXPORTED[5:25]]  # duplicates again, at the end
    CRAFTED["export"] = export
    spec = shop.campaign.issuers[0]

    default = three_way.check_issuer(shop, spec, 4)
    live = len(GRANTED) * len(COUPONS) - 1
    held = len(EXPORTED) * len(COUPONS) + 3 + 3  # + canonical strangers, + odd rows (counted once each)
    matched = len(EXPORTED) * len(COUPONS) - 1
    assert (default.state, default.ledger_live, default.issuer_held, default.matched) == (
        "compared",
        live,
        held,
        matched,
    )
    assert (default.issuer_missing, default.issuer_unexpected) == (live - matched, held - matched)
    assert default.summary()["outcome"]["breaks"] == {"issuer_missing": 50 * 2, "issuer_unexpected": 7}
    details = dict(
        sorted_breaks(default).select("item_sku", "detail").filter(pl.col("item_sku") != "coupon-3000").rows()
    )
    assert any("voided in the ledger by kim" in d for d in sorted_breaks(default)["detail"])
    assert "'emoticon-permanent' is not an item" in details["emoticon-permanent"]
    assert "'coupon-9999' is not an item" in details["coupon-9999"]
    assert sorted_breaks(default).filter(pl.col("detail").str.starts_with("foreign-1: ")).height == 1
    assert not scratch_folders(shop.settings.home), "the scratch folder is removed afterwards"

    CRAFTED["spilled_files"] = []
    cut_small = three_way.check_issuer(shop, spec, 4, spill_rows=5, compare_keys_max=7)
    assert max(CRAFTED["spilled_files"]) > 4 * 10, "many spills of every partition were on disk while it ran"
    assert without_duration(cut_small) == without_duration(default)
    assert sorted_breaks(cut_small).equals(sorted_breaks(default))

    many = three_way.check_issuer(shop, spec, 64, spill_rows=3, compare_keys_max=2)
    assert without_duration(many) == without_duration(default)
    assert sorted_breaks(many, drop=("partition_id",)).equals(sorted_breaks(default, drop=("partition_id",)))
    assert many.breaks is not None
    positive = many.breaks.filter(pl.col("user_id") > 0)
    assert positive["partition_id"].n_unique() > 16
    assert all(p == partition_of(u, 64) for u, p in positive.select("user_id", "partition_id").iter_rows())
    assert not scratch_folders(shop.settings.home), "the scratch folder is removed afterwards"


def test_an_export_that_fails_part_way_is_unreadable_and_its_spill_is_removed(shop: runs.Pipeline) -> None:
    CRAFTED["export"] = [exported(u, sku) for u in GRANTED for sku in COUPONS]
    CRAFTED["fail_after_chunks"] = 20
    check = three_way.check_issuer(shop, shop.campaign.issuers[0], 4, spill_rows=5)
    assert (check.state, check.ledger_live, check.breaks) == ("unreadable", len(GRANTED) * len(COUPONS), None)
    assert check.error is not None and "went down in the middle" in check.error
    assert max(CRAFTED["spilled_files"]) > 0, "keys were spilled before it failed"
    assert not scratch_folders(shop.settings.home), "the scratch folder is removed on failure too"


def test_a_home_without_room_for_the_spill_names_the_folder_and_removes_it(
    shop: runs.Pipeline, monkeypatch: pytest.MonkeyPatch
) -> None:
    CRAFTED["export"] = [exported(u, sku) for u in GRANTED for sku in COUPONS]

    def disk_full(*args: Any, **kwargs: Any) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(pl.DataFrame, "write_ipc", disk_full)
    with pytest.raises(StorageError, match=r"\.three-way-.*No space left on device.*free space there") as raised:
        three_way.check_issuer(shop, shop.campaign.issuers[0], 4)
    assert raised.value.exit_code == 2 and str(shop.settings.home) in str(raised.value)
    assert not scratch_folders(shop.settings.home), "the scratch folder is removed"


@given(
    lo=st.integers(0, BUCKET_MODULUS - 1),
    width=st.integers(1, BUCKET_MODULUS),
    count=st.integers(-1, 10_000),
)
def test_bucket_range_slices_cover_their_range_exactly_in_order(lo: int, width: int, count: int) -> None:
    hi = min(lo + width, BUCKET_MODULUS) - 1
    slices = split_bucket_range(lo, hi, count)
    assert 1 <= len(slices) <= max(1, count)
    assert slices[0][0] == lo and slices[-1][1] == hi
    assert all(a <= b for a, b in slices), "no empty slice"
    assert all(slices[i][1] + 1 == slices[i + 1][0] for i in range(len(slices) - 1)), "adjacent, no overlap"
    sizes = [b - a + 1 for a, b in slices]
    assert max(sizes) - min(sizes) <= 1, "equal widths"
