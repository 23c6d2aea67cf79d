"""Split a frozen snapshot into N Parquet partitions by a stable function of user_id.

The partition function is plain integer arithmetic, so it is the same on every
machine and every Polars version (unlike ``Expr.hash``)::

    user_bucket  = (user_id mod 2147483647) * 1540483477 mod 2147483647
    partition_id = user_bucket * N div 2147483647

2147483647 (2^31 - 1) is prime and 1540483477 is below it, so the bucket is a
well-mixed value in 0 .. 2^31 - 2; no intermediate exceeds 2^62, so int64
arithmetic (Polars, SQLite, PostgreSQL) computes it exactly.  Because the
partition is monotone in the bucket, every partition is one contiguous range of
buckets, which is also the ledger's key order: a partition's grants form one
contiguous run of the ledger's primary key, for any N.

Partitions and their manifest live under the snapshot's folder, which is a
local path or an object-store prefix (:mod:`pipeline.storage`); the manifest is
written last, so a partial set is never taken for a complete one.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline import schemas, storage
from pipeline.errors import ConfigError, EntitleError, PartitionError, invariant
from pipeline.grants.spill import numbered_folders, read_group, spill_by_group
from pipeline.storage import Location

BUCKET_MODULUS = 2_147_483_647
BUCKET_MULTIPLIER = 1_540_483_477
PARTITION_COUNT_MAX = 1024  # one Airflow mapped task each; Airflow's max_map_length is 1024
# Without ENTITLE_PARTITIONS the count follows the snapshot: about this many users a partition
# (one Airflow task instance each, so a small file is a few task instances, not hundreds).
PARTITION_USERS_TARGET_DEFAULT = 1_000_000
PARTITION_USERS_TARGET_MIN = 1_000
MANIFEST_NAME = "manifest.parquet"
# Freezing and partitioning hold at most about this many users in memory at once (a group of
# partitions, an id range), whatever the snapshot's size: at its peak about 30 bytes a user.
ROWS_IN_MEMORY_DEFAULT = 8_000_000
WRITER_THREADS = max(2, min(8, os.cpu_count() or 2))


@dataclass(frozen=True)
class PartitionEntry:
    """One manifest row: a partition file and what it must contain."""

    partition_id: int
    partition_count: int
    path: Location  # a local Path, or an s3:// ObjectUri
    rows: int
    bucket_lo: int
    bucket_hi: int
    content_sha256: str

    @property
    def label(self) -> str:
        """The partition's display name, e.g. ``part-0042``."""
        return partition_label(self.partition_id)


def partition_label(partition_id: int) -> str:
    """The display name of a partition id, e.g. ``part-0042``."""
    return f"part-{partition_id:04d}"


def user_bucket(user_id: int) -> int:
    """The ledger bucket of one user id (see the module docstring)."""
    return (user_id % BUCKET_MODULUS) * BUCKET_MULTIPLIER % BUCKET_MODULUS


def partition_of(user_id: int, partition_count: int) -> int:
    """The partition of one user id for ``partition_count`` partitions."""
    return user_bucket(user_id) * partition_count // BUCKET_MODULUS


def user_bucket_expr(column: str = "user_id") -> pl.Expr:
    """Polars expression computing :func:`user_bucket` on an int64 column."""
    return (pl.col(column) % BUCKET_MODULUS) * BUCKET_MULTIPLIER % BUCKET_MODULUS


def bucket_range(partition_id: int, partition_count: int) -> tuple[int, int]:
    """The inclusive bucket range ``(lo, hi)`` that makes up one partition."""
    check_partition_count(partition_count)
    invariant(0 <= partition_id < partition_count, f"partition {partition_id} outside 0..{partition_count - 1}")
    lo = -(-partition_id * BUCKET_MODULUS // partition_count)
    hi = -(-(partition_id + 1) * BUCKET_MODULUS // partition_count) - 1
    return lo, hi


def split_bucket_range(lo: int, hi: int, count: int) -> list[tuple[int, int]]:
    """The inclusive bucket range ``lo..hi`` cut into ``count`` adjacent ranges of equal width (at least one,
    at most one per bucket); buckets are uniform, so each holds about as many users."""
    count = max(1, min(count, hi - lo + 1))
    edges = [lo + (hi - lo + 1) * i // count for i in range(count + 1)]
    return [(edges[i], edges[i + 1] - 1) for i in range(count)]


def check_partition_count(partition_count: int) -> None:
    """Refuse partition counts outside 1..PARTITION_COUNT_MAX."""
    if not 1 <= partition_count <= PARTITION_COUNT_MAX:
        raise ConfigError(
            f"partition count {partition_count} must be between 1 and {PARTITION_COUNT_MAX} "
            "(one Airflow mapped task per partition; Airflow's max_map_length is 1024)"
        )


def partition_count_for(eligible_users: int, users_target: int) -> int:
    """How many partitions a snapshot of ``eligible_users`` gets at ``users_target`` users each (1..1024)."""
    invariant(users_target > 0, f"users per partition must be positive, not {users_target}")
    wanted = -(-eligible_users // users_target)  # ceiling division
    return max(1, min(PARTITION_COUNT_MAX, wanted))


def partitions_dir(snapshot_dir: Location, partition_count: int) -> Location:
    """Where the partitions of one snapshot for one N live."""
    return snapshot_dir / f"partitions-{partition_count:04d}"


def partition_snapshot(
    users_file: Location,
    out_dir: Location,
    partition_count: int,
    on_partition_written: Callable[[int], None] | None = None,
    rows_in_memory: int = ROWS_IN_MEMORY_DEFAULT,
) -> list[PartitionEntry]:
    """Write the snapshot's partitions and manifest under ``out_dir``; reuse a complete set.

    Consecutive partitions are taken in groups of at most ``rows_in_memory`` users: one
    streaming pass spills the snapshot's ids to a local scratch file per group, then each
    group alone is sorted and cut into its partitions.
    """
    check_partition_count(partition_count)
    existing = _reusable_manifest(out_dir, partition_count)
    if existing is not None:
        if on_partition_written is not None:
            on_partition_written(partition_count)
        return existing
    entries: list[PartitionEntry] = []
    with storage.scratch_folder(out_dir if isinstance(out_dir, Path) else None, "partition") as scratch:
        for partition_ids, ordered in _groups(users_file, scratch, partition_count, rows_in_memory):
            entries += _write_group(ordered, partition_ids, out_dir, partition_count, on_partition_written)
    rows = [
        {
            "partition_id": e.partition_id,
            "partition_count": partition_count,
            "file_name": e.path.name,
            "rows": e.rows,
            "bucket_lo": e.bucket_lo,
            "bucket_hi": e.bucket_hi,
            "content_sha256": e.content_sha256,
        }
        for e in entries
    ]
    invariant(len(entries) == partition_count, "every partition must be written once")
    manifest = pl.DataFrame(rows).with_columns(
        pl.col("partition_id").cast(pl.Int32), pl.col("partition_count").cast(pl.Int32)
    )
    # The manifest is written last: its presence means every partition file is complete.
    schemas.write_parquet(manifest, "manifest", out_dir / MANIFEST_NAME)
    return entries


def _groups(
    users_file: Location, scratch: Path, partition_count: int, rows_in_memory: int
) -> Iterator[tuple[range, pl.DataFrame]]:
    """(partition ids, their users in (user_bucket, user_id) order) for each group of partitions."""
    local = storage.local_file(users_file, scratch)
    try:
        metadata = pq.read_metadata(local)
    except (OSError, pa.ArrowInvalid) as exc:
        raise PartitionError(f"{users_file}: not a readable Parquet file ({exc})") from exc
    schemas.check_schema(metadata.schema.to_arrow_schema(), "snapshot", str(users_file))
    per_group = max(1, min(partition_count, rows_in_memory * partition_count // max(metadata.num_rows, 1)))
    groups = -(-partition_count // per_group)
    snapshot = pl.scan_parquet(local).select("user_id")
    if groups > 1:  # the ids only (the bucket is computed again): half the spill to write and read
        group = user_bucket_expr() * partition_count // BUCKET_MODULUS // per_group
        spill_by_group(snapshot.with_columns(group.alias("group")), scratch / "groups")
    spilled = numbered_folders(scratch / "groups")
    for number in range(groups):
        if groups == 1:
            users = snapshot.collect()
        else:
            users = read_group(spilled[number]) if number in spilled else snapshot.clear().collect()
        ordered = _bucket_order(users.select(user_bucket_expr().alias("user_bucket"), "user_id"))
        del users
        invariant(_in_key_order(ordered), f"{users_file}: the snapshot's ids are not in ascending order")
        yield range(number * per_group, min(partition_count, (number + 1) * per_group)), ordered


def _bucket_order(users: pl.DataFrame) -> pl.DataFrame:
    """``users`` (in user_id order, as the snapshot and the sinks keep it) in (user_bucket, user_id) order.

    One int64 key per user, bucket * 2^32 + position, sorted as a plain column (faster than a
    stable sort of the frame); the position then fetches the user id.
    """
    keys = users.select(
        (pl.col("user_bucket") * 2**32 + pl.int_range(pl.len(), dtype=pl.Int64)).alias("key")
    ).to_series()
    keys = keys.sort()
    return pl.DataFrame(
        {
            "user_bucket": keys // 2**32,
            "user_id": users["user_id"].gather((keys % 2**32).cast(pl.UInt32)),
        }
    )


def _in_key_order(ordered: pl.DataFrame) -> bool:
    """Whether ``ordered`` is strictly ascending in (user_bucket, user_id)."""
    if ordered.height < 2:
        return True
    step = ordered.select(
        (pl.col("user_bucket").diff() > 0) | ((pl.col("user_bucket").diff() == 0) & (pl.col("user_id").diff() > 0))
    ).to_series()
    return bool(step.slice(1).all())


def _write_group(
    ordered: pl.DataFrame,
    partition_ids: range,
    out_dir: Location,
    partition_count: int,
    on_partition_written: Callable[[int], None] | None,
) -> list[PartitionEntry]:
    buckets = ordered["user_bucket"]

    def write_one(partition_id: int) -> PartitionEntry:
        lo, hi = bucket_range(partition_id, partition_count)
        start = int(buckets.search_sorted(lo, side="left"))
        stop = int(buckets.search_sorted(hi, side="right"))
        part = ordered.slice(start, stop - start)
        path = out_dir / f"{partition_label(partition_id)}.parquet"
        schemas.write_parquet(part, "partition", path)
        return PartitionEntry(
            partition_id, partition_count, path, part.height, lo, hi, schemas.int64_sha256(part["user_id"])
        )

    # Compression and hashing release the GIL, so writer threads use every core.
    entries: list[PartitionEntry] = []
    with ThreadPoolExecutor(max_workers=WRITER_THREADS) as pool:
        for entry in pool.map(write_one, partition_ids):
            entries.append(entry)
            if on_partition_written is not None:
                on_partition_written(1)
    invariant(sum(e.rows for e in entries) == ordered.height, "partitions must cover the snapshot exactly")
    return entries


def load_manifest(out_dir: Location) -> list[PartitionEntry]:
    """The manifest's entries, in partition order; :class:`PartitionError` if absent."""
    path = out_dir / MANIFEST_NAME
    if not storage.exists(path):
        raise PartitionError(f"{path}: no manifest; the partitions were never written, or were deleted")
    manifest = schemas.read_parquet(path, "manifest").sort("partition_id")
    return [
        PartitionEntry(
            partition_id=row["partition_id"],
            partition_count=row["partition_count"],
            path=out_dir / row["file_name"],
            rows=row["rows"],
            bucket_lo=row["bucket_lo"],
            bucket_hi=row["bucket_hi"],
            content_sha256=row["content_sha256"],
        )
        for row in manifest.iter_rows(named=True)
    ]


def read_partition(entry: PartitionEntry) -> pl.DataFrame:
    """Read one partition and check it against its manifest row and bucket range."""
    frame = schemas.read_parquet(entry.path, "partition")
    if frame.height != entry.rows:
        raise PartitionError(
            f"{entry.path}: {frame.height:,} rows, the manifest says {entry.rows:,}; "
            f"the file changed after partitioning. {_rewrite_advice(entry)}"
        )
    digest = schemas.int64_sha256(frame["user_id"])
    if digest != entry.content_sha256:
        raise PartitionError(
            f"{entry.path}: content hash {digest[:12]}… differs from the manifest's "
            f"{entry.content_sha256[:12]}…; the file changed after partitioning. {_rewrite_advice(entry)}"
        )
    if frame.height:
        recomputed = frame.select(user_bucket_expr().alias("b"))["b"]
        if not recomputed.equals(frame["user_bucket"], check_names=False):
            raise PartitionError(f"{entry.path}: user_bucket does not match user_id; the file is corrupt")
        low, high = int(frame["user_bucket"].min()), int(frame["user_bucket"].max())  # type: ignore[arg-type]
        if not (entry.bucket_lo <= low and high <= entry.bucket_hi):
            raise PartitionError(f"{entry.path}: buckets {low}..{high} outside {entry.bucket_lo}..{entry.bucket_hi}")
    return frame


def _rewrite_advice(entry: PartitionEntry) -> str:
    # A changed file is not rewritten while its manifest stands (partition_snapshot reuses a
    # complete set), so the folder goes first; `entitle run` over the same user file writes it again.
    return (
        f"Delete the folder {entry.path.parent}, then write it again: `entitle run --users FILE` with the user "
        "file the snapshot was frozen from (grants already in the ledger are skipped)."
    )


def _reusable_manifest(out_dir: Location, partition_count: int) -> list[PartitionEntry] | None:
    names = storage.file_names(out_dir)  # one listing, not a request per partition on an object store
    if MANIFEST_NAME not in names:
        return None
    try:
        entries = load_manifest(out_dir)
    except EntitleError:  # a manifest that cannot be read is written again, with every partition
        return None
    if len(entries) != partition_count or not all(e.path.name in names for e in entries):
        return None
    return entries
