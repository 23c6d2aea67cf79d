"""Synthetic user files with a realistic id distribution and a few bad rows.

Ids mimic a messaging service's account ids: mostly sequential with gaps where
accounts were withdrawn, a newer id range for recent sign-ups, in no particular
file order.  A handful of bad rows (nulls, zero, negatives, duplicates, and in
CSV also non-integers) exercise validation without tripping the 0.01 % limit.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pyarrow.parquet as pq
from sqlalchemy.engine import make_url

from pipeline import ledger, schemas, storage
from pipeline.config import Settings
from pipeline.errors import ConfigError, EntitleError, LedgerError

DEMO_USERS_MAX = 500_000_000
SLICE_USERS = 50_000_000  # larger demo files are made and written this many users at a time
FIRST_ID = 10_000_000
RECENT_ID_BASE = 3_000_000_000
RECENT_SHARE = 0.02
BAD_ROWS_PER_100K = 9
_GAPS = pl.Series("gap", [1, 1, 1, 1, 1, 1, 2, 2, 3, 5, 8, 40], dtype=pl.Int64)


@dataclass(frozen=True)
class DemoUsers:
    """What was written: the file, its rows, and how many bad rows it holds."""

    path: str
    rows: int
    distinct_valid_users: int
    bad_rows: int
    duplicate_rows: int


def write_demo_users(
    count: int,
    out: Path,
    seed: int = 20230105,
    before_write: Callable[[pl.DataFrame], None] | None = None,
) -> DemoUsers:
    """Write ``count`` distinct valid users plus a few bad rows to ``out`` (.parquet or .csv).

    More than ``SLICE_USERS`` users are made and written slice by slice (each slice's ids
    follow the previous slice's and are shuffled among themselves), so memory stays near one
    slice.  ``before_write`` sees each slice's distinct valid user ids (column ``user_id``)
    before it is written, and may refuse by raising; the file appears only when complete.
    """
    if not 1 <= count <= DEMO_USERS_MAX:
        raise ConfigError(f"--count {count} must be between 1 and {DEMO_USERS_MAX:,}")
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ConfigError(f"{out}: use a .parquet or .csv file name")
    rows = bad_rows = duplicate_rows = 0
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        with schemas.replaced_atomically(out) as temporary, contextlib.ExitStack() as closing:
            writer: pq.ParquetWriter | None = None
            for number, (users, slice_seed) in enumerate(_valid_user_slices(count, seed)):
                if before_write is not None:
                    before_write(users)
                frame, bad, duplicates = _with_bad_rows(users, suffix, slice_seed)
                rows, bad_rows, duplicate_rows = rows + frame.height, bad_rows + bad, duplicate_rows + duplicates
                if suffix == ".csv":
                    with open(temporary, "ab") as handle:
                        frame.write_csv(handle, include_header=number == 0)
                elif count <= SLICE_USERS:
                    frame.write_parquet(temporary)
                else:
                    table = frame.to_arrow()
                    if writer is None:
                        writer = closing.enter_context(pq.ParquetWriter(temporary, table.schema, compression="zstd"))
                    writer.write_table(table)
    except OSError as exc:  # a folder that is a file, no permission, a full disk
        where = f": {exc.filename}" if exc.filename else ""
        raise ConfigError(f"--out {out}: cannot write it ({exc.strerror or exc}{where})") from exc
    return DemoUsers(str(out), rows, count, bad_rows, duplicate_rows)


def _with_bad_rows(users: pl.DataFrame, suffix: str, seed: int) -> tuple[pl.DataFrame, int, int]:
    """One slice's rows in file order, with its bad rows and duplicates; (rows, bad rows, duplicates)."""
    # Bad rows stay under 0.009 % of the file, below the default 0.01 % limit, so a demo file
    # passes validation (none below ~11,000 users); duplicates are always planted.
    budget = users.height * BAD_ROWS_PER_100K // 100_000
    kinds: list[int | str | None] = [None, 0, -7] + (["abc", "12.5"] if suffix == ".csv" else [])
    bad_values = [kinds[i % len(kinds)] for i in range(budget)]
    duplicates = users.head(max(3, budget))
    text = pl.DataFrame({"user_id": [None if v is None else str(v) for v in bad_values]}, schema={"user_id": pl.String})
    if suffix == ".csv":
        frame = pl.concat([users, duplicates]).with_columns(pl.col("user_id").cast(pl.String))
        frame = pl.concat([frame, text]).sample(fraction=1.0, shuffle=True, seed=seed + 3)
    else:
        bad = text.with_columns(pl.col("user_id").cast(pl.Int64))
        frame = pl.concat([users, duplicates, bad]).sample(fraction=1.0, shuffle=True, seed=seed + 3)
    return frame, len(bad_values), duplicates.height


def _valid_user_slices(count: int, seed: int) -> Iterator[tuple[pl.DataFrame, int]]:
    """The ``count`` distinct valid ids of a demo file, slice by slice in file order, with each slice's seed."""
    legacy_start, recent_start = FIRST_ID, RECENT_ID_BASE
    for number, first in enumerate(range(0, count, SLICE_USERS)):
        size = min(SLICE_USERS, count - first)
        slice_seed = seed + 100 * number
        recent = int(size * RECENT_SHARE)
        legacy_ids = _GAPS.sample(size - recent, with_replacement=True, seed=slice_seed).cum_sum() + legacy_start
        recent_gaps = _GAPS.sample(recent, with_replacement=True, seed=slice_seed + 1)
        recent_ids = recent_gaps.cum_sum() + recent_start
        legacy_start = int(legacy_ids[-1]) if legacy_ids.len() else legacy_start
        recent_start = int(recent_ids[-1]) if recent_ids.len() else recent_start
        users = pl.concat([legacy_ids, recent_ids]).alias("user_id").to_frame()
        yield users.sample(fraction=1.0, shuffle=True, seed=slice_seed + 2), slice_seed


def refuse_replacing_granted_users(settings: Settings, out: Path, users: pl.DataFrame) -> None:
    """Refuse (:class:`LedgerError`) to replace the users of the file the campaign's current snapshot came from.

    ``make demo`` writes its users to one file and grants it: a smaller demo after a larger
    one would leave the larger demo's grants in the ledger, each an ``unexpected`` break of
    the new run. Reads the ledger only when it exists; writes nothing.
    """
    granted = _current_snapshot(settings)
    if granted is None or not _same_local_file(str(granted["source_file"]), out):
        return
    ids = users["user_id"].sort()
    if schemas.int64_sha256(ids)[:16] == granted["snapshot_id"]:
        return  # the same users: the demo runs again over what it granted
    outside = _users_outside(settings, granted, ids)
    if outside == 0:
        return  # only new users: the demo run grants them
    eligible = int(granted["eligible_users"])
    which = f"{outside:,} of them are" if outside is not None else "they are not all"
    raise LedgerError(
        f"{out} is the user file of campaign {granted['campaign_id']}'s current snapshot {granted['snapshot_id']} "
        f"in the ledger {settings.describe_ledger()}, granted to {eligible:,} users; {which} not among the "
        f"{ids.len():,} users of this demo file, so a run over it would report each of their grants as an "
        f"unexpected break. Nothing was written. Start afresh: `make clean && make demo DEMO_USERS={ids.len()}` "
        "(make clean deletes var/: the ledger, snapshots, reports and Airflow metadata)"
    )


def _current_snapshot(settings: Settings) -> dict[str, Any] | None:
    """The configured campaign's current snapshot row, with its ``campaign_id``; None without one (or a ledger)."""
    url = make_url(settings.ledger_url)
    if url.get_backend_name() == "sqlite" and not (url.database and Path(url.database).exists()):
        return None  # no ledger yet; connecting would create the file
    campaign_id = settings.campaign().campaign_id
    with ledger.open_ledger(settings.ledger_url) as opened:
        if ledger.recorded_version(opened.engine) is None:
            return None
        campaign_key = ledger.find_campaign_key(opened.engine, campaign_id)
        row = None if campaign_key is None else ledger.current_snapshot(opened.engine, campaign_key)
    return None if row is None else {**row, "campaign_id": campaign_id}


def _same_local_file(source_file: str, out: Path) -> bool:
    if "://" in source_file:  # an object-store URI is never the local demo file
        return False
    return Path(source_file).expanduser().resolve() == out.expanduser().resolve()


def _users_outside(settings: Settings, granted: dict[str, Any], ids: pl.Series) -> int | None:
    """How many users of the granted snapshot are not in ``ids`` (None: its users file cannot be read)."""
    users_file = settings.location(granted["snapshot_dir"]) / "users.parquet"
    try:
        if not storage.exists(users_file):
            return None
        snapshot_users = schemas.read_parquet(users_file, "snapshot")
    except EntitleError:
        return None
    return snapshot_users.join(ids.to_frame(), on="user_id", how="anti").height
