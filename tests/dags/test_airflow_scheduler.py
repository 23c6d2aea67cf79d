"""Nights of ``entitlement_grant`` under Airflow's real scheduler, driven only through the REST API v2.

One deployment (tests/support/airflow_deployment.py: api-server, scheduler and dag-processor as
separate processes, LocalExecutor, the project's airflow.cfg, SQLite metadata in a temporary
AIRFLOW_HOME) lives through an operator's week, each night checked in the ledger with SQL and
in the state of every task instance:

1. unpausing makes the scheduler create the latest nightly run itself; it grants the default
   user file (4 partitions: the count follows the data, 2,000 users a partition here);
2. a night whose file has new users and one broken partition file: that partition fails alone,
   at once (no retry for a changed file), the others are granted; reconcile, notify and summary
   fail naming it; the failure notifier logs its line;
3. the operator repairs the file and clears only the failed task instances: the run ends green,
   the ledger exact, the good partitions not executed again;
4. a night with nothing new maps no grant task instance and changes nothing;
5. a conf key with a typo is refused by the first task, naming the key, before any work.

The ledger is named by the Airflow Connection ``entitle_ledger`` (no ENTITLE_LEDGER_URL), and
reconcile runs with 2 worker processes under the task supervisor. Every process is stopped.
"""

from __future__ import annotations

import datetime as dt
import json
import sqlite3
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import polars as pl
import pytest
from support.airflow_deployment import AirflowDeployment

from pipeline.config import load_settings
from pipeline.grants import runs

pytestmark = [pytest.mark.airflow, pytest.mark.slow]

BIN = Path(sys.executable).parent
DAG_ID = "entitlement_grant"
FIRST_USERS = 8_000
NEW_USERS = 2_000
USERS_PER_PARTITION = 2_000
ITEMS = 5
RETRIES = 2
RUN_TIMEOUT_S = 300
SCHEDULED_RUN_TIMEOUT_S = 90
SEOUL = ZoneInfo("Asia/Seoul")


@pytest.fixture(scope="module")
def week(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The deployment, its ENTITLE_HOME with the first night's user file, and the ledger's path."""
    base = tmp_path_factory.mktemp("scheduler")
    home = base / "var"
    ledger = base / "ledger-from-connection.sqlite"
    frame = pl.DataFrame({"user_id": [10_000_000 + 7_919 * i for i in range(FIRST_USERS + NEW_USERS)]})
    nightly = home / "incoming" / "users.parquet"
    nightly.parent.mkdir(parents=True)
    frame.head(FIRST_USERS).write_parquet(nightly)
    grown = base / "users-grown.parquet"
    frame.write_parquet(grown)
    entitle_env = {
        "ENTITLE_HOME": str(home),
        "ENTITLE_PARTITION_USERS": str(USERS_PER_PARTITION),
        "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": str(RETRIES),
        "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": "1",
        "ENTITLE_RECONCILE_WORKERS": "2",
        "AIRFLOW_CONN_ENTITLE_LEDGER": json.dumps({"conn_type": "sqlite", "host": str(ledger)}),
    }
    airflow = AirflowDeployment(base / "deployment", entitle_env)
    try:
        airflow.start()
        yield {"airflow": airflow, "home": home, "ledger": ledger, "grown": grown, "env": entitle_env}
    finally:
        airflow.stop()
    assert airflow.leftover_processes() == {}, "every process the deployment started is stopped"


def ledger_rows(ledger: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Rows of one query on the SQLite ledger, read as an analyst would."""
    with sqlite3.connect(ledger) as connection:
        return [tuple(r) for r in connection.execute(sql, params)]


def grant_counts(ledger: Path) -> tuple[int, int, int]:
    """Grant rows, distinct (user, item) pairs and distinct users in the ledger."""
    rows = ledger_rows(
        ledger,
        "SELECT count(*), (SELECT count(*) FROM (SELECT DISTINCT user_id, item_key FROM grants)), "
        "count(DISTINCT user_id) FROM grants",
    )
    return rows[0]


def states(airflow: AirflowDeployment, run_id: str) -> dict[str, tuple[str, int]]:
    """``task_id`` or ``grant[part-0002]`` → (state, try number)."""
    found = {}
    for ti in airflow.task_instances(DAG_ID, run_id):
        name = ti["task_id"] if ti["map_index"] < 0 else f"{ti['task_id']}[{ti['rendered_map_index']}]"
        found[name] = (ti["state"], ti["try_number"])
    return found


def last_line(airflow: AirflowDeployment, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
    """The last line of one try's task log that the UI shows (Airflow's ``::group::`` fold markers are not shown)."""
    entries = airflow.task_log_entries(DAG_ID, run_id, task_id, try_number, map_index)
    shown = [e for e in entries if not str(e.get("event", "") if isinstance(e, dict) else e).startswith("::")]
    return str(shown[-1].get("event", "") if isinstance(shown[-1], dict) else shown[-1]) if shown else ""


def test_1_unpausing_runs_the_latest_night_which_grants_everyone_once(week: dict[str, Any]) -> None:
    airflow: AirflowDeployment = week["airflow"]
    airflow.unpause(DAG_ID)
    scheduled = airflow.wait_for_scheduled_run(DAG_ID, timeout_s=SCHEDULED_RUN_TIMEOUT_S)
    assert scheduled["run_type"] == "scheduled" and scheduled["conf"] == {}
    assert scheduled["triggered_by"] == "timetable"
    # catchup=False: the one run created is the latest 02:00 Asia/Seoul that has passed.
    logical = dt.datetime.fromisoformat(scheduled["logical_date"].replace("Z", "+00:00")).astimezone(SEOUL)
    now = dt.datetime.now(SEOUL)
    assert (logical.hour, logical.minute) == (2, 0) and now - dt.timedelta(days=1) < logical <= now
    state = airflow.wait_for_run(DAG_ID, scheduled["dag_run_id"], timeout_s=RUN_TIMEOUT_S)
    found = states(airflow, scheduled["dag_run_id"])
    assert state == "success", found
    partitions = [f"part-{p:04d}" for p in range(FIRST_USERS // USERS_PER_PARTITION)]
    assert found == {
        "freeze_snapshot": ("success", 1),
        "plan_partitions": ("success", 1),
        **{f"grant[{label}]": ("success", 1) for label in partitions},
        "reconcile": ("success", 1),
        "notify": ("success", 1),
        "summary": ("success", 1),
    }
    assert grant_counts(week["ledger"]) == (FIRST_USERS * ITEMS, FIRST_USERS * ITEMS, FIRST_USERS)
    assert not (week["home"] / "ledger.sqlite").exists(), "the ledger is the Connection's, not the default"
    summary = airflow.task_log(DAG_ID, scheduled["dag_run_id"], "summary", 1)
    assert "check: RECONCILED" in summary and f"{FIRST_USERS:,} eligible users" in summary
    # The ledger is an asset: the reconciled night emitted an event an analyst's DAG can schedule on.
    events = airflow.api("GET", "/api/v2/assets/events", params={"source_run_id": scheduled["dag_run_id"]})
    assert [e["uri"] for e in events["asset_events"]] == ["entitle://ledger/grants"]


def _freeze_and_break(week: dict[str, Any], partition_id: int) -> Path:
    """Freeze and partition the grown file as the DAG will (content-addressed), then corrupt one partition file."""
    settings = load_settings(
        {k: v for k, v in week["env"].items() if k.startswith("ENTITLE_")},
        connection_ledger_url=f"sqlite:///{week['ledger']}",
    )
    pipeline = runs.open_pipeline(settings)
    try:
        prepared = runs.partition(pipeline, runs.freeze(pipeline, week["grown"]))
    finally:
        pipeline.engine.dispose()
    broken = Path(str(prepared.partitions_dir)) / f"part-{partition_id:04d}.parquet"
    week["good_bytes"] = broken.read_bytes()
    broken.write_bytes(b"this is not parquet")
    return broken


def test_2_a_broken_partition_fails_alone_at_once_and_the_rest_is_granted(week: dict[str, Any]) -> None:
    airflow: AirflowDeployment = week["airflow"]
    week["broken"] = _freeze_and_break(week, 2)
    run_id = airflow.trigger(DAG_ID, {"snapshot_uri": str(week["grown"])})
    week["run_id"] = run_id
    state = airflow.wait_for_run(DAG_ID, run_id, timeout_s=RUN_TIMEOUT_S)
    found = states(airflow, run_id)
    assert state == "failed", found
    partitions = [f"part-{p:04d}" for p in range((FIRST_USERS + NEW_USERS) // USERS_PER_PARTITION)]
    assert found == {
        "freeze_snapshot": ("success", 1),
        "plan_partitions": ("success", 1),
        **{f"grant[{label}]": ("failed" if label == "part-0002" else "success", 1) for label in partitions},
        "reconcile": ("failed", 1),
        "notify": ("failed", 1),
        "summary": ("failed", 1),
    }, "a changed partition file fails once, not after retries; the other partitions are granted"
    assert "part-0002 failed" in last_line(airflow, run_id, "grant", 1, map_index=2)
    assert "INCOMPLETE" in last_line(airflow, run_id, "reconcile", 1)
    assert "part-0002" in last_line(airflow, run_id, "reconcile", 1)
    summary = airflow.task_log(DAG_ID, run_id, "summary", 1)
    assert "part-0002 FAILED" in summary
    assert f"ENTITLE ALERT {DAG_ID} run {run_id} failed: verdict INCOMPLETE, failed partitions: part-0002" in summary
    rows, distinct, users = grant_counts(week["ledger"])
    assert rows == distinct and FIRST_USERS * ITEMS < rows < (FIRST_USERS + NEW_USERS) * ITEMS
    notices = week["home"] / "campaigns" / "kakao-outage-2022" / "notices" / "granted" / run_id
    assert (notices / "part-0000.parquet").exists(), "notices are written for what was granted"
    assert not (notices / "notices.json").exists(), "but the folder is not marked complete"


def test_3_clearing_only_the_failed_task_instances_finishes_the_run(week: dict[str, Any]) -> None:
    airflow: AirflowDeployment = week["airflow"]
    run_id = week["run_id"]
    week["broken"].write_bytes(week["good_bytes"])
    cleared = {(ti["task_id"], ti["map_index"]) for ti in airflow.clear_failed(DAG_ID, run_id)}
    assert cleared == {("grant", 2), ("reconcile", -1), ("notify", -1), ("summary", -1)}
    state = airflow.wait_for_run(DAG_ID, run_id, timeout_s=RUN_TIMEOUT_S)
    found = states(airflow, run_id)
    assert state == "success", found
    assert found["grant[part-0002]"] == ("success", 2)
    assert all(t == 1 for name, (_s, t) in found.items() if name.startswith("grant[") and "0002" not in name)
    total = FIRST_USERS + NEW_USERS
    assert grant_counts(week["ledger"]) == (total * ITEMS, total * ITEMS, total)
    marker = json.loads(
        (week["home"] / "campaigns" / "kakao-outage-2022" / "notices" / "granted" / run_id / "notices.json").read_text()
    )
    assert marker["users"] == NEW_USERS, "the notices name exactly the users this run granted"
    verdicts = ledger_rows(week["ledger"], "SELECT verdict FROM recon_runs ORDER BY reconciliation_key")
    assert [v for (v,) in verdicts] == ["RECONCILED", "INCOMPLETE", "RECONCILED"]


def test_4_a_night_with_nothing_new_maps_nothing_and_changes_nothing(week: dict[str, Any]) -> None:
    airflow: AirflowDeployment = week["airflow"]
    before = ledger_rows(week["ledger"], "SELECT count(*), max(granted_at) FROM grants")
    run_id = airflow.trigger(DAG_ID, {"snapshot_uri": str(week["grown"])})
    state = airflow.wait_for_run(DAG_ID, run_id, timeout_s=RUN_TIMEOUT_S)
    found = states(airflow, run_id)
    assert state == "success", found
    assert not any(name.startswith("grant[") for name in found), "no grant task instance without work"
    assert found["reconcile"] == ("success", 1) and found["summary"] == ("success", 1)
    assert ledger_rows(week["ledger"], "SELECT count(*), max(granted_at) FROM grants") == before
    assert "0 of 5 partitions run" in airflow.task_log(DAG_ID, run_id, "summary", 1)


def test_5_a_conf_key_with_a_typo_is_refused_before_any_work(week: dict[str, Any]) -> None:
    airflow: AirflowDeployment = week["airflow"]
    snapshots = ledger_rows(week["ledger"], "SELECT count(*) FROM snapshots")
    run_id = airflow.trigger(DAG_ID, {"snapshot_urii": str(week["grown"])})
    state = airflow.wait_for_run(DAG_ID, run_id, timeout_s=RUN_TIMEOUT_S)
    found = states(airflow, run_id)
    assert state == "failed"
    assert found["freeze_snapshot"] == ("failed", 1), found
    line = last_line(airflow, run_id, "freeze_snapshot", 1)
    assert "'snapshot_urii' (did you mean 'snapshot_uri'?)" in line, line
    assert ledger_rows(week["ledger"], "SELECT count(*) FROM snapshots") == snapshots
