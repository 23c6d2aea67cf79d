"""pipeline.grants.granting: one partition's grant step: exact writes, run-twice, --verify, failures, the start rule."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import socket
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support.ledger_state import Prepared
from support.settings import CAMPAIGN_START, ITEMS_PER_USER

from pipeline import ledger
from pipeline.config import Settings
from pipeline.errors import CampaignNotStartedError
from pipeline.grants import runs
from pipeline.grants.granting import GrantContext, PartitionOutcome, grant_partition
from pipeline.grants.partitioning import PartitionEntry, partition_of
from pipeline.ledger import queries

USERS = [10_000_000 + 7 * i for i in range(400)] + [1, 2_147_483_647, 2**63 - 1]


def context_for(prepared: Prepared, clock: Callable[[], dt.datetime] | None = None) -> GrantContext:
    pipeline = prepared.pipeline
    return GrantContext(
        pipeline.engine,
        pipeline.campaign,
        pipeline.keys,
        prepared.run.run_key,
        prepared.run.snapshot_id,
        clock or pipeline.settings.clock,
    )


def biggest(prepared: Prepared) -> PartitionEntry:
    return max(prepared.run.entries, key=lambda e: e.rows)


def attempts(prepared: Prepared, partition_id: int) -> list[dict[str, Any]]:
    table = ledger.partition_attempts
    with prepared.engine.connect() as connection:
        rows = connection.execute(
            sa.select(table).where(table.c.partition_id == partition_id).order_by(table.c.attempt_key)
        ).all()
    return [dict(r._mapping) for r in rows]


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path, settings_for: Callable[..., Settings]) -> Settings:
    """Settings for 4 partitions on SQLite and on PostgreSQL."""
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_url")
    return settings_for(tmp_path / "var", partitions=4, ledger_url=url)


@pytest.fixture
def prepared(
    backend_settings: Settings, prepare: Callable[..., Prepared], tmp_path: Path, write_users: Callable[..., Path]
) -> Prepared:
    return prepare(backend_settings, write_users(tmp_path / "users.parquet", USERS))


# --------------------------------------------------------------------------- exact writes


def test_grant_writes_every_planned_grant_with_the_campaign_terms(prepared: Prepared, ledger_probe: Any) -> None:
    fixed_now = dt.datetime(2024, 2, 29, 12, 0, 0, 654321, tzinfo=dt.UTC)
    context = context_for(prepared, clock=lambda: fixed_now)
    entry = biggest(prepared)
    outcome = grant_partition(context, entry)
    assert outcome.status == "done", outcome.error
    assert outcome.planned == entry.rows * ITEMS_PER_USER
    assert outcome.written == outcome.planned
    assert (outcome.already_present, outcome.skipped, outcome.verified) == (0, False, False)

    users_in_entry = [u for u in USERS if partition_of(u, 4) == entry.partition_id]
    skus = [i.sku for i in prepared.pipeline.campaign.items]
    assert ledger_probe.grant_pairs(prepared.engine) == ledger_probe.planned_pairs(users_in_entry, skus)

    g, i = ledger.grants, ledger.campaign_items
    with prepared.engine.connect() as connection:
        rows = connection.execute(sa.select(g, i.c.item_sku).join(i, i.c.item_key == g.c.item_key)).all()
    for row in rows:
        item = prepared.pipeline.campaign.item(row.item_sku)
        assert row.amount_krw == item.amount_krw
        assert row.valid_from == item.valid_from == CAMPAIGN_START
        assert row.valid_until == item.valid_until
        assert row.granted_at == fixed_now
        assert row.partition_id == entry.partition_id
        assert row.run_key == prepared.run.run_key
        assert row.campaign_key == prepared.pipeline.keys.campaign_key

    [attempt] = attempts(prepared, entry.partition_id)
    assert attempt["status"] == "done"
    assert (attempt["planned"], attempt["written"], attempt["already_present"]) == (outcome.planned, outcome.planned, 0)
    assert attempt["content_sha256"] == entry.content_sha256
    assert attempt["finished_at"] == fixed_now


def test_running_a_partition_twice_writes_nothing_and_is_a_skip(prepared: Prepared, ledger_probe: Any) -> None:
    context = context_for(prepared)
    entry = biggest(prepared)
    first = grant_partition(context, entry)
    assert first.written == first.planned > 0
    before = ledger_probe.grant_pairs(prepared.engine)

    # The skip is decided from the ledger alone: it does not even read the partition file.
    entry.path.write_bytes(os.urandom(64))
    second = grant_partition(context, entry)
    assert second.status == "done"
    assert second.skipped is True
    assert second.written == 0
    assert second.already_present == second.planned == first.planned
    assert ledger_probe.grant_pairs(prepared.engine) == before
    assert [a["status"] for a in attempts(prepared, entry.partition_id)] == ["done", "done"]


def test_each_attempt_records_the_worker_that_made_it(prepared: Prepared) -> None:
    """A partition that failed on one worker and was granted by another shows each attempt's worker."""
    entry = biggest(prepared)
    pipeline = prepared.pipeline
    elsewhere = dataclasses.replace(context_for(prepared), worker="worker-1:4101")
    intact = entry.path.read_bytes()
    entry.path.write_bytes(os.urandom(64))
    assert grant_partition(elsewhere, entry).status == "failed"
    entry.path.write_bytes(intact)

    # The retry through runs.grant, as the DAG task and the CLI run it: this process's identity from the settings.
    outcome = runs.grant(pipeline, prepared.run, [entry])[0]
    assert outcome.status == "done" and outcome.written == outcome.planned > 0
    assert pipeline.settings.worker == f"{socket.gethostname()}:{os.getpid()}"
    assert grant_partition(dataclasses.replace(elsewhere, worker="worker-3:4303"), entry).skipped

    recorded = [(a["status"], a["worker"]) for a in attempts(prepared, entry.partition_id)]
    assert recorded == [("failed", "worker-1:4101"), ("done", pipeline.settings.worker), ("done", "worker-3:4303")]
    latest = queries.run_query(prepared.engine, "partition_status", {"status": "done"})
    workers = {row[latest.columns.index("partition_id")]: row[latest.columns.index("worker")] for row in latest.rows}
    assert workers == {entry.partition_id: "worker-3:4303"}


def test_verify_checks_every_row_of_a_complete_partition(prepared: Prepared, ledger_probe: Any) -> None:
    context = context_for(prepared)
    entry = biggest(prepared)
    grant_partition(context, entry)
    before = ledger_probe.grant_counts(prepared.engine)
    outcome = grant_partition(context, entry, verify=True)
    assert outcome.status == "done", outcome.error
    assert outcome.skipped is False, "verify never takes the fast skip"
    assert outcome.verified is True
    assert outcome.written == 0
    assert outcome.already_present == outcome.planned
    assert ledger_probe.grant_counts(prepared.engine) == before
    assert attempts(prepared, entry.partition_id)[-1]["verified"] in (True, 1)


def _drop_update_trigger(connection: sa.Connection) -> None:
    if connection.dialect.name == "postgresql":
        connection.exec_driver_sql("DROP TRIGGER grants_append_only ON grants")
    else:
        connection.exec_driver_sql("DROP TRIGGER grants_append_only_update")


def test_verify_finds_a_grant_edited_in_the_database(prepared: Prepared) -> None:
    context = context_for(prepared)
    entry = biggest(prepared)
    assert grant_partition(context, entry).status == "done"
    victim = next(u for u in USERS if partition_of(u, 4) == entry.partition_id)
    with prepared.engine.begin() as connection:
        _drop_update_trigger(connection)
        changed = connection.execute(
            sa.text("UPDATE grants SET amount_krw = 1999 WHERE user_id = :u AND amount_krw = 2000"), {"u": victim}
        ).rowcount
    assert changed == 1

    plain = grant_partition(context, entry)
    assert plain.skipped is True and plain.status == "done", "without --verify the edit goes unseen"

    verified = grant_partition(context, entry, verify=True)
    assert verified.status == "failed"
    assert verified.error is not None
    assert "differs" in verified.error
    assert "1 grants whose amount or validity differs" in verified.error
    assert entry.label in verified.error
    last = attempts(prepared, entry.partition_id)[-1]
    assert last["status"] == "failed"
    assert "differs" in last["error"]


def test_verify_restores_a_deleted_grant_a_plain_rerun_does_not(prepared: Prepared, ledger_probe: Any) -> None:
    context = context_for(prepared)
    entry = biggest(prepared)
    grant_partition(context, entry)
    planned = ledger_probe.grant_pairs(prepared.engine)
    victim = min(u for u, _ in planned)
    with prepared.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("DROP TRIGGER grants_append_only ON grants")
        else:
            connection.exec_driver_sql("DROP TRIGGER grants_append_only_delete")
        connection.execute(sa.text("DELETE FROM grants WHERE user_id = :u"), {"u": victim})
    assert len(ledger_probe.grant_pairs(prepared.engine)) == len(planned) - ITEMS_PER_USER

    assert grant_partition(context, entry).skipped is True
    assert len(ledger_probe.grant_pairs(prepared.engine)) == len(planned) - ITEMS_PER_USER

    repaired = grant_partition(context, entry, verify=True)
    assert repaired.status == "done", repaired.error
    assert repaired.written == ITEMS_PER_USER
    assert ledger_probe.grant_pairs(prepared.engine) == planned


# --------------------------------------------------------------------------- failures


def test_an_unreadable_partition_fails_without_writing(prepared: Prepared, ledger_probe: Any) -> None:
    entry = biggest(prepared)
    entry.path.write_bytes(b"PAR1 this is not parquet PAR1")
    outcome = grant_partition(context_for(prepared), entry)
    assert isinstance(outcome, PartitionOutcome)
    assert outcome.status == "failed"
    assert outcome.written == 0
    assert outcome.error is not None and str(entry.path) in outcome.error
    assert ledger_probe.grant_counts(prepared.engine) == (0, 0)
    [attempt] = attempts(prepared, entry.partition_id)
    assert attempt["status"] == "failed"
    assert str(entry.path) in attempt["error"]
    assert attempt["finished_at"] is not None


def test_nothing_is_granted_before_the_campaign_starts(prepared: Prepared, ledger_probe: Any) -> None:
    early = CAMPAIGN_START - dt.timedelta(seconds=1)
    with pytest.raises(CampaignNotStartedError, match="starts at 2023-01-05T00:00:00\\+09:00"):
        grant_partition(context_for(prepared, clock=lambda: early), biggest(prepared))
    assert ledger_probe.grant_counts(prepared.engine) == (0, 0)
    assert attempts(prepared, biggest(prepared).partition_id) == []

    on_time = grant_partition(context_for(prepared, clock=lambda: CAMPAIGN_START), biggest(prepared))
    assert on_time.status == "done" and on_time.written > 0
