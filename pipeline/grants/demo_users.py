"""Synthetic user files with a realistic id distribution and a few bad rows.

Ids mimic a messaging service's account ids: mostly sequential with gaps where
accounts were withdrawn, a newer id range for recent sign-ups, in no particular
file order.  A handful of bad rows (nulls, zero, negatives, duplicates, and in
CSV also non-integers) exercise validation without tripping the 0.01 % limit.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import polars as pl

from pipeline.errors import ConfigError

DEMO_USERS_MAX = 500_000_000
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


def write_demo_users(count: int, out: Path, seed: int = 20230105) -> DemoUsers:
    """Write ``count`` distinct valid users plus a few bad rows to ``out`` (.parquet or .csv)."""
    if not 1 <= count <= DEMO_USERS_MAX:
        raise ConfigError(f"--count {count} must be between 1 and {DEMO_USERS_MAX:,}")
    suffix = out.suffix.lower()
    if suffix not in (".parquet", ".csv"):
        raise ConfigError(f"{out}: use a .parquet or .csv file name")
    recent = int(count * RECENT_SHARE)
    legacy = count - recent
    gaps = _GAPS.sample(legacy, with_replacement=True, seed=seed)
    legacy_ids = gaps.cum_sum() + FIRST_ID
    recent_gaps = _GAPS.sample(recent, with_replacement=True, seed=seed + 1)
    recent_ids = recent_gaps.cum_sum() + RECENT_ID_BASE
    users = pl.concat([legacy_ids, recent_ids]).alias("user_id").to_frame()
    users = users.sample(fraction=1.0, shuffle=True, seed=seed + 2)

    # Bad rows stay under 0.009 % of the file, below the default 0.01 % limit, so a demo file
    # passes validation (none below ~11,000 users); duplicates are always planted.
    budget = count * BAD_ROWS_PER_100K // 100_000
    kinds: list[int | str | None] = [None, 0, -7] + (["abc", "12.5"] if suffix == ".csv" else [])
    bad_values = [kinds[i % len(kinds)] for i in range(budget)]
    duplicates = users.head(max(3, budget))
    text = pl.DataFrame({"user_id": [None if v is None else str(v) for v in bad_values]}, schema={"user_id": pl.String})
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        frame = pl.concat([users, duplicates]).with_columns(pl.col("user_id").cast(pl.String))
        frame = pl.concat([frame, text]).sample(fraction=1.0, shuffle=True, seed=seed + 3)
        frame.write_csv(out)
    else:
        bad = text.with_columns(pl.col("user_id").cast(pl.Int64))
        frame = pl.concat([users, duplicates, bad]).sample(fraction=1.0, shuffle=True, seed=seed + 3)
        frame.write_parquet(out)
    rows, bad_rows = frame.height, len(bad_values)
    return DemoUsers(str(out), rows, count, bad_rows, duplicates.height)
