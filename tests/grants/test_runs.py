"""pipeline.grants.runs: the use cases end to end in-process: run twice, later snapshots, failures, the start rule."""

from __future__ import annotations

import datetime as dt
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from support import REPO_ROOT
from support.ledger_state import Prepared
from support.settings import CAMPAIGN_START, FACE_VALUE_PER_USER_KRW, ITEMS_PER_USER

from pipeline import ledger
from pipeline.campaigns import load_campaign
from pipeline.config import Settings
from pipeline.errors import CampaignNotStartedError, GrantFailedError, SnapshotError
from pipeline.grants import corrections, runs
from pipeline.grants.partitioning import partition_of

BUNDLED_TOML = REPO_ROOT / "pipeline" / "campaigns" / "kakao_outage_2022.toml"
USERS = list(range(20_000_000, 20_001_500))  # 1,500 users


@pytest.fixture
def users_file(tmp_path: Path, write_users: Callable[..., Path]) -> Path:
    return write_users(tmp_path / "users.parquet", USERS)


def skus() -> list[str]:
    return [i.sku for i in load_campaign().items]


def assert_exact(prepared_engine: Any, users: list[int], ledger_probe: Any) -> None:
    total, distinct = ledger_probe.grant_counts(prepared_engine)
    assert total == distinct == len(users) * ITEMS_PER_USER, "no duplicates, nothing missing"
    assert ledger_probe.grant_pairs(prepared_engine) == ledger_probe.planned_pairs(users, skus())


# --------------------------------------------------------------------------- run twice


def test_run_grants_everything_and_a_second_run_changes_nothing(
    settings: Settings, prepare: Callable[..., Prepared], users_file: Path, ledger_probe: Any
) -> None:
    prepared = prepare(settings, users_file)
    assert len(prepared.run.entries) == settings.partition_count == 8
    first = runs.grant(prepared.pipeline, prepared.run, prepared.run.entries)
    assert [o.status for o in first] == ["done"] * 8
    assert sum(o.written for o in first) == len(USERS) * ITEMS_PER_USER
    runs.require_all_done(first)
    assert_exact(prepared.engine, USERS, ledger_probe)

    # A second run over the same snapshot, as `entitle run` would start it.
    again = runs.start_run(prepared.pipeline, snapshot_id=prepared.run.snapshot_id)
    assert again.run_key != prepared.run.run_key
    second = runs.grant(prepared.pipeline, again, again.entries)
    assert sum(o.written for o in second) == 0
    assert all(o.skipped and o.status == "done" for o in second)
    assert sum(o.already_present for o in second) == len(USERS) * ITEMS_PER_USER
    assert_exact(prepared.engine, USERS, ledger_probe)


def test_status_and_totals_follow_the_ledger(
    settings: Settings, prepare: Callable[..., Prepared], users_file: Path
) -> None:
    prepared = prepare(settings, users_file)
    pending = runs.status(prepared.pipeline)
    assert (pending.done, pending.failed, pending.running, pending.pending) == (0, 0, 0, 8)
    assert pending.snapshot_id == prepared.run.snapshot_id

    runs.grant(prepared.pipeline, prepared.run, prepared.run.entries[:3])
    partial = runs.status(prepared.pipeline)
    assert (partial.done, partial.pending) == (3, 5)
    assert [p["status"] for p in partial.partitions[:3]] == ["done"] * 3
    assert all(p["run_id"] == prepared.run.run_id for p in partial.partitions[:3])

    runs.grant(prepared.pipeline, prepared.run, prepared.run.entries[3:])
    totals = runs.ledger_totals(prepared.pipeline)
    assert {t.item_sku: t.grants for t in totals} == {s: len(USERS) for s in skus()}
    assert sum(t.face_value_krw for t in totals) == len(USERS) * FACE_VALUE_PER_USER_KRW
    planned = runs.plan_items(prepared.pipeline.campaign, len(USERS))
    assert [(p.item_sku, p.grants, p.face_value_krw) for p in planned] == [
        (t.item_sku, t.grants, t.face_value_krw) for t in totals
    ]


def test_a_later_snapshot_with_more_users_grants_only_the_new_users(
    settings: Settings,
    prepare: Callable[..., Prepared],
    open_pipeline: Callable[[Settings], runs.Pipeline],
    users_file: Path,
    tmp_path: Path,
    write_users: Callable[..., Path],
    ledger_probe: Any,
) -> None:
    first = prepare(settings, users_file)
    runs.grant(first.pipeline, first.run, first.run.entries)

    newcomers = [30_000_000 + 13 * i for i in range(37)]
    later_users = USERS + newcomers
    later = runs.freeze(first.pipeline, write_users(tmp_path / "later.csv", later_users))
    assert later.snapshot_id != first.run.snapshot_id
    runs.partition(first.pipeline, later)
    run = runs.start_run(first.pipeline)  # the current snapshot is now the later one
    assert run.snapshot_id == later.snapshot_id
    outcomes = runs.grant(first.pipeline, run, run.entries)
    assert sum(o.written for o in outcomes) == len(newcomers) * ITEMS_PER_USER
    touched = {partition_of(u, settings.partition_count) for u in newcomers}
    for outcome in outcomes:
        assert outcome.status == "done"
        if outcome.partition_id in touched:
            assert outcome.written > 0 and not outcome.skipped
        else:
            assert outcome.written == 0
    assert_exact(first.engine, later_users, ledger_probe)


def test_adding_an_item_later_grants_just_that_item(
    settings_for: Callable[..., Settings],
    prepare: Callable[..., Prepared],
    users_file: Path,
    tmp_path: Path,
    ledger_probe: Any,
) -> None:
    home = tmp_path / "var"
    first = prepare(settings_for(home), users_file)
    runs.grant(first.pipeline, first.run, first.run.entries)

    extended = tmp_path / "extended.toml"
    extended.write_text(
        BUNDLED_TOML.read_text(encoding="utf-8")
        + '\n[[items]]\nsku = "coupon-1000"\nkind = "coupon"\namount_krw = 1000\nvalidity = "30d"\n',
        encoding="utf-8",
    )
    second = prepare(settings_for(home, campaign_file=extended), users_file)
    outcomes = runs.grant(second.pipeline, second.run, second.run.entries)
    assert sum(o.written for o in outcomes) == len(USERS)
    pairs = ledger_probe.grant_pairs(second.engine)
    assert pairs == ledger_probe.planned_pairs(USERS, [*skus(), "coupon-1000"])


def test_a_run_uses_the_configured_partition_count_after_repartitioning(
    settings_for: Callable[..., Settings],
    prepare: Callable[..., Prepared],
    users_file: Path,
    tmp_path: Path,
    ledger_probe: Any,
) -> None:
    home = tmp_path / "var"
    eight = prepare(settings_for(home, partitions=8), users_file)
    runs.grant(eight.pipeline, eight.run, eight.run.entries)

    # Same users, ENTITLE_PARTITIONS changed to 4: the snapshot is re-partitioned and registered again.
    four = prepare(settings_for(home, partitions=4), users_file)
    assert four.snapshot.partition_count == 4
    assert four.run.snapshot_id == eight.run.snapshot_id
    loaded = {e.partition_count for e in four.run.entries}, len(four.run.entries)
    assert loaded == ({4}, 4), (
        f"the run loaded {loaded[1]} partitions of N={sorted(loaded[0])} from an earlier partitioning, "
        f"not the 4 just written to {four.snapshot.partitions_dir.name}"
    )
    assert runs.status(four.pipeline).partition_count == 4
    outcomes = runs.grant(four.pipeline, four.run, four.run.entries)
    assert sum(o.written for o in outcomes) == 0
    assert_exact(four.engine, USERS, ledger_probe)


# --------------------------------------------------------------------------- failure isolation


def test_one_bad_partition_fails_alone_and_only_failed_repairs_it(
    settings: Settings,
    prepare: Callable[..., Prepared],
    users_file: Path,
    ledger_probe: Any,
) -> None:
    prepared = prepare(settings, users_file)
    pipeline, run = prepared.pipeline, prepared.run
    broken = run.entries[5]
    assert broken.rows > 0
    broken.path.write_bytes(b"\x00garbage\xff" * 100)

    outcomes = runs.grant(pipeline, run, run.entries)
    by_id = {o.partition_id: o for o in outcomes}
    assert by_id[5].status == "failed"
    assert by_id[5].error is not None and str(broken.path) in by_id[5].error
    assert all(o.status == "done" for pid, o in by_id.items() if pid != 5)
    granted_users = {u for u, _ in ledger_probe.grant_pairs(prepared.engine)}
    assert granted_users == {u for u in USERS if partition_of(u, 8) != 5}

    with pytest.raises(GrantFailedError, match=r"1 partition\(s\) failed: part-0005: .*--only-failed"):
        runs.require_all_done(outcomes)

    status = runs.status(pipeline)
    assert (status.done, status.failed, status.pending) == (7, 1, 0)
    assert str(broken.path) in status.partitions[5]["error"]

    assert [e.partition_id for e in runs.select_partitions(pipeline, run, None, only_failed=True)] == [5]
    assert [e.partition_id for e in runs.select_partitions(pipeline, run, [4, 5], only_failed=False)] == [4, 5]
    assert [e.partition_id for e in runs.select_partitions(pipeline, run, [4, 5], only_failed=True)] == [5]

    # Restore: delete the partitions folder and partition again (the file is rebuilt byte for byte).
    shutil.rmtree(prepared.snapshot.partitions_dir)
    runs.partition(pipeline, prepared.snapshot.report)
    retry = runs.start_run(pipeline, snapshot_id=run.snapshot_id)
    chosen = runs.select_partitions(pipeline, retry, None, only_failed=True)
    assert [e.partition_id for e in chosen] == [5]
    fixed = runs.grant(pipeline, retry, chosen)
    assert [o.status for o in fixed] == ["done"]
    assert fixed[0].written == broken.rows * ITEMS_PER_USER
    assert_exact(prepared.engine, USERS, ledger_probe)
    assert runs.select_partitions(pipeline, retry, None, only_failed=True) == []
    assert runs.status(pipeline).done == 8


def test_unknown_partition_ids_are_refused(
    settings: Settings, prepare: Callable[..., Prepared], users_file: Path
) -> None:
    prepared = prepare(settings, users_file)
    with pytest.raises(SnapshotError, match=r"partition id\(s\) \[8, 99999\] do not exist; .* partitions 0..7"):
        runs.select_partitions(prepared.pipeline, prepared.run, [1, 8, 99999], only_failed=False)


def test_a_run_needs_a_snapshot(settings: Settings, open_pipeline: Callable[[Settings], runs.Pipeline]) -> None:
    pipeline = open_pipeline(settings)
    with pytest.raises(SnapshotError, match="has no snapshot .* run `entitle run --users FILE` first"):
        runs.start_run(pipeline)
    with pytest.raises(SnapshotError, match="snapshot 'feedfacefeedface' is not registered"):
        runs.start_run(pipeline, snapshot_id="feedfacefeedface")


# --------------------------------------------------------------------------- the start rule


def test_grant_refuses_before_the_campaign_start(
    tmp_path: Path,
    settings_for: Callable[..., Settings],
    prepare: Callable[..., Prepared],
    users_file: Path,
    ledger_probe: Any,
) -> None:
    early = CAMPAIGN_START - dt.timedelta(minutes=1)
    prepared = prepare(settings_for(tmp_path / "var", clock=lambda: early), users_file)
    with pytest.raises(CampaignNotStartedError) as caught:
        runs.grant(prepared.pipeline, prepared.run, prepared.run.entries)
    assert "starts at 2023-01-05T00:00:00+09:00" in str(caught.value)
    assert "2023-01-04T23:59:00+09:00" in str(caught.value), "the message shows 'now' in the campaign's zone"
    assert ledger_probe.grant_counts(prepared.engine) == (0, 0)
    assert runs.status(prepared.pipeline).pending == 8, "no attempt was even recorded"


def test_grant_proceeds_from_the_start_instant(
    tmp_path: Path,
    settings_for: Callable[..., Settings],
    prepare: Callable[..., Prepared],
    users_file: Path,
    ledger_probe: Any,
) -> None:
    prepared = prepare(settings_for(tmp_path / "var", clock=lambda: CAMPAIGN_START), users_file)
    outcomes = runs.grant(prepared.pipeline, prepared.run, prepared.run.entries)
    assert all(o.status == "done" for o in outcomes)
    assert_exact(prepared.engine, USERS, ledger_probe)


def test_totals_count_a_reissued_grant_as_live_and_only_its_voided_issue_as_voided(
    settings: Settings, prepare: Callable[..., Prepared], write_users: Callable[..., Path], tmp_path: Path
) -> None:
    users = [1_000_003, 1_000_033, 1_000_333]
    prepared = prepare(settings, write_users(tmp_path / "u.parquet", users))
    pipeline = prepared.pipeline
    runs.require_all_done(runs.grant(pipeline, prepared.run, prepared.run.entries))
    # As `entitle repair` does for a grant with wrong terms: void issue 0, write issue 1.
    request = corrections.VoidRequest("test: wrong terms", user_id=users[0], item_sku="coupon-2000")
    corrections.void_grants(pipeline, [request], "tester", pipeline.settings.clock())
    with pipeline.engine.begin() as connection:
        (issue_zero,) = connection.execute(
            sa.select(ledger.grants).where(
                ledger.grants.c.user_id == users[0], ledger.grants.c.item_key == pipeline.keys.item_keys["coupon-2000"]
            )
        ).all()
        connection.execute(ledger.grants.insert().values(**{**dict(issue_zero._mapping), "issue_no": 1}))
    totals = {t.item_sku: t for t in runs.ledger_totals(pipeline)}
    assert totals["coupon-2000"].grants == len(users), "the reissue is live; only issue 0 is voided"
    assert totals["coupon-2000"].face_value_krw == 2_000 * len(users)
