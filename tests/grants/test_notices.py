"""User notices (pipeline/grants/notices.py): who a run granted what, and who to remind before items expire."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import sqlalchemy as sa
from polars.testing import assert_frame_equal
from support.cli import cli_environment, run_entitle
from support.ledger_state import Prepared, prepare_pipeline
from support.settings import ITEMS_PER_USER, SEOUL

from pipeline import ledger, schemas
from pipeline.config import Settings
from pipeline.errors import ConfigError
from pipeline.grants import corrections, notices
from pipeline.grants import runs as jobs
from pipeline.grants.partitioning import load_manifest, partitions_dir

USERS = list(range(40_000_000, 40_000_600))
NEW_USERS = list(range(40_000_600, 40_000_650))
ALL_SKUS = "coupon-2000,coupon-3000,emoticon-90d-a,emoticon-90d-b,emoticon-permanent"
EXPIRING_SKUS = "coupon-2000,coupon-3000,emoticon-90d-a,emoticon-90d-b"


@pytest.fixture(params=["sqlite", pytest.param("postgresql", marks=pytest.mark.postgres)])
def granted(
    request: pytest.FixtureRequest,
    tmp_path: Path,
    settings_for: Callable[..., Settings],
    prepare: Callable[..., Prepared],
    write_users: Callable[..., Path],
) -> Prepared:
    url = None if request.param == "sqlite" else request.getfixturevalue("pg_url")
    prepared = prepare(
        settings_for(tmp_path / "var", partitions=4, ledger_url=url), write_users(tmp_path / "u.parquet", USERS)
    )
    jobs.require_all_done(jobs.grant(prepared.pipeline, prepared.run, prepared.run.entries))
    return prepared


def read_all(directory: str) -> pl.DataFrame:
    return pl.concat([pl.read_parquet(p) for p in sorted(Path(directory).glob("part-*.parquet"))])


def digests(directory: str) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(directory).iterdir())}


def test_granted_notices_name_every_user_once_with_their_items_and_rerun_identically(granted: Prepared) -> None:
    export = notices.export_granted(granted.pipeline)
    assert export.detail["run_id"] == granted.run.run_id
    frame = read_all(export.directory)
    assert sorted(frame["user_id"].to_list()) == USERS
    assert frame["user_id"].n_unique() == frame.height == len(USERS)
    assert set(frame["items"]) == {ALL_SKUS}
    assert set(frame["item_count"]) == {ITEMS_PER_USER} and set(frame["face_value_krw"]) == {5_000}
    marker = json.loads((Path(export.directory) / notices.COMPLETE_MARKER).read_text())
    assert marker["users"] == len(USERS) and len(marker["users_per_partition"]) == 4
    for path in Path(export.directory).glob("part-*.parquet"):
        ids = pl.read_parquet(path)["user_id"]
        assert ids.is_sorted(), f"{path.name} is sorted by user id"
    before = digests(export.directory)
    notices.export_granted(granted.pipeline, granted.run.run_id)
    assert digests(export.directory) == before, "a rerun writes the same bytes: no duplicate notice"


def test_a_later_run_notifies_only_the_users_it_granted_and_voids_are_left_out(
    granted: Prepared, tmp_path: Path, write_users: Callable[..., Path]
) -> None:
    pipeline = granted.pipeline
    request = corrections.VoidRequest("test: coupon withdrawn", user_id=USERS[0], item_sku="coupon-3000")
    corrections.void_grants(pipeline, [request], "tester", pipeline.settings.clock())
    first = read_all(notices.export_granted(pipeline, granted.run.run_id).directory)
    voided_user = first.filter(first["user_id"] == USERS[0]).row(0, named=True)
    assert (voided_user["items"], voided_user["item_count"], voided_user["face_value_krw"]) == (
        ALL_SKUS.replace("coupon-3000,", ""),
        ITEMS_PER_USER - 1,
        2_000,
    ), "a voided grant is not announced"
    (reminder,) = notices.export_reminders(pipeline)
    reminded = read_all(reminder.directory)
    assert reminded.filter(reminded["user_id"] == USERS[0])["items"].item() == EXPIRING_SKUS.replace("coupon-3000,", "")
    more = prepare_pipeline(pipeline, write_users(tmp_path / "more.parquet", USERS + NEW_USERS))
    jobs.require_all_done(jobs.grant(pipeline, more.run, more.run.entries))
    latest = notices.export_granted(pipeline)
    assert latest.detail["run_id"] == more.run.run_id
    assert sorted(read_all(latest.directory)["user_id"].to_list()) == NEW_USERS
    with pytest.raises(ConfigError, match="not registered"):
        notices.export_granted(pipeline, "no-such-run")


def test_reminders_list_holders_of_expiring_items_before_valid_until(granted: Prepared) -> None:
    pipeline = granted.pipeline
    (export,) = notices.export_reminders(pipeline, days=7)
    valid_until = dt.datetime(2023, 1, 5, tzinfo=SEOUL) + dt.timedelta(days=90)
    assert dt.datetime.fromisoformat(export.detail["valid_until"]) == valid_until
    assert export.detail["remind_on"] == "2023-03-29"  # 2023-04-05 in Seoul, minus 7 days
    assert export.detail["last_valid_day"] == "2023-04-04", "valid_until (2023-04-05 00:00 Seoul) is exclusive"
    assert Path(export.directory).name == "2023-04-05-7d"
    frame = read_all(export.directory)
    assert sorted(frame["user_id"].to_list()) == USERS
    assert set(frame["items"]) == {EXPIRING_SKUS}, "the permanent emoticon never expires"
    assert set(frame["remind_on"]) == {"2023-03-29"}
    assert set(frame["last_valid_day"]) == {"2023-04-04"}
    with pytest.raises(ConfigError, match="between 0 and"):
        notices.export_reminders(pipeline, days=-1)


def test_the_notices_command(tmp_path: Path, write_users: Callable[..., Path]) -> None:
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_PARTITIONS="4")
    users_file = write_users(tmp_path / "u.parquet", USERS)
    assert run_entitle(["run", "--users", str(users_file), "--no-progress"], env).returncode == 0
    done = run_entitle(["notices", "granted", "--json", "--no-progress"], env)
    assert done.returncode == 0, done.stderr
    (export,) = json.loads(done.stdout)["exports"]
    assert export["users"] == len(USERS) and export["partitions"] == 4
    reminded = run_entitle(["notices", "reminders", "--days", "3", "--json", "--no-progress"], env)
    assert reminded.returncode == 0, reminded.stderr
    (reminder,) = json.loads(reminded.stdout)["exports"]
    assert reminder["remind_on"] == "2023-04-02" and reminder["users"] == len(USERS)
    refused = run_entitle(["notices", "reminders", "--days", "999"], env)
    assert refused.returncode == 2 and "between 0 and 365" in refused.stderr


# --------------------------------------------------------------------------- the aggregate method

NEWEST_USER = 40_000_700


def straightforward_notices(pipeline: jobs.Pipeline, run_id: str) -> dict[str, pl.DataFrame]:
    """The granted notices of ``run_id`` per partition label, computed grant by grant in Python."""
    g, items = ledger.grants, ledger.campaign_items
    query = (
        sa.select(g.c.user_bucket, g.c.user_id, items.c.item_sku, g.c.amount_krw, g.c.granted_at)
        .join(items, items.c.item_key == g.c.item_key)
        .join(ledger.runs, ledger.runs.c.run_key == g.c.run_key)
        .where(
            ledger.runs.c.run_id == run_id,
            g.c.campaign_key == pipeline.keys.campaign_key,
            ~sa.exists().where(ledger.void_of_grant()),
        )
    )
    with pipeline.engine.connect() as connection:
        grants = connection.execute(query).all()
    row = jobs.snapshot_row(pipeline, None)
    entries = load_manifest(partitions_dir(pipeline.settings.location(row["snapshot_dir"]), row["partition_count"]))
    expected = {}
    for entry in entries:
        per_user: dict[int, list[tuple[str, int | None, dt.datetime]]] = {}
        for bucket, user_id, sku, amount, granted_at in grants:
            if entry.bucket_lo <= bucket <= entry.bucket_hi:
                per_user.setdefault(user_id, []).append((sku, amount, granted_at))
        rows = [
            (
                user_id,
                ",".join(sorted(sku for sku, _, _ in held)),
                len(held),
                sum(amount or 0 for _, amount, _ in held),
                max(at for _, _, at in held),
                pipeline.campaign.campaign_id,
            )
            for user_id, held in sorted(per_user.items())
        ]
        schema = {
            "user_id": pl.Int64,
            "items": pl.String,
            "item_count": pl.Int32,
            "face_value_krw": pl.Int64,
            "granted_at": pl.Datetime("us", "UTC"),
            "campaign_id": pl.String,
        }
        expected[entry.label] = pl.DataFrame(rows, schema=schema, orient="row")
    return expected


def reissue_within_run(pipeline: jobs.Pipeline, run: jobs.RunHandle, user_id: int, sku: str) -> None:
    """Void a grant and write its reissue into the same run by hand, with another amount and instant."""
    request = corrections.VoidRequest("test: reissue", user_id=user_id, item_sku=sku)
    corrections.void_grants(pipeline, [request], "tester", pipeline.settings.clock())
    with pipeline.engine.begin() as connection:
        (issue_zero,) = connection.execute(
            sa.select(ledger.grants).where(
                ledger.grants.c.user_id == user_id, ledger.grants.c.item_key == pipeline.keys.item_keys[sku]
            )
        ).all()
        values = dict(issue_zero._mapping)
        values.update(
            issue_no=1,
            run_key=run.run_key,
            amount_krw=(values["amount_krw"] or 0) + 500,
            granted_at=values["granted_at"] + dt.timedelta(minutes=5),
        )
        connection.execute(ledger.grants.insert().values(**values))


def test_the_aggregate_export_writes_the_files_of_the_grant_by_grant_computation(
    granted: Prepared, tmp_path: Path, write_users: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    pipeline = granted.pipeline
    first = granted.run
    voids = [
        corrections.VoidRequest("test: one coupon", user_id=USERS[0], item_sku="coupon-3000"),
        corrections.VoidRequest("test: everything", user_id=USERS[1]),
    ]
    corrections.void_grants(pipeline, voids, "tester", pipeline.settings.clock())
    reissue_within_run(pipeline, first, USERS[2], "coupon-2000")
    second = prepare_pipeline(pipeline, write_users(tmp_path / "more.parquet", USERS + NEW_USERS)).run
    jobs.require_all_done(jobs.grant(pipeline, second, second.entries))
    newest = [*USERS, *NEW_USERS, NEWEST_USER]
    third = prepare_pipeline(pipeline, write_users(tmp_path / "newest.parquet", newest)).run
    jobs.require_all_done(jobs.grant(pipeline, third, third.entries))

    from_rows: list[str] = []
    by_rows = notices._granted_from_rows
    monkeypatch.setattr(
        notices, "_granted_from_rows", lambda p, k, entry: from_rows.append(entry.label) or by_rows(p, k, entry)
    )
    monkeypatch.setattr(notices, "PROCESS_USERS_MIN", 0)  # two workers: worker processes, even for a few users
    fallbacks = {}
    for run in (first, second, third):
        expected = straightforward_notices(pipeline, run.run_id)
        assert sum(f.height for f in expected.values()) > 0
        written = {}
        for workers in (1, 2):
            from_rows.clear()
            export = notices.export_granted(pipeline, run.run_id, workers=workers)
            fallbacks[run.run_id, workers] = sorted(from_rows)
            for label, frame in expected.items():
                path = Path(export.directory) / f"{label}.parquet"
                assert_frame_equal(pl.read_parquet(path), frame)
                reference = tmp_path / "expected" / run.run_id / f"{label}.parquet"
                schemas.write_parquet(frame, "notice_granted", reference)
                assert path.read_bytes() == reference.read_bytes(), f"{run.run_id} {label}: the same bytes"
            written[workers] = digests(export.directory)
        export = notices.export_granted(pipeline, run.run_id, method="rows")
        assert written[1] == written[2] == digests(export.directory), "aggregate (in process or not) = row by row"
    first_notices = pl.concat(straightforward_notices(pipeline, first.run_id).values())
    assert USERS[1] not in first_notices["user_id"], "a user whose every grant was voided is not notified"
    assert first_notices.filter(pl.col("user_id") == USERS[0])["item_count"].item() == ITEMS_PER_USER - 1
    reissued = first_notices.filter(pl.col("user_id") == USERS[2]).row(0, named=True)
    assert reissued["face_value_krw"] == 5_500 and reissued["items"] == ALL_SKUS
    # Only the partition holding the hand-made reissue (another amount and instant) is read row by row.
    assert len(fallbacks[first.run_id, 1]) == 1 and fallbacks[first.run_id, 1] == fallbacks[first.run_id, 2]
    assert all(fallbacks[run.run_id, workers] == [] for run in (second, third) for workers in (1, 2))
    assert sum(f.height for f in straightforward_notices(pipeline, third.run_id).values()) == 1
    with pytest.raises(ConfigError, match="export method"):
        notices.export_granted(pipeline, first.run_id, method="columns")


def test_a_partition_read_in_slices_gives_the_same_files(granted: Prepared, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(notices, "USERS_PER_QUERY", 64)  # about three slices of each partition's key range
    sliced = digests(notices.export_granted(granted.pipeline, workers=1).directory)
    assert sliced == digests(notices.export_granted(granted.pipeline, method="rows").directory)
