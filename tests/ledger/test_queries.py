"""pipeline.ledger.queries: named analyst queries from sql/queries/, bound parameters only."""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from support.ledger_state import Prepared
from support.settings import ITEMS_PER_USER

from pipeline import ledger, reconciliation
from pipeline.config import Settings
from pipeline.errors import QueryError
from pipeline.grants import runs
from pipeline.grants.partitioning import user_bucket
from pipeline.ledger import queries

USERS = [101, 202, 303, 404, 505]


@pytest.fixture
def granted(
    settings: Settings, prepare: Callable[..., Prepared], tmp_path: Path, write_users: Callable[..., Path]
) -> Prepared:
    prepared = prepare(settings, write_users(tmp_path / "users.csv", USERS))
    runs.require_all_done(runs.grant(prepared.pipeline, prepared.run, prepared.run.entries))
    return prepared


def rows_as_dicts(result: queries.QueryResult) -> list[dict[str, object]]:
    return [dict(zip(result.columns, row, strict=True)) for row in result.rows]


def test_every_query_file_is_listed_and_parsed() -> None:
    names = queries.list_queries()
    assert names == [
        "breaks_by_class",
        "claims_by_state",
        "coverage",
        "delivery_conflicts",
        "face_value_per_item",
        "grants_per_day",
        "open_breaks",
        "open_reviews",
        "partition_status",
        "pass_outcomes",
        "pass_stock",
        "payouts_per_tier",
        "program_reconciliations",
        "reconciliations",
        "user_grants",
        "user_history",
        "users_missing_items",
        "voids_by_actor",
    ]
    assert queries.load_query("open_breaks", "sqlite").parameters == ("campaign_id", "break_class", "limit")
    assert queries.load_query("user_grants", "sqlite").parameters == ("user_id",)
    assert queries.load_query("users_missing_items", "sqlite").parameters == ("campaign_id", "limit")
    assert queries.load_query("partition_status", "sqlite").parameters == ("campaign_id", "status")
    described = queries.load_query("coverage", "sqlite").description
    assert described.startswith("Coverage per item")


def test_dialect_variants_are_chosen() -> None:
    assert "unixepoch" in queries.load_query("grants_per_day", "sqlite").sql
    postgres = queries.load_query("grants_per_day", "postgresql")
    assert "AT TIME ZONE 'Asia/Seoul'" in postgres.sql
    assert postgres.parameters == ("campaign_id",), "'::date' is a cast, not a parameter"


@pytest.mark.parametrize("name", ["../schema", "Coverage", "user-grants", "", "coverage;drop"])
def test_query_names_are_checked(name: str) -> None:
    with pytest.raises(QueryError):
        queries.load_query(name, "sqlite")


def test_user_grants_returns_one_row_per_item(granted: Prepared) -> None:
    result = queries.run_query(granted.engine, "user_grants", {"user_id": "303"})
    rows = rows_as_dicts(result)
    assert len(rows) == ITEMS_PER_USER
    assert {r["user_id"] for r in rows} == {303}
    assert {r["run_id"] for r in rows} == {granted.run.run_id}


def test_parameters_are_bound_never_interpolated(granted: Prepared) -> None:
    with pytest.raises(QueryError, match=r"parameter user_id must be a whole number, got '303 OR 1=1'"):
        queries.run_query(granted.engine, "user_grants", {"user_id": "303 OR 1=1"})
    quoted = queries.run_query(granted.engine, "coverage", {"campaign_id": "x' OR '1'='1"})
    assert quoted.rows == []


@pytest.mark.parametrize("dialect", ["sqlite", "postgresql"])
def test_every_parameter_is_declared_with_its_type(dialect: str) -> None:
    for name in queries.list_queries():
        query = queries.load_query(name, dialect)  # refuses SQL parameters the Params line does not declare
        assert all(p.type in queries.PARAMETER_TYPES for p in query.declared), name
    user_grants = queries.load_query("user_grants", dialect)
    assert [p.describe() for p in user_grants.declared] == ["user_id: integer (required)"]
    limit = queries.load_query("open_breaks", dialect).declared[-1]
    assert (limit.name, limit.type, limit.required) == ("limit", "integer", False)


def test_a_missing_or_mistyped_parameter_is_refused_before_the_query_runs(granted: Prepared) -> None:
    with pytest.raises(QueryError, match=r"query 'user_grants' needs user_id: add --param user_id=VALUE") as missing:
        queries.run_query(granted.engine, "user_grants", {})
    assert missing.value.exit_code == 2
    with pytest.raises(QueryError, match=r"parameter limit must be a whole number, got 'ten'"):
        queries.run_query(granted.engine, "open_breaks", {"limit": "ten"})
    assert len(queries.run_query(granted.engine, "user_grants", {"user_id": " 303 "}).rows) == ITEMS_PER_USER


def test_unknown_parameters_are_refused(granted: Prepared) -> None:
    with pytest.raises(QueryError, match=r"has no parameter\(s\) \['user'\]; its parameters: user_id"):
        queries.run_query(granted.engine, "user_grants", {"user": "1"})


def test_optional_parameters_filter_when_given(granted: Prepared) -> None:
    everything = queries.run_query(granted.engine, "partition_status", {})
    assert len(everything.rows) == granted.pipeline.settings.partition_count
    assert queries.run_query(granted.engine, "partition_status", {"status": "failed"}).rows == []
    face = rows_as_dicts(queries.run_query(granted.engine, "face_value_per_item", {"campaign_id": "kakao-outage-2022"}))
    assert [r["live_grants"] for r in face] == [len(USERS)] * ITEMS_PER_USER
    assert queries.run_query(granted.engine, "face_value_per_item", {"campaign_id": "other"}).rows == []


def test_users_missing_items_sees_a_voided_grant(granted: Prepared) -> None:
    assert queries.run_query(granted.engine, "users_missing_items", {"campaign_id": "kakao-outage-2022"}).rows == []
    keys = granted.pipeline.keys
    with granted.engine.begin() as connection:
        connection.execute(
            ledger.grant_voids.insert().values(
                campaign_key=keys.campaign_key,
                user_bucket=user_bucket(404),
                user_id=404,
                item_key=keys.item_keys["coupon-3000"],
                reason="test",
                actor="pytest",
                voided_at=dt.datetime.now(dt.UTC),
            )
        )
    missing = rows_as_dicts(
        queries.run_query(granted.engine, "users_missing_items", {"campaign_id": "kakao-outage-2022"})
    )
    assert missing == [{"user_id": 404, "items_held": 4, "items_in_campaign": 5}]
    face = {
        r["item_sku"]: r["live_grants"]
        for r in rows_as_dicts(queries.run_query(granted.engine, "face_value_per_item", {}))
    }
    assert face["coupon-3000"] == len(USERS) - 1
    reconciliation.reconcile(granted.pipeline)
    coverage = {r["item_sku"]: r for r in rows_as_dicts(queries.run_query(granted.engine, "coverage", {}))}
    assert (coverage["coupon-3000"]["granted"], coverage["coupon-3000"]["voided"]) == (len(USERS) - 1, 1)
    assert coverage["coupon-2000"]["expected"] == coverage["coupon-2000"]["granted"] == len(USERS)
    history = rows_as_dicts(queries.run_query(granted.engine, "user_history", {"user_id": "404"}))
    assert [(r["item_sku"], r["entry_type"], r["actor"]) for r in history if r["entry_type"] == "void"] == [
        ("coupon-3000", "void", "pytest")
    ]
    by_actor = rows_as_dicts(queries.run_query(granted.engine, "voids_by_actor", {"actor": "pytest"}))
    assert [(r["item_sku"], r["voids"], r["face_value_krw"]) for r in by_actor] == [("coupon-3000", 1, 3000)]
    totals = {t.item_sku: t.grants for t in runs.ledger_totals(granted.pipeline)}
    assert totals["coupon-3000"] == len(USERS) - 1
    with granted.engine.connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM grants")).scalar_one() == len(USERS) * ITEMS_PER_USER


def test_a_failing_query_is_a_query_error(tmp_path: Path) -> None:
    engine = ledger.create_ledger_engine(f"sqlite:///{tmp_path / 'empty.sqlite'}")
    try:
        with pytest.raises(QueryError, match="query 'coverage' failed: no such table: campaign_coverage"):
            queries.run_query(engine, "coverage", {})
    finally:
        engine.dispose()
