"""Outside tools read the SQLite ledger: DuckDB's SQLite scanner plans every view with typed columns, every
named query's Parquet keeps its types, and the recipes of docs/how-to/read-the-ledger.md run as written."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import duckdb
import pytest
from support import REPO_ROOT
from support.cli import cli_environment, run_entitle

from pipeline import ledger
from pipeline.ledger import queries

USERS = 300
ITEMS = ("coupon-2000", "coupon-3000", "emoticon-90d-a", "emoticon-90d-b", "emoticon-permanent")
RECIPES = REPO_ROOT / "docs" / "how-to" / "read-the-ledger.md"

# What each view's columns are, as DuckDB sees them; the rest are VARCHAR.
INTEGER_COLUMNS = {
    "grant_ledger": {"user_id", "amount_krw", "partition_id", "user_bucket", "issue_no"},
    "grant_history": {"user_id", "issue_no", "amount_krw", "user_bucket"},
    "reconciliation_runs": {
        "partition_count",
        "expected",
        "matched",
        "terms_mismatch",
        "missing",
        "voided",
        "ledger_live",
        "unexpected",
        "duplicate",
        "residual_expected",
        "residual_ledger",
        "open_breaks",
        "reconciliation_key",
        "issuer_missing",
        "issuer_unexpected",
    },  # fmt: skip
    "reconciliation_breaks": {
        "user_id",
        "issue_no",
        "partition_id",
        "expected_amount_krw",
        "ledger_amount_krw",
        "user_bucket",
    },  # fmt: skip
    "campaign_coverage": {
        "expected",
        "granted",
        "matched",
        "missing",
        "unexpected",
        "terms_mismatch",
        "voided",
        "duplicate",
        "face_value_krw",
    },  # fmt: skip
    "partition_status": {"partition_count", "partition_id", "planned", "written", "already_present"},
}
DOUBLE_COLUMNS = {"partition_status": {"duration_s"}}


@pytest.fixture(scope="module")
def home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A project folder whose var/ledger.sqlite holds a granted, partly voided and reconciled campaign."""
    root = tmp_path_factory.mktemp("analyst")
    env = cli_environment(ENTITLE_HOME=str(root / "var"))
    users = root / "var" / "incoming" / "users.parquet"
    steps = [
        ["demo-users", "--count", str(USERS), "--out", str(users)],
        ["run", "--users", str(users), "--no-progress"],
        ["void", "--user", "10000001", "--item", "coupon-2000", "--reason", "test", "--actor", "analyst-test"],
        ["reconcile"],
    ]
    for step in steps:
        done = run_entitle(step, env)
        assert done.returncode == 0, (step, done.stderr)
    return root


def duckdb_on(path: Path) -> duckdb.DuckDBPyConnection:
    import duckdb_ext  # the sqlite extension as a wheel: nothing is downloaded

    con = duckdb.connect()
    con.execute(f"SET extension_directory = '{Path(next(iter(duckdb_ext.__path__))) / 'extensions'}'")
    con.execute("SET autoinstall_known_extensions = false")
    con.execute(f"ATTACH '{path}' AS ledger (TYPE sqlite, READ_ONLY)")
    return con


@pytest.mark.parametrize("view", ledger.LEDGER_VIEWS)
def test_duckdb_plans_every_view_with_typed_columns_and_the_values_sqlite_gives(home: Path, view: str) -> None:
    path = home / "var" / "ledger.sqlite"
    con = duckdb_on(path)
    relation = con.sql(f"SELECT * FROM ledger.{view}")
    types = dict(zip(relation.columns, (str(t) for t in relation.types), strict=True))
    expected = {
        column: "BIGINT"
        if column in INTEGER_COLUMNS[view]
        else "DOUBLE"
        if column in DOUBLE_COLUMNS.get(view, set())
        else "VARCHAR"
        for column in types
    }
    assert types == expected
    with sqlite3.connect(path) as connection:
        cursor = connection.execute(f"SELECT * FROM {view}")
        assert [d[0] for d in cursor.description] == relation.columns
        in_sqlite = sorted(cursor.fetchall(), key=repr)
    assert sorted(relation.fetchall(), key=repr) == in_sqlite
    if view in ("grant_ledger", "grant_history", "reconciliation_runs", "campaign_coverage", "partition_status"):
        assert in_sqlite, f"the fixture ledger has rows in {view}"


def test_grant_ledger_speaks_the_issuers_ids_local_times_and_money(home: Path) -> None:
    con = duckdb_on(home / "var" / "ledger.sqlite")
    rows = con.sql(
        "SELECT item_sku, grant_id, amount_krw, valid_from, valid_until, time_zone, valid_from_local, "
        "valid_until_local FROM ledger.grant_ledger WHERE user_id = 10000002 ORDER BY item_sku"
    ).fetchall()
    assert [r[0] for r in rows] == list(ITEMS)
    by_sku = {r[0]: r[1:] for r in rows}
    assert by_sku["coupon-2000"][0] == "kakao-outage-2022:10000002:coupon-2000:0"
    assert {sku: r[1] for sku, r in by_sku.items()} == {
        "coupon-2000": 2000,
        "coupon-3000": 3000,
        "emoticon-90d-a": 0,
        "emoticon-90d-b": 0,
        "emoticon-permanent": 0,
    }
    # The campaign starts 2023-01-05 00:00 in Seoul; 90 days later, exclusive, is 2023-04-05 00:00 there.
    assert by_sku["emoticon-90d-a"][2:] == (
        "2023-01-04T15:00:00Z",
        "2023-04-04T15:00:00Z",
        "Asia/Seoul",
        "2023-01-05T00:00:00+09:00",
        "2023-04-05T00:00:00+09:00",
    )
    assert by_sku["emoticon-permanent"][3] is None and by_sku["emoticon-permanent"][6] is None
    money = con.sql("SELECT sum(amount_krw) FROM ledger.grant_ledger").fetchone()
    assert money == ((USERS * 5000 - 2000),), "one ₩2,000 coupon is voided"
    summary = run_entitle(["summary", "--json"], cli_environment(ENTITLE_HOME=str(home / "var")))
    assert summary.returncode == 0, summary.stderr
    assert str(USERS * 5000 - 2000) in summary.stdout.replace(",", "")


@pytest.mark.parametrize("name", queries.list_queries())
def test_every_named_query_writes_parquet_with_the_types_of_its_values(home: Path, name: str) -> None:
    query = queries.load_query(name, "sqlite")
    params = {p.name: ("10000002" if p.type == "integer" and p.name == "user_id" else None) for p in query.declared}
    params.update({p.name: "kakao-outage-2022" for p in query.declared if p.name == "campaign_id" and p.required})
    args = [f"--param={k}={v}" for k, v in params.items() if v is not None]
    out = home / f"{name}.parquet"
    env = cli_environment(ENTITLE_HOME=str(home / "var"))
    done = run_entitle(["query", name, *args, "--format", "parquet", "--out", str(out)], env)
    assert done.returncode == 0, done.stderr
    relation = duckdb.sql(f"SELECT * FROM '{out}'")
    as_json = run_entitle(["query", name, *args, "--format", "ndjson"], env)
    assert as_json.returncode == 0, as_json.stderr
    records = [json.loads(line) for line in as_json.stdout.splitlines()]
    assert len(records) == len(relation.fetchall())
    for column, kind in zip(relation.columns, relation.types, strict=True):
        values = [r[column] for r in records if r[column] is not None]
        expected = _duckdb_type(values)
        assert str(kind) == expected, f"{name}.{column}: {kind} for values like {values[:3]}"


def _duckdb_type(values: list[Any]) -> str:
    if values and all(isinstance(v, int) and not isinstance(v, bool) for v in values):
        return "BIGINT"
    if values and all(isinstance(v, int | float) for v in values):
        return "DOUBLE"
    return "VARCHAR"


def test_the_counts_are_numbers_not_text(home: Path) -> None:
    out = home / "coverage-typed.parquet"
    env = cli_environment(ENTITLE_HOME=str(home / "var"))
    done = run_entitle(["query", "coverage", "--format", "parquet", "--out", str(out)], env)
    assert done.returncode == 0, done.stderr
    relation = duckdb.sql(f"SELECT expected, granted, face_value_krw FROM '{out}'")
    assert [str(t) for t in relation.types] == ["BIGINT", "BIGINT", "BIGINT"]
    coupon_2000 = (USERS, USERS - 1, (USERS - 1) * 2000)  # one voided
    assert sorted(relation.fetchall()) == sorted([coupon_2000, (USERS, USERS, USERS * 3000)] + [(USERS, USERS, 0)] * 3)


def recipe_blocks() -> list[tuple[str, str]]:
    """(language, code) of every fenced block of the recipes page that the test can run."""
    text = RECIPES.read_text(encoding="utf-8")
    blocks = re.findall(r"^```(python|sql|sh)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [(language, code) for language, code in blocks if "db.example" not in code]


def test_the_recipes_page_has_duckdb_pandas_and_polars_recipes() -> None:
    code = "\n".join(c for _, c in recipe_blocks())
    for library in ("import duckdb", "import pandas", "import polars"):
        assert library in code


def test_every_recipe_runs_as_written_from_the_project_root(home: Path) -> None:
    """Shell lines run first (they write files the Python recipes read), then each Python and SQL block."""
    env = cli_environment(ENTITLE_HOME=str(home / "var"))
    venv_bin = Path(sys.executable).parent
    (home / ".venv").mkdir(exist_ok=True)
    if not (home / ".venv" / "bin").exists():
        (home / ".venv" / "bin").symlink_to(venv_bin)
    blocks = recipe_blocks()
    for language, code in sorted(blocks, key=lambda b: b[0] != "sh"):
        if language == "sh":
            for line in code.strip().splitlines():
                done = subprocess.run(line, shell=True, cwd=home, env=env, capture_output=True, text=True)
                assert done.returncode == 0, (line, done.stderr)
        elif language == "python":
            done = subprocess.run(
                [sys.executable, "-c", code], cwd=home, env=env, capture_output=True, text=True, timeout=120
            )
            assert done.returncode == 0, (code, done.stderr)
            assert "coupon-2000" in done.stdout or "coupon-3000" in done.stdout, (code, done.stdout)
        else:  # the DuckDB shell's statements, through DuckDB's Python API in the same folder
            runner = (
                "import pathlib, sys, duckdb, duckdb_ext\n"
                "con = duckdb.connect()\n"
                "folder = pathlib.Path(next(iter(duckdb_ext.__path__))) / 'extensions'\n"
                "con.execute(f\"SET extension_directory = '{folder}'\")\n"
                "statements = [s for s in sys.stdin.read().split(';') if s.strip()]\n"
                "for statement in statements[:-1]:\n"
                "    con.execute(statement)\n"
                "print(len(con.sql(statements[-1]).fetchall()))\n"
            )
            done = subprocess.run(
                [sys.executable, "-c", runner], input=code, cwd=home, env=env, capture_output=True, text=True
            )
            assert done.returncode == 0, (code, done.stderr)
            assert done.stdout.strip() == str(len(ITEMS)), (code, done.stdout)


@pytest.mark.postgres
def test_postgresql_sums_and_local_times_reach_json_as_numbers_and_wall_times(tmp_path: Path, pg_url: str) -> None:
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_LEDGER_URL=pg_url)
    users = tmp_path / "users.parquet"
    for step in (["demo-users", "--count", "50", "--out", str(users)], ["run", "--users", str(users), "--no-progress"]):
        done = run_entitle(step, env)
        assert done.returncode == 0, (step, done.stderr)
    done = run_entitle(["query", "face_value_per_item", "--format", "json"], env)
    assert done.returncode == 0, done.stderr
    face_values = {r["item_sku"]: r["face_value_krw"] for r in json.loads(done.stdout)}
    assert face_values == {
        "coupon-2000": 100_000,
        "coupon-3000": 150_000,
        "emoticon-90d-a": 0,
        "emoticon-90d-b": 0,
        "emoticon-permanent": 0,
    }
    done = run_entitle(["query", "user_grants", "--param", "user_id=10000001", "--format", "json"], env)
    assert done.returncode == 0, done.stderr
    by_sku = {r["item_sku"]: r for r in json.loads(done.stdout)}
    assert by_sku["emoticon-90d-a"]["valid_until_local"] == "2023-04-05 00:00:00"
    assert by_sku["coupon-2000"]["grant_id"] == "kakao-outage-2022:10000001:coupon-2000:0"
