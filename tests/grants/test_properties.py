"""Properties of the whole grant step: any interleaving of runs, partial reruns and crashes leaves exactly the plan.

Two kinds of crash:

* in-process (hypothesis): a SQLAlchemy ``after_cursor_execute`` hook raises an exception that is not one
  of ours (so ``grant_partition`` does not treat it as a partition failure) right after a chosen statement
  ran and before its transaction commits, which is what a dying process leaves behind;
* a real ``SIGKILL`` of ``entitle run`` while it is granting, followed by a rerun of ``entitle grant``.
"""

from __future__ import annotations

import json
import random
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import sqlalchemy as sa
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from support.cli import ENTITLE_SCRIPT, cli_environment, run_entitle
from support.ledger_state import grant_counts, grant_pairs, grants_per_partition, planned_pairs, prepare_pipeline
from support.settings import ITEMS_PER_USER, build_settings, write_user_file

from pipeline import ledger
from pipeline.campaigns import load_campaign
from pipeline.errors import SnapshotError
from pipeline.grants import runs
from pipeline.grants.partitioning import PartitionEntry

PARTITIONS = 4
CRASH_POINTS = (
    "INSERT INTO partition_attempts",  # recording the start (or a skip)
    "INSERT INTO stage_users",  # staging the partition's users
    "INSERT INTO grants",  # the grants are written, not yet committed
    "UPDATE partition_attempts",  # the outcome is recorded, not yet committed
)
SCRATCH = Path("/dev/shm") if Path("/dev/shm").is_dir() else None  # tmpfs keeps fsync cheap


class SimulatedCrash(Exception):
    """Raised from inside a transaction; not an EntitleError, SQLAlchemyError or OSError."""


@contextmanager
def crash_after(engine: sa.Engine, statement_prefix: str, occurrence: int) -> Iterator[list[int]]:
    """Raise :class:`SimulatedCrash` right after the ``occurrence``-th statement starting with the prefix."""
    seen = [0]

    def hook(conn: Any, cursor: Any, statement: str, parameters: Any, context: Any, executemany: bool) -> None:
        if statement.lstrip().startswith(statement_prefix):
            seen[0] += 1
            if seen[0] == occurrence:
                raise SimulatedCrash(f"crash after {statement_prefix} #{occurrence}")

    sa.event.listen(engine, "after_cursor_execute", hook)
    try:
        yield seen
    finally:
        sa.event.remove(engine, "after_cursor_execute", hook)


def partition_state(pipeline: runs.Pipeline, entries: tuple[PartitionEntry, ...]) -> dict[int, bool]:
    """Per partition: complete (True) or empty (False); fails if any partition is partly granted."""
    counts = grants_per_partition(pipeline.engine)
    state = {}
    for entry in entries:
        n = counts.get(entry.partition_id, 0)
        planned = entry.rows * ITEMS_PER_USER
        assert n in (0, planned), f"{entry.label} holds {n} of {planned} grants: not all-or-nothing"
        state[entry.partition_id] = n == planned and planned > 0
    return state


def done_contents(pipeline: runs.Pipeline) -> set[str]:
    table = ledger.partition_attempts
    with pipeline.engine.connect() as connection:
        rows = connection.execute(sa.select(table.c.content_sha256).where(table.c.status == "done")).scalars()
        return set(rows)


def assert_record_matches_ledger(pipeline: runs.Pipeline, entries: tuple[PartitionEntry, ...]) -> dict[int, bool]:
    """A partition is complete in the ledger exactly when a 'done' attempt for its content exists."""
    state = partition_state(pipeline, entries)
    done = done_contents(pipeline)
    for entry in entries:
        if entry.rows:
            assert state[entry.partition_id] == (entry.content_sha256 in done), (
                f"{entry.label}: grants complete={state[entry.partition_id]} but done attempt="
                f"{entry.content_sha256 in done}"
            )
    return state


crash = st.tuples(st.just("crash"), st.sampled_from(CRASH_POINTS), st.integers(1, PARTITIONS))
operation = st.one_of(
    st.just(("all",)),
    st.tuples(st.just("subset"), st.sets(st.integers(0, PARTITIONS - 1), min_size=1)),
    crash,
)
# Every interleaving holds at least one crash, anywhere in the sequence.
interleavings = st.tuples(st.lists(operation, max_size=3), crash, st.lists(operation, max_size=3)).map(
    lambda parts: [*parts[0], parts[1], *parts[2]]
)


@st.composite
def user_sets(draw: st.DrawFn) -> set[int]:
    """0..300 distinct ids, sized uniformly (hypothesis alone favours tiny sets, which leave partitions empty)."""
    size = draw(st.integers(0, 300))
    seed = draw(st.integers(0, 2**32 - 1))
    rng = random.Random(seed)
    dense_share = draw(st.sampled_from([0.0, 0.5, 1.0]))  # small sequential ids, huge random ids, or both
    users: set[int] = set()
    while len(users) < size:
        users.add(rng.randint(1, 5_000) if rng.random() < dense_share else rng.randint(1, 2**63 - 1))
    return users


@settings(
    max_examples=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(users=user_sets(), operations=interleavings)
def test_any_interleaving_of_runs_reruns_and_crashes_leaves_exactly_the_plan(
    users: set[int], operations: list[tuple[Any, ...]]
) -> None:
    with tempfile.TemporaryDirectory(dir=SCRATCH, prefix="entitle-prop-") as scratch:
        home = Path(scratch) / "var"
        users_file = write_user_file(Path(scratch) / "users.parquet", sorted(users))
        pipeline = runs.open_pipeline(build_settings(home, partitions=PARTITIONS))
        try:
            if not users:
                with pytest.raises(SnapshotError, match="no data rows"):
                    prepare_pipeline(pipeline, users_file)
                assert grant_counts(pipeline.engine) == (0, 0)
                return
            prepared = prepare_pipeline(pipeline, users_file)
            entries = prepared.run.entries
            complete = assert_record_matches_ledger(pipeline, entries)
            for op in operations:
                run = runs.start_run(pipeline, snapshot_id=prepared.run.snapshot_id)
                if op[0] == "all":
                    outcomes = runs.grant(pipeline, run, entries)
                    expected = {e.partition_id for e in entries if e.rows}
                elif op[0] == "subset":
                    chosen = runs.select_partitions(pipeline, run, op[1], only_failed=False)
                    outcomes = runs.grant(pipeline, run, chosen)
                    expected = {e.partition_id for e in chosen if e.rows}
                else:
                    _, point, occurrence = op
                    with crash_after(pipeline.engine, point, occurrence):
                        try:
                            outcomes = runs.grant(pipeline, run, entries)
                            event(f"crash point {point!r} not reached")
                        except SimulatedCrash:
                            outcomes = []
                            event(f"crashed after {point!r}")
                    expected = set()
                assert all(o.status == "done" for o in outcomes), [o.error for o in outcomes]
                now = assert_record_matches_ledger(pipeline, entries)
                for partition_id, was_complete in complete.items():
                    assert now[partition_id] or not was_complete, "a complete partition lost grants"
                assert expected <= {p for p, c in now.items() if c}
                complete = now

            # Whatever happened, one full rerun finishes the job exactly.
            final = runs.start_run(pipeline, snapshot_id=prepared.run.snapshot_id)
            outcomes = runs.grant(pipeline, final, entries)
            assert all(o.status == "done" for o in outcomes)
            total, distinct = grant_counts(pipeline.engine)
            assert total == distinct == len(users) * ITEMS_PER_USER
            skus = [i.sku for i in pipeline.campaign.items]
            assert grant_pairs(pipeline.engine) == planned_pairs(sorted(users), skus)
            assert runs.status(pipeline).done == PARTITIONS
        finally:
            pipeline.engine.dispose()


def test_the_crash_hook_really_interrupts_a_grant(tmp_path: Path) -> None:
    """Guard for the property above: a crash after INSERT INTO grants leaves the partition empty and 'running'."""
    pipeline = runs.open_pipeline(build_settings(tmp_path / "var", partitions=PARTITIONS))
    try:
        prepared = prepare_pipeline(pipeline, write_user_file(tmp_path / "u.csv", list(range(1, 101))))
        with crash_after(pipeline.engine, "INSERT INTO grants", 1) as seen, pytest.raises(SimulatedCrash):
            runs.grant(pipeline, prepared.run, prepared.run.entries)
        assert seen == [1]
        assert grant_counts(pipeline.engine) == (0, 0), "the uncommitted grants were rolled back"
        status = runs.status(pipeline)
        assert (status.running, status.pending) == (1, PARTITIONS - 1)
        only_failed = runs.select_partitions(pipeline, prepared.run, None, only_failed=True)
        assert [e.partition_id for e in only_failed] == [prepared.run.entries[0].partition_id]
    finally:
        pipeline.engine.dispose()


def test_a_crash_in_one_of_several_writers_stops_the_run_and_leaves_partitions_whole(tmp_path: Path) -> None:
    """With writer threads, a crash in one partition is not swallowed, and no new partition starts after it."""
    pipeline = runs.open_pipeline(build_settings(tmp_path / "var", partitions=PARTITIONS))
    try:
        prepared = prepare_pipeline(pipeline, write_user_file(tmp_path / "u.csv", list(range(1, 101))))
        with crash_after(pipeline.engine, "INSERT INTO grants", 1), pytest.raises(SimulatedCrash):
            runs.grant(pipeline, prepared.run, prepared.run.entries, writers=2)
        state = partition_state(pipeline, prepared.run.entries)  # every partition all or nothing
        status = runs.status(pipeline)
        assert status.running == 1, "the crashed partition is left 'running' (interrupted)"
        assert status.done == sum(state.values()) <= 1, "only the other writer's partition in flight may finish"
        assert status.pending >= PARTITIONS - 2, "no partition starts after the crash"
        rerun = runs.grant(pipeline, prepared.run, prepared.run.entries, writers=2)
        runs.require_all_done(rerun)
        assert all(partition_state(pipeline, prepared.run.entries).values())
    finally:
        pipeline.engine.dispose()


# --------------------------------------------------------------------------- a real SIGKILL

KILL_USERS = 30_000
KILL_PARTITIONS = 8
KILL_ATTEMPTS_MAX = 5


def _ledger_state(home: Path, snapshot_dir: Path) -> tuple[int, dict[int, bool]]:
    """(grant rows, per-partition completeness) of a ledger a killed process left behind."""
    from pipeline.grants.partitioning import load_manifest, partitions_dir

    entries = load_manifest(partitions_dir(snapshot_dir, KILL_PARTITIONS))
    engine = ledger.create_ledger_engine(f"sqlite:///{home / 'ledger.sqlite'}")
    try:
        counts = grants_per_partition(engine)
        state = {}
        for entry in entries:
            n = counts.get(entry.partition_id, 0)
            assert n in (0, entry.rows * ITEMS_PER_USER), f"{entry.label}: {n} grants after SIGKILL"
            state[entry.partition_id] = n > 0
        return sum(counts.values()), state
    finally:
        engine.dispose()


@pytest.mark.slow
def test_sigkill_while_granting_then_rerun_gives_exactly_the_plan(tmp_path: Path) -> None:
    rng = random.Random()
    users = sorted(rng.sample(range(10_000_000, 40_000_000), KILL_USERS))
    users_file = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": users}, schema={"user_id": pl.Int64}).write_parquet(users_file)
    planned = KILL_USERS * ITEMS_PER_USER

    interrupted = None
    for attempt in range(KILL_ATTEMPTS_MAX):
        home = tmp_path / f"var-{attempt}"
        env = cli_environment(ENTITLE_HOME=str(home), ENTITLE_PARTITIONS=str(KILL_PARTITIONS))
        process = subprocess.Popen(
            [str(ENTITLE_SCRIPT), "run", "--users", str(users_file)],
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert process.stderr is not None
            # Progress lines go to stderr; the first "grant" line means granting has begun.
            for line in process.stderr:
                if line.startswith("grant"):
                    break
            else:
                pytest.fail(f"`entitle run` ended (exit {process.wait()}) before granting started")
            time.sleep(rng.uniform(0.0, 0.12 / (attempt + 1)))
            process.send_signal(signal.SIGKILL)
            assert process.wait(timeout=30) == -signal.SIGKILL
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
            if process.stderr is not None:
                process.stderr.close()
        snapshot_dirs = [p for p in (home / "campaigns" / "kakao-outage-2022" / "snapshots").iterdir() if p.is_dir()]
        assert len(snapshot_dirs) == 1
        written, state = _ledger_state(home, snapshot_dirs[0])
        if written < planned:
            interrupted = (home, env, written, state)
            break
    assert interrupted is not None, f"in {KILL_ATTEMPTS_MAX} attempts the kill never landed before the last commit"
    home, env, written, state = interrupted
    assert not all(state.values()), "the kill landed while granting: some partition is still empty"

    status = run_entitle(["status", "--json"], env)
    assert status.returncode == 0, status.stderr
    report = json.loads(status.stdout)
    assert report["done"] == sum(state.values()), "a partition is 'done' exactly when its grants are in"
    assert report["done"] + report["running"] + report["pending"] == KILL_PARTITIONS

    rerun = run_entitle(["grant", "--json", "--no-progress"], env)
    assert rerun.returncode == 0, rerun.stderr
    document = json.loads(rerun.stdout)
    assert document["written"] == planned - written
    assert document["failed_partitions"] == []

    engine = ledger.create_ledger_engine(f"sqlite:///{home / 'ledger.sqlite'}")
    try:
        total, distinct = grant_counts(engine)
        assert total == distinct == planned
        assert grant_pairs(engine) == planned_pairs(users, [i.sku for i in load_campaign().items])
    finally:
        engine.dispose()
