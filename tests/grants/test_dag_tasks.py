"""pipeline.grants.dag_tasks: the task bodies of the grant DAGs, called as the DAG calls them (no Airflow here).

The DAG's wiring under Airflow is tested in test_dags.py (dag.test) and test_airflow_scheduler.py
(the real scheduler); these tests pin what each body decides: which partitions a night maps,
which failures are worth a retry, and how a failed partition is named downstream.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from sqlalchemy.exc import IntegrityError, OperationalError

from pipeline.errors import (
    ConfigError,
    DeliveryFailedError,
    GrantFailedError,
    PartitionError,
    ReconciliationIncompleteError,
    SnapshotError,
)
from pipeline.grants import dag_tasks
from pipeline.grants.demo_users import write_demo_users
from pipeline.grants.granting import is_transient

USERS = 3_000
PARTITIONS = 4
ITEMS = 5


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh ENTITLE_HOME with a 3,000-user file, 4 partitions, reconciliation in process."""
    import os

    for name in [n for n in os.environ if n.startswith("ENTITLE_")]:
        monkeypatch.delenv(name)
    home = tmp_path / "var"
    monkeypatch.setenv("ENTITLE_HOME", str(home))
    monkeypatch.setenv("ENTITLE_PARTITIONS", str(PARTITIONS))
    monkeypatch.setenv("ENTITLE_RECONCILE_WORKERS", "1")
    write_demo_users(USERS, home / "incoming" / "users.parquet")
    return home


def test_an_unknown_conf_key_is_refused_naming_it_and_the_known_ones() -> None:
    known = ["dry_run", "exclusion_uri", "partitions", "snapshot_uri", "verify"]
    dag_tasks.check_conf({"snapshot_uri": "x", "dry_run": True}, known)
    with pytest.raises(ConfigError) as caught:
        dag_tasks.check_conf({"snapshot_urii": "/data/users.parquet"}, known)
    message = str(caught.value)
    assert "'snapshot_urii' (did you mean 'snapshot_uri'?)" in message
    assert "this DAG knows dry_run, exclusion_uri, partitions, snapshot_uri, verify" in message
    assert not caught.value.retryable


def test_a_night_with_nothing_new_maps_no_partition_and_verify_maps_all(env: Path) -> None:
    prepared = dag_tasks.freeze_snapshot({})
    planned = dag_tasks.plan_partitions(prepared, {})
    assert [p["label"] for p in planned] == [f"part-{i:04d}" for i in range(PARTITIONS)]
    outcomes = [dag_tasks.grant("night-1", p, {}) for p in planned[:3]]
    assert sum(o["written"] for o in outcomes) == sum(p["rows"] for p in planned[:3]) * ITEMS
    assert outcomes[0]["deliveries"] == [], "no issuers: nothing is delivered"

    again = dag_tasks.plan_partitions(dag_tasks.freeze_snapshot({}), {})
    assert [p["partition_id"] for p in again] == [3], "only the partition with work left is mapped"
    dag_tasks.grant("night-1", again[0], {})
    assert dag_tasks.plan_partitions(prepared, {}) == []
    assert len(dag_tasks.plan_partitions(prepared, {"verify": True})) == PARTITIONS
    assert [
        p["partition_id"] for p in dag_tasks.plan_partitions(prepared, {"partitions": [2], "verify": True})
    ] == [2]
    checked = dag_tasks.reconcile(prepared, planned)
    assert checked["verdict"] == "RECONCILED" and checked["partitions_failed"] == {}
    dag_tasks.require_reconciled(checked)


def test_a_changed_partition_file_fails_without_retry_and_is_named_downstream(env: Path) -> None:
    prepared = dag_tasks.freeze_snapshot({})
    planned = dag_tasks.plan_partitions(prepared, {})
    broken = Path(prepared["partitions_dir"]) / "part-0002.parquet"
    broken.write_bytes(b"this is not parquet")
    for partition in planned:
        if partition["partition_id"] == 2:
            with pytest.raises(GrantFailedError) as caught:
                dag_tasks.grant("night-1", partition, {})
            assert caught.value.retryable is False, "a changed file fails the same way every time"
            assert str(caught.value).startswith("part-0002 failed: ")
        else:
            dag_tasks.grant("night-1", partition, {})

    checked = dag_tasks.reconcile(prepared, planned)
    assert checked["verdict"] == "INCOMPLETE"
    assert list(checked["partitions_failed"]) == ["part-0002"]
    with pytest.raises(ReconciliationIncompleteError, match="failed partitions: part-0002.*Clear → Only failed"):
        dag_tasks.require_reconciled(checked)

    written = dag_tasks.notify("night-1", prepared, planned)
    assert written["users"] == USERS - planned[2]["rows"], "notices for what was granted"
    folder = Path(written["directory"])
    assert (folder / "part-0000.parquet").exists()
    assert not (folder / "notices.json").exists(), "a folder with a partition to come is not marked complete"
    with pytest.raises(GrantFailedError, match=r"1 partition\(s\) of the run failed \(part-0002\)"):
        dag_tasks.require_notices_complete(written)

    result = dag_tasks.summary("night-1", prepared, planned, checked)
    assert result["partitions_failed"] == checked["partitions_failed"]
    assert result["written"] == (USERS - planned[2]["rows"]) * ITEMS
    assert "part-0002 FAILED: " in dag_tasks.render_summary(result)
    no_check = dag_tasks.summary("night-1", prepared, planned, None)
    assert no_check["verdict"] == "NOT_RUN"
    with pytest.raises(ReconciliationIncompleteError, match="the reconcile task did not finish"):
        dag_tasks.require_reconciled(no_check)


def test_what_is_worth_a_retry() -> None:
    locked = OperationalError("INSERT", {}, Exception("database is locked"))
    assert is_transient(locked)
    assert not is_transient(IntegrityError("INSERT", {}, Exception("UNIQUE constraint failed")))
    assert is_transient(ConnectionResetError("reset by peer"))
    assert not is_transient(FileNotFoundError("gone"))
    assert not is_transient(PartitionError("part-0002: content changed"))
    assert not is_transient(SnapshotError("bad rows"))
    assert is_transient(DeliveryFailedError("issuer down"))
    assert is_transient(GrantFailedError("x", retryable=True))


def test_a_missing_user_file_fails_at_freeze_naming_the_param(env: Path) -> None:
    with pytest.raises(SnapshotError, match="pass the 'snapshot_uri' param") as caught:
        dag_tasks.freeze_snapshot({"snapshot_uri": str(env / "nowhere.parquet")})
    assert not caught.value.retryable
    assert not (env / "ledger.sqlite").exists() or _no_snapshot(env)


def _no_snapshot(home: Path) -> bool:
    engine = sa.create_engine(f"sqlite:///{home / 'ledger.sqlite'}")
    try:
        with engine.connect() as connection:
            return connection.exec_driver_sql("SELECT count(*) FROM snapshots").scalar_one() == 0
    finally:
        engine.dispose()
