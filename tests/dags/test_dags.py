"""The Airflow DAGs: integrity of every DAG file, and real runs through ``dag.test``.

Airflow runs in subprocesses with a project-local metadata DB under tmp, so the
test process never imports Airflow and each module gets a clean Airflow.
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from support import REPO_ROOT
from support.cli import BIN, run_dag
from support.settings import DAG_TEST_PARTITIONS

from pipeline.config import load_settings
from pipeline.grants import runs
from pipeline.grants.demo_users import write_demo_users
from pipeline.grants.partitioning import partitions_dir

ROOT = REPO_ROOT
DAGS = sorted((ROOT / "dags").glob("*.py"))
USERS = 20_000
PARTITIONS = DAG_TEST_PARTITIONS

pytestmark = [pytest.mark.airflow, pytest.mark.slow]


@pytest.fixture
def entitle_env(airflow_env: dict[str, str], tmp_path: Path) -> Iterator[dict[str, str]]:
    """Airflow env plus a fresh ENTITLE_HOME with a 20,000-user file in it."""
    env = dict(airflow_env)
    env["ENTITLE_HOME"] = str(tmp_path / "var")
    write_demo_users(USERS, tmp_path / "var" / "incoming" / "users.parquet")
    yield env


def ledger_state(env: dict[str, str]) -> tuple[dict[str, int], int, int]:
    """Live grants per item, total rows and distinct (user, item) pairs in the ledger."""
    pipeline = runs.open_pipeline(load_settings(env))
    try:
        totals = {t.item_sku: t.grants for t in runs.ledger_totals(pipeline)}
        with pipeline.engine.connect() as connection:
            rows = connection.exec_driver_sql("SELECT count(*) FROM grants").scalar_one()
            distinct = connection.exec_driver_sql(
                "SELECT count(*) FROM (SELECT DISTINCT user_id, item_key FROM grants) AS d"
            ).scalar_one()
    finally:
        pipeline.engine.dispose()
    return totals, int(rows), int(distinct)


def attempts(env: dict[str, str], run_id: str) -> dict[int, list[str]]:
    """Statuses of every attempt per partition for one Airflow run."""
    path = Path(env["ENTITLE_HOME"]) / "ledger.sqlite"
    with sqlite3.connect(path) as connection:
        rows = connection.execute(
            "SELECT a.partition_id, a.status FROM partition_attempts a JOIN runs r ON r.run_key = a.run_key "
            "WHERE r.run_id = ? ORDER BY a.attempt_key",
            (run_id,),
        ).fetchall()
    found: dict[int, list[str]] = {}
    for partition_id, status in rows:
        found.setdefault(int(partition_id), []).append(str(status))
    return found


# --- integrity of every DAG file -------------------------------------------------------------

_INSPECT = r"""
import json, os, sys, time, runpy
import pendulum
sys.path.append(os.path.dirname(sys.argv[1]))  # as Airflow does: the dags folder is importable
from airflow.sdk import DAG
from airflow.configuration import conf
started = time.perf_counter()
namespace = runpy.run_path(sys.argv[1])
seconds = time.perf_counter() - started
dags = [v for v in namespace.values() if isinstance(v, DAG)]
out = []
for dag in dags:
    out.append({
        "dag_id": dag.dag_id, "tags": sorted(dag.tags), "doc_md": dag.doc_md or "",
        "catchup": dag.catchup, "max_active_runs": dag.max_active_runs,
        "start_date": dag.start_date.isoformat() if dag.start_date else None,
        "timezone": str(dag.timezone),
        "schedule": str(getattr(dag, "schedule", None)),
        "tasks": {t.task_id: {"retries": t.retries, "pool": t.pool} for t in dag.tasks},
        "params": sorted(dag.params.keys()),
    })
print(json.dumps({"seconds": seconds, "dags": out,
                  "import_timeout": conf.getfloat("core", "dagbag_import_timeout"),
                  "heavy_imports": sorted(m for m in ("polars", "pyarrow", "pipeline") if m in sys.modules)}))
"""


@pytest.mark.parametrize("dag_file", DAGS, ids=[p.name for p in DAGS])
def test_dag_file_imports_cleanly_without_work(dag_file: Path, airflow_env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(BIN / "python"), "-c", _INSPECT, str(dag_file)],
        env=airflow_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    found = json.loads(result.stdout.strip().splitlines()[-1])
    assert found["dags"], f"{dag_file.name} defines no DAG"
    # What keeps parsing cheap is that the file imports nothing heavy and does no work (checked next); the
    # only time bound is the one Airflow itself enforces, so a slow CI machine cannot fail this test.
    assert found["seconds"] < found["import_timeout"], (
        f"{dag_file.name} took {found['seconds']:.2f}s to parse, beyond Airflow's dagbag_import_timeout"
    )
    assert found["heavy_imports"] == [], f"{dag_file.name} imports {found['heavy_imports']} at parse time"
    for dag in found["dags"]:
        assert dag["tags"], f"{dag['dag_id']} has no tags"
        assert len(dag["doc_md"]) > 200, f"{dag['dag_id']} has no real doc_md"
        assert dag["catchup"] is False
        assert dag["max_active_runs"] == 1
        for task_id, task in dag["tasks"].items():
            assert task["retries"] >= 1, f"{dag['dag_id']}.{task_id} has no retries"


@pytest.mark.parametrize("dag_file", sorted((REPO_ROOT / "dags").glob("*.py")), ids=lambda p: p.name)
def test_every_task_calls_the_pipeline_inside_failing_fast(dag_file: Path) -> None:
    """Bad input and refused writes fail a task at once instead of three retries later (only retryable errors retry)."""
    import ast

    tree = ast.parse(dag_file.read_text(encoding="utf-8"))
    guarded: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.With) and any(
            isinstance(item.context_expr, ast.Call) and getattr(item.context_expr.func, "id", "") == "failing_fast"
            for item in node.items
        ):
            guarded.update(id(inner) for inner in ast.walk(node))
    calls = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and isinstance(node.func.value, ast.Name)
        and node.func.value.id == "dag_tasks"
    ]
    assert calls, f"{dag_file.name} calls no dag_tasks function"
    unguarded = [f"line {c.lineno}: dag_tasks.{c.func.attr}" for c in calls if id(c) not in guarded]  # type: ignore[attr-defined]
    assert not unguarded, f"{dag_file.name}: outside failing_fast(): {unguarded}"


def test_grant_dag_schedule_start_and_params(airflow_env: dict[str, str]) -> None:
    result = subprocess.run(
        [str(BIN / "python"), "-c", _INSPECT, str(ROOT / "dags" / "entitlement_grant.py")],
        env=airflow_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    dag = json.loads(result.stdout.strip().splitlines()[-1])["dags"][0]
    assert dag["dag_id"] == "entitlement_grant"
    assert dag["start_date"].startswith("2023-01-05T00:00:00+09:00") or dag["start_date"].startswith(
        "2023-01-04T15:00:00+00:00"
    )
    assert "Asia/Seoul" in dag["timezone"]
    assert "0 2 * * *" in dag["schedule"]
    assert dag["tasks"]["grant"]["pool"] == "ledger_writers"
    assert dag["params"] == ["dry_run", "exclusion_uri", "partitions", "snapshot_uri", "verify"]


def test_dag_files_pass_ruff_airflow3_rules() -> None:
    result = subprocess.run(
        [str(BIN / "ruff"), "check", "--select", "AIR3", "--no-cache", str(ROOT / "dags")],
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr


# --- real runs -------------------------------------------------------------------------------


def test_dag_grants_every_user_once_and_a_second_run_changes_nothing(entitle_env: dict[str, str]) -> None:
    code, result, log = run_dag(entitle_env)
    assert code == 0 and result["state"] == "success", log
    totals, rows, distinct = ledger_state(entitle_env)
    assert set(totals.values()) == {USERS}, totals
    assert rows == distinct == USERS * 5

    airflow_db = Path(entitle_env["AIRFLOW_HOME"]) / "airflow.db"
    with sqlite3.connect(airflow_db) as connection:
        labels = {
            r[0]
            for r in connection.execute(
                "SELECT rendered_map_index FROM task_instance WHERE run_id = ? AND task_id = 'grant'",
                (result["run_id"],),
            )
        }
    assert labels == {f"part-{p:04d}" for p in range(PARTITIONS)}
    # The notify task wrote who this run granted something to, for the messaging system.
    notices_dir = Path(entitle_env["ENTITLE_HOME"]) / "campaigns" / "kakao-outage-2022" / "notices" / "granted"
    marker = json.loads((notices_dir / result["run_id"] / "notices.json").read_text(encoding="utf-8"))
    assert marker["users"] == USERS and len(marker["users_per_partition"]) == PARTITIONS

    code, second, log = run_dag(entitle_env)
    assert code == 0, log
    # Nothing new: every partition is done for this snapshot, so the night maps no grant task instance.
    assert attempts(entitle_env, second["run_id"]) == {}
    with sqlite3.connect(airflow_db) as connection:
        mapped = connection.execute(
            "SELECT count(*) FROM task_instance WHERE run_id = ? AND task_id = 'grant' AND map_index >= 0",
            (second["run_id"],),
        ).fetchone()[0]
    assert mapped == 0, "a night with nothing new starts no grant task instance"
    assert ledger_state(entitle_env)[1:] == (USERS * 5, USERS * 5)
    assert reconciliation_verdicts(entitle_env) == ["RECONCILED", "RECONCILED"], "each night reconciles"

    # Behind the pipeline's back, a grant disappears: the next night's reconcile task finds it
    # from the data (the grant tasks skip, their records say done), and the run fails visibly.
    with sqlite3.connect(Path(entitle_env["ENTITLE_HOME"]) / "ledger.sqlite") as connection:
        connection.execute("DROP TRIGGER grants_append_only_delete")
        victim = connection.execute("SELECT user_id FROM grants ORDER BY user_id LIMIT 1").fetchone()[0]
        connection.execute("DELETE FROM grants WHERE user_id = ? AND item_key = 2", (victim,))
    code, third, log = run_dag(entitle_env)
    assert code != 0 and third["state"] == "failed", log
    assert "reconciliation verdict BREAKS" in log
    assert reconciliation_verdicts(entitle_env)[-1] == "BREAKS"
    pipeline = runs.open_pipeline(load_settings(entitle_env))
    try:
        with pipeline.engine.connect() as connection:
            open_breaks = connection.exec_driver_sql(
                "SELECT break_class, user_id, item_sku FROM reconciliation_breaks WHERE status = 'open'"
            ).all()
    finally:
        pipeline.engine.dispose()
    assert [tuple(r) for r in open_breaks] == [("missing", victim, "emoticon-90d-a")]


def connection_rows(env: dict[str, str], sql: str) -> list[tuple[object, ...]]:
    """Rows of one query on the SQLite ledger."""
    with sqlite3.connect(Path(env["ENTITLE_HOME"]) / "ledger.sqlite") as connection:
        return [tuple(r) for r in connection.execute(sql)]


def reconciliation_verdicts(env: dict[str, str]) -> list[str]:
    """Verdicts of every stored reconciliation, oldest first."""
    with sqlite3.connect(Path(env["ENTITLE_HOME"]) / "ledger.sqlite") as connection:
        return [r[0] for r in connection.execute("SELECT verdict FROM recon_runs ORDER BY reconciliation_key")]


def _break_partition(env: dict[str, str], partition_id: int) -> Path:
    """Freeze and partition the user file ahead of the DAG, then corrupt one partition file."""
    with runs.open_pipeline(load_settings(env)) as pipeline:
        runs.register(pipeline)
        report = runs.freeze(pipeline, Path(env["ENTITLE_HOME"]) / "incoming" / "users.parquet")
        prepared = runs.partition(pipeline, report)
    broken = prepared.partitions_dir / f"part-{partition_id:04d}.parquet"
    broken.write_bytes(b"this is not parquet")
    return broken


def _repair_partitions(env: dict[str, str], broken: Path) -> None:
    """Regenerate the partitions (byte-identical) so the broken one is readable again."""
    shutil.rmtree(broken.parent)
    with runs.open_pipeline(load_settings(env)) as pipeline:
        runs.register(pipeline)
        report = runs.freeze(pipeline, Path(env["ENTITLE_HOME"]) / "incoming" / "users.parquet")
        runs.partition(pipeline, report)
    assert partitions_dir(Path(report.directory), PARTITIONS) == broken.parent


def test_failed_partition_fails_alone_and_clear_only_failed_finishes_it(entitle_env: dict[str, str]) -> None:
    broken = _break_partition(entitle_env, 3)
    code, result, log = run_dag(entitle_env)
    assert code == 1 and result["state"] == "failed", log
    run_id = result["run_id"]
    first = attempts(entitle_env, run_id)
    assert set(first[3]) == {"failed"}
    assert all(first[p] == ["done"] for p in range(PARTITIONS) if p != 3), first
    totals, rows, _ = ledger_state(entitle_env)
    assert 0 < rows < USERS * 5

    _repair_partitions(entitle_env, broken)
    cleared = subprocess.run(
        [str(BIN / "airflow"), "dags", "clear", "entitlement_grant", "--run-id", run_id, "--only-failed", "-y"],
        env=entitle_env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert cleared.returncode == 0, cleared.stderr[-2000:]
    resumed = subprocess.run(
        [
            str(BIN / "python"),
            str(ROOT / "ops" / "airflow_resume_run.py"),
            str(ROOT / "dags" / "entitlement_grant.py"),
            "entitlement_grant",
            run_id,
        ],
        env=entitle_env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = attempts(entitle_env, run_id)
    assert after[3][-1] == "done" and after[3][:-1] == first[3], after[3]
    assert all(after[p] == ["done"] for p in range(PARTITIONS) if p != 3), "a finished partition was re-executed"
    totals, rows, distinct = ledger_state(entitle_env)
    assert set(totals.values()) == {USERS} and rows == distinct == USERS * 5


def test_operator_run_restricted_to_partitions_finishes_the_failed_one(entitle_env: dict[str, str]) -> None:
    broken = _break_partition(entitle_env, 5)
    code, result, log = run_dag(entitle_env)
    assert code == 1, log
    _repair_partitions(entitle_env, broken)
    code, rerun, log = run_dag(entitle_env, {"partitions": [5]})
    assert code == 0 and rerun["state"] == "success", log
    assert sorted(attempts(entitle_env, rerun["run_id"])) == [5]
    totals, rows, distinct = ledger_state(entitle_env)
    assert set(totals.values()) == {USERS} and rows == distinct == USERS * 5


@pytest.mark.parametrize(
    ("conf", "field"),
    [
        ({"partitions": ["x"]}, "partitions"),
        ({"partitions": [1024]}, "partitions"),
        ({"dry_run": "maybe"}, "dry_run"),
    ],
)
def test_bad_param_is_refused_before_the_run_starts(
    entitle_env: dict[str, str], conf: dict[str, Any], field: str
) -> None:
    code, result, log = run_dag(entitle_env, conf)
    assert code == 2 and result["state"] == "refused", log
    assert field in result["error"]
    assert not (Path(entitle_env["ENTITLE_HOME"]) / "ledger.sqlite").exists(), "nothing may run"


def test_dry_run_writes_nothing_to_the_ledger(entitle_env: dict[str, str]) -> None:
    code, result, log = run_dag(entitle_env, {"dry_run": True})
    assert code == 0, log
    assert not (Path(entitle_env["ENTITLE_HOME"]) / "ledger.sqlite").exists()


def test_a_night_after_new_sign_ups_grants_only_them(entitle_env: dict[str, str]) -> None:
    import polars as pl

    users_file = Path(entitle_env["ENTITLE_HOME"]) / "incoming" / "users.parquet"
    code, first, log = run_dag(entitle_env)
    assert code == 0, log
    before = ledger_state(entitle_env)[1]
    newcomers = pl.DataFrame({"user_id": list(range(9_000_000_001, 9_000_000_001 + 1_234))})
    pl.concat([pl.read_parquet(users_file), newcomers]).write_parquet(users_file)
    code, second, log = run_dag(entitle_env)
    assert code == 0, log
    pipeline = runs.open_pipeline(load_settings(entitle_env))
    with pipeline.engine.connect() as connection:
        written = connection.exec_driver_sql(
            "SELECT sum(a.written) FROM partition_attempts a JOIN runs r ON r.run_key = a.run_key WHERE r.run_id = ?",
            (second["run_id"],),
        ).scalar_one()
    pipeline.engine.dispose()
    assert written == 1_234 * 5
    assert ledger_state(entitle_env)[1:] == (before + 1_234 * 5, before + 1_234 * 5)


def test_dag_delivers_to_an_http_issuer_after_granting(entitle_env: dict[str, str], tmp_path: Path) -> None:
    from support.delivery import Service, write_campaign

    service = Service(tmp_path / "issuer.sqlite")
    service.start()
    try:
        env = dict(entitle_env)
        env["ENTITLE_CAMPAIGN"] = str(write_campaign(tmp_path / "campaign.toml", batch_size=1000, requests_per_s=50))
        env["ENTITLE_ISSUER_SHOP_URL"] = service.url
        code, result, log = run_dag(env)
        assert code == 0 and result["state"] == "success", log
        totals, _rows, _distinct = ledger_state(env)
        exported = service.export()
        ids = {row["grant_id"] for row in exported}
        assert len(ids) == len(exported) == totals["coupon-2000"] + totals["coupon-3000"] == 2 * USERS
        assert service.stats()["outcomes"]["conflict"] == 0
        with sqlite3.connect(Path(env["AIRFLOW_HOME"]) / "airflow.db") as connection:
            states = connection.execute(
                "SELECT task_id, state, count(*) FROM task_instance WHERE run_id = ? GROUP BY task_id, state",
                (result["run_id"],),
            ).fetchall()
        # Each partition is granted and delivered by its own grant task instance; there is no other.
        assert {(t, s): n for t, s, n in states}[("grant", "success")] == PARTITIONS, states
        assert {t for t, _s, _n in states} == {
            "freeze_snapshot",
            "plan_partitions",
            "grant",
            "reconcile",
            "notify",
            "summary",
        }
        delivered = connection_rows(
            env, "SELECT issuer, status, count(*), sum(created) FROM delivery_partitions GROUP BY issuer, status"
        )
        assert delivered == [("shop", "done", PARTITIONS, 2 * USERS)], delivered
    finally:
        service.stop()


def test_channel_credit_dag_grants_every_merchant_50000_once(entitle_env: dict[str, str]) -> None:
    merchants = 3_000
    incoming = Path(entitle_env["ENTITLE_HOME"]) / "incoming"
    ids = [7_000_000 + 13 * i for i in range(merchants)]
    pl.DataFrame({"merchant_id": ids + ids[:5], "shop": ["s"] * (merchants + 5)}).write_parquet(
        incoming / "merchants.parquet"
    )
    env = {**entitle_env, "ENTITLE_REJECTED_SHARE_MAX": "0.01"}
    code, result, log = run_dag(env, dag_id="channel_credit")
    assert code == 0 and result["state"] == "success", log
    code, _second, log = run_dag(env, dag_id="channel_credit")
    assert code == 0, log

    pipeline = runs.open_pipeline(load_settings({**env, "ENTITLE_CAMPAIGN": "channel-credit-2022"}))
    try:
        totals = {t.item_sku: (t.grants, t.face_value_krw) for t in runs.ledger_totals(pipeline)}
        with pipeline.engine.connect() as connection:
            granted = sorted(
                connection.exec_driver_sql(
                    "SELECT user_id FROM grant_ledger WHERE campaign_id = 'channel-credit-2022'"
                ).scalars()
            )
            verdicts = (
                connection.exec_driver_sql(
                    "SELECT verdict FROM reconciliation_runs WHERE campaign_id = 'channel-credit-2022'"
                )
                .scalars()
                .all()
            )
            others = connection.exec_driver_sql(
                "SELECT count(*) FROM grant_ledger WHERE campaign_id <> 'channel-credit-2022'"
            ).scalar_one()
    finally:
        pipeline.engine.dispose()
    assert totals == {"channel-credit-50000": (merchants, merchants * 50_000)}
    assert granted == ids, "every merchant once, the duplicated rows of the list included once"
    assert verdicts == ["RECONCILED", "RECONCILED"]
    assert others == 0, "the user campaign is untouched"
