"""Alembic migrations: from nothing, or from a version-1 ledger with grants, to this program's schema.

On both backends: replaying every migration builds exactly the tables a new ledger
gets; a version-1 ledger holding grants and voids is refused until
``entitle db upgrade`` migrates it in place, keeping every row; and afterwards the
pipeline grants, voids, reissues and reconciles on it (on PostgreSQL through a new
child table next to the old rows, which become the default child).
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from alembic import command
from sqlalchemy.engine import Engine
from support.cli import cli_environment, run_entitle
from support.ledger_state import describe_schema, prepare_pipeline

from pipeline import ledger, reconciliation
from pipeline.config import Settings
from pipeline.errors import LedgerError
from pipeline.grants import runs
from pipeline.grants.partitioning import user_bucket

V1_USERS = (10_000_001, 10_000_002, 10_000_003)
V1_START_US = 1_672_844_400_000_000  # 2023-01-05T00:00+09:00
CAMPAIGN = "(SELECT campaign_key FROM campaigns WHERE campaign_id = 'legacy')"
ITEM = "(SELECT item_key FROM campaign_items WHERE item_sku = 'coupon-2000')"
RUN = "(SELECT run_key FROM runs WHERE run_id = 'legacy-run')"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger database on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    engine = ledger.create_ledger_engine(url)
    yield engine
    engine.dispose()


def migrate_to(engine: Engine, revision: str) -> None:
    with ledger.write_transaction(engine) as connection:
        command.upgrade(ledger.alembic_config(connection), revision)


def tables(engine: Engine) -> dict[str, Any]:
    """describe_schema, with columns in name order (ALTER TABLE ADD COLUMN appends) and Alembic's table."""
    described = describe_schema(engine)
    for table in described.values():
        table["columns"] = sorted(table["columns"])
    return described


def grants_is_partitioned(engine: Engine) -> bool:
    if engine.dialect.name != "postgresql":
        return False
    with engine.connect() as connection:
        kind = connection.exec_driver_sql("SELECT relkind FROM pg_class WHERE relname = 'grants'").scalar_one()
    return str(kind) == "p"


def wipe(engine: Engine) -> None:
    with engine.begin() as connection:
        if engine.dialect.name == "postgresql":
            connection.exec_driver_sql("DROP SCHEMA public CASCADE")
            connection.exec_driver_sql("CREATE SCHEMA public")
        else:
            for kind in ("view", "table"):
                names = connection.exec_driver_sql(
                    f"SELECT name FROM sqlite_master WHERE type = '{kind}' AND name NOT LIKE 'sqlite_%'"
                ).scalars()
                for name in list(names):
                    connection.exec_driver_sql(f"DROP {kind.upper()} {name}")


def test_every_migration_from_nothing_builds_the_tables_of_a_new_ledger(engine: Engine) -> None:
    migrate_to(engine, "head")
    ledger.create_schema(engine)  # as `entitle db upgrade` does: views and their helper tables
    migrated = tables(engine)
    migrated_partitioned = grants_is_partitioned(engine)
    assert ledger.recorded_version(engine) == ledger.SCHEMA_VERSION
    wipe(engine)
    ledger.create_schema(engine)
    created = tables(engine)
    assert "alembic_version" in created, "a new ledger is stamped with the newest migration"
    assert migrated == created
    assert migrated_partitioned == grants_is_partitioned(engine) == (engine.dialect.name == "postgresql")
    with engine.connect() as connection:
        stamped = connection.exec_driver_sql("SELECT version_num FROM alembic_version").scalar_one()
    assert stamped == f"{ledger.SCHEMA_VERSION:04d}"


def write_version_1_ledger(engine: Engine) -> None:
    """A version-1 ledger as the first release left it: a campaign, three users' grants, one void."""
    migrate_to(engine, "0001")
    instant = "to_timestamp(:us / 1e6)" if engine.dialect.name == "postgresql" else ":us"

    def at(us: int) -> str:
        return instant.replace(":us", str(us))

    with engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO campaigns (campaign_id, name, time_zone, starts_at, registered_at) "
                f"VALUES ('legacy', 'legacy campaign', 'Asia/Seoul', {at(V1_START_US)}, {at(V1_START_US)})"
            )
        )
        connection.execute(
            sa.text(
                "INSERT INTO campaign_items (campaign_key, item_sku, item_kind, amount_krw, validity_days, "
                f"valid_from, valid_until, terms_hash) VALUES ({CAMPAIGN}, 'coupon-2000', 'coupon', 2000, NULL, "
                f"{at(V1_START_US)}, NULL, 'abc')"
            )
        )
        connection.execute(
            sa.text(
                "INSERT INTO runs (run_id, campaign_key, snapshot_id, trigger, started_at) "
                f"VALUES ('legacy-run', {CAMPAIGN}, 'snap', 'cli', {at(V1_START_US)})"
            )
        )
        for user in V1_USERS:
            connection.execute(
                sa.text(
                    "INSERT INTO grants (campaign_key, user_bucket, user_id, item_key, partition_id, run_key, "
                    f"amount_krw, valid_from, valid_until, granted_at) VALUES ({CAMPAIGN}, {user_bucket(user)}, "
                    f"{user}, {ITEM}, 0, {RUN}, 2000, {at(V1_START_US)}, NULL, {at(V1_START_US)})"
                )
            )
        connection.execute(
            sa.text(
                "INSERT INTO grant_voids (campaign_key, user_bucket, user_id, item_key, reason, actor, voided_at) "
                f"VALUES ({CAMPAIGN}, {user_bucket(V1_USERS[0])}, {V1_USERS[0]}, {ITEM}, 'test', 'tester', "
                f"{at(V1_START_US)})"
            )
        )


def test_a_version_1_ledger_is_refused_then_upgraded_in_place_keeping_every_row(
    engine: Engine, url: str, tmp_path: Path, settings_for: Callable[..., Settings], write_users: Callable[..., Path]
) -> None:
    write_version_1_ledger(engine)
    with pytest.raises(LedgerError, match=r"ledger schema version 1, this program needs \d+: .*entitle db upgrade"):
        ledger.create_schema(engine)
    env = cli_environment(ENTITLE_LEDGER_URL=url, ENTITLE_HOME=str(tmp_path / "var"))
    version = run_entitle(["db", "version", "--json"], env)
    assert version.returncode == 0, version.stderr
    assert json.loads(version.stdout)["schema_version"] == 1
    refused = run_entitle(["status"], env)
    assert refused.returncode == 5 and "entitle db upgrade" in refused.stderr

    upgraded = run_entitle(["db", "upgrade", "--json"], env)
    assert upgraded.returncode == 0, upgraded.stderr
    document = json.loads(upgraded.stdout)
    assert (document["from_version"], document["to_version"]) == (1, ledger.SCHEMA_VERSION)
    assert document["migrations"] == [f"{v:04d}" for v in range(2, ledger.SCHEMA_VERSION + 1)]
    with engine.connect() as connection:
        rows = connection.exec_driver_sql("SELECT user_id, issue_no FROM grants ORDER BY user_id").all()
        voids = connection.exec_driver_sql("SELECT user_id, issue_no FROM grant_voids").all()
        live = connection.exec_driver_sql("SELECT user_id FROM grant_ledger ORDER BY user_id").scalars().all()
    assert [tuple(r) for r in rows] == [(u, 0) for u in V1_USERS], "every grant kept, as issue 0"
    assert [tuple(r) for r in voids] == [(V1_USERS[0], 0)]
    assert list(live) == list(V1_USERS[1:]), "the analyst view is back and reads the old rows"

    again = run_entitle(["db", "upgrade"], env)
    assert again.returncode == 0 and "nothing to do" in again.stdout

    # The upgraded ledger takes a reissue of the old voided grant (the trigger guards issue_no) ...
    with engine.begin() as connection:
        connection.exec_driver_sql(
            "INSERT INTO grants (campaign_key, user_bucket, user_id, item_key, issue_no, partition_id, run_key, "
            "amount_krw, valid_from, valid_until, granted_at) SELECT campaign_key, user_bucket, user_id, item_key, 1, "
            "partition_id, run_key, amount_krw, valid_from, valid_until, granted_at FROM grants "
            f"WHERE user_id = {V1_USERS[0]}"
        )
    # ... and a new campaign's grants, on PostgreSQL through child tables beside the old default child.
    settings = settings_for(tmp_path / "var", partitions=4, ledger_url=url)
    pipeline = runs.open_pipeline(settings)
    try:
        prepared = prepare_pipeline(pipeline, write_users(tmp_path / "users.parquet", list(range(500, 900))))
        outcomes = runs.grant(pipeline, prepared.run, prepared.run.entries)
        assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes]
        assert reconciliation.reconcile(pipeline).verdict == "RECONCILED"
    finally:
        pipeline.engine.dispose()
    if engine.dialect.name == "postgresql":
        with engine.connect() as connection:
            leaves = connection.exec_driver_sql(
                "SELECT relid::regclass::text FROM pg_partition_tree('grants') WHERE isleaf"
            ).scalars()
            names = sorted(str(name) for name in leaves)
        key = pipeline.keys.campaign_key
        assert "grants_default" in names and f"grants_c{key}_default" in names
        assert len(names) == 2 + 4, "the old rows' default child, the campaign's default and one child per partition"


def test_a_newer_ledger_is_refused_and_left_alone(engine: Engine) -> None:
    ledger.create_schema(engine)
    with engine.begin() as connection:
        connection.execute(
            ledger.ledger_meta.update().values(meta_value="99").where(ledger.ledger_meta.c.meta_key == "schema_version")
        )
    with pytest.raises(LedgerError, match="newer release"):
        ledger.create_schema(engine)
    with pytest.raises(LedgerError, match="nothing was changed"):
        ledger.upgrade(engine)
    assert ledger.recorded_version(engine) == 99


def test_upgrade_of_an_empty_database_creates_a_current_ledger(engine: Engine) -> None:
    done = ledger.upgrade(engine)
    assert (done.from_version, done.to_version, done.migrations) == (None, ledger.SCHEMA_VERSION, [])
    assert ledger.recorded_version(engine) == ledger.SCHEMA_VERSION
    with engine.connect() as connection:
        assert sa.inspect(connection).has_table("grants")
