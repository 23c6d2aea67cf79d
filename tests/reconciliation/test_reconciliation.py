"""pipeline.reconciliation and pipeline.grants.corrections: tampering found exactly, repaired and voided to RECONCILED.

The ledger is tampered with directly in the database (triggers dropped or disabled, as an
intruder or a careless script would), never through the pipeline, so these tests show that
reconciliation reads the data itself and not the pipeline's own records.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Engine
from support.ledger_state import Prepared
from support.reconciliation import STRANGER, USERS, tamper_for
from support.settings import ITEMS_PER_USER, build_settings

from pipeline import reconciliation
from pipeline.campaigns import load_campaign
from pipeline.config import Settings
from pipeline.errors import CorrectionError
from pipeline.grants import corrections, runs
from pipeline.grants.partitioning import partition_of, user_bucket
from pipeline.reconciliation import checksums

SKUS = [i.sku for i in load_campaign().items]


@pytest.fixture(params=["sqlite", "postgresql"])
def backend_settings(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "postgresql":
        url = request.getfixturevalue("pg_url")
        return build_settings(tmp_path / "var", ledger_url=url)
    return build_settings(tmp_path / "var")


@pytest.fixture
def users_file(tmp_path: Path, write_users: Callable[..., Path]) -> Path:
    return write_users(tmp_path / "users.parquet", USERS)


@pytest.fixture
def granted(prepare: Callable[..., Prepared], backend_settings: Settings, users_file: Path) -> Prepared:
    prepared = prepare(backend_settings, users_file)
    runs.require_all_done(runs.grant(prepared.pipeline, prepared.run, prepared.run.entries))
    return prepared


# --------------------------------------------------------------------------- tampering helpers


def live_rows(engine: Engine) -> set[tuple[Any, ...]]:
    """Every live grant with its terms, as analysts see it."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT user_id, item_sku, amount_krw, valid_from, valid_until FROM grant_ledger")
        ).all()
    return {tuple(r) for r in rows}


def break_set(result: reconciliation.Reconciliation) -> set[tuple[str, int, str]]:
    frame = pl.read_parquet(result.breaks_file)
    return {(r["break_class"], r["user_id"], r["item_sku"]) for r in frame.iter_rows(named=True)}


def assert_bridge_holds(result: reconciliation.Reconciliation) -> None:
    b = result.bridge
    assert b["expected"] == b["matched"] + b["terms_mismatch"] + b["missing"] + b["voided"]
    assert b["ledger"] == b["matched"] + b["terms_mismatch"] + b["unexpected"] + b["duplicate"]
    assert b["residual_expected"] == b["residual_ledger"] == 0


# --------------------------------------------------------------------------- clean ledger


def test_a_clean_ledger_reconciles_by_checksum(granted: Prepared) -> None:
    result = reconciliation.reconcile(granted.pipeline)
    assert result.verdict == "RECONCILED", result.explanation
    assert result.checksum_partitions == 8 and result.row_partitions == 0
    assert result.bridge["expected"] == result.bridge["matched"] == len(USERS) * ITEMS_PER_USER
    assert result.bridge["ledger"] == len(USERS) * ITEMS_PER_USER
    assert_bridge_holds(result)
    assert {i["item_sku"]: (i["expected"], i["live"]) for i in result.items} == {
        sku: (len(USERS), len(USERS)) for sku in SKUS
    }
    assert result.open_breaks == 0 and pl.read_parquet(result.breaks_file).height == 0
    # What the report needs to show times and face values the campaign's way.
    assert result.time_zone == "Asia/Seoul"
    assert {i["item_sku"]: i["amount_krw"] for i in result.items} == {
        sku: {"coupon-2000": 2_000, "coupon-3000": 3_000}.get(sku) for sku in SKUS
    }
    with granted.engine.connect() as connection:
        stored = connection.execute(
            sa.text("SELECT verdict, expected, ledger_live FROM reconciliation_runs WHERE reconciliation_id = :r"),
            {"r": result.reconciliation_id},
        ).one()
        coverage = connection.execute(sa.text("SELECT item_sku, expected, granted FROM campaign_coverage")).all()
    assert tuple(stored) == ("RECONCILED", 5_000, 5_000)
    assert {tuple(r) for r in coverage} == {(sku, len(USERS), len(USERS)) for sku in SKUS}


# --------------------------------------------------------------------------- tampering, repair, void


def test_tampering_is_found_exactly_and_repair_and_void_restore_the_plan(granted: Prepared) -> None:
    pipeline = granted.pipeline
    planned = live_rows(granted.engine)
    tamper = tamper_for(granted)
    deleted = [(USERS[0], "emoticon-permanent"), (USERS[500], "coupon-3000")]
    for user_id, sku in deleted:
        tamper.delete(user_id, sku)
    for sku in ("emoticon-permanent", "coupon-2000"):
        tamper.copy_grant(USERS[1], STRANGER, sku)
    tamper.set_amount(USERS[2], "coupon-2000", 20_000)
    tamper.shift_valid_until(USERS[3], "emoticon-90d-a", 30)

    result = reconciliation.reconcile(pipeline)
    assert result.verdict == "BREAKS"
    assert break_set(result) == {
        ("missing", USERS[0], "emoticon-permanent"),
        ("missing", USERS[500], "coupon-3000"),
        ("unexpected", STRANGER, "emoticon-permanent"),
        ("unexpected", STRANGER, "coupon-2000"),
        ("terms_mismatch", USERS[2], "coupon-2000"),
        ("terms_mismatch", USERS[3], "emoticon-90d-a"),
    }
    assert result.breaks_by_class == {"missing": 2, "unexpected": 2, "terms_mismatch": 2, "duplicate": 0}
    assert result.bridge["matched"] == 5_000 - 4
    assert_bridge_holds(result)
    frame = pl.read_parquet(result.breaks_file)
    amount = frame.filter(pl.col("break_class") == "terms_mismatch", pl.col("item_sku") == "coupon-2000").row(
        0, named=True
    )
    assert (amount["expected_amount_krw"], amount["ledger_amount_krw"]) == (2_000, 20_000)
    assert "amount_krw 20000 in the ledger, 2000 in the campaign" in amount["detail"]
    validity = frame.filter(pl.col("item_sku") == "emoticon-90d-a").row(0, named=True)
    assert validity["ledger_valid_until"] - validity["expected_valid_until"] == dt.timedelta(days=30)
    # Only the partitions holding a difference were compared row by row.
    touched = {partition_of(u, 8) for u in (USERS[0], USERS[500], STRANGER, USERS[2], USERS[3])}
    assert {p["partition_id"] for p in result.partitions if p["method"] == "rows"} == touched

    repaired = corrections.repair(pipeline, "ops-kim")
    assert (repaired.granted_missing, repaired.reissued, repaired.needs_decision) == (2, 2, {"unexpected": 2})
    again = corrections.repair(pipeline, "ops-kim")
    assert (again.granted_missing, again.reissued) == (0, 0), "repair is idempotent"
    assert again.already_fixed == 4

    after_repair = reconciliation.reconcile(pipeline)
    assert after_repair.verdict == "BREAKS"
    assert break_set(after_repair) == {
        ("unexpected", STRANGER, "emoticon-permanent"),
        ("unexpected", STRANGER, "coupon-2000"),
    }
    assert after_repair.resolved_breaks == 4
    ids = pl.read_parquet(after_repair.breaks_file)["break_id"].to_list()
    voided = corrections.void_grants(
        pipeline,
        [corrections.VoidRequest("not eligible", break_id=i) for i in ids],
        "ops-kim",
        pipeline.settings.clock(),
    )
    assert {(v.user_id, v.item_sku) for v in voided} == {(STRANGER, "emoticon-permanent"), (STRANGER, "coupon-2000")}

    final = reconciliation.reconcile(pipeline)
    assert final.verdict == "RECONCILED", final.explanation
    assert final.checksum_partitions == 8, "voided and reissued rows cancel out in the checksum"
    assert_bridge_holds(final)
    assert live_rows(granted.engine) == planned, "the live ledger is exactly the plan again, nothing else changed"
    with granted.engine.connect() as connection:
        history = connection.execute(
            sa.text("SELECT user_id, item_sku, entry_type, actor FROM grant_history WHERE entry_type = 'void'")
        ).all()
        statuses = connection.execute(
            sa.text("SELECT status, count(*) FROM reconciliation_breaks GROUP BY status")
        ).all()
    assert sorted((r.user_id, r.item_sku) for r in history) == sorted(
        [
            (USERS[2], "coupon-2000"),
            (USERS[3], "emoticon-90d-a"),
            (STRANGER, "coupon-2000"),
            (STRANGER, "emoticon-permanent"),
        ]
    )
    assert {r.actor for r in history} == {"ops-kim"}
    assert dict((str(s), int(n)) for s, n in statuses) == {"resolved": 6}


def test_reconciling_the_same_data_twice_gives_identical_output(granted: Prepared) -> None:
    tamper = tamper_for(granted)
    tamper.delete(USERS[7], "coupon-2000")
    tamper.set_amount(USERS[8], "coupon-3000", 1)
    first = reconciliation.reconcile(granted.pipeline)
    second = reconciliation.reconcile(granted.pipeline)
    assert first.reconciliation_id != second.reconciliation_id
    assert first.comparable() == second.comparable()
    assert Path(first.breaks_file).read_bytes() == Path(second.breaks_file).read_bytes()
    assert first.open_breaks == 2


def test_a_break_keeps_its_id_until_it_is_resolved(granted: Prepared) -> None:
    tamper = tamper_for(granted)
    tamper.delete(USERS[9], "emoticon-90d-b")
    first = reconciliation.reconcile(granted.pipeline)
    tamper.delete(USERS[10], "emoticon-90d-b")
    second = reconciliation.reconcile(granted.pipeline)
    ids_first = set(pl.read_parquet(first.breaks_file)["break_id"])
    ids_second = set(pl.read_parquet(second.breaks_file)["break_id"])
    assert ids_first < ids_second and len(ids_second) == 2
    second_frame = pl.read_parquet(second.breaks_file)
    assert set(second_frame["first_seen_in"]) == {first.reconciliation_id, second.reconciliation_id}
    corrections.repair(granted.pipeline, "ops")
    third = reconciliation.reconcile(granted.pipeline)
    assert third.verdict == "RECONCILED" and third.resolved_breaks == 2
    with granted.engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT break_id, status, first_seen_in, resolved_in FROM reconciliation_breaks")
        ).all()
    assert {r.break_id for r in rows} == ids_second
    assert {(r.status, r.resolved_in) for r in rows} == {("resolved", third.reconciliation_id)}


def test_row_method_and_worker_processes_agree_with_the_default(granted: Prepared, backend_settings: Settings) -> None:
    tamper = tamper_for(granted)
    tamper.delete(USERS[11], "coupon-3000")
    tamper.copy_grant(USERS[12], STRANGER, "coupon-3000")
    by_checksum = reconciliation.reconcile(granted.pipeline)
    by_rows = reconciliation.reconcile(granted.pipeline, method="rows")
    in_two_processes = reconciliation.reconcile(granted.pipeline, workers=2)
    assert by_rows.row_partitions == 8
    for other in (by_rows, in_two_processes):
        left, right = by_checksum.comparable(), other.comparable()
        for document in (left, right):
            document.pop("method")
            document.pop("checksum_partitions")
            document.pop("row_partitions")
            for partition in document["partitions"]:
                partition.pop("method")
        assert left == right
    assert Path(by_checksum.breaks_file).read_bytes() == Path(in_two_processes.breaks_file).read_bytes()


def test_a_voided_expected_grant_is_explained_not_a_break_and_not_regranted(granted: Prepared) -> None:
    pipeline = granted.pipeline
    corrections.void_grants(
        pipeline,
        [corrections.VoidRequest("account closed", USERS[20], "coupon-3000")],
        "cs-lee",
        pipeline.settings.clock(),
    )
    result = reconciliation.reconcile(pipeline)
    assert result.verdict == "RECONCILED", result.explanation
    assert result.bridge["voided"] == 1 and result.bridge["missing"] == 0
    assert "1 voided on purpose" in result.explanation
    assert result.checksum_partitions == 8, "a deliberate void does not force a row-level comparison"
    assert_bridge_holds(result)
    repaired = corrections.repair(pipeline, "ops")
    assert repaired.granted_missing == 0
    assert (USERS[20], "coupon-3000", 3_000) not in {r[:3] for r in live_rows(granted.engine)}


def test_partitions_not_granted_make_the_verdict_incomplete(
    prepare: Callable[..., Prepared], backend_settings: Settings, users_file: Path
) -> None:
    prepared = prepare(backend_settings, users_file)
    runs.grant(prepared.pipeline, prepared.run, prepared.run.entries[:5])
    result = reconciliation.reconcile(prepared.pipeline)
    assert result.verdict == "INCOMPLETE"
    assert "3 partition(s) not granted yet ([5, 6, 7]" in result.explanation
    expected_missing = sum(e.rows for e in prepared.run.entries[5:]) * ITEMS_PER_USER
    assert result.bridge["missing"] == expected_missing
    assert result.open_breaks == 0 and pl.read_parquet(result.breaks_file).height == 0, "work to do is not a break"
    assert_bridge_holds(result)
    repaired = corrections.repair(prepared.pipeline, "ops")
    assert repaired.partitions_granted == [5, 6, 7]
    assert reconciliation.reconcile(prepared.pipeline).verdict == "RECONCILED"


def test_an_unreadable_partition_makes_the_verdict_incomplete_and_names_the_file(granted: Prepared) -> None:
    entry = granted.run.entries[3]
    entry.path.write_bytes(b"not parquet")
    result = reconciliation.reconcile(granted.pipeline)
    assert result.verdict == "INCOMPLETE"
    assert str(entry.path) in result.explanation
    assert result.bridge["residual_ledger"] == entry.rows * ITEMS_PER_USER, "its grants could not be compared"
    assert result.partitions[3]["state"] == "unreadable"


def test_a_grant_under_a_forged_bucket_is_a_duplicate(
    tmp_path: Path, prepare: Callable[..., Prepared], users_file: Path
) -> None:
    prepared = prepare(build_settings(tmp_path / "var"), users_file)
    runs.require_all_done(runs.grant(prepared.pipeline, prepared.run, prepared.run.entries))
    victim = USERS[30]
    # Same user and item stored a second time under a bucket of another partition (CHECK bypassed).
    other = next(e for e in prepared.run.entries if e.partition_id != partition_of(victim, 8))
    tamper_for(prepared).copy_grant(victim, victim, "coupon-2000", bucket=other.bucket_lo + 1)
    result = reconciliation.reconcile(prepared.pipeline)
    assert result.verdict == "BREAKS"
    assert break_set(result) == {("duplicate", victim, "coupon-2000")}
    [row] = pl.read_parquet(result.breaks_file).iter_rows(named=True)
    assert row["partition_id"] == other.partition_id and row["user_bucket"] == other.bucket_lo + 1
    corrections.void_grants(
        prepared.pipeline,
        [corrections.VoidRequest("duplicate", break_id=row["break_id"])],
        "ops",
        dt.datetime.now(dt.UTC),
    )
    assert reconciliation.reconcile(prepared.pipeline).verdict == "RECONCILED"


def test_a_second_live_issue_inserted_directly_is_a_duplicate(
    tmp_path: Path, prepare: Callable[..., Prepared], users_file: Path
) -> None:
    # SQLite has no insert trigger on grants (bulk speed), so a direct insert of issue 1 while
    # issue 0 is live succeeds there; reconciliation must report it.
    prepared = prepare(build_settings(tmp_path / "var"), users_file)
    runs.require_all_done(runs.grant(prepared.pipeline, prepared.run, prepared.run.entries))
    victim = USERS[31]
    with prepared.engine.begin() as connection:
        connection.execute(
            sa.text(
                "INSERT INTO grants (campaign_key, user_bucket, user_id, item_key, issue_no, partition_id, run_key, "
                "amount_krw, valid_from, valid_until, granted_at) SELECT campaign_key, user_bucket, user_id, "
                "item_key, 1, partition_id, run_key, amount_krw + 1, valid_from, valid_until, granted_at FROM grants "
                "WHERE user_bucket = :b AND user_id = :u AND item_key = :i"
            ),
            {"b": user_bucket(victim), "u": victim, "i": prepared.pipeline.keys.item_keys["coupon-3000"]},
        )
    result = reconciliation.reconcile(prepared.pipeline)
    [row] = pl.read_parquet(result.breaks_file).iter_rows(named=True)
    assert (row["break_class"], row["user_id"], row["item_sku"], row["issue_no"]) == (
        "duplicate",
        victim,
        "coupon-3000",
        1,
    ), "the issue with the campaign's terms is the live one; the other is the duplicate"
    corrections.void_grants(
        prepared.pipeline, [corrections.VoidRequest("dup", break_id=row["break_id"])], "ops", dt.datetime.now(dt.UTC)
    )
    assert reconciliation.reconcile(prepared.pipeline).verdict == "RECONCILED"


def test_an_unexpected_grant_to_an_excluded_user_says_so(
    tmp_path: Path, prepare: Callable[..., Prepared], write_users: Callable[..., Path]
) -> None:
    users = write_users(tmp_path / "all.parquet", USERS)
    blocked = write_users(tmp_path / "blocked.parquet", [USERS[40]])
    prepared = prepare(build_settings(tmp_path / "var"), users, blocked)
    runs.require_all_done(runs.grant(prepared.pipeline, prepared.run, prepared.run.entries))
    tamper_for(prepared).copy_grant(USERS[41], USERS[40], "coupon-3000")
    result = reconciliation.reconcile(prepared.pipeline)
    [brk] = result.top_breaks
    assert (brk["break_class"], brk["user_id"]) == ("unexpected", USERS[40])
    assert "exclusion list" in brk["detail"]


# --------------------------------------------------------------------------- void refusals


def test_voiding_nothing_or_twice_is_refused_and_writes_nothing(granted: Prepared) -> None:
    pipeline = granted.pipeline
    now = pipeline.settings.clock()
    with pytest.raises(CorrectionError, match=f"user {STRANGER} has no live grant to void \\(no such grant\\)"):
        corrections.void_grants(pipeline, [corrections.VoidRequest("x", STRANGER)], "ops", now)
    with pytest.raises(CorrectionError, match="item_sku 'coupon-9000' is not an item"):
        corrections.void_grants(pipeline, [corrections.VoidRequest("x", USERS[0], "coupon-9000")], "ops", now)
    with pytest.raises(CorrectionError, match="reason is empty"):
        corrections.void_grants(pipeline, [corrections.VoidRequest("  ", USERS[0])], "ops", now)
    with pytest.raises(CorrectionError, match="actor is empty"):
        corrections.void_grants(pipeline, [corrections.VoidRequest("x", USERS[0])], "", now)
    # A batch with one bad request writes nothing at all.
    batch = [
        corrections.VoidRequest("fraud", USERS[50], "coupon-2000", source="row 1"),
        corrections.VoidRequest("fraud", STRANGER, "coupon-2000", source="row 2"),
        corrections.VoidRequest("fraud", USERS[50], "coupon-2000", source="row 3"),
    ]
    with pytest.raises(CorrectionError, match="row 2: user .* no live grant.*row 3: voids the same grant as row 1"):
        corrections.void_grants(pipeline, batch, "ops", now)
    assert _void_count(granted.engine) == 0
    corrections.void_grants(pipeline, batch[:1], "ops", now)
    with pytest.raises(CorrectionError, match="already voided: issue 0 voided .* by ops"):
        corrections.void_grants(pipeline, batch[:1], "ops", now)
    assert _void_count(granted.engine) == 1
    voided_all = corrections.void_grants(pipeline, [corrections.VoidRequest("closed", USERS[51])], "ops", now)
    assert sorted(v.item_sku for v in voided_all) == sorted(SKUS), "no --item: every item the user holds"


def test_a_void_file_names_its_bad_rows(granted: Prepared, tmp_path: Path) -> None:
    path = tmp_path / "voids.csv"
    path.write_text(f"user_id,item_sku,reason\n{USERS[60]},coupon-2000,fraud\nabc,coupon-2000,fraud\n{USERS[61]},,\n")
    with pytest.raises(CorrectionError) as caught:
        corrections.read_void_file(path, None)
    assert f"{path} row 2: user_id 'abc' is not a positive whole number" in str(caught.value)
    assert f"{path} row 3: no reason" in str(caught.value)
    path.write_text(f"user_id,item_sku,reason\n{USERS[60]},coupon-2000,fraud\n{USERS[61]},,\n")
    requests = corrections.read_void_file(path, "bulk clean-up")
    voided = corrections.void_grants(granted.pipeline, requests, "ops", dt.datetime.now(dt.UTC))
    assert len(voided) == 1 + ITEMS_PER_USER
    assert {v.reason for v in voided} == {"fraud", "bulk clean-up"}


def test_repair_needs_a_reconciliation_of_the_current_snapshot(granted: Prepared) -> None:
    with pytest.raises(CorrectionError, match="no reconciliation yet; run `entitle reconcile` first"):
        corrections.repair(granted.pipeline, "ops")


def _void_count(engine: Engine) -> int:
    with engine.connect() as connection:
        return int(connection.execute(sa.text("SELECT count(*) FROM grant_voids")).scalar_one())


# --------------------------------------------------------------------------- checksums


def test_the_expected_checksum_equals_the_databases_on_the_same_rows(granted: Prepared) -> None:
    items = reconciliation.item_terms(granted.pipeline)
    entry = granted.run.entries[0]
    users = pl.read_parquet(entry.path).select("user_id")
    expected = reconciliation.expected_checksum(users, items)
    h1, h2 = checksums.hash_sql(granted.engine.dialect.name)
    with granted.engine.connect() as connection:
        row = connection.execute(
            sa.text(
                f"SELECT count(*), sum({h1}), sum({h2}) FROM grants AS g WHERE g.campaign_key = :ck "
                "AND g.user_bucket BETWEEN :lo AND :hi"
            ),
            {"ck": granted.pipeline.keys.campaign_key, "lo": entry.bucket_lo, "hi": entry.bucket_hi},
        ).one()
    assert expected == (int(row[0]), int(row[1]), int(row[2]))
    one = [checksums.row_hashes(u, items[0]) for u in users["user_id"].to_list()]
    single = reconciliation.expected_checksum(users, items[:1])
    assert single == (users.height, sum(h for h, _ in one), sum(h for _, h in one))


def _reconcile_in_a_daemon(environ: dict[str, str], answers: Any) -> None:
    """Body of a daemonic process (like a Celery prefork worker's): reconcile with two workers asked for."""
    from pipeline.config import load_settings

    pipeline = runs.open_pipeline(load_settings(environ))
    try:
        answers.put(reconciliation.reconcile(pipeline, workers=2).verdict)
    except BaseException as exc:  # reported to the test, not lost in the child
        answers.put(f"{type(exc).__name__}: {exc}")
    finally:
        pipeline.engine.dispose()


def test_a_daemonic_process_reconciles_with_worker_processes(granted: Prepared) -> None:
    """Celery's prefork workers are daemonic: multiprocessing may not start children there, our workers can."""
    import multiprocessing

    settings = granted.pipeline.settings
    environ = {
        "ENTITLE_HOME": str(settings.home),
        "ENTITLE_LEDGER_URL": settings.ledger_url,
        "ENTITLE_PARTITIONS": str(settings.partition_count),
    }
    context = multiprocessing.get_context("spawn")
    answers = context.Queue()
    child = context.Process(target=_reconcile_in_a_daemon, args=(environ, answers), daemon=True)
    child.start()
    verdict = answers.get(timeout=120)
    child.join(timeout=30)
    assert verdict == "RECONCILED"
    assert child.exitcode == 0
