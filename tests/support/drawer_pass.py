"""Pass program test helpers: program files, application batches and the order they must be served in."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import polars as pl

from pipeline.grants.partitioning import user_bucket

SEOUL = dt.timezone(dt.timedelta(hours=9))

OPENS = dt.datetime(2023, 1, 5, 0, 0, tzinfo=SEOUL)

NOW = dt.datetime(2023, 1, 20, 12, 0, tzinfo=dt.UTC)  # the tests' clock: after every application


def program_text(cap: int, program_id: str = "drawer-pass-test") -> str:
    return f"""
[program]
id = "{program_id}"
name = "test pass"
time_zone = "Asia/Seoul"
opens = 2023-01-05T00:00:00
closes = 2023-02-05T00:00:00

[pass]
sku = "drawer-plus-1m"
stock_cap = {cap}
validity_months = 1
reminder_days = 7
intake_lag_s = 600
"""


def write_applications(path: Path, rows: list[tuple[object, object]]) -> Path:
    """A batch file of (user_id, applied_at): CSV cells as text, or Parquet int64 + timestamp (UTC)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        lines = ["user_id,applied_at"] + [f"{'' if u is None else u},{'' if a is None else a}" for u, a in rows]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    else:
        pl.DataFrame(
            {"user_id": [u for u, _ in rows], "applied_at": [a for _, a in rows]},
            schema={"user_id": pl.Int64, "applied_at": pl.Datetime("us", "UTC")},
        ).write_parquet(path)
    return path


def serving_order(rows: list[tuple[int, dt.datetime]]) -> list[int]:
    """User ids in the documented order: applied_at, then user_bucket, then user_id."""
    return [u for u, a in sorted(rows, key=lambda r: (r[1], user_bucket(r[0]), r[0]))]


def synthetic(count: int, seed: int, ties: bool = True) -> list[tuple[int, dt.datetime]]:
    """Distinct users with applied_at in the first hours (whole seconds when ``ties``: many equal instants)."""
    rng = np.random.default_rng(seed)
    users = rng.choice(np.arange(1_000_000, 90_000_000), size=count, replace=False)
    unit_s = 1.0 if ties else 1e-6
    spread = rng.integers(0, 3 * 3_600 if ties else 3 * 3_600 * 1_000_000, size=count)
    base = OPENS.astimezone(dt.UTC)
    return [(int(u), base + dt.timedelta(seconds=float(s) * unit_s)) for u, s in zip(users, spread, strict=True)]
