"""pipeline.grants.snapshot: validating user files, quarantining bad rows, freezing the eligible set."""

from __future__ import annotations

import hashlib
import json
import struct
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest

from pipeline import schemas
from pipeline.errors import SnapshotError
from pipeline.grants.snapshot import (
    REJECTED_SHARE_MAX_DEFAULT,
    SnapshotReport,
    freeze_snapshot,
    load_snapshot_report,
    snapshot_root,
)

CAMPAIGN = "test-campaign"
INT64_MAX = 2**63 - 1
FORMATS = ("csv", "parquet")

WriteUsers = Callable[..., Path]


def freeze(path: Path, home: Path, **kwargs: object) -> SnapshotReport:
    return freeze_snapshot(path, home, CAMPAIGN, **kwargs)  # type: ignore[arg-type]


def frozen_snapshots(home: Path) -> list[Path]:
    """Every snapshot.json under the campaign's snapshot folder."""
    root = snapshot_root(home, CAMPAIGN)
    return sorted(root.rglob("snapshot.json")) if root.exists() else []


def quarantine_rows(path: Path) -> list[tuple[int, str | None, str]]:
    frame = pl.read_parquet(path)
    return list(frame.select("row_number", "raw_value", "reason").iter_rows())


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "var"


# --------------------------------------------------------------------------- good input


@pytest.mark.parametrize("fmt", FORMATS)
def test_valid_file_is_frozen_sorted_and_distinct(
    fmt: str, tmp_path: Path, home: Path, write_users: WriteUsers
) -> None:
    users = write_users(tmp_path / f"users.{fmt}", [30, 10, 20, 9_000_000_000, 1, INT64_MAX])
    report = freeze(users, home)
    assert report.rows_read == 6
    assert report.eligible_users == 6
    assert (report.null_rows, report.not_integer_rows, report.out_of_range_rows, report.duplicate_rows) == (0, 0, 0, 0)
    assert report.rejected_share == 0.0
    frozen = pl.read_parquet(report.users_file)
    assert frozen["user_id"].to_list() == [1, 10, 20, 30, 9_000_000_000, INT64_MAX]
    assert pq.read_schema(report.users_file).equals(schemas.arrow_schema("snapshot"))
    assert Path(report.directory) == snapshot_root(home, CAMPAIGN) / report.snapshot_id
    assert load_snapshot_report(Path(report.directory)) == report
    # The quarantine file exists (empty) and follows its schema.
    assert pq.read_schema(report.quarantine_file).equals(schemas.arrow_schema("quarantine"))
    assert pl.read_parquet(report.quarantine_file).height == 0


def test_snapshot_id_is_the_content_hash_of_the_distinct_sorted_ids(
    tmp_path: Path, home: Path, write_users: WriteUsers
) -> None:
    users = write_users(tmp_path / "users.csv", [3, 1, 2, 2])
    report = freeze(users, home)
    expected = hashlib.sha256(struct.pack("<3q", 1, 2, 3)).hexdigest()[:16]
    assert report.snapshot_id == expected


def test_same_input_twice_gives_the_same_snapshot_and_bytes(tmp_path: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / "users.parquet", list(range(1000, 0, -1)) + [5, 6, None])
    first = freeze(users, tmp_path / "home-a", rejected_share_max=0.01)
    second = freeze(users, tmp_path / "home-b", rejected_share_max=0.01)
    assert first.snapshot_id == second.snapshot_id
    assert first.users_file.read_bytes() == second.users_file.read_bytes()
    assert Path(first.quarantine_file).read_bytes() == Path(second.quarantine_file).read_bytes()
    # And again into the same home: same id, same directory.
    third = freeze(users, tmp_path / "home-a", rejected_share_max=0.01)
    assert third == first


def test_csv_and_parquet_with_the_same_ids_give_the_same_snapshot(
    tmp_path: Path, home: Path, write_users: WriteUsers
) -> None:
    ids = [7, 3, 99, 12_345_678_901]
    from_csv = freeze(write_users(tmp_path / "u.csv", ids), home)
    from_parquet = freeze(write_users(tmp_path / "u.parquet", ids), home)
    assert from_csv.snapshot_id == from_parquet.snapshot_id


def test_a_different_user_set_gives_a_different_snapshot(tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    a = freeze(write_users(tmp_path / "a.csv", [1, 2, 3]), home)
    b = freeze(write_users(tmp_path / "b.csv", [1, 2, 4]), home)
    assert a.snapshot_id != b.snapshot_id
    assert len(frozen_snapshots(home)) == 2


def test_whitespace_and_text_digits_are_accepted(tmp_path: Path, home: Path) -> None:
    path = tmp_path / "users.csv"
    path.write_text("user_id\n 42 \n+7\n007\n", encoding="utf-8")
    report = freeze(path, home)
    assert pl.read_parquet(report.users_file)["user_id"].to_list() == [7, 42]
    assert report.duplicate_rows == 1  # 007 and +7 are the same user


def test_parquet_text_and_whole_float_columns_are_accepted(tmp_path: Path, home: Path) -> None:
    text = tmp_path / "text.parquet"
    pl.DataFrame({"user_id": ["5", " 6", "abc"]}).write_parquet(text)
    report = freeze(text, home, rejected_share_max=0.5)
    assert pl.read_parquet(report.users_file)["user_id"].to_list() == [5, 6]
    assert report.not_integer_rows == 1

    floats = tmp_path / "floats.parquet"
    pl.DataFrame({"user_id": [5.0, 6.0, 6.5]}).write_parquet(floats)
    report = freeze(floats, home, rejected_share_max=0.5)
    assert pl.read_parquet(report.users_file)["user_id"].to_list() == [5, 6]
    assert quarantine_rows(Path(report.quarantine_file)) == [(3, "6.5", "not_integer")]


def test_parquet_column_of_another_type_is_refused(tmp_path: Path, home: Path) -> None:
    path = tmp_path / "bools.parquet"
    pl.DataFrame({"user_id": [True, False]}).write_parquet(path)
    with pytest.raises(SnapshotError, match=r"column 'user_id' has type bool; expected integers"):
        freeze(path, home)


# --------------------------------------------------------------------------- bad rows


@pytest.mark.parametrize("fmt", FORMATS)
def test_null_rows_are_quarantined(fmt: str, tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / f"users.{fmt}", [1, None, 2, None])
    report = freeze(users, home, rejected_share_max=0.5)
    assert report.null_rows == 2
    assert report.eligible_users == 2
    assert report.rejected_share == 0.5
    assert quarantine_rows(Path(report.quarantine_file)) == [(2, None, "null"), (4, None, "null")]
    with pytest.raises(SnapshotError, match=r"2 of 4 rows rejected \(50\.0000%\).*null 2"):
        freeze(users, home)


def test_non_integers_are_quarantined_with_their_text(tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / "users.csv", [1, "abc", "12.5", 2, "1e3"])
    report = freeze(users, home, rejected_share_max=1.0)
    assert report.not_integer_rows == 3
    assert quarantine_rows(Path(report.quarantine_file)) == [
        (2, "abc", "not_integer"),
        (3, "12.5", "not_integer"),
        (5, "1e3", "not_integer"),
    ]
    with pytest.raises(SnapshotError) as caught:
        freeze(users, home)
    message = str(caught.value)
    assert "not an integer 3" in message
    assert "row 2 not_integer ('abc')" in message
    assert "row 3 not_integer ('12.5')" in message


def test_ids_out_of_range_are_quarantined(tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    too_big = str(INT64_MAX + 1)  # '9223372036854775808'
    users = write_users(tmp_path / "users.csv", [0, -7, too_big, INT64_MAX, 1, "-9223372036854775808"])
    report = freeze(users, home, rejected_share_max=1.0)
    assert report.out_of_range_rows == 4
    assert report.not_integer_rows == 0
    assert pl.read_parquet(report.users_file)["user_id"].to_list() == [1, INT64_MAX]
    assert quarantine_rows(Path(report.quarantine_file)) == [
        (1, "0", "out_of_range"),
        (2, "-7", "out_of_range"),
        (3, "9223372036854775808", "out_of_range"),
        (6, "-9223372036854775808", "out_of_range"),
    ]
    with pytest.raises(SnapshotError, match=r"out of range 4.*row 3 out_of_range \('9223372036854775808'\)"):
        freeze(users, home)


def test_parquet_ids_out_of_range(tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / "users.parquet", [0, -1, 5])
    report = freeze(users, home, rejected_share_max=1.0)
    assert report.out_of_range_rows == 2
    assert pl.read_parquet(report.users_file)["user_id"].to_list() == [5]


@pytest.mark.parametrize("fmt", FORMATS)
def test_duplicates_are_removed_counted_and_not_held_against_the_share(
    fmt: str, tmp_path: Path, home: Path, write_users: WriteUsers
) -> None:
    # Half the rows are duplicates: far above 0.01 %, yet not a rejection.
    users = write_users(tmp_path / f"users.{fmt}", [5, 3, 5, 3, 9, 5])
    report = freeze(users, home)
    assert report.duplicate_rows == 3
    assert report.eligible_users == 3
    assert report.rejected_share == 0.0
    assert pl.read_parquet(report.users_file)["user_id"].to_list() == [3, 5, 9]
    # The first occurrence is kept; later ones are quarantined as 'duplicate'.
    assert quarantine_rows(Path(report.quarantine_file)) == [
        (3, "5", "duplicate"),
        (4, "3", "duplicate"),
        (6, "5", "duplicate"),
    ]


# --------------------------------------------------------------------------- bad files


@pytest.mark.parametrize("fmt", FORMATS)
def test_misnamed_column_suggests_the_rename(fmt: str, tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / f"users.{fmt}", [1, 2], column="userid")
    with pytest.raises(SnapshotError) as caught:
        freeze(users, home)
    message = str(caught.value)
    assert "no 'user_id' column" in message
    assert "found ['userid']" in message
    assert "Did you mean 'userid'? Rename it to 'user_id'." in message
    assert str(users) in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_missing_column_lists_what_was_found(fmt: str, tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / f"users.{fmt}", [1, 2], column="email")
    with pytest.raises(SnapshotError) as caught:
        freeze(users, home)
    message = str(caught.value)
    assert "no 'user_id' column; found ['email']" in message
    assert "Did you mean" not in message


@pytest.mark.parametrize("fmt", FORMATS)
def test_file_with_no_rows_is_refused(fmt: str, tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / f"users.{fmt}", [])
    with pytest.raises(SnapshotError, match="the file has no data rows; expected a 'user_id' column"):
        freeze(users, home)
    assert frozen_snapshots(home) == []


def test_zero_byte_csv_is_refused(tmp_path: Path, home: Path) -> None:
    users = tmp_path / "users.csv"
    users.write_bytes(b"")
    with pytest.raises(SnapshotError, match="not a readable CSV file"):
        freeze(users, home)


def test_file_of_only_bad_rows_is_refused(tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / "users.csv", ["x"])
    with pytest.raises(SnapshotError, match="no eligible user ids remain"):
        freeze(users, home, rejected_share_max=1.0)
    assert frozen_snapshots(home) == []


@pytest.mark.parametrize("keep", [0.5, 0.9, 0.05])
def test_truncated_parquet_is_refused(keep: float, tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    good = write_users(tmp_path / "good.parquet", list(range(1, 5000)))
    data = good.read_bytes()
    truncated = tmp_path / "users.parquet"
    truncated.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(SnapshotError) as caught:
        freeze(truncated, home)
    message = str(caught.value)
    assert str(truncated) in message
    assert "not a readable Parquet file" in message
    assert "truncated" in message
    assert frozen_snapshots(home) == []


def test_missing_file_and_unknown_type(tmp_path: Path, home: Path) -> None:
    with pytest.raises(SnapshotError, match="file not found"):
        freeze(tmp_path / "absent.csv", home)
    odd = tmp_path / "users.json"
    odd.write_text('[{"user_id": 1}]', encoding="utf-8")
    with pytest.raises(SnapshotError, match="unknown file type; use a .parquet or .csv file"):
        freeze(odd, home)


# --------------------------------------------------------------------------- the rejected share


def test_rejected_share_default_is_one_in_ten_thousand() -> None:
    assert REJECTED_SHARE_MAX_DEFAULT == 0.0001


def test_exactly_the_allowed_share_passes(tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / "users.csv", list(range(1, 10_000)) + ["bad"])  # 1 of 10,000 rows
    report = freeze(users, home)
    assert report.rejected_share == 0.0001
    assert report.eligible_users == 9_999


@pytest.mark.parametrize("fmt", FORMATS)
def test_exceeding_the_share_writes_the_quarantine_and_freezes_nothing(
    fmt: str, tmp_path: Path, home: Path, write_users: WriteUsers
) -> None:
    values: list[int | str | None] = list(range(1, 9_998)) + [None, 0, -5]  # 3 of 10,000 rows
    if fmt == "csv":
        values[100] = "abc"
    users = write_users(tmp_path / f"users.{fmt}", values)
    with pytest.raises(SnapshotError) as caught:
        freeze(users, home)
    message = str(caught.value)
    quarantine = snapshot_root(home, CAMPAIGN) / "rejected" / f"users.{fmt}.quarantine.parquet"
    assert str(quarantine) in message
    assert "more than the allowed 0.0100%" in message
    assert "Nothing was granted" in message
    assert "ENTITLE_REJECTED_SHARE_MAX" in message

    assert quarantine.exists()
    assert pq.read_schema(quarantine).equals(schemas.arrow_schema("quarantine"))
    frame = pl.read_parquet(quarantine)
    assert set(frame["source_file"].to_list()) == {str(users)}
    expected_reasons = {"null": 1, "out_of_range": 2} | ({"not_integer": 1} if fmt == "csv" else {})
    assert dict(frame.group_by("reason").len().iter_rows()) == expected_reasons
    assert frame["row_number"].to_list() == sorted(frame["row_number"].to_list())

    assert frozen_snapshots(home) == [], "no snapshot may be frozen from a refused file"


def test_raising_the_share_lets_the_same_file_through(tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / "users.csv", list(range(1, 98)) + ["x", "y", "z"])  # 3 %
    with pytest.raises(SnapshotError):
        freeze(users, home)
    report = freeze(users, home, rejected_share_max=0.03)
    assert report.eligible_users == 97
    assert len(frozen_snapshots(home)) == 1


def test_dry_run_writes_nothing_even_when_refusing(tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    good = write_users(tmp_path / "good.csv", [1, 2, 3])
    report = freeze(good, home, dry_run=True)
    assert report.eligible_users == 3
    bad = write_users(tmp_path / "bad.csv", [1, "x"])
    with pytest.raises(SnapshotError, match=r"dry run: not written"):
        freeze(bad, home, dry_run=True)
    assert not home.exists()


# --------------------------------------------------------------------------- exclusions


@pytest.mark.parametrize("fmt", FORMATS)
def test_exclusions_remove_users_and_are_counted(fmt: str, tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / "users.csv", list(range(1, 11)))
    # 999 is not in the user file: it excludes nobody; 3 is listed twice.
    exclusions = write_users(tmp_path / f"blocked.{fmt}", [3, 7, 999, 3])
    report = freeze(users, home, exclusion_file=exclusions)
    assert report.excluded_users == 2
    assert report.eligible_users == 8
    assert report.exclusion_file == str(exclusions)
    assert pl.read_parquet(report.users_file)["user_id"].to_list() == [1, 2, 4, 5, 6, 8, 9, 10]
    without = freeze(users, home)
    assert without.snapshot_id != report.snapshot_id


@pytest.mark.parametrize("bad_value", ["abc", None, 0, "-4"])
def test_a_bad_exclusion_row_is_an_error(
    bad_value: int | str | None, tmp_path: Path, home: Path, write_users: WriteUsers
) -> None:
    users = write_users(tmp_path / "users.csv", [1, 2, 3])
    exclusions = write_users(tmp_path / "blocked.csv", [2, bad_value])
    with pytest.raises(SnapshotError) as caught:
        freeze(users, home, exclusion_file=exclusions)
    message = str(caught.value)
    assert str(exclusions) in message
    assert "1 exclusion rows are not valid user ids" in message
    assert "row 2" in message
    assert frozen_snapshots(home) == []


def test_exclusion_file_without_user_id_column_is_an_error(tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / "users.csv", [1, 2, 3])
    exclusions = write_users(tmp_path / "blocked.csv", [2], column="uid")
    with pytest.raises(SnapshotError, match="Did you mean 'uid'"):
        freeze(users, home, exclusion_file=exclusions)


def test_snapshot_metadata_is_json_with_every_count(tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    users = write_users(tmp_path / "users.csv", [1, 1, 2, "x", None, 0])
    report = freeze(users, home, rejected_share_max=1.0)
    values = json.loads((Path(report.directory) / "snapshot.json").read_text(encoding="utf-8"))
    assert values["rows_read"] == 6
    assert values["eligible_users"] == 2
    assert values["duplicate_rows"] == 1
    assert values["null_rows"] == 1
    assert values["not_integer_rows"] == 1
    assert values["out_of_range_rows"] == 1
    assert values["snapshot_id"] == report.snapshot_id


def test_quarantined_duplicates_keep_the_cell_as_read(tmp_path: Path, home: Path) -> None:
    # schemas/quarantine.json: raw_value is "the user id cell as read".
    path = tmp_path / "users.csv"
    path.write_text("user_id\n7\n007\n 7 \n", encoding="utf-8")
    report = freeze(path, home)
    assert report.duplicate_rows == 2
    assert quarantine_rows(Path(report.quarantine_file)) == [(2, "007", "duplicate"), (3, " 7 ", "duplicate")]


# --------------------------------------------------------------------------- another id column


@pytest.mark.parametrize("fmt", FORMATS)
def test_a_merchant_list_is_read_from_its_id_column(tmp_path: Path, home: Path, fmt: str) -> None:
    path = tmp_path / f"merchants.{fmt}"
    frame = pl.DataFrame({"merchant_id": ["30", "10", "20", "10", "x"], "name": ["c", "a", "b", "a", "?"]})
    if fmt == "csv":
        frame.write_csv(path)
    else:
        frame.write_parquet(path)
    report = freeze(path, home, id_column="merchant_id", rejected_share_max=0.5)
    assert report.eligible_users == 3
    assert pl.read_parquet(report.users_file)["user_id"].to_list() == [10, 20, 30], "the subject id is user_id inside"
    assert [(r, reason) for r, _raw, reason in quarantine_rows(Path(report.quarantine_file))] == [
        (4, "duplicate"),
        (5, "not_integer"),
    ]


def test_a_user_file_given_to_a_merchant_campaign_names_the_column_it_needs(tmp_path: Path, home: Path) -> None:
    path = tmp_path / "users.csv"
    pl.DataFrame({"user_id": [1, 2]}).write_csv(path)
    with pytest.raises(SnapshotError, match=r"no 'merchant_id' column; found \['user_id'\]"):
        freeze(path, home, id_column="merchant_id")


# --------------------------------------------------------------------------- scratch folders


def test_a_failure_midway_leaves_no_snapshot_and_no_scratch(
    tmp_path: Path, home: Path, write_users: WriteUsers, monkeypatch: pytest.MonkeyPatch
) -> None:
    from pipeline.grants import freezing

    users = write_users(tmp_path / "users.parquet", list(range(1, 5000)))

    def crash(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(freezing, "_write_quarantine", crash)
    with pytest.raises(OSError, match="disk full"):
        freeze(users, home)
    root = snapshot_root(home, CAMPAIGN)
    assert frozen_snapshots(home) == []
    assert [p.name for p in root.iterdir()] == []  # the scratch folder went with the failure


def test_scratch_of_a_killed_freeze_is_removed_by_the_next(tmp_path: Path, home: Path, write_users: WriteUsers) -> None:
    import os
    import socket
    import subprocess
    import sys

    users = write_users(tmp_path / "users.parquet", list(range(1, 5000)))
    root = snapshot_root(home, CAMPAIGN)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(finished.stdout)
    abandoned = root / f".freeze-{socket.gethostname()}-{dead_pid}-x1"
    (abandoned / "groups").mkdir(parents=True)
    (abandoned / "groups" / "spill.arrow").write_bytes(b"x" * 1000)
    running = root / f".freeze-{socket.gethostname()}-{os.getpid()}-x2"  # a live process's folder stays
    running.mkdir()
    report = freeze(users, home)
    assert not abandoned.exists()
    assert running.exists()
    assert report.eligible_users == 4999


def test_a_full_disk_while_spilling_says_where_room_is_needed(
    tmp_path: Path, home: Path, write_users: WriteUsers, monkeypatch: pytest.MonkeyPatch
) -> None:
    import errno

    from pipeline.errors import StorageError
    from pipeline.grants import freezing

    users = write_users(tmp_path / "users.parquet", list(range(1, 100)))

    def full(*args: object, **kwargs: object) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(freezing, "_split", full)
    with pytest.raises(StorageError, match="no space left for the scratch files.*free space there") as caught:
        freeze(users, home)
    assert caught.value.exit_code == 2
    assert frozen_snapshots(home) == []
