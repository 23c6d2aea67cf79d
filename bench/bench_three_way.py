"""Benchmark of the three-way comparison at scale: time and memory per grant, without an issuer's export speed.

    .venv/bin/python bench/bench_three_way.py --users 5000000
    .venv/bin/python bench/bench_three_way.py --users 5000000 \
        --ledger-url postgresql+psycopg://postgres@127.0.0.1:5432/bench_three_way

Grants USERS synthetic users the bundled campaign with its two coupons routed
to an issuer (SQLite ledger, ``entitle run``), then compares the ledger with
an export holding exactly those coupon grants, in this process, as
``entitle reconcile`` does for each issuer (``three_way.check_issuer``).
The export comes from a ``kind = "python"`` issuer defined here that builds it
partition by partition from the run's own partition files, so the figures are
the pipeline's side of the comparison: reading the ledger side, reducing the
export chunk by chunk, the joins. A real issuer's export adds its own time
(about 125,000 grants/s for the reference service's export and its reading,
which ``bench/bench_delivery.py`` measures end to end).

Prints the time and the process's peak resident memory, and both per exported
grant, so that they can be scaled to 48 million users.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import polars as pl

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT))

import bench_delivery  # noqa: E402  (this script's folder is on sys.path)

from pipeline.campaigns import IssuerSpec  # noqa: E402
from pipeline.config import load_settings  # noqa: E402
from pipeline.delivery.issuers import Answer  # noqa: E402
from pipeline.grants import runs  # noqa: E402
from pipeline.grants.partitioning import load_manifest, partitions_dir  # noqa: E402
from pipeline.reconciliation import three_way  # noqa: E402

COUPONS = ("coupon-2000", "coupon-3000")
# The delivery benchmark's campaign, its coupons' issuer built here instead of reached over http.
CAMPAIGN = bench_delivery.CAMPAIGN.format(
    requests_per_s=25, concurrency=4, batch_size=1_000, emoticon_issuer=""
).replace('kind = "http"', 'kind = "python"\nfactory = "bench_three_way:make_issuer"')


class PartitionExportIssuer:
    """An issuer that holds exactly the coupon grants of the current snapshot's users (issue 0)."""

    name = "shop"

    def __init__(self, partitions: list[Path]) -> None:
        self.partitions = partitions

    def deliver(self, batch: Any) -> list[Answer]:
        raise NotImplementedError("this benchmark's issuer only exports")

    def revoke(self, grant_ids: Any, reason: str) -> list[Answer]:
        raise NotImplementedError("this benchmark's issuer only exports")

    def export(self, campaign_id: str) -> Iterator[dict[str, Any]]:
        for frame in self.export_frames(campaign_id):
            yield from frame.iter_rows(named=True)

    def export_frames(self, campaign_id: str) -> Iterator[pl.DataFrame]:
        """One chunk per partition and coupon, with the canonical grant ids."""
        for path in self.partitions:
            users = pl.read_parquet(path, columns=["user_id"])
            for sku in COUPONS:
                yield users.select(
                    pl.concat_str(
                        [pl.lit(f"{campaign_id}:"), pl.col("user_id").cast(pl.String), pl.lit(f":{sku}:0")]
                    ).alias("grant_id"),
                    pl.col("user_id").cast(pl.Int64),
                    pl.lit(sku).alias("item_sku"),
                    pl.lit(0, dtype=pl.Int64).alias("issue_no"),
                )

    def close(self) -> None:
        pass


PARTITION_FILES: list[Path] = []


def make_issuer(spec: IssuerSpec) -> PartitionExportIssuer:
    """The campaign's factory (``factory = "bench_three_way:make_issuer"``)."""
    return PartitionExportIssuer(PARTITION_FILES)


def _fresh_database(url_text: str) -> str:
    """Drop and create the benchmark's PostgreSQL database (only one named bench_*); its URL."""
    import sqlalchemy as sa

    url = sa.make_url(url_text)
    if not url.drivername.startswith("postgresql") or not (url.database or "").startswith("bench_"):
        raise SystemExit(f"--ledger-url must be a PostgreSQL database named bench_*, got {url_text!r}")
    admin = sa.create_engine(url.set(database="postgres"), isolation_level="AUTOCOMMIT")
    with admin.connect() as connection:
        connection.exec_driver_sql(f'DROP DATABASE IF EXISTS "{url.database}" WITH (FORCE)')
        connection.exec_driver_sql(f'CREATE DATABASE "{url.database}"')
    admin.dispose()
    return url_text


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=5_000_000)
    parser.add_argument("--partitions", type=int, default=16)
    parser.add_argument("--home", type=Path, default=ROOT / "var" / "bench-three-way")
    parser.add_argument(
        "--ledger-url",
        help="a PostgreSQL ledger whose database name starts with bench_ (dropped and created again); default SQLite",
    )
    args = parser.parse_args()
    sys.modules.setdefault("bench_three_way", sys.modules[__name__])  # the factory's module is this script

    shutil.rmtree(args.home, ignore_errors=True)
    args.home.mkdir(parents=True)
    campaign_file = args.home / "campaign.toml"
    campaign_file.write_text(CAMPAIGN, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTITLE_")}
    env.update(
        ENTITLE_HOME=str(args.home / "var"),
        ENTITLE_CAMPAIGN=str(campaign_file),
        ENTITLE_PARTITIONS=str(args.partitions),
    )
    if args.ledger_url:
        env["ENTITLE_LEDGER_URL"] = _fresh_database(args.ledger_url)
    users = args.home / "users.parquet"
    entitle = str(BIN / "entitle")
    subprocess.run([entitle, "demo-users", "--count", str(args.users), "--out", str(users)], env=env, check=True)
    started = time.perf_counter()
    subprocess.run([entitle, "run", "--users", str(users), "--no-progress"], env=env, check=True)
    print(f"granted in {time.perf_counter() - started:.1f} s", flush=True)

    pipeline = runs.open_pipeline(load_settings({k: v for k, v in env.items() if k.startswith("ENTITLE_")}))
    row = runs.snapshot_row(pipeline, None)
    count = int(row["partition_count"])
    manifest = load_manifest(partitions_dir(pipeline.settings.location(row["snapshot_dir"]), count))
    PARTITION_FILES[:] = [Path(str(entry.path)) for entry in manifest]
    spec = pipeline.campaign.issuers[0]
    before_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    started = time.perf_counter()
    check = three_way.check_issuer(pipeline, spec, count)
    seconds = time.perf_counter() - started
    peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    pipeline.engine.dispose()
    held = check.issuer_held
    exact = check.state == "compared" and check.matched == check.ledger_live == held and check.breaks is not None
    exact = exact and check.breaks.height == 0
    print(
        f"three-way, issuer 'shop': {check.ledger_live:,} live ledger grants against {held:,} exported; "
        f"matched {check.matched:,}, missing {check.issuer_missing:,}, unexpected {check.issuer_unexpected:,} "
        f"(exactly equal: {exact})"
    )
    if not exact:
        print("FAILED: the comparison did not find the export equal to the ledger", file=sys.stderr)
        return 1
    print(
        f"compared in {seconds:.1f} s = {held / seconds:,.0f} exported grants/s; peak memory "
        f"{peak_kib / 1024:,.0f} MiB (before the comparison {before_kib / 1024:,.0f} MiB; the ledger's SQLite "
        "page cache is up to 256 MiB of it on SQLite)"
    )
    print(
        f"per exported grant: {seconds / held * 1e6:.2f} µs, "
        f"{(peak_kib - before_kib) * 1024 / held:.0f} bytes of peak memory above the start"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
