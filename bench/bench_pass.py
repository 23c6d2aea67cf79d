"""Benchmark: first-come-first-served pass intake and allocation, in applications per second.

    python bench/bench_pass.py --applications 1000000 --cap 300000 --batches 4
    python bench/bench_pass.py --ledger-url postgresql+psycopg://postgres@127.0.0.1:5432/bench_pass --processes 2

Writes ``--batches`` Parquet batch files of synthetic applications (distinct users,
applied_at spread over the program's first day at millisecond precision, so many
ties), then times, on a fresh ledger: the intake of every batch (validation,
quarantine, one transaction each; ``--processes`` OS processes take batches at once,
as several intake workers would — on SQLite they queue on its single writer) and one
allocation with the cap enforced. Prints
the figures; the target is 100,000 applications/s end to end on 2 cores.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import multiprocessing
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl
import sqlalchemy as sa

from pipeline.config import load_settings
from pipeline.programs.drawer_pass import allocation as pass_allocation
from pipeline.programs.drawer_pass import intake
from pipeline.programs.drawer_pass import reconciliation as pass_reconciliation
from pipeline.programs.drawer_pass.program import parse_program

SEED = 20230105
USER_ID_LOW, USER_ID_HIGH = 10_000_000, 9_000_000_000
DAY_MS = 86_400_000
OPENS_UTC = dt.datetime(2023, 1, 4, 15, 0, tzinfo=dt.UTC)  # 2023-01-05 00:00 Asia/Seoul
TARGET_PER_S = 100_000
PROGRAM = """
[program]
id = "bench-pass"
name = "benchmark pass"
time_zone = "Asia/Seoul"
opens = 2023-01-05T00:00:00
[pass]
sku = "bench-pass-1m"
stock_cap = {cap}
validity_months = 1
"""


def write_batches(folder: Path, applications: int, batches: int) -> list[Path]:
    """Synthetic batch files: distinct users, applied_at within the first day (ms, with ties)."""
    rng = np.random.default_rng(SEED)
    users = np.unique(rng.integers(USER_ID_LOW, USER_ID_HIGH, size=int(applications * 1.01)))[:applications]
    rng.shuffle(users)
    offsets_ms = rng.integers(0, DAY_MS, size=users.size)
    frame = pl.DataFrame({"user_id": users.astype(np.int64), "offset_ms": offsets_ms}).with_columns(
        (pl.lit(OPENS_UTC) + pl.duration(milliseconds=pl.col("offset_ms"))).alias("applied_at")
    )
    paths = []
    for index, part in enumerate(frame.select("user_id", "applied_at").iter_slices(-(-users.size // batches))):
        path = folder / f"applications-{index:03d}.parquet"
        part.write_parquet(path)
        paths.append(path)
    return paths


def main() -> None:
    """Run the benchmark and print the figures."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--applications", type=int, default=1_000_000)
    parser.add_argument("--cap", type=int, default=300_000)
    parser.add_argument("--batches", type=int, default=4)
    parser.add_argument("--ledger-url", help="default: a new SQLite file under a temporary folder")
    parser.add_argument("--processes", type=int, default=1, help="intake processes at once (default 1)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench-pass-") as tmp:
        home = Path(tmp)
        environ = {"ENTITLE_HOME": str(home / "var")}
        if args.ledger_url:
            environ["ENTITLE_LEDGER_URL"] = args.ledger_url
        settings = load_settings(environ)
        # The synthetic applications are in January 2023: allocate "now" far enough later.
        settings = dataclasses.replace(settings, clock=lambda: dt.datetime(2023, 1, 10, tzinfo=dt.UTC))
        paths = write_batches(home, args.applications, args.batches)
        program = parse_program(PROGRAM.format(cap=args.cap), "<bench>")
        context = pass_allocation.open_pass(settings, program)
        pass_allocation.register(context)
        _require_empty(context)
        started = time.perf_counter()
        shares = [(environ, args.cap, paths[i :: args.processes]) for i in range(args.processes)]
        with multiprocessing.get_context("spawn").Pool(args.processes) as pool:
            stored = sum(pool.starmap(_ingest, shares))
        intake_s = time.perf_counter() - started
        started_allocation = time.perf_counter()
        allocation = pass_allocation.allocate(context, dt.datetime(2023, 1, 9, tzinfo=dt.UTC))
        allocation_s = time.perf_counter() - started_allocation
        total_s = intake_s + allocation_s
        verdict = pass_reconciliation.reconcile(context).verdict
        context.engine.dispose()
    backend = "postgresql" if args.ledger_url and args.ledger_url.startswith("postgresql") else "sqlite"
    rate = args.applications / total_s
    print(
        f"backend {backend}: {args.applications:,} applications in {args.batches} batches, cap {args.cap:,}, "
        f"{args.processes} intake process(es)"
    )
    print(f"  intake     {intake_s:7.2f} s  {args.applications / intake_s:12,.0f} applications/s ({stored:,} stored)")
    print(
        f"  allocation {allocation_s:7.2f} s  {allocation.considered / allocation_s:12,.0f} applications/s "
        f"({allocation.granted:,} passes, {allocation.sold_out:,} sold_out)"
    )
    print(f"  end to end {total_s:7.2f} s  {rate:12,.0f} applications/s (target {TARGET_PER_S:,}); reconcile {verdict}")


def _ingest(environ: dict[str, str], cap: int, paths: list[Path]) -> int:
    """One intake worker: its own engine, its share of the batch files; returns applications stored."""
    settings = dataclasses.replace(load_settings(environ), clock=lambda: dt.datetime(2023, 1, 10, tzinfo=dt.UTC))
    with pass_allocation.open_pass(settings, parse_program(PROGRAM.format(cap=cap), "<bench>")) as context:
        return sum(intake.ingest(context, path).new_applications for path in paths)


def _require_empty(context: pass_allocation.PassContext) -> None:
    with context.engine.connect() as connection:
        found = connection.execute(sa.text("SELECT count(*) FROM pass_applications")).scalar_one()
    if found:
        raise SystemExit(f"the ledger already holds {found:,} applications: give an empty database")


if __name__ == "__main__":
    main()
