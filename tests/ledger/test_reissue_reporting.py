"""After `entitle repair` reissues grants with wrong terms, every report counts them as the ledger holds them.

A reissued grant is the same (campaign, user, item) with ``issue_no`` 1: issue 0 is voided and issue 1 is
live. Every join between grants and voids must use the whole grant key, or a report counts the reissue
as voided. This runs the way an operator does — ``entitle run``, ``reconcile``, ``repair`` — on SQLite and
PostgreSQL, then reads ``summary``, ``status``, the analyst views and every named query.
"""

from __future__ import annotations

import json
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support.cli import cli_environment
from support.settings import ITEMS_PER_USER

from pipeline.grants.partitioning import user_bucket

USERS = list(range(5_000_000, 5_006_000, 2))  # 3,000 users
TAMPERED = USERS[:2]
SKU, AMOUNT = "coupon-2000", 2_000
EntitleRunner = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture(params=["sqlite", "postgresql"])
def repaired(
    request: pytest.FixtureRequest, tmp_path: Path, write_users: Callable[..., Path], entitle: EntitleRunner
) -> Iterator[tuple[sa.Engine, dict[str, str], EntitleRunner]]:
    """A ledger where two ₩2,000 coupons were tampered to ₩20,000, reconciled and repaired (reissued)."""
    url = request.getfixturevalue("pg_url") if request.param == "postgresql" else f"sqlite:///{tmp_path}/ledger.sqlite"
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_LEDGER_URL=url)
    users = write_users(tmp_path / "users.parquet", USERS)
    _json(entitle, ["run", "--users", str(users), "--json"], env)
    engine = sa.create_engine(url)
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL session_replication_role = replica")  # triggers off
        else:
            connection.exec_driver_sql("DROP TRIGGER IF EXISTS grants_append_only_update")
        for user_id in TAMPERED:
            changed = connection.execute(
                sa.text(
                    "UPDATE grants SET amount_krw = 20000 WHERE user_bucket = :b AND user_id = :u AND item_key = "
                    "(SELECT item_key FROM campaign_items WHERE item_sku = :sku)"
                ),
                {"b": user_bucket(user_id), "u": user_id, "sku": SKU},
            )
            assert changed.rowcount == 1
    found = _json(entitle, ["reconcile", "--json"], env, exit_code=8)  # 8: BREAKS
    assert found["verdict"] == "BREAKS"
    fixed = _json(entitle, ["repair", "--actor", "ops-test", "--json"], env)
    assert fixed["repair"]["reissued"] == len(TAMPERED)
    yield engine, env, entitle
    engine.dispose()


def _json(entitle: EntitleRunner, args: list[str], env: dict[str, str], exit_code: int = 0) -> Any:
    result = entitle(args, env)
    assert result.returncode == exit_code, f"entitle {' '.join(args)} exited {result.returncode}: {result.stderr}"
    return json.loads(result.stdout)


def _query(entitle: EntitleRunner, env: dict[str, str], name: str, **params: Any) -> list[dict[str, Any]]:
    args = ["query", name, "--json"] + [f"--param={k}={v}" for k, v in params.items()]
    records: list[dict[str, Any]] = _json(entitle, args, env)
    return records


def test_summary_and_status_count_reissued_grants_as_live(repaired: Any) -> None:
    engine, env, entitle = repaired
    summary = _json(entitle, ["summary", "--json"], env)
    items = {i["item_sku"]: i for i in summary["items"]}
    assert items[SKU]["grants"] == len(USERS), "a reissued grant is live"
    assert items[SKU]["face_value_krw"] == AMOUNT * len(USERS)
    assert summary["total_grants"] == len(USERS) * ITEMS_PER_USER
    assert summary["total_face_value_krw"] == (2_000 + 3_000) * len(USERS)
    status = _json(entitle, ["status", "--json"], env)
    assert status["failed"] == 0 and status["done"] == status["partition_count"]
    checked = _json(entitle, ["reconcile", "--json"], env)
    assert checked["verdict"] == "RECONCILED"


def test_views_show_the_reissued_grants_once_and_live(repaired: Any) -> None:
    engine, _, _ = repaired
    with engine.connect() as connection:
        live = connection.execute(
            sa.text("SELECT count(*), sum(amount_krw), max(issue_no) FROM grant_ledger WHERE item_sku = :s"),
            {"s": SKU},
        ).one()
        coverage = connection.execute(
            sa.text("SELECT granted, missing, voided, face_value_krw FROM campaign_coverage WHERE item_sku = :s"),
            {"s": SKU},
        ).one()
        history = connection.execute(
            sa.text("SELECT entry_type, count(*) FROM grant_history WHERE user_id = :u GROUP BY entry_type"),
            {"u": TAMPERED[0]},
        ).all()
    assert tuple(live) == (len(USERS), AMOUNT * len(USERS), 1)
    assert coverage.granted == len(USERS) and coverage.missing == 0
    assert coverage.face_value_krw == AMOUNT * len(USERS)
    assert dict((str(k), int(v)) for k, v in history)["void"] == 1


def test_every_named_query_runs_and_counts_the_reissue(repaired: Any) -> None:
    engine, env, entitle = repaired
    listed = {q["name"] for q in _json(entitle, ["query", "--list", "--json"], env)["queries"]}
    required = {"user_grants": {"user_id": TAMPERED[0]}, "user_history": {"user_id": TAMPERED[0]}}
    required["users_missing_items"] = {"campaign_id": "kakao-outage-2022"}
    results = {name: _query(entitle, env, name, **required.get(name, {})) for name in sorted(listed)}
    face = {r["item_sku"]: r for r in results["face_value_per_item"]}
    assert int(face[SKU]["face_value_krw"]) == AMOUNT * len(USERS)  # PostgreSQL sums to numeric: JSON text
    coverage = {r["item_sku"]: r for r in results["coverage"]}
    assert coverage[SKU]["granted"] == len(USERS)
    mine = [r for r in results["user_grants"] if r["item_sku"] == SKU]
    assert len(mine) == 1 and mine[0]["amount_krw"] == AMOUNT, "one live coupon, the reissue, with the right amount"
    assert results["users_missing_items"] == []
    assert sum(int(r["voids"]) for r in results["voids_by_actor"]) == len(TAMPERED)
    assert results["open_breaks"] == []
