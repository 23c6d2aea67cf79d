"""User notices (pipeline/notices.py): who a run granted what, and who to remind before items expire."""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
from conftest import ITEMS_PER_USER, SEOUL, Prepared, cli_environment, prepare_pipeline, run_entitle

from pipeline import corrections, jobs, notices
from pipeline.config import Settings
from pipeline.errors import ConfigError

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
    assert Path(export.directory).name == "2023-04-05-7d"
    frame = read_all(export.directory)
    assert sorted(frame["user_id"].to_list()) == USERS
    assert set(frame["items"]) == {EXPIRING_SKUS}, "the permanent emoticon never expires"
    assert set(frame["remind_on"]) == {"2023-03-29"}
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
