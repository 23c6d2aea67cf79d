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

    bad_each = max(1, count // 500_000)
    duplicates = users.head(bad_each * 3)
    bad_values: list[int | None] = [None] * bad_each + [0] * bad_each + [-7] * bad_each
    bad = pl.DataFrame({"user_id": bad_values}, schema={"user_id": pl.Int64})
    frame = pl.concat([users, duplicates, bad]).sample(fraction=1.0, shuffle=True, seed=seed + 3)
    bad_rows = len(bad_values)
    out.parent.mkdir(parents=True, exist_ok=True)
    if suffix == ".csv":
        text_rows = frame.with_columns(pl.col("user_id").cast(pl.String))
        not_integer = pl.DataFrame({"user_id": ["abc"] * bad_each + ["12.5"] * bad_each})
        text_rows = pl.concat([text_rows, not_integer])
        bad_rows += not_integer.height
        text_rows.write_csv(out)
        rows = text_rows.height
    else:
        frame.write_parquet(out)
        rows = frame.height
    return DemoUsers(str(out), rows, count, bad_rows, duplicates.height)
