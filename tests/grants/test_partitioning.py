"""pipeline.grants.partitioning: the stable partition function, bucket ranges, reproducible files, manifests."""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

import polars as pl
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline import schemas
from pipeline.config import load_settings
from pipeline.errors import ConfigError, PartitionError
from pipeline.grants.partitioning import (
    BUCKET_MODULUS,
    MANIFEST_NAME,
    PARTITION_COUNT_MAX,
    PartitionEntry,
    bucket_range,
    check_partition_count,
    load_manifest,
    partition_of,
    partition_snapshot,
    read_partition,
    user_bucket,
    user_bucket_expr,
)

M = 2_147_483_647
K = 1_540_483_477
INT64_MAX = 2**63 - 1
PARTITION_COUNTS = (1, 7, 256, 1024)

# Golden values, computed by hand from the documented formula
#   bucket = (uid % 2147483647) * 1540483477 % 2147483647,  partition = bucket * N // 2147483647
# and hard-coded: if these change, every existing ledger's keys and partitions change with them.
# (user_id, bucket, partition for N=256, partition for N=1024)
GOLDEN = [
    (1, 1540483477, 183, 734),
    (2, 933483307, 111, 445),
    (1_000, 737702101, 87, 351),
    (10_000_000, 414682555, 49, 197),
    (10_000_001, 1955166032, 233, 932),
    (2_147_483_646, 607000170, 72, 289),
    (2_147_483_647, 0, 0, 0),
    (2_147_483_648, 1540483477, 183, 734),
    (3_000_000_001, 1391198451, 165, 663),
    (9_223_372_036_854_775_807, 1540483477, 183, 734),
]


def uid_with_bucket(bucket: int) -> int:
    """A positive user id whose bucket is ``bucket`` (the multiplier is invertible mod the prime)."""
    if bucket == 0:
        return M
    return bucket * pow(K, -1, M) % M


# --------------------------------------------------------------------------- the function


@pytest.mark.parametrize(("user_id", "bucket", "part_256", "part_1024"), GOLDEN)
def test_golden_buckets_and_partitions(user_id: int, bucket: int, part_256: int, part_1024: int) -> None:
    assert user_bucket(user_id) == bucket
    assert partition_of(user_id, 256) == part_256
    assert partition_of(user_id, 1024) == part_1024
    assert partition_of(user_id, 1) == 0


def test_golden_values_in_polars_and_sqlite() -> None:
    ids = [g[0] for g in GOLDEN]
    expected = [g[1] for g in GOLDEN]
    frame = pl.DataFrame({"user_id": ids}, schema={"user_id": pl.Int64})
    assert frame.select(user_bucket_expr())["user_id"].to_list() == expected
    # The ledger's CHECK constraint computes the same expression in SQL.
    with sqlite3.connect(":memory:") as connection:
        got = [connection.execute(f"SELECT ({u} % {M}) * {K} % {M}").fetchone()[0] for u in ids]
    assert got == expected


def test_uid_with_bucket_helper_inverts_the_bucket() -> None:
    for bucket in (0, 1, 2, 12345, M - 1):
        assert user_bucket(uid_with_bucket(bucket)) == bucket


@settings(max_examples=30, deadline=None)
@given(st.lists(st.integers(min_value=1, max_value=INT64_MAX), min_size=1, max_size=3000))
def test_polars_expression_agrees_with_python(user_ids: list[int]) -> None:
    frame = pl.DataFrame({"user_id": user_ids}, schema={"user_id": pl.Int64})
    buckets = frame.select(user_bucket_expr().alias("b"))["b"].to_list()
    assert buckets == [user_bucket(u) for u in user_ids]
    assert all(0 <= b < M for b in buckets)


def test_polars_expression_agrees_on_dense_and_edge_ids() -> None:
    edges = [1, 2, M - 1, M, M + 1, 2 * M, 2**31, 2**32, 2**62, INT64_MAX - 1, INT64_MAX]
    dense = list(range(10_000_000, 10_005_000))
    user_ids = edges + dense
    frame = pl.DataFrame({"uid": user_ids}, schema={"uid": pl.Int64})
    assert frame.select(user_bucket_expr("uid"))["uid"].to_list() == [user_bucket(u) for u in user_ids]


# --------------------------------------------------------------------------- bucket ranges


@pytest.mark.parametrize("partition_count", PARTITION_COUNTS)
def test_bucket_ranges_are_contiguous_disjoint_and_cover_every_bucket(partition_count: int) -> None:
    ranges = [bucket_range(p, partition_count) for p in range(partition_count)]
    assert ranges[0][0] == 0
    assert ranges[-1][1] == BUCKET_MODULUS - 1 == 2_147_483_646
    for (lo, hi), (next_lo, _) in zip(ranges, ranges[1:], strict=False):
        assert lo <= hi, "no partition is empty of buckets"
        assert next_lo == hi + 1, "contiguous and disjoint"
    assert sum(hi - lo + 1 for lo, hi in ranges) == BUCKET_MODULUS
    sizes = {hi - lo + 1 for lo, hi in ranges}
    assert max(sizes) - min(sizes) <= 1, "ranges are as even as integers allow"


@pytest.mark.parametrize("partition_count", PARTITION_COUNTS)
def test_range_edges_map_to_their_partition(partition_count: int) -> None:
    for p in range(partition_count):
        lo, hi = bucket_range(p, partition_count)
        assert partition_of(uid_with_bucket(lo), partition_count) == p
        assert partition_of(uid_with_bucket(hi), partition_count) == p
        if lo > 0:
            assert partition_of(uid_with_bucket(lo - 1), partition_count) == p - 1
        if hi < M - 1:
            assert partition_of(uid_with_bucket(hi + 1), partition_count) == p + 1


@settings(max_examples=200, deadline=None)
@given(
    user_id=st.integers(min_value=1, max_value=INT64_MAX),
    partition_count=st.integers(min_value=1, max_value=PARTITION_COUNT_MAX),
    other=st.integers(min_value=0, max_value=PARTITION_COUNT_MAX - 1),
)
def test_partition_of_is_the_range_that_holds_the_bucket(user_id: int, partition_count: int, other: int) -> None:
    bucket = user_bucket(user_id)
    p = partition_of(user_id, partition_count)
    assert 0 <= p < partition_count
    lo, hi = bucket_range(p, partition_count)
    assert lo <= bucket <= hi
    q = other % partition_count
    q_lo, q_hi = bucket_range(q, partition_count)
    assert (q_lo <= bucket <= q_hi) == (q == p)


@pytest.mark.parametrize("partition_count", [0, -1, PARTITION_COUNT_MAX + 1, 100_000])
def test_partition_count_outside_limits_is_a_config_error(partition_count: int, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=rf"partition count {partition_count} must be between 1 and 1024"):
        check_partition_count(partition_count)
    with pytest.raises(ConfigError, match="between 1 and 1024"):
        load_settings({"ENTITLE_HOME": str(tmp_path), "ENTITLE_PARTITIONS": str(partition_count)})
    with pytest.raises(ConfigError):
        partition_snapshot(tmp_path / "unused.parquet", tmp_path / "out", partition_count)
    assert not (tmp_path / "out").exists()


def test_partition_count_limits_themselves_are_accepted(tmp_path: Path) -> None:
    for count in (1, PARTITION_COUNT_MAX):
        check_partition_count(count)
        assert load_settings({"ENTITLE_HOME": str(tmp_path), "ENTITLE_PARTITIONS": str(count)}).partition_count == count
    with pytest.raises(ConfigError, match="ENTITLE_PARTITIONS='many' is not a whole number"):
        load_settings({"ENTITLE_HOME": str(tmp_path), "ENTITLE_PARTITIONS": "many"})


# --------------------------------------------------------------------------- partition files


def write_snapshot_file(path: Path, user_ids: list[int]) -> Path:
    """A snapshot file as freezing writes it: distinct ids, ascending, schema 'snapshot'."""
    frame = pl.DataFrame({"user_id": sorted(set(user_ids))}, schema={"user_id": pl.Int64})
    schemas.write_parquet(frame, "snapshot", path)
    return path


@pytest.fixture
def snapshot_file(tmp_path: Path) -> Path:
    import random

    rng = random.Random(7)
    ids = [10_000_000 + i for i in range(3_000)] + [rng.randrange(1, INT64_MAX) for _ in range(1_000)] + [M, 1]
    return write_snapshot_file(tmp_path / "snap" / "users.parquet", ids)


def test_partitioning_twice_gives_byte_identical_files(snapshot_file: Path, tmp_path: Path) -> None:
    first = partition_snapshot(snapshot_file, tmp_path / "a", 16)
    second = partition_snapshot(snapshot_file, tmp_path / "b", 16)
    names_a = sorted(p.name for p in (tmp_path / "a").iterdir())
    names_b = sorted(p.name for p in (tmp_path / "b").iterdir())
    assert names_a == names_b
    assert names_a == sorted([f"part-{i:04d}.parquet" for i in range(16)] + [MANIFEST_NAME]), "no temporary files left"
    for name in names_a:
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name
    assert [(e.rows, e.content_sha256, e.bucket_lo, e.bucket_hi) for e in first] == [
        (e.rows, e.content_sha256, e.bucket_lo, e.bucket_hi) for e in second
    ]


def test_manifest_counts_and_hashes_match_the_files(snapshot_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    written = partition_snapshot(snapshot_file, out, 7)
    entries = load_manifest(out)
    assert entries == written
    snapshot_ids = pl.read_parquet(snapshot_file)["user_id"]
    assert sum(e.rows for e in entries) == snapshot_ids.len() == 4_002
    assert [e.partition_id for e in entries] == list(range(7))
    assert all(e.partition_count == 7 for e in entries)

    seen: list[int] = []
    for entry in entries:
        assert pq.read_schema(entry.path).equals(schemas.arrow_schema("partition"))
        frame = pl.read_parquet(entry.path)
        assert frame.height == entry.rows
        assert schemas.int64_sha256(frame["user_id"]) == entry.content_sha256
        assert (entry.bucket_lo, entry.bucket_hi) == bucket_range(entry.partition_id, 7)
        assert frame["user_bucket"].to_list() == [user_bucket(u) for u in frame["user_id"].to_list()]
        assert all(partition_of(u, 7) == entry.partition_id for u in frame["user_id"].to_list())
        # Ledger key order: (user_bucket, user_id).
        assert frame.rows() == sorted(frame.rows())
        assert read_partition(entry).equals(frame)
        seen.extend(frame["user_id"].to_list())
    assert sorted(seen) == snapshot_ids.to_list(), "every user in exactly one partition"


def test_manifest_file_follows_its_schema(snapshot_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    partition_snapshot(snapshot_file, out, 4)
    manifest_schema = pq.read_schema(out / MANIFEST_NAME)
    assert manifest_schema.equals(schemas.arrow_schema("manifest"))
    manifest = pl.read_parquet(out / MANIFEST_NAME)
    assert manifest["file_name"].to_list() == [f"part-{i:04d}.parquet" for i in range(4)]
    assert manifest["rows"].sum() == 4_002


def test_empty_partitions_are_written_and_read(tmp_path: Path) -> None:
    users = write_snapshot_file(tmp_path / "users.parquet", [1, 2, 3])
    entries = partition_snapshot(users, tmp_path / "parts", 1024)
    assert len(entries) == 1024
    assert sum(e.rows for e in entries) == 3
    non_empty = {e.partition_id for e in entries if e.rows}
    assert non_empty == {partition_of(u, 1024) for u in (1, 2, 3)}
    empty = next(e for e in entries if e.rows == 0)
    assert read_partition(empty).height == 0


def test_complete_partition_set_is_reused_not_rewritten(snapshot_file: Path, tmp_path: Path) -> None:
    out = tmp_path / "parts"
    first = partition_snapshot(snapshot_file, out, 8)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    again = partition_snapshot(snapshot_file, out, 8)
    assert again == first
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_missing_manifest_is_a_partition_error(tmp_path: Path) -> None:
    with pytest.raises(PartitionError, match="no manifest"):
        load_manifest(tmp_path)


# --------------------------------------------------------------------------- tampering


@pytest.fixture
def partitioned(snapshot_file: Path, tmp_path: Path) -> list[PartitionEntry]:
    return partition_snapshot(snapshot_file, tmp_path / "parts", 4)


def _biggest(entries: list[PartitionEntry]) -> PartitionEntry:
    return max(entries, key=lambda e: e.rows)


def test_read_partition_detects_one_changed_user(partitioned: list[PartitionEntry]) -> None:
    entry = _biggest(partitioned)
    frame = pl.read_parquet(entry.path)
    # Replace one user by another of the same partition, keeping the file self-consistent and sorted.
    victim = frame["user_id"][0]
    replacement = next(
        u
        for u in range(victim + 1, victim + 100_000)
        if partition_of(u, 4) == entry.partition_id and u not in set(frame["user_id"].to_list())
    )
    tampered = (
        frame.with_columns(
            pl.when(pl.col("user_id") == victim).then(replacement).otherwise(pl.col("user_id")).alias("user_id")
        )
        .with_columns(user_bucket_expr().alias("user_bucket"))
        .sort("user_bucket", "user_id")
    )
    assert tampered.height == entry.rows
    schemas.write_parquet(tampered, "partition", entry.path)
    with pytest.raises(PartitionError) as caught:
        read_partition(entry)
    assert str(entry.path) in str(caught.value)
    assert "content hash" in str(caught.value)


def test_read_partition_detects_a_dropped_row(partitioned: list[PartitionEntry]) -> None:
    entry = _biggest(partitioned)
    frame = pl.read_parquet(entry.path)
    schemas.write_parquet(frame.slice(1), "partition", entry.path)
    with pytest.raises(PartitionError, match=rf"{frame.height - 1:,} rows, the manifest says {frame.height:,}"):
        read_partition(entry)


def test_read_partition_detects_a_wrong_bucket(partitioned: list[PartitionEntry]) -> None:
    entry = _biggest(partitioned)
    frame = pl.read_parquet(entry.path)
    bad = frame.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(pl.col("user_bucket") + 1)
        .otherwise(pl.col("user_bucket"))
        .alias("user_bucket")
    )
    schemas.write_parquet(bad, "partition", entry.path)
    with pytest.raises(PartitionError, match="user_bucket does not match user_id"):
        read_partition(entry)


def test_read_partition_detects_garbage_and_missing_files(partitioned: list[PartitionEntry]) -> None:
    entry = _biggest(partitioned)
    entry.path.write_bytes(os.urandom(256))
    with pytest.raises(PartitionError, match="not a readable Parquet file") as caught:
        read_partition(entry)
    assert str(entry.path) in str(caught.value)
    entry.path.unlink()
    with pytest.raises(PartitionError, match="file not found"):
        read_partition(entry)
