"""PostgreSQL roles (sql/postgresql/roles.sql): the analyst reads only the analyst views, the operator only
adds voids, the writer runs the pipeline; none of them can change or delete a grant."""

from __future__ import annotations

import datetime as dt
import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from support.ledger_state import prepare_pipeline
from support.settings import ITEMS_PER_USER, build_settings

from pipeline import ledger, reconciliation
from pipeline.delivery import rate_budget
from pipeline.errors import ConfigError
from pipeline.grants import corrections, runs
from pipeline.ledger import pgcopy, queries

pytestmark = pytest.mark.postgres

USERS = list(range(70_000_000, 70_000_300))
NEW_USERS = list(range(70_000_300, 70_000_350))
ROLE_DROP_ATTEMPTS = 50
ANALYST_VIEWS = (
    "grant_ledger",
    "grant_history",
    "campaign_coverage",
    "reconciliation_runs",
    "reconciliation_breaks",
    "partition_status",
)


@pytest.fixture
def logins(pg_admin: Engine) -> Iterator[dict[str, str]]:
    """One login user per group role, dropped afterwards (roles are cluster-wide)."""
    suffix = uuid.uuid4().hex[:10]
    names = {group: f"{group}_{suffix}" for group in ("writer", "operator", "analyst")}
    with pg_admin.connect() as connection:
        for name in names.values():
            connection.exec_driver_sql(f'CREATE ROLE "{name}" LOGIN')
    yield names
    with pg_admin.connect() as connection:
        for name in names.values():
            # A closed session's backend may still be dropping its temporary tables: end it, then retry.
            connection.exec_driver_sql(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE usename = %(name)s", {"name": name}
            )
            for _ in range(ROLE_DROP_ATTEMPTS):
                try:
                    connection.exec_driver_sql(f'DROP ROLE IF EXISTS "{name}"')
                    break
                except sa.exc.InternalError:
                    time.sleep(0.2)
            else:
                pytest.fail(f"login role {name} could not be dropped")


def engine_as(pg_url: str, user: str) -> Engine:
    return ledger.create_ledger_engine(make_url(pg_url).set(username=user).render_as_string(hide_password=False))


def denied(engine: Engine, sql: str) -> bool:
    try:
        with engine.begin() as connection:
            connection.exec_driver_sql(sql)
    except sa.exc.ProgrammingError as exc:
        return "permission denied" in str(exc.orig) or "must be owner" in str(exc.orig)
    return False


def test_roles_separate_writer_operator_and_analyst(
    tmp_path: Path, pg_url: str, logins: dict[str, str], write_users: Callable[..., Path]
) -> None:
    owner = build_settings(tmp_path / "var", ledger_url=pg_url)
    pipeline = runs.open_pipeline(owner)
    prepared = prepare_pipeline(pipeline, write_users(tmp_path / "users.parquet", USERS))
    runs.require_all_done(runs.grant(pipeline, prepared.run, prepared.run.entries))
    reconciliation.reconcile(pipeline)
    assert ledger.apply_roles(pipeline.engine) == ("entitle_writer", "entitle_operator", "entitle_analyst")
    assert ledger.apply_roles(pipeline.engine), "applying twice is fine"
    with pipeline.engine.connect() as connection:
        for group, login in logins.items():
            connection.exec_driver_sql(f'GRANT entitle_{group} TO "{login}"')
        connection.commit()
    pipeline.engine.dispose()

    analyst = engine_as(pg_url, logins["analyst"])
    operator = engine_as(pg_url, logins["operator"])
    writer_url = make_url(pg_url).set(username=logins["writer"]).render_as_string(hide_password=False)
    as_writer: runs.Pipeline | None = None
    try:
        # The analyst reads every analyst view and nothing else, and writes nothing.
        with analyst.connect() as connection:
            for view in ANALYST_VIEWS:
                connection.exec_driver_sql(f"SELECT * FROM {view} LIMIT 1").all()
            live = connection.exec_driver_sql("SELECT count(*) FROM grant_ledger").scalar_one()
        assert live == len(USERS) * ITEMS_PER_USER
        for table in ("grants", "grant_voids", "runs", "recon_breaks", "partition_attempts"):
            assert denied(analyst, f"SELECT * FROM {table} LIMIT 1"), table
        # ... and every named query (the program queries join the campaign catalogue and their own tables).
        for name in queries.list_queries():
            query = queries.load_query(name, "postgresql")
            required = {
                d.name: "1" if d.type == "integer" else "kakao-outage-2022" for d in query.declared if d.required
            }
            queries.run_query(analyst, name, required)
        assert denied(
            analyst,
            "INSERT INTO grant_voids (campaign_key, user_bucket, user_id, item_key, reason, "
            "actor, voided_at) VALUES (1, 1, 1, 1, 'x', 'x', now())",
        )
        assert denied(analyst, "CREATE TABLE analyst_scratch (x int)")

        # The operator voids through the real command path, and can do nothing else to the ledger.
        operator_settings = build_settings(tmp_path / "var", ledger_url=str(operator.url.render_as_string(False)))
        as_operator = runs.open_pipeline(operator_settings)
        voided = corrections.void_grants(
            as_operator, [corrections.VoidRequest("fraud", USERS[0], "coupon-2000")], "ops", dt.datetime.now(dt.UTC)
        )
        as_operator.engine.dispose()
        assert [(v.user_id, v.item_sku) for v in voided] == [(USERS[0], "coupon-2000")]
        assert denied(operator, "UPDATE grants SET amount_krw = 1")
        assert denied(operator, "DELETE FROM grant_voids")
        assert denied(
            operator,
            "INSERT INTO runs (run_id, campaign_key, snapshot_id, trigger, started_at) "
            "VALUES ('x', 1, 'x', 'x', now())",
        )

        # The writer runs the pipeline on new sign-ups and reconciles; it cannot rewrite history either.
        writer_settings = build_settings(tmp_path / "writer", ledger_url=writer_url)
        as_writer = runs.open_pipeline(writer_settings)
        more = prepare_pipeline(as_writer, write_users(tmp_path / "more.parquet", USERS + NEW_USERS))
        outcomes = runs.grant(as_writer, more.run, more.run.entries)
        runs.require_all_done(outcomes)
        assert sum(o.written for o in outcomes) == len(NEW_USERS) * ITEMS_PER_USER
        result = reconciliation.reconcile(as_writer)
        assert result.verdict == "RECONCILED" and result.bridge["voided"] == 1
        writer = as_writer.engine
        # Delivery's shared rate budget: the writer reserves slots and holds an issuer.
        rate_budget.hold_issuer(writer, "shop", 5.0)
        assert 4.0 < rate_budget.take_issuer_slot(writer, "shop", 0.01) <= 5.0
        assert denied(analyst, "SELECT * FROM issuer_budgets")
        assert denied(writer, "DELETE FROM grants")
        assert denied(writer, "UPDATE grants SET amount_krw = 1")
        assert denied(writer, "DROP TABLE grants")
    finally:
        analyst.dispose()
        operator.dispose()
        if as_writer is not None:
            as_writer.engine.dispose()  # its session's temporary tables go with it


def test_roles_are_refused_on_sqlite(tmp_path: Path) -> None:
    engine = ledger.create_ledger_engine(f"sqlite:///{tmp_path / 'ledger.sqlite'}")
    try:
        with pytest.raises(ConfigError, match="roles are a PostgreSQL feature"):
            ledger.apply_roles(engine)
    finally:
        engine.dispose()


def test_db_roles_command(tmp_path: Path, pg_url: str) -> None:
    from support.cli import cli_environment, run_entitle

    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_LEDGER_URL=pg_url)
    result = run_entitle(["db", "roles", "--json"], env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["roles"] == ["entitle_writer", "entitle_operator", "entitle_analyst"]
    on_sqlite = run_entitle(["db", "roles"], cli_environment(ENTITLE_HOME=str(tmp_path / "var")))
    assert on_sqlite.returncode == 2
    assert on_sqlite.stderr.startswith("entitle: error: roles are a PostgreSQL feature")


def test_a_writer_that_does_not_own_grants_writes_new_ranges_row_by_row(
    tmp_path: Path, pg_url: str, logins: dict[str, str], write_users: Callable[..., Path]
) -> None:
    """Attaching a child table needs ownership of grants; entitle_writer alone takes the INSERT path."""
    owner = build_settings(tmp_path / "var", partitions=4, ledger_url=pg_url)
    pipeline = runs.open_pipeline(owner)
    prepared = prepare_pipeline(pipeline, write_users(tmp_path / "users.parquet", USERS))
    entries = prepared.run.entries
    runs.require_all_done(runs.grant(pipeline, prepared.run, entries[:2]))
    ledger.apply_roles(pipeline.engine)
    with pipeline.engine.connect() as connection:
        connection.exec_driver_sql(f'GRANT entitle_writer TO "{logins["writer"]}"')
        connection.exec_driver_sql(f'GRANT entitle_analyst TO "{logins["analyst"]}"')
        connection.commit()
    writer_url = make_url(pg_url).set(username=logins["writer"]).render_as_string(hide_password=False)
    as_writer = runs.open_pipeline(build_settings(tmp_path / "var", partitions=4, ledger_url=writer_url))
    analyst = engine_as(pg_url, logins["analyst"])
    try:
        outcomes = runs.grant(as_writer, prepared.run, entries[2:])
        runs.require_all_done(outcomes)
        key = pipeline.keys.campaign_key
        with pipeline.engine.connect() as connection:
            in_default = connection.exec_driver_sql(f"SELECT count(*) FROM grants_c{key}_default").scalar_one()
        assert in_default == sum(e.rows for e in entries[2:]) * ITEMS_PER_USER
        assert len(_children(pipeline.engine)) == 2, "the owner's two children; the writer made none"
        assert reconciliation.reconcile(as_writer).verdict == "RECONCILED"
        child = next(iter(_children(pipeline.engine)))
        assert denied(analyst, f"SELECT 1 FROM {child}"), "children are not readable around the views"
        assert denied(as_writer.engine, f"DELETE FROM {child}")
    finally:
        analyst.dispose()
        as_writer.engine.dispose()
        pipeline.engine.dispose()


def _children(engine: Engine) -> list[str]:
    with engine.connect() as connection:
        return [
            str(name)
            for name in connection.exec_driver_sql(
                "SELECT relid::regclass::text FROM pg_partition_tree('grants') WHERE isleaf"
            ).scalars()
            if pgcopy.is_range_child(str(name))
        ]
