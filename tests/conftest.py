"""Shared fixtures: settings, small user files, prepared pipelines, ledger probes and PostgreSQL.

Everything here is real: SQLite files under ``tmp_path``, a fresh PostgreSQL
database per test, Parquet and CSV files written by the test itself.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine, make_url

from pipeline import ledger
from pipeline.config import Settings, load_settings
from pipeline.grants import runs

ITEMS_PER_USER = 5  # the bundled campaign: 3 emoticons and 2 coupons
FACE_VALUE_PER_USER_KRW = 2_000 + 3_000
SEOUL = dt.timezone(dt.timedelta(hours=9))
CAMPAIGN_START = dt.datetime(2023, 1, 5, 0, 0, tzinfo=SEOUL)
ENTITLE_SCRIPT = Path(sys.executable).parent / "entitle"
PG_TEST_URL = os.environ.get("ENTITLE_TEST_POSTGRES_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/test")
PG_CONNECT_TIMEOUT_S = 3
CLI_TIMEOUT_S = 120


# --------------------------------------------------------------------------- settings


def build_settings(
    home: Path,
    *,
    partitions: int = 8,
    ledger_url: str | None = None,
    campaign_file: Path | None = None,
    rejected_share_max: float | None = None,
    clock: Callable[[], dt.datetime] | None = None,
    reconcile_workers: int = 1,
) -> Settings:
    """Settings through the real composition root, from an explicit environment dict.

    Reconciliation runs in-process by default here (one worker); tests of the worker pool ask for more.
    """
    environ = {
        "ENTITLE_HOME": str(home),
        "ENTITLE_PARTITIONS": str(partitions),
        "ENTITLE_RECONCILE_WORKERS": str(reconcile_workers),
    }
    if ledger_url is not None:
        environ["ENTITLE_LEDGER_URL"] = ledger_url
    if campaign_file is not None:
        environ["ENTITLE_CAMPAIGN"] = str(campaign_file)
    if rejected_share_max is not None:
        environ["ENTITLE_REJECTED_SHARE_MAX"] = repr(rejected_share_max)
    settings = load_settings(environ)
    if clock is not None:
        settings = dataclasses.replace(settings, clock=clock)
    return settings


@pytest.fixture(scope="session")
def settings_for() -> Callable[..., Settings]:
    """``settings_for(home, partitions=8, ledger_url=None, campaign_file=None, ...)``."""
    return build_settings


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    """SQLite ledger under ``tmp_path/var``, 8 partitions, the bundled campaign, the real clock."""
    return build_settings(tmp_path / "var")


# --------------------------------------------------------------------------- user files


def write_user_file(path: Path, values: Sequence[int | str | None], column: str = "user_id") -> Path:
    """A user file of ``values``: CSV cells as text ('' for None) or a Parquet int64 column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        cells = ["" if v is None else str(v) for v in values]
        path.write_text(column + "\n" + "".join(f"{c}\n" for c in cells), encoding="utf-8")
    elif path.suffix == ".parquet":
        invalid = [v for v in values if v is not None and not isinstance(v, int)]
        if invalid:
            raise ValueError(f"a Parquet user file holds int64 ids; got {invalid[:3]}")
        pl.DataFrame({column: list(values)}, schema={column: pl.Int64}).write_parquet(path)
    else:
        raise ValueError(f"{path}: use .csv or .parquet")
    return path


@pytest.fixture(scope="session")
def write_users() -> Callable[..., Path]:
    """``write_users(path, values, column='user_id')`` writes a CSV or Parquet user file."""
    return write_user_file


# --------------------------------------------------------------------------- pipelines


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An open pipeline with a frozen, partitioned snapshot and a registered run."""

    pipeline: runs.Pipeline
    snapshot: runs.PreparedSnapshot
    run: runs.RunHandle

    @property
    def engine(self) -> Engine:
        return self.pipeline.engine


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


def prepare_pipeline(pipeline: runs.Pipeline, users_file: Path, exclusion_file: Path | None = None) -> Prepared:
    """Register, freeze, partition and start a run, exactly as ``entitle run`` does before granting."""
    runs.register(pipeline)
    report = runs.freeze(pipeline, users_file, exclusion_file)
    prepared = runs.partition(pipeline, report)
    run = runs.start_run(pipeline, snapshot_id=report.snapshot_id)
    return Prepared(pipeline, prepared, run)


@pytest.fixture
def prepare(open_pipeline: Callable[[Settings], runs.Pipeline]) -> Callable[..., Prepared]:
    """``prepare(settings, users_file, exclusion_file=None)`` → :class:`Prepared`."""

    def factory(settings: Settings, users_file: Path, exclusion_file: Path | None = None) -> Prepared:
        return prepare_pipeline(open_pipeline(settings), users_file, exclusion_file)

    return factory


# --------------------------------------------------------------------------- ledger probes


def grant_pairs(engine: Engine) -> set[tuple[int, str]]:
    """Every (user_id, item_sku) in the ledger's grants table."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(ledger.grants.c.user_id, ledger.campaign_items.c.item_sku).join(
                ledger.campaign_items, ledger.campaign_items.c.item_key == ledger.grants.c.item_key
            )
        ).all()
    return {(int(u), str(s)) for u, s in rows}


def grant_counts(engine: Engine) -> tuple[int, int]:
    """(rows in grants, distinct (campaign, user, item) triples in grants)."""
    with engine.connect() as connection:
        total = connection.execute(sa.text("SELECT count(*) FROM grants")).scalar_one()
        distinct = connection.execute(
            sa.text("SELECT count(*) FROM (SELECT DISTINCT campaign_key, user_id, item_key FROM grants) AS d")
        ).scalar_one()
    return int(total), int(distinct)


def grants_per_partition(engine: Engine) -> dict[int, int]:
    """Grant rows per partition id as recorded in the ledger."""
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT partition_id, count(*) FROM grants GROUP BY partition_id")).all()
    return {int(p): int(n) for p, n in rows}


def planned_pairs(users: Sequence[int], skus: Sequence[str]) -> set[tuple[int, str]]:
    """The exact set of grants a campaign with ``skus`` plans for ``users``."""
    return {(u, s) for u in users for s in skus}


class LedgerProbe:
    """The ledger probes above, handed to tests by the ``ledger_probe`` fixture."""

    grant_pairs = staticmethod(grant_pairs)
    grant_counts = staticmethod(grant_counts)
    grants_per_partition = staticmethod(grants_per_partition)
    planned_pairs = staticmethod(planned_pairs)


@pytest.fixture(scope="session")
def ledger_probe() -> type[LedgerProbe]:
    """Ledger probes: grant_pairs, grant_counts, grants_per_partition, planned_pairs."""
    return LedgerProbe


# --------------------------------------------------------------------------- CLI


def cli_environment(**entitle_vars: str) -> dict[str, str]:
    """The current environment without any ENTITLE_* variable, plus ``entitle_vars``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTITLE_")}
    env.update(entitle_vars)
    return env


def run_entitle(args: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script and capture its output."""
    return subprocess.run(
        [str(ENTITLE_SCRIPT), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


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
