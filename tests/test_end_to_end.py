"""The whole thing, as operators run it: demo users → `entitle run` → the ledger, on SQLite and PostgreSQL."""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from support.cli import cli_environment
from support.ledger_state import grant_counts
from support.settings import FACE_VALUE_PER_USER_KRW, ITEMS_PER_USER

from pipeline import ledger
from pipeline.grants.demo_users import write_demo_users
from pipeline.grants.partitioning import user_bucket
from pipeline.ledger import queries

Entitle = Callable[..., subprocess.CompletedProcess[str]]
CAMPAIGN_ID = "kakao-outage-2022"
SKUS = {"emoticon-permanent", "emoticon-90d-a", "emoticon-90d-b", "coupon-2000", "coupon-3000"}


def distinct_valid_ids(users_file: Path) -> set[int]:
    """What eligibility means, computed independently of the pipeline: distinct positive integer ids."""
    frame = pl.read_parquet(users_file)
    return set(frame.filter(pl.col("user_id") > 0)["user_id"].unique().to_list())


def run_json(entitle: Entitle, args: list[str], env: dict[str, str]) -> dict[str, object]:
    result = entitle([*args, "--json"], env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert isinstance(document, dict)
    return document


def per_item(engine: sa.Engine) -> dict[str, tuple[int, int, int]]:
    """item_sku → (grants, distinct users, face value) counted in the ledger."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text(
                "SELECT i.item_sku, count(*), count(DISTINCT g.user_id), coalesce(sum(g.amount_krw), 0) "
                "FROM grants AS g JOIN campaign_items AS i ON i.item_key = g.item_key GROUP BY i.item_sku"
            )
        ).all()
    return {str(sku): (int(n), int(users), int(value)) for sku, n, users, value in rows}


def granted_users(engine: sa.Engine) -> set[int]:
    with engine.connect() as connection:
        return set(connection.execute(sa.text("SELECT DISTINCT user_id FROM grants")).scalars())


@pytest.mark.slow
def test_fifty_thousand_users_on_sqlite(entitle: Entitle, tmp_path: Path) -> None:
    users_file = tmp_path / "users.parquet"
    demo = write_demo_users(50_000, users_file)
    assert demo.bad_rows > 0 and demo.duplicate_rows > 0, "the demo file exercises validation"
    eligible = distinct_valid_ids(users_file)
    assert len(eligible) == demo.distinct_valid_users == 50_000

    home = tmp_path / "var"
    env = cli_environment(ENTITLE_HOME=str(home), ENTITLE_PARTITIONS="16")
    first = run_json(entitle, ["run", "--users", str(users_file), "--no-progress"], env)
    assert first["partitions"] == 16
    assert first["failed_partitions"] == []
    assert first["planned"] == first["written"] == 50_000 * ITEMS_PER_USER

    engine = ledger.create_ledger_engine(f"sqlite:///{home / 'ledger.sqlite'}")
    try:
        items = per_item(engine)
        assert set(items) == SKUS
        for sku, (grants, users, _) in items.items():
            assert grants == users == len(eligible), sku
        total, distinct = grant_counts(engine)
        assert total == distinct == 50_000 * ITEMS_PER_USER, "no duplicate grants"
        assert granted_users(engine) == eligible
        assert sum(value for _, _, value in items.values()) == 50_000 * FACE_VALUE_PER_USER_KRW == 250_000_000
        with engine.connect() as connection:
            wrong_buckets = connection.execute(sa.text("SELECT user_id, user_bucket FROM grants LIMIT 1000")).all()
        assert all(user_bucket(u) == b for u, b in wrong_buckets)

        second = run_json(entitle, ["run", "--users", str(users_file), "--no-progress"], env)
        assert second["written"] == 0
        assert second["already_present"] == 50_000 * ITEMS_PER_USER
        assert grant_counts(engine) == (total, distinct)

        summary = run_json(entitle, ["summary"], env)
        assert summary["total_grants"] == 250_000
        assert summary["total_face_value_krw"] == 250_000_000

        missing = queries.run_query(engine, "users_missing_items", {"campaign_id": CAMPAIGN_ID})
        assert missing.rows == []
        per_day = queries.run_query(engine, "grants_per_day", {})
        assert sum(r[per_day.columns.index("grants")] for r in per_day.rows) == 250_000
        status = queries.run_query(engine, "partition_status", {"status": "done"})
        assert len(status.rows) == 16
    finally:
        engine.dispose()


@pytest.mark.postgres
def test_five_thousand_users_on_postgresql(entitle: Entitle, tmp_path: Path, pg_url: str) -> None:
    users_file = tmp_path / "users.parquet"
    write_demo_users(5_000, users_file, seed=11)
    eligible = distinct_valid_ids(users_file)
    assert len(eligible) == 5_000

    # The demo file's 3 bad rows are 0.06 % of 5,006 rows, above the default 0.01 % (see test_demo_users.py).
    env = cli_environment(
        ENTITLE_HOME=str(tmp_path / "var"),
        ENTITLE_PARTITIONS="8",
        ENTITLE_LEDGER_URL=pg_url,
        ENTITLE_REJECTED_SHARE_MAX="0.001",
    )
    first = run_json(entitle, ["run", "--users", str(users_file), "--no-progress"], env)
    assert first["planned"] == first["written"] == 5_000 * ITEMS_PER_USER
    assert first["failed_partitions"] == []
    assert not (tmp_path / "var" / "ledger.sqlite").exists(), "the PostgreSQL URL was used"

    engine = ledger.create_ledger_engine(pg_url)
    try:
        items = per_item(engine)
        assert {sku: (g, u) for sku, (g, u, _) in items.items()} == {sku: (5_000, 5_000) for sku in SKUS}
        assert sum(v for _, _, v in items.values()) == 5_000 * FACE_VALUE_PER_USER_KRW
        assert grant_counts(engine) == (25_000, 25_000)
        assert granted_users(engine) == eligible

        with engine.connect() as connection:
            view_rows = connection.execute(sa.text("SELECT count(*), count(DISTINCT user_id) FROM grant_ledger")).one()
            assert tuple(view_rows) == (25_000, 5_000)
            statuses = connection.execute(
                sa.text("SELECT status, count(*) FROM partition_status GROUP BY status")
            ).all()
            assert [tuple(r) for r in statuses] == [("done", 8)]
            types = dict(
                connection.execute(
                    sa.text(
                        "SELECT column_name, data_type FROM information_schema.columns "
                        "WHERE table_name = 'grants' AND column_name IN ('valid_from', 'granted_at')"
                    )
                ).all()
            )
            assert set(types.values()) == {"timestamp with time zone"}

        user_id = min(eligible)
        result = queries.run_query(engine, "user_grants", {"user_id": str(user_id)})
        rows = [dict(zip(result.columns, r, strict=True)) for r in result.rows]
        assert {r["item_sku"] for r in rows} == SKUS
        assert {r["user_id"] for r in rows} == {user_id}
        coupon = next(r for r in rows if r["item_sku"] == "coupon-3000")
        assert coupon["amount_krw"] == 3000
        assert coupon["valid_until"].tzinfo is not None
        assert coupon["valid_until"].isoformat() == "2023-04-04T15:00:00+00:00"

        cli_query = entitle(["query", "user_grants", "--param", f"user_id={user_id}", "--format", "json"], env)
        assert cli_query.returncode == 0, cli_query.stderr
        assert len(json.loads(cli_query.stdout)) == ITEMS_PER_USER

        coverage = queries.run_query(engine, "coverage", {"campaign_id": CAMPAIGN_ID})
        assert all(r[coverage.columns.index("live_grants")] == 5_000 for r in coverage.rows)
        assert queries.run_query(engine, "users_missing_items", {"campaign_id": CAMPAIGN_ID}).rows == []
        per_day = queries.run_query(engine, "grants_per_day", {})
        assert sum(r[per_day.columns.index("grants")] for r in per_day.rows) == 25_000

        second = run_json(entitle, ["run", "--users", str(users_file), "--no-progress"], env)
        assert second["written"] == 0
        verify = run_json(entitle, ["grant", "--verify", "--no-progress"], env)
        assert verify["written"] == 0 and verify["failed_partitions"] == []
        assert grant_counts(engine) == (25_000, 25_000)

        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            with engine.begin() as connection:
                connection.execute(sa.text("DELETE FROM grants WHERE user_id = :u"), {"u": user_id})
    finally:
        engine.dispose()
