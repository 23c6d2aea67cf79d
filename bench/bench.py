"""Benchmark of the grant pipeline: one line per stage with rows, seconds, rows/s and peak RSS.

    .venv/bin/python bench/bench.py --users 48000000 --backend sqlite

Stages: generate users, freeze the snapshot, partition, grant every partition
(in a child process, so its peak RSS is the grant work's alone), rerun with
nothing to do, look up single users, and a naive baseline on a sample
(row-at-a-time INSERT ... ON CONFLICT DO NOTHING through executemany) with the
ratio of the pipeline's write rate to it.  Targets are printed beside figures.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import sqlite3
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # machine.py and stages.py, beside this script
import machine  # noqa: E402
from machine import peak_rss_mb, reset_peak_rss  # noqa: E402

BASELINE_SAMPLE_USERS = 200_000
LOOKUPS = 1000
TAMPERED_GRANTS = 5  # grants deleted behind the pipeline to time a reconciliation that finds breaks
DEFAULT_PG_URL = "postgresql+psycopg://postgres@127.0.0.1:5432/test"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=int(os.environ.get("BENCH_USERS", 48_000_000)))
    parser.add_argument(
        "--backend", choices=("sqlite", "postgresql"), default=os.environ.get("BENCH_BACKEND", "sqlite")
    )
    parser.add_argument("--partitions", type=int, default=int(os.environ.get("ENTITLE_PARTITIONS", 128)))
    parser.add_argument("--home", type=Path, default=None, help="work folder (default var/bench/<users>-<backend>)")
    parser.add_argument("--pg-url", default=os.environ.get("BENCH_PG_URL", DEFAULT_PG_URL))
    parser.add_argument(
        "--writers", type=int, default=None, help="ledger writer threads for the grant stage (default: 2 on PostgreSQL)"
    )
    parser.add_argument(
        "--bound-partitions",
        type=int,
        default=8,
        help="PostgreSQL: partitions sampled for the raw-COPY bound and the ON CONFLICT baseline (default 8)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON document at the end")
    parser.add_argument(
        "--record",
        type=Path,
        default=None,
        help="also write the figures, the command and the machine to this JSON file "
        "(docs/performance/*.json feed docs/performance.md: bench/performance_page.py)",
    )
    parser.add_argument(
        "--airflow",
        action="store_true",
        help="run the campaign through Airflow's scheduler and the CLI (bench/bench_airflow.py --dag-test)",
    )
    parser.add_argument(
        "--stages",
        default=None,
        help="run only these stages, comma-separated, each with its own peak RSS: "
        "generate,freeze,partition,grant,reconcile,notify (bench/stages.py); the last three on --partitions-sample",
    )
    parser.add_argument(
        "--partitions-sample",
        type=float,
        default=0.05,
        help="with --stages: the share of the partitions that grant, reconcile and notify run on (default 0.05)",
    )
    parser.add_argument("--child-figures", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-grant", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--child-reconcile", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    home = args.home or ROOT / "var" / "bench" / f"{args.users}-{args.backend}"
    env = {
        "ENTITLE_HOME": str(home),
        "ENTITLE_PARTITIONS": str(args.partitions),
        "ENTITLE_LEDGER_URL": args.pg_url if args.backend == "postgresql" else f"sqlite:///{home / 'ledger.sqlite'}",
    }
    if args.writers is None:
        args.writers = 2 if args.backend == "postgresql" else 1
    if args.child_grant:
        return child_grant(env, args.writers)
    if args.child_reconcile:
        return child_reconcile(env)
    if args.airflow:
        return airflow_bench(args)
    if args.stages is not None:
        return stages_bench(args, home, env)
    return run_bench(args, home, env)


def stages_bench(args: argparse.Namespace, home: Path, env: dict[str, str]) -> int:
    """bench.py --stages: the chosen stages (bench/stages.py), the work folder kept for the next ones."""
    import stages  # bench/stages.py, beside this script

    names = stages.parse(args.stages)
    if "generate" in names and home.exists():
        shutil.rmtree(home)
    if args.backend == "postgresql" and "generate" in names:
        reset_postgres(args.pg_url)
    print(f"bench: {args.users:,} users, backend {args.backend}, {args.partitions} partitions, home {home}", flush=True)
    print(f"{'stage':<22} {'rows':>13} {'seconds':>9} {'rows/s':>13} {'peak RSS MB':>12}  target", flush=True)

    figures: list[dict[str, Any]] = []

    report = reporter(figures)

    status = int(stages.run(args, home, env, report, peak_rss_mb))
    if args.child_figures:
        print(json.dumps(figures))
        return status
    if args.record is not None and status == 0:
        command = reproducing_command(args) + f" --stages {args.stages}"
        if any(name in stages.SAMPLED for name in names):
            command += f" --partitions-sample {args.partitions_sample}"
        write_record(args, record_document(args, "grant pipeline, stage by stage", command, figures))
    return status


def airflow_bench(args: argparse.Namespace) -> int:
    """The campaign through Airflow's real scheduler against the CLI: bench_airflow.py (dag.test as a second line)."""
    command = [sys.executable, str(ROOT / "bench" / "bench_airflow.py"), "--users", str(args.users), "--dag-test"]
    if args.backend == "postgresql":
        command += ["--ledger-url", args.pg_url]
    if args.json:
        command.append("--json")
    return subprocess.call(command)


def run_bench(args: argparse.Namespace, home: Path, env: dict[str, str]) -> int:

    from pipeline.config import load_settings
    from pipeline.grants import runs
    from pipeline.grants.demo_users import write_demo_users

    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    if args.backend == "postgresql":
        reset_postgres(args.pg_url)
    figures: list[dict[str, Any]] = []
    print(f"bench: {args.users:,} users, backend {args.backend}, {args.partitions} partitions, home {home}", flush=True)
    print(f"{'stage':<22} {'rows':>13} {'seconds':>9} {'rows/s':>13} {'peak RSS MB':>12}  target", flush=True)

    report = reporter(figures)

    users_file = home / "users.parquet"
    reset_peak_rss()  # each stage's figure is its own peak, not the highest so far
    started = time.perf_counter()
    write_demo_users(args.users, users_file)
    report("generate users", args.users, time.perf_counter() - started, peak_rss_mb())

    settings = load_settings(env)
    pipeline = runs.open_pipeline(settings)
    runs.register(pipeline)
    # Freeze and partition in a fresh process, as Airflow runs them: their peaks are their own.
    for figure in run_stages_child(env, args, home, "freeze,partition"):
        report(figure["stage"], figure["rows"], figure["seconds"], figure["peak_rss_mb"], figure["target"])
    from pipeline.grants.snapshot import load_snapshot_report

    snapshot_report = load_snapshot_report(Path(json.loads((home / "frozen.json").read_text())["directory"]))

    planned = snapshot_report.eligible_users * len(pipeline.campaign.items)
    grant_figures = run_child(env, args)
    report(
        "grant (all partitions)",
        grant_figures["written"],
        grant_figures["seconds"],
        grant_figures["rss_mb"],
        (">= 600,000 grants/s" if args.backend == "postgresql" else ">= 1,000,000 grants/s")
        + f"; peak RSS <= 1,500 MB; {args.writers} writer(s)",
    )
    if grant_figures["written"] != planned:
        print(f"ERROR: wrote {grant_figures['written']:,} grants, planned {planned:,}", file=sys.stderr)
        return 1

    grant_rate = grant_figures["written"] / grant_figures["seconds"]
    size = ledger_bytes(args, home)
    report(
        "ledger on disk",
        grant_figures["written"],
        0.0,
        0.0,
        f"{size / 1e9:.1f} GB in all; {size / grant_figures['written'] * 1e8 / 1e9:.1f} GB per 100M grants",
    )
    if args.backend == "postgresql":
        bound, conflict = pg_bounds(pipeline, args.bound_partitions)
        report(
            "COPY bound (unindexed)",
            bound["rows"],
            bound["seconds"],
            peak_rss_mb(),
            f"raw binary COPY, {args.bound_partitions} partitions, one stream; the pipeline reaches "
            f"{grant_rate / bound['rate']:.0%} of it",
        )
        report(
            "ON CONFLICT baseline",
            conflict["rows"],
            conflict["seconds"],
            peak_rss_mb(),
            "COPY to staging + INSERT ... ON CONFLICT DO NOTHING; the pipeline is "
            f"{grant_rate / conflict['rate']:.2f}x this (target >= 2.5x)",
        )
    partition_s = next(f["seconds"] for f in figures if f["stage"] == "partition")

    rerun_figures = run_child(env, args)
    report("rerun (nothing to do)", planned, rerun_figures["seconds"], rerun_figures["rss_mb"], "<= 60 s")
    if rerun_figures["written"] != 0:
        print(f"ERROR: the rerun wrote {rerun_figures['written']:,} grants", file=sys.stderr)
        return 1

    recon = run_child(env, args, "--child-reconcile")
    report(
        "reconcile (clean)",
        recon["grants_checked"],
        recon["seconds"],
        recon["worker_peak_rss_mb"],
        f">= 3,000,000 grants/s, <= 80 s; verdict {recon['verdict']} "
        f"({recon['checksum_partitions']} partitions by checksum); RSS is a worker's peak",
    )
    if recon["verdict"] != "RECONCILED":
        print(f"ERROR: reconciliation says {recon['verdict']}", file=sys.stderr)
        return 1
    end_to_end = partition_s + grant_figures["seconds"] + recon["seconds"]
    report(
        "end to end",
        planned,
        end_to_end,
        max(grant_figures["rss_mb"], recon["worker_peak_rss_mb"]),
        f"partition + grant + reconcile; <= 720 s for 48M ({end_to_end / 60:.1f} min)",
    )
    tampered = tamper_sample(pipeline, snapshot_report.users_file, TAMPERED_GRANTS)
    recon = run_child(env, args, "--child-reconcile")
    report(
        "reconcile (5 breaks)",
        recon["grants_checked"],
        recon["seconds"],
        recon["worker_peak_rss_mb"],
        f"verdict {recon['verdict']}, {recon['open_breaks']} breaks; {recon['row_partitions']} partitions "
        "compared row by row",
    )
    if recon["verdict"] != "BREAKS" or recon["open_breaks"] != tampered:
        print(f"ERROR: expected {tampered} breaks, reconciliation says {recon}", file=sys.stderr)
        return 1
    report(
        "report (HTML + PNG)",
        recon["partitions"],
        recon["report_s"],
        recon["worker_peak_rss_mb"],
        "rows = partitions drawn; the page and the chart of the reconciliation above",
    )

    reset_peak_rss()
    lookup_ms = lookup_users(pipeline, snapshot_report.users_file)
    report(
        "user lookup (median)",
        LOOKUPS,
        lookup_ms["median_ms"] / 1000 * LOOKUPS,
        peak_rss_mb(),
        f"<= {2 if args.backend == 'postgresql' else 5} ms per user "
        f"(median {lookup_ms['median_ms']:.3f} ms, p99 {lookup_ms['p99_ms']:.3f} ms)",
    )

    reset_peak_rss()
    baseline = naive_baseline(args.backend, args.pg_url, home, snapshot_report.users_file, pipeline)
    ratio = (grant_figures["written"] / grant_figures["seconds"]) / baseline["rate"]
    report(
        "naive executemany",
        baseline["rows"],
        baseline["seconds"],
        peak_rss_mb(),
        f"pipeline is {ratio:.2f}x this baseline",
    )
    document = {
        **record_document(args, "grant pipeline", reproducing_command(args), figures),
        "lookup": lookup_ms,
        "lookups": LOOKUPS,
        "ratio_vs_naive": ratio,
    }
    if args.json:
        print(json.dumps(document, indent=2))
    if args.record is not None:
        write_record(args, document)
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return 0


def record_document(
    args: argparse.Namespace, benchmark: str, command: str, figures: list[dict[str, Any]]
) -> dict[str, Any]:
    """What a --record file holds: the figures, the command that repeats them and the machine."""
    return {
        "benchmark": benchmark,
        "command": command,
        "machine": machine.describe(args.pg_url if args.backend == "postgresql" else None),
        "users": args.users,
        "backend": args.backend,
        "partitions": args.partitions,
        "writers": args.writers,
        "stages": figures,
    }


def write_record(args: argparse.Namespace, document: dict[str, Any]) -> None:
    """Write ``document`` to --record (docs/performance/*.json feed docs/performance.md)."""
    args.record.parent.mkdir(parents=True, exist_ok=True)
    args.record.write_text(json.dumps(document, indent=2) + "\n", encoding="utf-8")
    print(f"recorded in {args.record}; render the page with .venv/bin/python bench/performance_page.py")


def reporter(figures: list[dict[str, Any]]) -> Callable[..., None]:
    """``report(stage, rows, seconds, rss_mb, target="")``: print one line and keep it in ``figures``."""

    def report(stage: str, rows: int, seconds: float, rss_mb: float, target: str = "") -> None:
        rate = rows / seconds if seconds > 0 else 0.0
        figures.append(
            {
                "stage": stage,
                "rows": rows,
                "seconds": round(seconds, 3),
                "rows_per_s": round(rate),
                "peak_rss_mb": round(rss_mb),
                "target": target,
            }
        )
        print(f"{stage:<22} {rows:>13,} {seconds:>9.2f} {rate:>13,.0f} {rss_mb:>12,.0f}  {target}", flush=True)

    return report


def reproducing_command(args: argparse.Namespace) -> str:
    """The command line that repeats this run (defaults left out)."""
    command = f".venv/bin/python bench/bench.py --users {args.users} --backend {args.backend}"
    if args.partitions != 128:
        command += f" --partitions {args.partitions}"
    if args.writers != (2 if args.backend == "postgresql" else 1):
        command += f" --writers {args.writers}"
    if args.backend == "postgresql" and args.pg_url != DEFAULT_PG_URL:
        command += " --pg-url URL"
    return command


def run_stages_child(env: dict[str, str], args: argparse.Namespace, home: Path, names: str) -> list[dict[str, Any]]:
    """Run ``--stages names`` in a fresh process on ``home``; its figures."""
    command = [sys.executable, __file__, "--stages", names, "--child-figures", "--home", str(home)]
    command += ["--users", str(args.users), "--backend", args.backend, "--partitions", str(args.partitions)]
    command += ["--pg-url", args.pg_url]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stdout + result.stderr)
        raise SystemExit(f"the {names} child failed with exit code {result.returncode}")
    return list(json.loads(result.stdout.strip().splitlines()[-1]))


def run_child(env: dict[str, str], args: argparse.Namespace, mode: str = "--child-grant") -> dict[str, Any]:
    """Grant (or reconcile) in a fresh process; its own peak RSS is that work's."""
    command = [
        sys.executable,
        __file__,
        mode,
        "--users",
        str(args.users),
        "--backend",
        args.backend,
        "--partitions",
        str(args.partitions),
        "--pg-url",
        args.pg_url,
        "--writers",
        str(args.writers),
    ]
    if args.home is not None:
        command += ["--home", str(args.home)]
    result = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"grant child failed with exit code {result.returncode}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def child_grant(env: dict[str, str], writers: int) -> int:
    from pipeline.config import load_settings
    from pipeline.grants import runs

    pipeline = runs.open_pipeline(load_settings(env))
    runs.register(pipeline)
    run = runs.start_run(pipeline, trigger="bench")
    started = time.perf_counter()
    outcomes = runs.grant(pipeline, run, run.entries, writers=writers)
    seconds = time.perf_counter() - started
    runs.require_all_done(outcomes)
    print(json.dumps({"written": sum(o.written for o in outcomes), "seconds": seconds, "rss_mb": peak_rss_mb()}))
    return 0


def child_reconcile(env: dict[str, str]) -> int:
    from pipeline import reconciliation
    from pipeline.config import load_settings
    from pipeline.grants import runs

    pipeline = runs.open_pipeline(load_settings(env))
    started = time.perf_counter()
    result = reconciliation.reconcile(pipeline)
    seconds = time.perf_counter() - started
    from pipeline import report

    started = time.perf_counter()
    report.write_report(result.as_dict(), Path(result.export_dir))
    report_s = time.perf_counter() - started
    print(
        json.dumps(
            {
                "seconds": seconds,
                "verdict": result.verdict,
                "grants_checked": result.grants_checked,
                "open_breaks": result.open_breaks,
                "checksum_partitions": result.checksum_partitions,
                "row_partitions": result.row_partitions,
                "worker_peak_rss_mb": max(result.extra["worker_peak_rss_mb"], peak_rss_mb()),
                "report_s": report_s,
                "partitions": len(result.partitions),
            }
        )
    )
    return 0


def tamper_sample(pipeline: Any, users_file: Path, count: int) -> int:
    """Delete ``count`` grants of users spread over the partitions, behind the pipeline's back."""
    import polars as pl
    import sqlalchemy as sa

    from pipeline.grants.partitioning import user_bucket

    users = pl.read_parquet(users_file)["user_id"]
    chosen = [int(users[i * (len(users) // count)]) for i in range(count)]
    with pipeline.engine.begin() as connection:
        if connection.dialect.name == "postgresql":
            connection.exec_driver_sql("SET LOCAL session_replication_role = replica")
        else:
            connection.exec_driver_sql("DROP TRIGGER IF EXISTS grants_append_only_delete")
        for user_id in chosen:
            connection.execute(
                sa.text("DELETE FROM grants WHERE user_bucket = :b AND user_id = :u AND item_key = 1"),
                {"b": user_bucket(user_id), "u": user_id},
            )
    return count


def lookup_users(pipeline: Any, users_file: Path) -> dict[str, float]:
    """Median and p99 latency of the user_grants named query for random users, on one open connection."""
    import polars as pl

    from pipeline.ledger.queries import run_query

    users = pl.read_parquet(users_file)["user_id"]
    picks = [int(users[random.randrange(users.len())]) for _ in range(LOOKUPS)]
    latencies = []
    # One open connection, as a service answering lookups (or a psql session) would hold.
    with pipeline.engine.connect() as connection:
        for user_id in picks:
            started = time.perf_counter()
            result = run_query(pipeline.engine, "user_grants", {"user_id": str(user_id)}, connection)
            latencies.append((time.perf_counter() - started) * 1000)
            if len(result.rows) != len(pipeline.campaign.items):
                raise SystemExit(
                    f"user {user_id} has {len(result.rows)} grants, expected {len(pipeline.campaign.items)}"
                )
    latencies.sort()
    return {"median_ms": statistics.median(latencies), "p99_ms": latencies[int(len(latencies) * 0.99) - 1]}


def naive_baseline(backend: str, pg_url: str, home: Path, users_file: Path, pipeline: Any) -> dict[str, float]:
    """Row-at-a-time INSERT ... ON CONFLICT DO NOTHING via executemany into a copy of the grants table."""
    import polars as pl

    users = pl.read_parquet(users_file).head(BASELINE_SAMPLE_USERS)["user_id"].to_list()
    items = list(pipeline.keys.item_keys.values())
    rows = [(1, u % 2147483647 * 1540483477 % 2147483647, u, k, 0, 1, None, 0, None, 0) for u in users for k in items]
    columns = (
        "campaign_key, user_bucket, user_id, item_key, partition_id, run_key, amount_krw, valid_from, "
        "valid_until, granted_at"
    )
    if backend == "sqlite":
        path = home / "baseline.sqlite"
        connection = sqlite3.connect(path)
        connection.execute("PRAGMA journal_mode=WAL")
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute(
            "CREATE TABLE grants (campaign_key INTEGER NOT NULL, user_bucket INTEGER NOT NULL,"
            " user_id INTEGER NOT NULL, item_key INTEGER NOT NULL, partition_id INTEGER NOT NULL,"
            " run_key INTEGER NOT NULL, amount_krw INTEGER,"
            " valid_from INTEGER NOT NULL, valid_until INTEGER, granted_at INTEGER NOT NULL,"
            " PRIMARY KEY (campaign_key, item_key, user_id)) WITHOUT ROWID"
        )
        started = time.perf_counter()
        with connection:
            connection.executemany(
                f"INSERT INTO grants ({columns}) VALUES (?,?,?,?,?,?,?,?,?,?) ON CONFLICT DO NOTHING", rows
            )
        seconds = time.perf_counter() - started
        connection.close()
    else:
        import psycopg

        dsn = pg_url.replace("postgresql+psycopg://", "postgresql://")
        with psycopg.connect(dsn) as connection:
            connection.execute("DROP TABLE IF EXISTS bench_naive_grants")
            connection.execute("CREATE TABLE bench_naive_grants (LIKE grants INCLUDING ALL)")
            started = time.perf_counter()
            with connection.cursor() as cursor:
                cursor.executemany(
                    f"INSERT INTO bench_naive_grants ({columns}) VALUES (%s,%s,%s,%s,%s,%s,%s,"
                    "to_timestamp(%s),NULL,to_timestamp(%s)) ON CONFLICT DO NOTHING",
                    [r[:8] + (r[9],) for r in rows],
                )
            connection.commit()
            seconds = time.perf_counter() - started
            connection.execute("DROP TABLE bench_naive_grants")
    return {"rows": len(rows), "seconds": seconds, "rate": len(rows) / seconds}


def pg_bounds(pipeline: Any, sample: int) -> tuple[dict[str, float], dict[str, float]]:
    """The grants of ``sample`` partitions written two other ways, into scratch tables beside the ledger.

    Raw: binary COPY into an unindexed, unchecked copy of grants (what this machine can
    ingest at all). Baseline: the textbook idempotent load, binary COPY into a staging
    table and INSERT ... ON CONFLICT DO NOTHING into an indexed copy of grants, one
    transaction per partition.
    """
    import datetime as dt

    from pipeline.grants.partitioning import read_partition
    from pipeline.grants.runs import start_run
    from pipeline.ledger import pgcopy

    run = start_run(pipeline, trigger="bench-bounds")
    entries = list(run.entries)[:sample]
    now = dt.datetime.now(dt.UTC)

    def constants(partition_id: int) -> Any:
        return pgcopy.RowConstants(
            pipeline.keys.campaign_key,
            partition_id,
            run.run_key,
            now,
            [
                pgcopy.ItemTerms(pipeline.keys.item_keys[i.sku], i.amount_krw, i.valid_from, i.valid_until)
                for i in pipeline.campaign.items
            ],
        )

    frames = [(e.partition_id, read_partition(e)) for e in entries]
    rows = sum(f.height for _, f in frames) * len(pipeline.campaign.items)
    engine = pipeline.engine
    key = ", ".join(pgcopy.COLUMNS[:5])
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE IF EXISTS bench_raw, bench_conflict")
        connection.exec_driver_sql("CREATE TABLE bench_raw (LIKE grants INCLUDING DEFAULTS)")
        connection.exec_driver_sql("CREATE TABLE bench_conflict (LIKE grants INCLUDING DEFAULTS INCLUDING CONSTRAINTS)")
        connection.exec_driver_sql(f"ALTER TABLE bench_conflict ADD PRIMARY KEY ({key})")
    started = time.perf_counter()
    for partition_id, frame in frames:
        with engine.begin() as connection:
            pgcopy.copy_rows(connection, "bench_raw", constants(partition_id), frame)
    raw_s = time.perf_counter() - started
    started = time.perf_counter()
    for partition_id, frame in frames:
        with engine.begin() as connection:
            connection.exec_driver_sql("CREATE TEMP TABLE bench_stage (LIKE grants) ON COMMIT DROP")
            pgcopy.copy_rows(connection, "bench_stage", constants(partition_id), frame)
            connection.exec_driver_sql(
                f"INSERT INTO bench_conflict SELECT * FROM bench_stage ORDER BY {key} ON CONFLICT DO NOTHING"
            )
    conflict_s = time.perf_counter() - started
    with engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE bench_raw, bench_conflict")
    return (
        {"rows": rows, "seconds": raw_s, "rate": rows / raw_s},
        {"rows": rows, "seconds": conflict_s, "rate": rows / conflict_s},
    )


def ledger_bytes(args: argparse.Namespace, home: Path) -> int:
    """The ledger's size on disk: the SQLite file and its WAL, or the PostgreSQL database."""
    if args.backend == "sqlite":
        return sum(path.stat().st_size for path in home.glob("ledger.sqlite*"))
    import psycopg

    with psycopg.connect(args.pg_url.replace("postgresql+psycopg://", "postgresql://")) as connection:
        row = connection.execute("SELECT pg_database_size(current_database())").fetchone()
    return int(row[0]) if row else 0


def reset_postgres(pg_url: str) -> None:
    import psycopg

    with psycopg.connect(pg_url.replace("postgresql+psycopg://", "postgresql://"), autocommit=True) as connection:
        connection.execute("DROP SCHEMA public CASCADE")
        connection.execute("CREATE SCHEMA public")


if __name__ == "__main__":
    sys.path.insert(0, str(ROOT))
    raise SystemExit(main())
