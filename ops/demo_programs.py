"""Demo inputs for the merchant and pass programs (``make demo``), deterministic for a seed.

    python ops/demo_programs.py var --merchants 20000 --claims 5000 --applications 40000 --pass-cap 10000

Writes under the ENTITLE_HOME given as the first argument:

- ``incoming/merchants.parquet``: the merchant list of the channel credit (a
  ``merchant_id`` column; three merchants listed twice, as real lists are);
- ``incoming/merchant-cash-2022/claims-demo.csv``: claims from those merchants,
  losses across every tier (the boundaries ₩300,000 and ₩500,000 exactly among
  them), a few outside the intake windows, repeated, conflicting, with evidence
  answered "no", and a few malformed rows (they go to quarantine);
- ``incoming/pass/drawer-pass-2022/batch-000N.parquet``: pass applications from
  the demo users (``incoming/users.parquet``) in the first hour of 2023-01-05,
  many at the same millisecond;
- ``demo/drawer_pass_demo.toml``: the bundled pass program with a stock cap of
  ``--pass-cap``, so that the demo sells out (the real cap is 3,000,000).
"""

from __future__ import annotations

import argparse
import datetime as dt
import random
import sys
from importlib import resources
from pathlib import Path

import polars as pl

SEOUL = dt.timezone(dt.timedelta(hours=9))
CLAIMS_DIR = Path("incoming") / "merchant-cash-2022"
PASS_DIR = Path("incoming") / "pass" / "drawer-pass-2022"
PASS_BATCHES = 4
PASS_OPENS = dt.datetime(2023, 1, 5, tzinfo=SEOUL)
PASS_SPREAD_MS = 3_600_000  # applications in the first hour, at millisecond precision (many ties)
INITIAL_WINDOW = (dt.datetime(2022, 10, 19, tzinfo=SEOUL), dt.datetime(2022, 11, 6, 23, tzinfo=SEOUL))
OUTSIDE_WINDOW = dt.datetime(2022, 12, 1, 10, tzinfo=SEOUL)
BOUNDARY_LOSSES = (299_999, 300_000, 300_001, 499_999, 500_000, 500_001)
EVIDENCE = ("merchant_certificate", "proof_of_lost_sales", "proof_of_service_use")


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("home", type=Path, help="ENTITLE_HOME")
    parser.add_argument("--merchants", type=int, default=20_000)
    parser.add_argument("--claims", type=int, default=5_000)
    parser.add_argument("--applications", type=int, default=40_000)
    parser.add_argument("--pass-cap", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=20230105)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    merchants = sorted(rng.sample(range(100_000_000, 999_999_999), args.merchants))
    write_merchants(args.home / "incoming" / "merchants.parquet", merchants)
    write_claims(args.home / CLAIMS_DIR / "claims-demo.csv", merchants, args.claims, rng)
    users = pl.read_parquet(args.home / "incoming" / "users.parquet", columns=["user_id"])["user_id"]
    valid = users.cast(pl.Int64, strict=False).drop_nulls().unique(maintain_order=True)
    write_applications(args.home / PASS_DIR, valid.filter(valid > 0), args, rng)
    write_pass_program(args.home / "demo" / "drawer_pass_demo.toml", args.pass_cap)
    print(
        f"demo inputs: {args.merchants:,} merchants, {args.claims:,} claims, {args.applications:,} pass applications "
        f"(cap {args.pass_cap:,}) under {args.home}"
    )
    return 0


def write_merchants(path: Path, merchants: list[int]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    listed = merchants + merchants[:3]
    pl.DataFrame({"merchant_id": listed, "region": ["Pangyo"] * len(listed)}).write_parquet(path)


def write_claims(path: Path, merchants: list[int], count: int, rng: random.Random) -> None:
    """Claims from distinct merchants, with the cases a claims desk sees."""
    rows: list[dict[str, object]] = []
    claimants = rng.sample(merchants, min(count, len(merchants)))
    span_s = int((INITIAL_WINDOW[1] - INITIAL_WINDOW[0]).total_seconds())
    for index, merchant in enumerate(claimants):
        draw = rng.random()
        if index < len(BOUNDARY_LOSSES):
            loss = BOUNDARY_LOSSES[index]
        elif draw < 0.6:
            loss = rng.randint(10_000, 300_000)
        elif draw < 0.9:
            loss = rng.randint(300_001, 500_000)
        else:
            loss = rng.randint(500_001, 3_000_000)
        submitted = INITIAL_WINDOW[0] + dt.timedelta(seconds=rng.randint(0, span_s))
        if rng.random() < 0.02:
            submitted = OUTSIDE_WINDOW  # between the two intake windows: rejected with that reason
        evidence = {name: "yes" for name in EVIDENCE}
        if rng.random() < 0.01:
            evidence["proof_of_service_use"] = "no"  # goes to review: incomplete evidence
        row = {"claim_id": f"c-{index:06d}", "merchant_id": str(merchant), "submitted_at": submitted.isoformat()}
        rows.append({**row, "loss_krw": str(loss), **evidence})
        if rng.random() < 0.01:  # the same claim filed twice: merged
            rows.append({**rows[-1], "claim_id": f"c-{index:06d}-again"})
        elif rng.random() < 0.005:  # a second, different claim: the case goes to review
            rows.append({**rows[-1], "claim_id": f"c-{index:06d}-b", "loss_krw": str(loss + 10_000)})
    for bad in range(max(1, count // 500)):  # malformed rows: quarantined with row and field
        rows.append({**rows[bad], "claim_id": f"bad-{bad:04d}", "loss_krw": "about 200,000"})
    path.parent.mkdir(parents=True, exist_ok=True)
    pl.DataFrame(rows, schema={name: pl.String for name in rows[0]}).write_csv(path)


def write_applications(folder: Path, users: pl.Series, args: argparse.Namespace, rng: random.Random) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    applicants = users.sample(min(args.applications, users.len()), seed=args.seed).to_list()
    opens_ms = int(PASS_OPENS.timestamp() * 1000)
    applied_ms = pl.Series([opens_ms + rng.randrange(PASS_SPREAD_MS) for _ in applicants], dtype=pl.Int64)
    frame = pl.DataFrame({"user_id": pl.Series(applicants, dtype=pl.Int64)}).with_columns(
        pl.from_epoch(applied_ms, time_unit="ms").dt.replace_time_zone("UTC").alias("applied_at")
    )
    size = -(-frame.height // PASS_BATCHES)
    for batch in range(PASS_BATCHES):
        frame.slice(batch * size, size).write_parquet(folder / f"batch-{batch + 1:04d}.parquet")


def write_pass_program(path: Path, cap: int) -> None:
    text = resources.files("pipeline.campaigns").joinpath("drawer_pass_2022.toml").read_text(encoding="utf-8")
    if "stock_cap = 3_000_000" not in text:
        raise SystemExit("demo_programs: the bundled pass program no longer says stock_cap = 3_000_000")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text.replace("stock_cap = 3_000_000", f"stock_cap = {cap:_}"), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
