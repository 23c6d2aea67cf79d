"""pipeline.ledger and pipeline.ledger.ddl: committed DDL, keys and checks, append-only grants, terms, instants."""

from __future__ import annotations

import datetime as dt
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from support import REPO_ROOT
from support.ledger_state import describe_schema

from pipeline import ledger
from pipeline.campaigns import load_campaign
from pipeline.config import Settings
from pipeline.delivery import rate_budget
from pipeline.errors import ConfigError, InvariantViolation, LedgerError, TermsChangedError
from pipeline.grants import runs as jobs
from pipeline.grants.partitioning import user_bucket
from pipeline.ledger.ddl import render_ddl

REPO = REPO_ROOT
SEOUL = dt.timezone(dt.timedelta(hours=9))
START = dt.datetime(2023, 1, 5, tzinfo=SEOUL)
BUNDLED_TOML = REPO / "pipeline" / "campaigns" / "kakao_outage_2022.toml"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Engine]:
    """A ledger engine with the schema created, on SQLite and on PostgreSQL."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    else:
        url = request.getfixturevalue("pg_url")
    created = ledger.create_ledger_engine(url)
    ledger.create_schema(created)
    yield created
    created.dispose()


def grant_values(user_id: int, item_key: int = 1, **overrides: Any) -> dict[str, Any]:
    values: dict[str, Any] = {
        "campaign_key": 1,
        "user_bucket": user_bucket(user_id),
        "user_id": user_id,
        "item_key": item_key,
        "partition_id": 0,
        "run_key": 1,
        "amount_krw": 2000,
        "valid_from": START,
        "valid_until": START + dt.timedelta(days=90),
        "granted_at": dt.datetime.now(dt.UTC),
    }
    values.update(overrides)
    return values


def insert_grant(engine: Engine, **values: Any) -> None:
    with engine.begin() as connection:
        connection.execute(ledger.grants.insert().values(**values))


def count_grants(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.text("SELECT count(*) FROM grants")).scalar_one())


# --------------------------------------------------------------------------- DDL


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_committed_ddl_is_the_rendered_ddl(dialect: str) -> None:
    committed = (REPO / "sql" / dialect / "schema.sql").read_text(encoding="utf-8")
    assert committed == render_ddl(dialect), (
        f"sql/{dialect}/schema.sql is stale; regenerate it: "
        f"`python -m pipeline.ledger.ddl {dialect} > sql/{dialect}/schema.sql`"
    )


def test_render_ddl_refuses_an_unknown_dialect() -> None:
    with pytest.raises(ConfigError, match="unknown dialect 'oracle'"):
        render_ddl("oracle")


def test_committed_sqlite_ddl_builds_the_same_tables_as_the_metadata(tmp_path: Path) -> None:
    from_file = tmp_path / "from_file.sqlite"
    with sqlite3.connect(from_file) as connection:
        connection.executescript((REPO / "sql" / "sqlite" / "schema.sql").read_text(encoding="utf-8"))
    from_metadata = sa.create_engine(f"sqlite:///{tmp_path / 'from_metadata.sqlite'}")
    ledger.metadata.create_all(from_metadata)
    from_file_engine = sa.create_engine(f"sqlite:///{from_file}")
    try:
        expected = describe_schema(from_metadata)
        assert set(expected) == {t.name for t in ledger.metadata.sorted_tables}
        assert expected["grants"]["pk"] == ["campaign_key", "user_bucket", "user_id", "item_key", "issue_no"]
        assert describe_schema(from_file_engine) == expected
    finally:
        from_metadata.dispose()
        from_file_engine.dispose()


@pytest.mark.postgres
def test_committed_postgresql_ddl_builds_the_same_tables_as_the_metadata(pg_url: str) -> None:
    engine = sa.create_engine(pg_url)
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE SCHEMA committed")
            connection.exec_driver_sql("SET LOCAL search_path TO committed")
            script = (REPO / "sql" / "postgresql" / "schema.sql").read_text(encoding="utf-8")
            connection.exec_driver_sql(script.replace("%", "%%"))  # psycopg's paramstyle, as psql would not need
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE SCHEMA generated")
            ledger.metadata.create_all(connection.execution_options(schema_translate_map={None: "generated"}))
        expected = describe_schema(engine, "generated")
        assert set(expected) == {t.name for t in ledger.metadata.sorted_tables}
        assert describe_schema(engine, "committed") == expected
    finally:
        engine.dispose()


def test_create_schema_is_idempotent_and_records_the_version(engine: Engine) -> None:
    ledger.create_schema(engine)
    ledger.create_schema(engine)
    with engine.connect() as connection:
        meta = {str(k): str(v) for k, v in connection.execute(sa.select(ledger.ledger_meta))}
        views = set(sa.inspect(connection).get_view_names())
    assert meta["schema_version"] == str(ledger.SCHEMA_VERSION)
    assert set(meta) == {"schema_version", "views_sha256"}, "views are applied once per version of views.sql"
    assert {"grant_ledger", "partition_status"} <= views


def test_create_schema_refuses_another_schema_version(engine: Engine) -> None:
    with engine.begin() as connection:
        connection.execute(ledger.ledger_meta.update().values(meta_value="99"))
    with pytest.raises(LedgerError, match=f"ledger schema version 99, this program needs {ledger.SCHEMA_VERSION}"):
        ledger.create_schema(engine)


# --------------------------------------------------------------------------- keys and checks


def test_a_duplicate_grant_is_refused_by_the_database(engine: Engine) -> None:
    insert_grant(engine, **grant_values(10_000_001))
    with pytest.raises(sa.exc.IntegrityError):
        # Same key, different payload: still the same (campaign, user, item).
        insert_grant(engine, **grant_values(10_000_001, run_key=2, partition_id=3))
    insert_grant(engine, **grant_values(10_000_001, item_key=2))  # another item is fine
    insert_grant(engine, **grant_values(10_000_001, campaign_key=2))  # so is another campaign
    assert count_grants(engine) == 3


def test_a_wrong_user_bucket_violates_the_check(engine: Engine) -> None:
    user_id = 10_000_001
    with pytest.raises(sa.exc.IntegrityError, match="ck_grants_user_bucket"):
        insert_grant(engine, **grant_values(user_id, user_bucket=user_bucket(user_id) + 1))
    # The check is what makes (campaign, user, item) unique even though user_bucket is in the key.
    with pytest.raises(sa.exc.IntegrityError, match="ck_grants_user_bucket"):
        insert_grant(engine, **grant_values(user_id, user_bucket=0))
    assert count_grants(engine) == 0


def test_the_bucket_check_holds_for_the_largest_ids(engine: Engine) -> None:
    for user_id in (1, 2_147_483_647, 2_147_483_648, 2**63 - 1):
        insert_grant(engine, **grant_values(user_id))
    assert count_grants(engine) == 4


def test_non_positive_user_ids_violate_the_check(engine: Engine) -> None:
    with pytest.raises(sa.exc.IntegrityError, match="ck_grants_user_id_positive"):
        insert_grant(engine, **grant_values(0, user_bucket=0))


def test_item_checks(engine: Engine) -> None:
    with engine.begin() as connection:
        campaign_key = connection.execute(
            ledger.campaigns.insert().values(
                campaign_id="c", name="c", time_zone="UTC", starts_at=START, registered_at=START
            )
        ).inserted_primary_key[0]
    base = {"campaign_key": campaign_key, "item_sku": "x", "valid_from": START, "terms_hash": "0" * 16}
    with pytest.raises(sa.exc.IntegrityError, match="ck_item_kind"):
        with engine.begin() as connection:
            connection.execute(ledger.campaign_items.insert().values(item_kind="sticker", **base))
    with pytest.raises(sa.exc.IntegrityError, match="ck_item_amount_positive"):
        with engine.begin() as connection:
            connection.execute(ledger.campaign_items.insert().values(item_kind="coupon", amount_krw=-1, **base))


# --------------------------------------------------------------------------- append-only


def test_grants_cannot_be_updated_or_deleted(engine: Engine) -> None:
    insert_grant(engine, **grant_values(42))
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        with engine.begin() as connection:
            connection.execute(ledger.grants.update().values(amount_krw=1))
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):
        with engine.begin() as connection:
            connection.execute(ledger.grants.delete())
    with engine.connect() as connection:
        assert connection.execute(sa.select(ledger.grants.c.amount_krw)).scalars().all() == [2000]


def test_voids_cannot_be_updated_or_deleted(engine: Engine) -> None:
    insert_grant(engine, **grant_values(42))
    with engine.begin() as connection:
        connection.execute(
            ledger.grant_voids.insert().values(
                campaign_key=1,
                user_bucket=user_bucket(42),
                user_id=42,
                item_key=1,
                reason="test",
                actor="pytest",
                voided_at=dt.datetime.now(dt.UTC),
            )
        )
    with pytest.raises(sa.exc.DBAPIError, match="append-only|cannot be updated"):
        with engine.begin() as connection:
            connection.execute(ledger.grant_voids.update().values(reason="changed"))
    with pytest.raises(sa.exc.DBAPIError, match="append-only|cannot be deleted"):
        with engine.begin() as connection:
            connection.execute(ledger.grant_voids.delete())
    with engine.connect() as connection:
        assert connection.execute(sa.select(ledger.grant_voids.c.reason)).scalars().all() == ["test"]


def test_a_void_must_name_an_existing_grant(engine: Engine) -> None:
    with pytest.raises(sa.exc.DBAPIError, match="a void must name an existing grant"):
        with engine.begin() as connection:
            connection.execute(
                ledger.grant_voids.insert().values(
                    campaign_key=1,
                    user_bucket=user_bucket(43),
                    user_id=43,
                    item_key=1,
                    reason="test",
                    actor="pytest",
                    voided_at=dt.datetime.now(dt.UTC),
                )
            )


# PostgreSQL only: SQLite has no insert trigger on grants (it would cost ~40 % of bulk grant speed);
# there a second live issue is caught by reconciliation (tests/test_reconciliation.py).
@pytest.mark.parametrize("engine", [pytest.param("postgresql", marks=pytest.mark.postgres)], indirect=True)
def test_a_reissue_needs_the_previous_issue_voided(engine: Engine) -> None:
    insert_grant(engine, **grant_values(44))
    with pytest.raises(sa.exc.DBAPIError, match="only when issue n-1 exists and is voided"):
        insert_grant(engine, **grant_values(44), issue_no=1)
    with engine.begin() as connection:
        connection.execute(
            ledger.grant_voids.insert().values(
                campaign_key=1,
                user_bucket=user_bucket(44),
                user_id=44,
                item_key=1,
                issue_no=0,
                reason="wrong amount",
                actor="pytest",
                voided_at=dt.datetime.now(dt.UTC),
            )
        )
    with pytest.raises(sa.exc.DBAPIError, match="only when issue n-1 exists and is voided"):
        insert_grant(engine, **grant_values(44), issue_no=2)  # skipping an issue number
    insert_grant(engine, **grant_values(44), issue_no=1)
    with pytest.raises(sa.exc.DBAPIError, match="only when issue n-1 exists and is voided"):
        insert_grant(engine, **grant_values(44), issue_no=2)  # issue 1 is live: no second live grant
    assert count_grants(engine) == 2


def test_a_voided_grant_leaves_the_grant_ledger_view(engine: Engine) -> None:
    with engine.begin() as connection:
        campaign_key = connection.execute(
            ledger.campaigns.insert().values(
                campaign_id="c", name="c", time_zone="UTC", starts_at=START, registered_at=START
            )
        ).inserted_primary_key[0]
        item_key = connection.execute(
            ledger.campaign_items.insert().values(
                campaign_key=campaign_key,
                item_sku="x",
                item_kind="coupon",
                amount_krw=2000,
                valid_from=START,
                terms_hash="0" * 16,
            )
        ).inserted_primary_key[0]
        run_key = connection.execute(
            ledger.runs.insert().values(
                run_id="r", campaign_key=campaign_key, snapshot_id="s", trigger="test", started_at=START
            )
        ).inserted_primary_key[0]
    for user_id in (1, 2):
        insert_grant(engine, **grant_values(user_id, campaign_key=campaign_key, item_key=item_key, run_key=run_key))
    with engine.begin() as connection:
        connection.execute(
            ledger.grant_voids.insert().values(
                campaign_key=campaign_key,
                user_bucket=user_bucket(2),
                user_id=2,
                item_key=item_key,
                reason="fraud",
                actor="pytest",
                voided_at=dt.datetime.now(dt.UTC),
            )
        )
    with engine.connect() as connection:
        live = connection.execute(sa.text("SELECT user_id, item_sku, run_id FROM grant_ledger")).all()
    assert [tuple(r) for r in live] == [(1, "x", "r")]
    assert count_grants(engine) == 2, "the voided grant is still in the append-only table"


# --------------------------------------------------------------------------- instants


@pytest.mark.parametrize(
    "instant",
    [
        dt.datetime(2023, 1, 5, 0, 0, 0, 123456, tzinfo=SEOUL),
        dt.datetime(1969, 7, 20, 20, 17, 40, 1, tzinfo=dt.UTC),
        dt.datetime(2038, 1, 19, 3, 14, 8, tzinfo=dt.timezone(dt.timedelta(hours=-5))),
    ],
    ids=["seoul-micros", "before-epoch", "after-2038"],
)
def test_instants_round_trip_timezone_aware(engine: Engine, instant: dt.datetime) -> None:
    with engine.begin() as connection:
        connection.execute(
            ledger.campaigns.insert().values(
                campaign_id="c", name="c", time_zone="Asia/Seoul", starts_at=instant, registered_at=instant
            )
        )
    with engine.connect() as connection:
        stored = connection.execute(sa.select(ledger.campaigns.c.starts_at)).scalar_one()
    assert stored.tzinfo is not None
    assert stored.utcoffset() == dt.timedelta(0), "read back in UTC"
    assert stored == instant
    assert stored.microsecond == instant.microsecond


def test_sqlite_stores_instants_as_utc_epoch_microseconds(tmp_path: Path) -> None:
    engine = ledger.create_ledger_engine(f"sqlite:///{tmp_path / 'l.sqlite'}")
    try:
        ledger.create_schema(engine)
        with engine.begin() as connection:
            connection.execute(
                ledger.campaigns.insert().values(
                    campaign_id="c", name="c", time_zone="Asia/Seoul", starts_at=START, registered_at=START
                )
            )
        with engine.connect() as connection:
            raw = connection.execute(sa.text("SELECT starts_at FROM campaigns")).scalar_one()
        assert raw == 1_672_844_400_000_000  # 2023-01-04T15:00:00Z
        assert ledger.to_epoch_us(START) == raw
        assert ledger.from_epoch_us(raw) == START
    finally:
        engine.dispose()


def test_naive_datetimes_never_reach_the_ledger(engine: Engine) -> None:
    with pytest.raises(sa.exc.StatementError, match="naive datetime") as caught:
        with engine.begin() as connection:
            connection.execute(
                ledger.campaigns.insert().values(
                    campaign_id="c", name="c", time_zone="UTC", starts_at=dt.datetime(2023, 1, 5), registered_at=START
                )
            )
    assert isinstance(caught.value.orig, InvariantViolation)


# --------------------------------------------------------------------------- campaign terms


def write_edited_campaign(tmp_path: Path, old: str, new: str) -> Path:
    text = BUNDLED_TOML.read_text(encoding="utf-8")
    assert old in text
    path = tmp_path / "edited.toml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def item_amounts(engine: Engine) -> dict[str, int | None]:
    with engine.connect() as connection:
        rows = connection.execute(sa.select(ledger.campaign_items.c.item_sku, ledger.campaign_items.c.amount_krw)).all()
    return {sku: amount for sku, amount in rows}


def test_editing_terms_after_grants_exist_is_refused(
    tmp_path: Path,
    settings_for: Callable[..., Settings],
    prepare: Callable[..., Any],
    open_pipeline: Callable[[Settings], jobs.Pipeline],
    write_users: Callable[..., Path],
) -> None:
    home = tmp_path / "var"
    prepared = prepare(settings_for(home), write_users(tmp_path / "users.csv", [1, 2, 3]))
    outcomes = jobs.grant(prepared.pipeline, prepared.run, prepared.run.entries)
    assert sum(o.written for o in outcomes) == 15

    edited = write_edited_campaign(tmp_path, "amount_krw = 2000", "amount_krw = 2500")
    with pytest.raises(TermsChangedError) as caught:
        open_pipeline(settings_for(home, campaign_file=edited))
    message = str(caught.value)
    assert str(edited) in message
    assert "'coupon-2000'" in message
    assert "amount_krw=2000" in message and "amount_krw=2500" in message
    assert "cannot change" in message and "new sku" in message
    assert caught.value.exit_code == 5
    assert item_amounts(prepared.engine)["coupon-2000"] == 2000, "the refused edit changed nothing"

    # Changing the validity of a granted item is refused as well.
    later = write_edited_campaign(tmp_path, "start = 2023-01-05T00:00:00", "start = 2023-01-06T00:00:00")
    with pytest.raises(TermsChangedError, match="valid_from=2023-01-04T15:00:00\\+00:00"):
        open_pipeline(settings_for(home, campaign_file=later))

    # The unchanged file still opens.
    open_pipeline(settings_for(home, campaign_file=BUNDLED_TOML))


def test_editing_terms_before_any_grant_is_allowed(
    tmp_path: Path,
    settings_for: Callable[..., Settings],
    open_pipeline: Callable[[Settings], jobs.Pipeline],
    prepare: Callable[..., Any],
    write_users: Callable[..., Path],
    ledger_probe: Any,
) -> None:
    home = tmp_path / "var"
    first = open_pipeline(settings_for(home))
    assert item_amounts(first.engine)["coupon-2000"] == 2000

    edited = write_edited_campaign(tmp_path, "amount_krw = 2000", "amount_krw = 2500")
    prepared = prepare(settings_for(home, campaign_file=edited), write_users(tmp_path / "users.csv", [1, 2]))
    assert prepared.pipeline.keys == first.keys, "the same items keep their keys"
    assert item_amounts(prepared.engine)["coupon-2000"] == 2500
    outcomes = jobs.grant(prepared.pipeline, prepared.run, prepared.run.entries)
    assert sum(o.written for o in outcomes) == 10
    with prepared.engine.connect() as connection:
        amounts = (
            connection.execute(
                sa.text("SELECT DISTINCT amount_krw FROM grants WHERE amount_krw IS NOT NULL ORDER BY 1")
            )
            .scalars()
            .all()
        )
    assert amounts == [2500, 3000]

    # Now that grants carry 2,500, going back to the bundled 2,000 is the refused edit.
    with pytest.raises(TermsChangedError, match="amount_krw=2500.*amount_krw=2000"):
        open_pipeline(settings_for(home))


def test_register_campaign_is_idempotent(engine: Engine) -> None:
    campaign = load_campaign()
    now = dt.datetime.now(dt.UTC)
    first = ledger.register_campaign(engine, campaign, now)
    second = ledger.register_campaign(engine, campaign, now)
    assert first == second
    assert set(first.item_keys) == {i.sku for i in campaign.items}
    assert len(set(first.item_keys.values())) == 5
    with engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM campaign_items")).scalar_one() == 5
        assert connection.execute(sa.text("SELECT count(*) FROM campaigns")).scalar_one() == 1


def test_a_run_id_belongs_to_one_snapshot(engine: Engine) -> None:
    keys = ledger.register_campaign(engine, load_campaign(), dt.datetime.now(dt.UTC))
    now = dt.datetime.now(dt.UTC)
    run_key = ledger.register_run(engine, "run-1", keys.campaign_key, "aaaa", "test", now)
    assert ledger.register_run(engine, "run-1", keys.campaign_key, "aaaa", "test", now) == run_key
    with pytest.raises(LedgerError, match="run 'run-1' already belongs to snapshot aaaa, not bbbb"):
        ledger.register_run(engine, "run-1", keys.campaign_key, "bbbb", "test", now)


def test_issuer_slots_are_spaced_by_the_interval_and_a_hold_delays_the_next(engine: Engine) -> None:
    """The shared rate budget's row: slots taken back to back are one interval apart (what each
    caller must wait grows by the interval), other issuers are independent, a hold pushes the next."""
    waits = [rate_budget.take_issuer_slot(engine, "shop", 0.5) for _ in range(4)]
    assert waits[0] < 0.05, "the first request of an idle issuer goes at once"
    for earlier, later in zip(waits, waits[1:], strict=False):
        assert 0.4 < later - earlier <= 0.5, waits  # the interval, less the time the call itself took
    assert rate_budget.take_issuer_slot(engine, "emoticons", 0.5) < 0.05, "another issuer has its own budget"
    rate_budget.hold_issuer(engine, "emoticons", 3.0)
    assert 2.8 < rate_budget.take_issuer_slot(engine, "emoticons", 0.5) <= 3.0, "a Retry-After holds every caller"
    rate_budget.hold_issuer(engine, "shop", 0.1)
    assert 1.8 < rate_budget.take_issuer_slot(engine, "shop", 0.5) <= 2.0, "a shorter hold than the queue: no change"
    # A wait no budget or Retry-After can explain (the clock went back an hour): start again from now.
    rate_budget.hold_issuer(engine, "shop", 3_600.0)
    assert rate_budget.take_issuer_slot(engine, "shop", 0.5, wait_max_s=60.0) == 0.0
    assert 0.4 < rate_budget.take_issuer_slot(engine, "shop", 0.5, wait_max_s=60.0) <= 0.5, "and the spacing goes on"
