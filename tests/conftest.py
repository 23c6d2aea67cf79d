"""Shared fixtures: settings, small user files, prepared pipelines, ledger probes and PostgreSQL.

Everything here is real: SQLite files under ``tmp_path``, a fresh PostgreSQL
database per test, Parquet and CSV files written by the test itself.
"""

from __future__ import annotations

import datetime as dt
import os
import subprocess
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url
from support import REPO_ROOT
from support.cli import BIN, ENTITLE_SCRIPT, run_entitle
from support.drawer_pass import NOW, program_text
from support.ledger_state import LedgerProbe, Prepared, prepare_pipeline
from support.settings import DAG_TEST_PARTITIONS, build_settings, write_user_file

from pipeline.config import Settings
from pipeline.grants import runs
from pipeline.programs.drawer_pass import allocation as pass_allocation
from pipeline.programs.drawer_pass.allocation import PassContext
from pipeline.programs.drawer_pass.program import load_program
from pipeline.programs.merchant_cash import claims
from pipeline.programs.merchant_cash.claims import OpenProgram

PG_TEST_URL = os.environ.get("ENTITLE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_CONNECT_TIMEOUT_S = 3


# --------------------------------------------------------------------------- settings


@pytest.fixture(scope="session")
def settings_for() -> Callable[..., Settings]:
    """``settings_for(home, partitions=8, ledger_url=None, campaign_file=None, ...)``."""
    return build_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """SQLite ledger under ``tmp_path/var``, 8 partitions, the bundled campaign, the real clock."""
    return build_settings(tmp_path / "var")


# --------------------------------------------------------------------------- user files


@pytest.fixture(scope="session")
def write_users() -> Callable[..., Path]:
    """``write_users(path, values, column='user_id')`` writes a CSV or Parquet user file."""
    return write_user_file


# --------------------------------------------------------------------------- pipelines


@pytest.fixture
def open_pipeline() -> Iterator[Callable[[Settings], runs.Pipeline]]:
    """``open_pipeline(settings)``: :func:`runs.open_pipeline` then :func:`runs.register`, as every command
    that writes does; closed afterwards."""
    opened: list[runs.Pipeline] = []

    def factory(settings: Settings) -> runs.Pipeline:
        pipeline = runs.open_pipeline(settings)
        opened.append(pipeline)
        runs.register(pipeline)
        return pipeline

    yield factory
    for pipeline in opened:
        pipeline.close()


@pytest.fixture
def prepare(open_pipeline: Callable[[Settings], runs.Pipeline]) -> Callable[..., Prepared]:
    """``prepare(settings, users_file, exclusion_file=None)`` → :class:`Prepared`."""

    def factory(settings: Settings, users_file: Path, exclusion_file: Path | None = None) -> Prepared:
        return prepare_pipeline(open_pipeline(settings), users_file, exclusion_file)

    return factory


# --------------------------------------------------------------------------- ledger probes


@pytest.fixture(scope="session")
def ledger_probe() -> type[LedgerProbe]:
    """Ledger probes: grant_pairs, grant_counts, grants_per_partition, planned_pairs."""
    return LedgerProbe


# --------------------------------------------------------------------------- CLI


@pytest.fixture(scope="session")
def entitle() -> Callable[..., subprocess.CompletedProcess[str]]:
    """``entitle(args, env)`` runs ``.venv/bin/entitle`` as a subprocess."""
    if not ENTITLE_SCRIPT.exists():
        pytest.fail(f"console script {ENTITLE_SCRIPT} is missing; install the project (pip install -e .)")
    return run_entitle


# --------------------------------------------------------------------------- PostgreSQL


@pytest.fixture(scope="session")
def pg_admin() -> Iterator[Engine]:
    """An AUTOCOMMIT engine on the server's ``postgres`` database; skip (or fail) when unreachable."""
    admin_url = make_url(PG_TEST_URL).set(database="postgres")
    engine = sa.create_engine(
        admin_url, isolation_level="AUTOCOMMIT", connect_args={"connect_timeout": PG_CONNECT_TIMEOUT_S}
    )
    unreachable = None
    try:
        with engine.connect() as connection:
            connection.execute(sa.text("SELECT 1"))
    except sa.exc.OperationalError as exc:
        where = admin_url.render_as_string(hide_password=True)
        unreachable = f"PostgreSQL is not reachable at {where}: {' '.join(str(exc.orig).split())}"
    if unreachable is not None:
        engine.dispose()
        if os.environ.get("ENTITLE_REQUIRE_POSTGRES") == "1":
            pytest.fail(f"{unreachable} (ENTITLE_REQUIRE_POSTGRES=1: a failure, not a skip)", pytrace=False)
        pytest.skip(f"{unreachable}; set ENTITLE_TEST_POSTGRES_URL or start the server")
    yield engine
    engine.dispose()


@pytest.fixture
def pg_url(pg_admin: Engine) -> Iterator[str]:
    """The URL of a fresh, empty database ``entitle_test_<random>``, dropped after the test."""
    name = f"entitle_test_{uuid.uuid4().hex[:16]}"
    with pg_admin.connect() as connection:
        connection.exec_driver_sql(f'CREATE DATABASE "{name}"')
    try:
        yield make_url(PG_TEST_URL).set(database=name).render_as_string(hide_password=False)
    finally:
        with pg_admin.connect() as connection:
            connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


# --------------------------------------------------------------------------- programs and Airflow


@pytest.fixture(scope="module")
def airflow_env(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Environment for a project-local Airflow with a migrated SQLite metadata DB."""
    home = tmp_path_factory.mktemp("airflow")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ENTITLE_"))}
    env.update(
        {
            "PATH": f"{BIN}:{env.get('PATH', '')}",
            "AIRFLOW_HOME": str(home),
            "AIRFLOW_CONFIG": str(REPO_ROOT / "airflow.cfg"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(REPO_ROOT / "dags"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home / 'airflow.db'}",
            "ENTITLE_PARTITIONS": str(DAG_TEST_PARTITIONS),
            "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": "1",
            "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "1",
        }
    )
    migrate = subprocess.run(
        [str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, text=True, timeout=300, check=False
    )
    assert migrate.returncode == 0, migrate.stderr[-2000:]
    return env


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """An empty ledger on each backend."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'var' / 'ledger.sqlite'}"
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
def open_pass_program(tmp_path: Path) -> Iterator[Callable[..., PassContext]]:
    """``open_pass_program(ledger_url, cap, clock=NOW, share=0.0001)`` → a registered pass program (closed after)."""
    opened: list[PassContext] = []

    def factory(url: str, cap: int, clock: dt.datetime = NOW, share: float = 0.0001) -> PassContext:
        path = tmp_path / f"program-{cap}.toml"
        path.write_text(program_text(cap), encoding="utf-8")
        settings = build_settings(tmp_path / "var", ledger_url=url, clock=lambda: clock, rejected_share_max=share)
        context = pass_allocation.open_pass(settings, load_program(path))
        opened.append(context)
        pass_allocation.register(context)
        return context

    yield factory
    for context in opened:
        context.close()


@pytest.fixture
def open_merchant_program(
    tmp_path: Path, ledger_url: str, settings_for: Callable[..., Settings]
) -> Iterator[Callable[..., OpenProgram]]:
    """``open_merchant_program(program_file=None)``: the registered program on this ledger (closed afterwards)."""
    opened: list[OpenProgram] = []

    def factory(program_file: Path | None = None) -> OpenProgram:
        op = claims.open_program(settings_for(tmp_path / "var", ledger_url=ledger_url), program_file)
        opened.append(op)
        claims.register(op)
        return op

    yield factory
    for op in opened:
        op.close()
