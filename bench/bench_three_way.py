"""Benchmark of the three-way comparison at scale: time and memory per grant, without an issuer's export speed.

    .venv/bin/python bench/bench_three_way.py --users 48000000    # the target's scale, about 15 min
    .venv/bin/python bench/bench_three_way.py --users 5000000
    .venv/bin/python bench/bench_three_way.py --users 5000000 \
        --ledger-url postgresql+psycopg://postgres@127.0.0.1:5432/bench_three_way

Grants USERS synthetic users the bundled campaign with its two coupons routed
to an issuer (SQLite ledger, ``entitle run``), then compares the ledger with
an export holding exactly those coupon grants, in this process, as
``entitle reconcile`` does for each issuer (``three_way.check_issuer``).
The export comes from a ``kind = "python"`` issuer defined here that builds it
partition by partition from the run's own partition files, so the figures are
the pipeline's side of the comparison: reading the export and spilling its
keys by partition, comparing each partition with the ledger, reading the
breaks' details. A real issuer's export adds its own time (about 125,000
grants/s for the reference service's export and its reading, which
``bench/bench_delivery.py`` measures end to end).

Prints the time and peak resident memory of every stage: the two commands'
own (from wait4), and each stage of the comparison's (the peak is reset
between stages through /proc/self/clear_refs); then the comparison's peak
against the target, at most 2,048 MB at 48 million users, the disk its spill
took, and time and memory per exported grant. Exits 1 when the comparison is
not exact, or at 48 million users or more when it misses the target.
"""

from __future__ import annotations

import argparse
import os
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
from machine import peak_rss_mb, reset_peak_rss  # noqa: E402

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


PEAK_RSS_TARGET_MB = 2_048  # the comparison's peak at 48 million users
TARGET_USERS = 48_000_000


class StagePeaks:
    """Time and peak resident memory of this process per stage, the peak reset as each stage ends."""

    def __init__(self) -> None:
        self.rows: list[tuple[str, float, float]] = []  # (stage, seconds, peak MB)
        self.resets = reset_peak_rss()
        self.started = time.perf_counter()

    def end(self, stage: str) -> None:
        """Record ``stage`` (from the previous one's end to now) and start the next one's peak afresh."""
        now = time.perf_counter()
        self.rows.append((stage, now - self.started, peak_rss_mb()))
        self.resets = reset_peak_rss() and self.resets
        self.started = time.perf_counter()


def _current_mb() -> float:
    """This process's resident memory now (VmRSS), in MB."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _run_measured(command: list[str], env: dict[str, str]) -> tuple[float, float]:
    """Run ``command`` to its end; its seconds and its own peak resident memory in MB (from wait4)."""
    started = time.perf_counter()
    process = subprocess.Popen(command, env=env)
    _pid, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - started
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(command)} failed with exit code {os.waitstatus_to_exitcode(status)}")
    return seconds, usage.ru_maxrss / 1024


def _folder_bytes(root: Path) -> int:
    return sum(path.stat().st_size for path in root.rglob("*") if path.is_file())


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
    stages: list[tuple[str, int, float, float]] = []  # (stage, rows, seconds, peak MB)
    seconds, peak_mb = _run_measured([entitle, "demo-users", "--count", str(args.users), "--out", str(users)], env)
    stages.append(("generate users (entitle demo-users)", args.users, seconds, peak_mb))
    seconds, peak_mb = _run_measured([entitle, "run", "--users", str(users), "--no-progress"], env)

    pipeline = runs.open_pipeline(load_settings({k: v for k, v in env.items() if k.startswith("ENTITLE_")}))
    stages.append(("grant (entitle run)", args.users * len(pipeline.campaign.items), seconds, peak_mb))
    row = runs.snapshot_row(pipeline, None)
    count = int(row["partition_count"])
    manifest = load_manifest(partitions_dir(pipeline.settings.location(row["snapshot_dir"]), count))
    PARTITION_FILES[:] = [Path(str(entry.path)) for entry in manifest]
    spec = pipeline.campaign.issuers[0]
    spilled_bytes = 0

    def on_stage(stage: str) -> None:
        nonlocal spilled_bytes
        if stage == three_way.STAGES[0]:  # the export's keys are all in the scratch folder now
            spilled_bytes = sum(
                _folder_bytes(folder) for folder in pipeline.settings.home.glob(f".{three_way.SPILL_PREFIX}-*")
            )
        peaks.end(stage)

    start_mb = _current_mb()
    peaks = StagePeaks()
    started = time.perf_counter()
    check = three_way.check_issuer(pipeline, spec, count, on_stage=on_stage)
    seconds = time.perf_counter() - started
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
    for stage, stage_s, stage_mb in peaks.rows:
        rows = check.breaks.height if stage == three_way.STAGES[2] else held  # the details are the breaks'
        stages.append((f"three-way: {stage}", rows, stage_s, stage_mb))
    compare_mb = max(stage_mb for _stage, _s, stage_mb in peaks.rows)
    stages.append(("three-way (all its stages)", held, seconds, compare_mb))

    print(f"\n{args.users:,} users, {count} partitions, {held:,} exported grants\n")
    print(f"| {'stage':<40} | {'rows':>13} | {'seconds':>8} | {'rows/s':>11} | {'peak RSS MB':>11} |")
    print(f"|{'-' * 42}|{'-' * 14}:|{'-' * 9}:|{'-' * 12}:|{'-' * 12}:|")
    for stage, rows, stage_s, stage_mb in stages:
        rate = f"{rows / stage_s:,.0f}" if rows and stage_s >= 0.05 else "—"
        print(f"| {stage:<40} | {rows:>13,} | {stage_s:>8.1f} | {rate:>11} | {stage_mb:>11,.0f} |")
    print()
    if not peaks.resets:
        print("note: /proc/self/clear_refs could not be written, so each stage's peak includes the earlier ones'")
    meets = compare_mb <= PEAK_RSS_TARGET_MB
    scale = "" if args.users >= TARGET_USERS else f" (the target is for {TARGET_USERS:,} users; this run has fewer)"
    print(
        f"target: the three-way comparison's peak RSS <= {PEAK_RSS_TARGET_MB:,} MB at {TARGET_USERS:,} users: "
        f"{compare_mb:,.0f} MB, {'met' if meets else 'NOT MET'}{scale}; the process held {start_mb:,.0f} MB "
        "before it (the ledger's SQLite page cache is up to 256 MiB of it on SQLite)"
    )
    print(
        f"spilled {spilled_bytes / 1e6:,.0f} MB to the scratch folder in ENTITLE_HOME ({spilled_bytes / held:.1f} "
        "bytes a grant), removed afterwards"
    )
    print(
        f"per exported grant: {seconds / held * 1e6:.2f} µs, "
        f"{(compare_mb - start_mb) * 1024 * 1024 / held:.1f} bytes of peak memory above the start"
    )
    return 0 if meets or args.users < TARGET_USERS else 1


if __name__ == "__main__":
    sys.exit(main())
