"""Merchant cash test helpers: claims rows and claims files."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import polars as pl

IN_WINDOW = "2022-10-20T10:00:00+09:00"

EVIDENCE = ("merchant_certificate", "proof_of_lost_sales", "proof_of_service_use")

COLUMNS = ("claim_id", "merchant_id", "submitted_at", "loss_krw", *EVIDENCE)

TIER_1_KRW, TIER_2_KRW = 30_000, 50_000


def claim(
    claim_id: str,
    merchant_id: int | str,
    loss_krw: int | str,
    submitted_at: str = IN_WINDOW,
    evidence: tuple[str, str, str] = ("yes", "yes", "yes"),
) -> dict[str, Any]:
    """One claims-file row."""
    return dict(zip(COLUMNS, (claim_id, merchant_id, submitted_at, loss_krw, *evidence), strict=True))


def write_claims(path: Path, rows: list[dict[str, Any]]) -> Path:
    """A claims file: CSV (cells as text) or Parquet (every column text)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".csv":
        with path.open("w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(COLUMNS))
            writer.writeheader()
            writer.writerows(rows)
    else:
        frame = pl.DataFrame(
            {c: [None if r[c] is None else str(r[c]) for r in rows] for c in COLUMNS},
            schema={c: pl.String for c in COLUMNS},
        )
        frame.write_parquet(path)
    return path
