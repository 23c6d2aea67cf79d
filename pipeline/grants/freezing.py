"""Freezing a user file in bounded memory: split by bucket, deduplicate per group, merge by id range.

A snapshot is the sorted set of distinct valid ids, hashed in that order; its
quarantine is every unusable or repeated row, in file order.  Neither needs the
whole file in memory at once:

1. **Split.**  One streaming pass (:mod:`pipeline.grants.spill`) writes each row's
   value and row number to local spill files grouped by the id's ledger bucket
   (:func:`~pipeline.grants.partitioning.user_bucket_expr`, a well-mixed function
   of the id, so the groups come out even); rejected rows form a group of their
   own and are classified again from their values when read.
2. **Deduplicate.**  A user's bucket is fixed, so every row of one id is in one
   group: each group, read alone, is sorted, its repeats become quarantine rows
   (the first row of an id stays, the later ones are duplicates), the
   exclusions are taken out, and its distinct ids are cut into id ranges at
   boundaries taken from the first group's ids (an even sample of all ids).
3. **Merge.**  Range by range, in id order, the pieces every group left for
   that range are sorted together: the snapshot's ids in order, hashed and
   written piece by piece.

The quarantine is assembled from the rejected and duplicate rows in row
order, row range by row range.  Memory is bounded by ``rows_in_memory`` rows
of one group or range (about 30 bytes a row at its peak), not by the file;
the spill files take about 16 bytes a valid row on disk, in a scratch folder
beside the snapshots (or ``TMPDIR`` for a dry run or an object-store home).
The files written are byte for byte those of sorting the whole file in memory.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline import schemas
from pipeline.grants.partitioning import BUCKET_MODULUS, user_bucket_expr
from pipeline.grants.spill import group_rows, new_piece, numbered_folders, read_group, spill_by_group
from pipeline.grants.user_files import EXAMPLES_IN_MESSAGE_MAX, UserRows, unreadable
from pipeline.storage import Location


@dataclass(frozen=True)
class Counts:
    """What the rows of a user file came to."""

    rows_read: int
    null_rows: int
    not_integer_rows: int
    out_of_range_rows: int
    duplicate_rows: int
    excluded_users: int
    eligible_users: int


@dataclass
class Frozen:
    """A user file after splitting and deduplicating: counts, quarantine, and the ranges to merge."""

    counts: Counts
    quarantine_file: Path
    excluded_file: Path | None
    first_rejected: list[tuple[int, str | None, str]]
    users_file: Path
    range_folders: list[Path]

    def write_users(self, write: bool = True) -> str:
        """Merge the id ranges into ``users_file`` (unless not ``write``); the snapshot id."""
        digest = hashlib.sha256()
        with schemas.ParquetStream("snapshot", self.users_file) if write else nullcontext() as out:
            for folder in self.range_folders:
                ids = read_group(folder)["user_id"].sort()
                schemas.update_int64_digest(digest, ids)
                if out is not None:
                    out.write(ids.to_frame())
        return digest.hexdigest()[:16]


def freeze_rows(
    scanned: UserRows,
    scratch: Path,
    exclusions: pl.DataFrame | None,
    rows_in_memory: int,
    source: Location,
) -> Frozen:
    """Split, deduplicate and exclude ``scanned``'s rows in ``scratch``; merge later with write_users."""
    groups = max(1, -(-scanned.estimated_rows // rows_in_memory))
    try:
        _split(scanned, scratch, groups)
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise unreadable(source, exc) from exc
    folders = numbered_folders(scratch / "groups")
    rejected_folder = folders.pop(groups, None)
    rejected = _rejected(scanned, rejected_folder)
    by_reason = dict(rejected.group_by("reason").len().collect().iter_rows())
    first_rejected = list(
        rejected.sort("row_number")
        .head(EXAMPLES_IN_MESSAGE_MAX)
        .select("row_number", "raw_value", "reason")
        .collect()
        .iter_rows()
    )
    group_folders = list(folders.values())
    valid_rows = sum(group_rows(folder) for folder in group_folders)
    ranges = -(-valid_rows // rows_in_memory)

    duplicate_rows = eligible = 0
    excluded: list[pl.Series] = []
    cuts: pl.Series | None = None
    for number, folder in enumerate(group_folders):
        repeated, kept, left_out = _deduplicate(scanned, read_group(folder), exclusions)
        if cuts is None:
            # A group is an even sample of all ids (the bucket mixes them): its ids place the range cuts.
            cuts = _range_cuts(kept, ranges)
        if repeated.height:
            repeated.write_ipc(new_piece(scratch / "duplicates", number))
        duplicate_rows += repeated.height
        eligible += kept.len()
        excluded.append(left_out)
        bounds = [0, *kept.search_sorted(cuts, side="left").to_list(), kept.len()]
        for range_number, (start, stop) in enumerate(zip(bounds, bounds[1:], strict=False)):
            if stop > start:
                kept.slice(start, stop - start).to_frame().write_ipc(
                    new_piece(scratch / "ranges" / f"{range_number:06d}", number)
                )

    excluded_ids = pl.concat(excluded).sort() if excluded else pl.Series("user_id", [], pl.Int64)
    excluded_file = None
    if excluded_ids.len():
        excluded_file = scratch / "excluded.parquet"
        schemas.write_parquet(excluded_ids.to_frame(), "snapshot", excluded_file)
    rejected_rows = sum(by_reason.values())
    rows_read = valid_rows + rejected_rows
    quarantine_file = scratch / "quarantine.parquet"
    _write_quarantine(
        [rejected.select("row_number", "raw_value", "reason"), *_duplicates(scratch)],
        quarantine_file,
        str(source),
        rejected_rows + duplicate_rows,
        rows_read,
        rows_in_memory,
    )
    counts = Counts(
        rows_read=rows_read,
        null_rows=int(by_reason.get("null", 0)),
        not_integer_rows=int(by_reason.get("not_integer", 0)),
        out_of_range_rows=int(by_reason.get("out_of_range", 0)),
        duplicate_rows=duplicate_rows,
        excluded_users=excluded_ids.len(),
        eligible_users=eligible,
    )
    return Frozen(
        counts,
        quarantine_file,
        excluded_file,
        first_rejected,
        scratch / "users.parquet",
        list(numbered_folders(scratch / "ranges").values()),
    )


def _split(scanned: UserRows, scratch: Path, groups: int) -> None:
    """Every row's (value, row_number) into its bucket group's spill; the rejected rows into group ``groups``."""
    group = (
        pl.when(pl.col("reason").is_null())
        .then(user_bucket_expr() * groups // BUCKET_MODULUS)
        .otherwise(pl.lit(groups, dtype=pl.Int64))
    )
    spill_by_group(scanned.rows.select("value", "row_number", group.alias("group")), scratch / "groups")


def _rejected(scanned: UserRows, folder: Path | None) -> pl.LazyFrame:
    """The rejected rows, classified again from their spilled values: (row_number, raw_value, reason)."""
    if folder is None:
        empty = scanned.source.clear()
        return scanned.classified(empty).select("row_number", scanned.raw_value.alias("raw_value"), "reason")
    frame = pl.scan_ipc(sorted(folder.glob("*.*")))
    return scanned.classified(frame).select("row_number", scanned.raw_value.alias("raw_value"), "reason")


def _deduplicate(
    scanned: UserRows, values: pl.DataFrame, exclusions: pl.DataFrame | None
) -> tuple[pl.DataFrame, pl.Series, pl.Series]:
    """One group's (duplicate rows, sorted distinct kept ids, sorted excluded ids)."""
    rows = values.select("row_number", scanned.parsed.alias("user_id"), "value")
    ids = rows["user_id"].sort()
    first = (ids != ids.shift(1)).fill_null(True)
    distinct = ids.filter(first)
    repeated_ids = ids.filter(~first).unique()
    if repeated_ids.len():
        # The first row of an id stays; its later rows are duplicates, with the text the file had.
        of_repeated = rows.filter(pl.col("user_id").is_in(repeated_ids.implode())).sort(["user_id", "row_number"])
        repeated = of_repeated.filter(pl.col("user_id") == pl.col("user_id").shift(1)).select(
            "row_number", scanned.raw_value.alias("raw_value")
        )
    else:
        repeated = pl.DataFrame(schema={"row_number": rows.schema["row_number"], "raw_value": pl.String})
    left_out = distinct.clear()
    if exclusions is not None:
        hit = distinct.is_in(exclusions["user_id"].implode())
        left_out = distinct.filter(hit)
        distinct = distinct.filter(~hit)
    return repeated, distinct, left_out


def _range_cuts(sample: pl.Series, ranges: int) -> pl.Series:
    """Ids at which to cut the sorted distinct ids into ``ranges`` ranges of about equal size."""
    if ranges <= 1 or not sample.len():
        return pl.Series("user_id", [], pl.Int64)
    cuts = sorted({int(sample[i * sample.len() // ranges]) for i in range(1, ranges)})
    return pl.Series("user_id", cuts, pl.Int64)


def _duplicates(scratch: Path) -> list[pl.LazyFrame]:
    folder = scratch / "duplicates"
    if not folder.exists():
        return []
    return [pl.scan_ipc(path).with_columns(pl.lit("duplicate").alias("reason")) for path in sorted(folder.iterdir())]


def _write_quarantine(
    pieces: list[pl.LazyFrame], target: Path, source_file: str, quarantined: int, rows_read: int, rows_in_memory: int
) -> None:
    """Rejected and duplicate rows in row order, one row range at a time."""
    steps = max(1, -(-quarantined // rows_in_memory))
    width = -(-(rows_read + 1) // steps)
    with schemas.ParquetStream("quarantine", target) as out:
        for step in range(steps):
            lo, hi = step * width, (step + 1) * width
            part = (
                pl.concat([piece.filter(pl.col("row_number").is_between(lo, hi, closed="left")) for piece in pieces])
                .collect()
                .sort("row_number")
            )
            out.write(
                part.select(
                    pl.lit(source_file).alias("source_file"),
                    pl.col("row_number").cast(pl.Int64),
                    pl.col("raw_value").cast(pl.String),
                    pl.col("reason").cast(pl.String),
                )
            )
