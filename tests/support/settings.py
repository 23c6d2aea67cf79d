"""Test settings through the real composition root, the bundled campaign's constants, user files."""

from __future__ import annotations

import dataclasses
import datetime as dt
from collections.abc import Callable, Sequence
from pathlib import Path

import polars as pl

from pipeline.config import Settings, load_settings

ITEMS_PER_USER = 5  # the bundled campaign: 3 emoticons and 2 coupons
DAG_TEST_PARTITIONS = 8  # ENTITLE_PARTITIONS of the Airflow tests

FACE_VALUE_PER_USER_KRW = 2_000 + 3_000

SEOUL = dt.timezone(dt.timedelta(hours=9))

CAMPAIGN_START = dt.datetime(2023, 1, 5, 0, 0, tzinfo=SEOUL)


def build_settings(
    home: Path,
    *,
    partitions: int = 8,
    ledger_url: str | None = None,
    campaign_file: Path | None = None,
    rejected_share_max: float | None = None,
    clock: Callable[[], dt.datetime] | None = None,
    reconcile_workers: int = 1,
) -> Settings:
    """Settings through the real composition root, from an explicit environment dict.

    Reconciliation runs in-process by default here (one worker); tests of the worker pool ask for more.
    """
    environ = {
        "ENTITLE_HOME": str(home),
        "ENTITLE_PARTITIONS": str(partitions),
        "ENTITLE_RECONCILE_WORKERS": str(reconcile_workers),
    }
    if ledger_url is not None:
        environ["ENTITLE_LEDGER_URL"] = ledger_url
    if campaign_file is not None:
        environ["ENTITLE_CAMPAIGN"] = str(campaign_file)
    if rejected_share_max is not None:
        environ["ENTITLE_REJECTED_SHARE_MAX"] = repr(rejected_share_max)
    settings = load_settings(environ)
    if clock is not None:
        settings = dataclasses.replace(settings, clock=clock)
    return settings


def write_user_file(path: Path, values: Sequence[int | str | None], column: str = "user_id") -> Path:
    """A user file of ``values``: CSV cells as text ('' for None) or a Parquet int64 column."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        cells = ["" if v is None else str(v) for v in values]
        path.write_text(column + "\n" + "".join(f"{c}\n" for c in cells), encoding="utf-8")
    elif path.suffix == ".parquet":
        invalid = [v for v in values if v is not None and not isinstance(v, int)]
        if invalid:
            raise ValueError(f"a Parquet user file holds int64 ids; got {invalid[:3]}")
        pl.DataFrame({column: list(values)}, schema={column: pl.Int64}).write_parquet(path)
    else:
        raise ValueError(f"{path}: use .csv or .parquet")
    return path
