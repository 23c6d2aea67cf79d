"""The PostgreSQL fast path (pipeline/ledger/pgcopy.py): a child table per partition, loaded by binary COPY.

The terms written by COPY are checked row by row against the campaign in
test_granting (which runs on PostgreSQL through this path); here: which path a
partition takes, what the catalog looks like afterwards, and several writers at once.
"""

from __future__ import annotations

import datetime as dt
import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from support.cli import cli_environment, run_entitle
from support.ledger_state import Prepared, prepare_pipeline
from support.settings import ITEMS_PER_USER, build_settings

from pipeline import reconciliation
from pipeline.grants import runs
from pipeline.grants.partitioning import read_partition, user_bucket
from pipeline.ledger import pgcopy

pytestmark = pytest.mark.postgres

USERS = list(range(60_000_000, 60_002_000))
PARTITIONS = 4


@pytest.fixture
def prepared(tmp_path: Path, pg_url: str, write_users: Callable[..., Path]) -> Prepared:
    pipeline = runs.open_pipeline(build_settings(tmp_path / "var", partitions=PARTITIONS, ledger_url=pg_url))
    return prepare_pipeline(pipeline, write_users(tmp_path / "users.parquet", USERS))


def children(prepared: Prepared) -> dict[str, int]:
    """The tables that hold grants (the leaves under grants) and their row counts."""
    with prepared.pipeline.engine.connect() as connection:
        names = connection.exec_driver_sql(
            "SELECT relid::regclass::text FROM pg_partition_tree('grants') WHERE isleaf ORDER BY 1"
        ).scalars()
        return {
            str(name): int(connection.exec_driver_sql(f"SELECT count(*) FROM {name}").scalar_one())
            for name in list(names)
        }


def test_first_grant_attaches_one_loaded_child_per_partition_and_a_rerun_adds_none(prepared: Prepared) -> None:
    pipeline, run = prepared.pipeline, prepared.run
    outcomes = runs.grant(pipeline, run, run.entries)
    runs.require_all_done(outcomes)
    key = pipeline.keys.campaign_key
    expected = {pgcopy.child_name(key, e.bucket_lo, e.bucket_hi): e.rows * ITEMS_PER_USER for e in run.entries}
    defaults = {"grants_default": 0, f"grants_c{key}_default": 0}
    assert children(prepared) == {**expected, **defaults}
    with pipeline.engine.connect() as connection:
        owners = connection.exec_driver_sql(
            "SELECT DISTINCT pg_get_userbyid(c.relowner) FROM pg_partition_tree('grants') AS t "
            "JOIN pg_class AS c ON c.oid = t.relid"
        ).all()
        first = pgcopy.child_name(key, run.entries[0].bucket_lo, run.entries[0].bucket_hi)
        constraints = set(
            connection.exec_driver_sql(
                f"SELECT conname FROM pg_constraint WHERE conrelid = '{first}'::regclass"
            ).scalars()
        )
        estimated = connection.exec_driver_sql(f"SELECT reltuples FROM pg_class WHERE relname = '{first}'").scalar_one()
        parent_owner = connection.exec_driver_sql(
            "SELECT pg_get_userbyid(relowner) FROM pg_class WHERE oid = 'grants'::regclass"
        ).scalar_one()
        triggers = set(
            connection.exec_driver_sql(
                f"SELECT tgname FROM pg_trigger WHERE tgrelid = '{first}'::regclass AND NOT tgisinternal"
            ).scalars()
        )
    assert owners == [(parent_owner,)], "children belong to the owner of grants"
    assert estimated == run.entries[0].rows * ITEMS_PER_USER, "the child was analyzed when loaded"
    assert {
        f"{first}_pkey",
        f"ck_{first}_range",
        "ck_grants_user_bucket",
        "ck_grants_user_id_positive",
        "ck_grants_issue_no",
    } <= constraints
    assert {"grants_append_only", "grants_reissue_guard"} <= triggers, "the parent's triggers reach the child"

    # The append-only trigger guards the child as it guards the parent.
    with pytest.raises(sa.exc.DBAPIError, match="append-only"), pipeline.engine.begin() as connection:
        connection.exec_driver_sql(f"DELETE FROM {first}")

    again = runs.grant(pipeline, run, runs.select_partitions(pipeline, run, None, only_failed=False), verify=True)
    assert sum(o.written for o in again) == 0 and all(o.verified for o in again)
    assert children(prepared) == {**expected, **defaults}, "a rerun takes the INSERT path, adds no table"
    assert reconciliation.reconcile(pipeline).verdict == "RECONCILED"


def test_a_range_that_already_has_grants_takes_the_insert_path(prepared: Prepared) -> None:
    pipeline, run = prepared.pipeline, prepared.run
    entry = run.entries[0]
    user = next(u for u in USERS if entry.bucket_lo <= user_bucket(u) <= entry.bucket_hi)
    # One planned grant made row by row before the partition's first run (as a repair would) lands
    # in the default child; the range is then no longer new, and COPY must not be used for it.
    item = pipeline.campaign.items[0]
    assert pgcopy.ensure_campaign_table(pipeline.engine, pipeline.keys.campaign_key)
    with pipeline.engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO grants (campaign_key, user_bucket, user_id, item_key, partition_id, run_key, amount_krw, "
                "valid_from, valid_until, granted_at) VALUES (:c, :b, :u, :i, :p, :r, :a, :vf, :vu, now())"
            ),
            {
                "c": pipeline.keys.campaign_key,
                "b": user_bucket(user),
                "u": user,
                "i": pipeline.keys.item_keys[item.sku],
                "p": entry.partition_id,
                "r": run.run_key,
                "a": item.amount_krw,
                "vf": item.valid_from,
                "vu": item.valid_until,
            },
        )
    outcomes = runs.grant(pipeline, run, run.entries)
    runs.require_all_done(outcomes)
    assert (outcomes[0].written, outcomes[0].already_present) == (entry.rows * ITEMS_PER_USER - 1, 1)
    tables = children(prepared)
    key = pipeline.keys.campaign_key
    assert tables[f"grants_c{key}_default"] == entry.rows * ITEMS_PER_USER, "partition 0 was written row by row"
    assert pgcopy.child_name(key, entry.bucket_lo, entry.bucket_hi) not in tables
    assert len(tables) == 2 + PARTITIONS - 1
    assert reconciliation.reconcile(pipeline).verdict == "RECONCILED"


@pytest.mark.parametrize("writers", [2, 4])
def test_writers_in_parallel_grant_every_partition_once(prepared: Prepared, writers: int) -> None:
    pipeline, run = prepared.pipeline, prepared.run
    seen: list[int] = []
    outcomes = runs.grant(pipeline, run, run.entries, on_outcome=lambda o: seen.append(o.partition_id), writers=writers)
    runs.require_all_done(outcomes)
    assert [o.partition_id for o in outcomes] == [e.partition_id for e in run.entries], "outcomes in partition order"
    assert sorted(seen) == [e.partition_id for e in run.entries], "each outcome reported once, as it finished"
    assert sum(o.written for o in outcomes) == len(USERS) * ITEMS_PER_USER
    assert len(children(prepared)) == 2 + PARTITIONS
    assert reconciliation.reconcile(pipeline).verdict == "RECONCILED"


def test_encode_writes_fixed_size_tuples_in_key_order(prepared: Prepared) -> None:
    """The COPY stream itself: one tuple per (user, item), 11 fields each, ordered by the ledger key."""
    frame = read_partition(prepared.run.entries[1])
    constants = pgcopy.RowConstants(
        1,
        1,
        1,
        dt.datetime(2023, 1, 5, tzinfo=dt.UTC),
        [pgcopy.ItemTerms(k, None, dt.datetime(2023, 1, 5, tzinfo=dt.UTC), None) for k in (3, 1, 2)],
    )
    data = b"".join(bytes(chunk) for chunk, _ in pgcopy.encode(constants, frame.reverse()))
    keys = []
    position = 0
    while position < len(data):
        (fields,) = struct.unpack_from(">h", data, position)
        assert fields == len(pgcopy.COLUMNS)
        position += 2
        values = []
        for _ in range(fields):
            (size,) = struct.unpack_from(">i", data, position)
            position += 4
            values.append(None if size == -1 else data[position : position + size])
            position += max(size, 0)
        keys.append(tuple(int.from_bytes(v or b"", "big", signed=True) for v in values[1:4]))
    assert len(keys) == frame.height * 3
    assert keys == sorted(keys), "rows in (bucket, user_id, item_key) order, whatever order the users came in"
    assert {k[2] for k in keys} == {1, 2, 3}


def test_the_cli_grants_with_several_writers_and_refuses_a_bad_count(
    tmp_path: Path, pg_url: str, write_users: Callable[..., Path]
) -> None:
    users_file = write_users(tmp_path / "users.parquet", USERS)
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_LEDGER_URL=pg_url, ENTITLE_PARTITIONS="6")
    refused = run_entitle(["run", "--users", str(users_file), "--writers", "0"], env)
    assert refused.returncode == 2 and "--writers 0: give 1 to" in refused.stderr
    done = run_entitle(["run", "--users", str(users_file), "--writers", "3", "--json", "--no-progress"], env)
    assert done.returncode == 0, done.stdout
    document = json.loads(done.stdout)
    assert document["written"] == len(USERS) * ITEMS_PER_USER
    assert (document["partitions"], document["failed_partitions"]) == (6, [])
