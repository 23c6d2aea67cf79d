"""Safety under concurrency and crashes, on SQLite and PostgreSQL.

* Four `entitle grant` processes on the same and overlapping partitions at once: every grant
  written exactly once, by exactly one of them.
* `entitle grant` killed with SIGKILL at 20 random moments (before, during and after commits),
  checking after each kill that every partition is all-or-nothing; a final rerun gives the plan.
* A PostgreSQL connection terminated in the middle of a partition's transaction: a clean failure
  of that partition, and a clean retry.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from support.cli import ENTITLE_SCRIPT, cli_environment, run_entitle
from support.ledger_state import prepare_pipeline
from support.settings import ITEMS_PER_USER, build_settings

from pipeline import reconciliation
from pipeline.config import Settings
from pipeline.grants import granting, runs
from pipeline.grants.partitioning import load_manifest, partitions_dir
from pipeline.ledger import pgcopy

CONCURRENT_USERS = 12_000
KILL_USERS = 20_000
KILL_PARTITIONS = 64
KILLS = 20
PROCESS_TIMEOUT_S = 180


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[dict[str, str]]:
    """ENTITLE_* variables for a fresh ledger on each backend."""
    env = {"ENTITLE_HOME": str(tmp_path / "var")}
    if request.param == "postgresql":
        env["ENTITLE_LEDGER_URL"] = request.getfixturevalue("pg_url")
    yield env


def settings_of(env: dict[str, str], partitions: int) -> Settings:
    return build_settings(Path(env["ENTITLE_HOME"]), partitions=partitions, ledger_url=env.get("ENTITLE_LEDGER_URL"))


def prepare(env: dict[str, str], partitions: int, users: list[int], tmp_path: Path, write_users: Any) -> None:
    """Freeze and partition a user file and register it, as the first half of `entitle run` does."""
    pipeline = runs.open_pipeline(settings_of(env, partitions))
    try:
        prepare_pipeline(pipeline, write_users(tmp_path / "users.parquet", users))
    finally:
        pipeline.engine.dispose()


def ledger_facts(env: dict[str, str], partitions: int) -> dict[str, Any]:
    """Rows, distinct keys, per-partition counts and attempt states, straight from the ledger."""
    pipeline = runs.open_pipeline(settings_of(env, partitions))
    try:
        with pipeline.engine.connect() as connection:
            rows = connection.exec_driver_sql("SELECT count(*) FROM grants").scalar_one()
            distinct = connection.exec_driver_sql(
                "SELECT count(*) FROM (SELECT DISTINCT user_id, item_key FROM grants) AS d"
            ).scalar_one()
            per_partition = dict(
                connection.exec_driver_sql("SELECT partition_id, count(*) FROM grants GROUP BY partition_id").all()
            )
        state = runs.status(pipeline)
        return {"rows": int(rows), "distinct": int(distinct), "per_partition": per_partition, "status": state}
    finally:
        pipeline.engine.dispose()


def reconciled(env: dict[str, str], partitions: int) -> str:
    pipeline = runs.open_pipeline(settings_of(env, partitions))
    try:
        return reconciliation.reconcile(pipeline).verdict
    finally:
        pipeline.engine.dispose()


def test_tasks_starting_at_the_same_instant_register_one_schema_campaign_and_run(
    backend: dict[str, str], tmp_path: Path, write_users: Callable[..., Path]
) -> None:
    """Mapped Airflow tasks of one run start together: every one opens an empty ledger and
    registers the same run id. All succeed with the same keys; one run row (found by the
    scale-out smoke on PostgreSQL, where the second insert used to fail on the unique key)."""
    from pipeline import ledger

    workers = 8
    settings = settings_of(backend, 4)
    settings.home.mkdir(parents=True)
    engines = [ledger.create_ledger_engine(settings.ledger_url) for _ in range(workers)]
    campaign = settings.campaign()
    start = threading.Barrier(workers, timeout=60)

    def open_and_register(engine: Engine, run_id: str) -> tuple[int, int]:
        try:
            start.wait()
            ledger.create_schema(engine)
            keys = ledger.register_campaign(engine, campaign, settings.clock())
            start.wait()  # every worker now races for the same new run id
            return keys.campaign_key, ledger.register_run(
                engine, run_id, keys.campaign_key, "0123456789abcdef", "airflow", settings.clock()
            )
        except Exception:
            start.abort()  # the others stop waiting; the real error is reported below
            raise

    try:
        for attempt in range(5):
            run_id = f"manual__race_{attempt}"
            with ThreadPoolExecutor(workers) as pool:
                futures = [pool.submit(open_and_register, engine, run_id) for engine in engines]
            errors = [f.exception() for f in futures if f.exception() is not None]
            assert not errors, [e for e in errors if not isinstance(e, threading.BrokenBarrierError)] or errors
            results = [f.result() for f in futures]
            assert len(set(results)) == 1, results
        with engines[0].connect() as connection:
            assert connection.exec_driver_sql("SELECT count(*) FROM campaigns").scalar_one() == 1
            assert connection.exec_driver_sql("SELECT count(*) FROM runs").scalar_one() == 5
    finally:
        for engine in engines:
            engine.dispose()


@pytest.mark.slow
def test_four_processes_on_overlapping_partitions_grant_each_grant_once(
    backend: dict[str, str], tmp_path: Path, write_users: Callable[..., Path]
) -> None:
    users = list(range(80_000_000, 80_000_000 + CONCURRENT_USERS))
    prepare(backend, 8, users, tmp_path, write_users)
    env = cli_environment(ENTITLE_PARTITIONS="8", **backend)
    selections = [None, "0,1,2,3", "2,3,4,5,6,7", None]
    processes = []
    for selection in selections:
        args = [str(ENTITLE_SCRIPT), "grant", "--json", "--no-progress"]
        if selection:
            args += ["--partitions", selection]
        processes.append(subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    documents = []
    for process in processes:
        stdout, stderr = process.communicate(timeout=PROCESS_TIMEOUT_S)
        assert process.returncode == 0, stderr
        documents.append(json.loads(stdout))
    planned = CONCURRENT_USERS * ITEMS_PER_USER
    assert sum(d["written"] for d in documents) == planned, "each grant was written by exactly one process"
    for document in documents:
        assert document["written"] + document["already_present"] == document["planned"]
    facts = ledger_facts(backend, 8)
    assert facts["rows"] == facts["distinct"] == planned
    assert facts["status"].done == 8
    assert reconciled(backend, 8) == "RECONCILED"


@pytest.mark.slow
def test_sigkill_at_twenty_random_moments_then_rerun_gives_exactly_the_plan(
    backend: dict[str, str], tmp_path: Path, write_users: Callable[..., Path]
) -> None:
    rng = random.Random()
    users = sorted(rng.sample(range(90_000_000, 99_000_000), KILL_USERS))
    prepare(backend, KILL_PARTITIONS, users, tmp_path, write_users)
    env = cli_environment(ENTITLE_PARTITIONS=str(KILL_PARTITIONS), **backend)
    sizes = {e.partition_id: e.rows * ITEMS_PER_USER for e in _entries(backend)}

    # How long a whole grant takes on this machine, measured on a throwaway copy, bounds the kill times.
    window_s = _grant_duration(backend, tmp_path, write_users, users)
    landed = {"before any commit": 0, "between commits": 0, "after the last commit": 0}
    for _ in range(KILLS):
        before = ledger_facts(backend, KILL_PARTITIONS)["rows"]
        process = subprocess.Popen(
            [str(ENTITLE_SCRIPT), "grant", "--no-progress"],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        time.sleep(rng.uniform(0.0, window_s))
        process.send_signal(signal.SIGKILL)
        process.wait(timeout=PROCESS_TIMEOUT_S)
        facts = ledger_facts(backend, KILL_PARTITIONS)
        for partition_id, count in facts["per_partition"].items():
            assert count == sizes[partition_id], f"part-{partition_id:04d}: {count} of {sizes[partition_id]} grants"
        done = {p["partition_id"] for p in facts["status"].partitions if p["status"] == "done"}
        assert done == set(facts["per_partition"]), "a partition is 'done' exactly when its grants are in"
        assert facts["rows"] == facts["distinct"]
        if facts["rows"] == before:
            landed["before any commit" if facts["rows"] < sum(sizes.values()) else "after the last commit"] += 1
        else:
            landed["between commits"] += 1
    print(f"kills landed: {landed}")
    assert landed["between commits"] > 0, f"no kill landed while granting: {landed}"

    rerun = run_entitle(["grant", "--json", "--no-progress"], env)
    assert rerun.returncode == 0, rerun.stderr
    facts = ledger_facts(backend, KILL_PARTITIONS)
    assert facts["rows"] == facts["distinct"] == KILL_USERS * ITEMS_PER_USER
    assert reconciled(backend, KILL_PARTITIONS) == "RECONCILED"


def _entries(env: dict[str, str]) -> list[Any]:
    pipeline = runs.open_pipeline(settings_of(env, KILL_PARTITIONS))
    try:
        row = runs.snapshot_row(pipeline, None)
        return load_manifest(partitions_dir(Path(row["snapshot_dir"]), KILL_PARTITIONS))
    finally:
        pipeline.engine.dispose()


def _grant_duration(env: dict[str, str], tmp_path: Path, write_users: Any, users: list[int]) -> float:
    """Seconds of one `entitle grant` of the whole snapshot into a throwaway SQLite ledger."""
    scratch = {"ENTITLE_HOME": str(tmp_path / "scratch")}
    prepare(scratch, KILL_PARTITIONS, users, tmp_path / "scratch-input", write_users)
    started = time.monotonic()
    result = run_entitle(
        ["grant", "--no-progress"], cli_environment(ENTITLE_PARTITIONS=str(KILL_PARTITIONS), **scratch)
    )
    assert result.returncode == 0, result.stderr
    return time.monotonic() - started


@pytest.mark.postgres
@pytest.mark.parametrize("path", ["copy", "insert"])
def test_a_connection_dropped_mid_transaction_fails_cleanly_and_retries_cleanly(
    path: str,
    tmp_path: Path,
    pg_url: str,
    pg_admin: Engine,
    write_users: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The connection dies in the middle of a binary COPY into a new child, or of the INSERT path's staging."""
    users = list(range(81_000_000, 81_004_000))
    settings = build_settings(tmp_path / "var", ledger_url=pg_url)
    pipeline = runs.open_pipeline(settings)
    prepared = prepare_pipeline(pipeline, write_users(tmp_path / "users.parquet", users))
    dropped: list[int] = []

    def terminate(pid: int) -> None:
        if not dropped:  # the first partition only: its rows are in an open transaction
            with pg_admin.connect() as admin:
                admin.exec_driver_sql(f"SELECT pg_terminate_backend({pid})")
            dropped.append(pid)

    def backend_pid(connection: sa.Connection) -> int:
        return int(connection.exec_driver_sql("SELECT pg_backend_pid()").scalar_one())

    if path == "copy":
        real_encode, real_copy_rows = pgcopy.encode, pgcopy.copy_rows
        copying: list[int] = []

        def copy_rows(connection: sa.Connection, *args: Any) -> int:
            copying[:] = [backend_pid(connection)]  # asked before the COPY holds the connection
            return real_copy_rows(connection, *args)

        def encode_then_lose(constants: Any, frame: Any) -> Any:
            for number, chunk in enumerate(real_encode(constants, frame)):
                yield chunk
                if number == 1:  # some rows sent, the COPY still open
                    terminate(copying[0])

        monkeypatch.setattr(pgcopy, "encode", encode_then_lose)
        monkeypatch.setattr(pgcopy, "copy_rows", copy_rows)
        monkeypatch.setattr(pgcopy, "USERS_PER_CHUNK", 64)
    else:
        real_stage = granting._stage

        def stage_then_lose(connection: sa.Connection, context: Any, frame: Any) -> None:
            real_stage(connection, context, frame)
            terminate(backend_pid(connection))

        monkeypatch.setattr(pgcopy, "load_new_range", lambda *args: None)
        monkeypatch.setattr(granting, "_stage", stage_then_lose)
    outcomes = runs.grant(pipeline, prepared.run, prepared.run.entries)
    assert dropped, "the connection was terminated"
    failed = [o for o in outcomes if o.status == "failed"]
    assert [o.partition_id for o in failed] == [0], "only the partition whose connection died failed"
    assert "database error" in (failed[0].error or "")
    assert all(o.status == "done" for o in outcomes[1:]), "the others went on, on fresh connections"
    with pipeline.engine.connect() as connection:
        in_partition_0 = connection.exec_driver_sql("SELECT count(*) FROM grants WHERE partition_id = 0").scalar_one()
        names = connection.exec_driver_sql("SELECT tablename FROM pg_tables").scalars().all()
        child_count = sum(1 for name in names if pgcopy.is_range_child(str(name)))
    assert in_partition_0 == 0, "nothing of the dropped transaction was committed"
    assert child_count == (7 if path == "copy" else 0), "the dropped partition left no child table behind"

    monkeypatch.undo()
    retry = runs.grant(pipeline, prepared.run, runs.select_partitions(pipeline, prepared.run, None, only_failed=True))
    assert [(o.partition_id, o.status) for o in retry] == [(0, "done")]
    assert reconciliation.reconcile(pipeline).verdict == "RECONCILED"
    pipeline.engine.dispose()
