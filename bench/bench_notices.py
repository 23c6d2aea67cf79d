"""Benchmark of the granted notices export (``entitle notices granted``): users/s, seconds and peak RSS.

    .venv/bin/python bench/bench_notices.py                      # 2,000,000 users, SQLite, both methods
    .venv/bin/python bench/bench_notices.py --users 2000000 \
        --ledger-url postgresql+psycopg://postgres@127.0.0.1:5432/bench_notices
    .venv/bin/python bench/bench_notices.py --reuse --method aggregate --repeat 3 --json

Builds a ledger of USERS synthetic users with the project's own CLI (``entitle
demo-users`` and ``entitle run``: the bundled campaign, five grants per user),
then times ``notices.export_granted`` for the run, each time in a fresh child
process so that its peak RSS is the export's own (CPU seconds include the
export's worker processes; "workers MB" is the largest one's peak RSS). ``--method`` picks the
aggregate method (the default of ``entitle notices granted``), the row-by-row
method (the export as it was before the aggregate method), or both; with both,
the files they wrote are compared byte for byte. Seconds are scaled linearly to
48 million users.

``--ledger-url`` takes a PostgreSQL database whose name starts with ``bench_``;
it is dropped and created again unless ``--reuse`` finds the ledger this script
built before under ``--home``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
TARGET_USERS = 48_000_000
TARGET_SECONDS = 40.0  # SQLite, 48 million users
LEDGER_MARKER = "bench-ledger.json"

sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

# bench/bench.py: peak RSS of this process image; bench/bench_three_way.py: a fresh bench_* PostgreSQL database.
from bench_three_way import _fresh_database  # noqa: E402

from bench import self_rss_mb  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=2_000_000)
    parser.add_argument("--partitions", type=int, default=128)
    parser.add_argument(
        "--home", type=Path, default=None, help="work folder (default var/bench-notices/<users>-<partitions>p-<db>)"
    )
    parser.add_argument(
        "--ledger-url",
        help="a PostgreSQL ledger whose database name starts with bench_ (dropped and created again); default SQLite",
    )
    parser.add_argument("--method", choices=("aggregate", "rows", "both"), default="both")
    parser.add_argument("--repeat", type=int, default=1, help="exports per method (default 1)")
    parser.add_argument("--workers", type=int, default=None, help="partitions at a time (aggregate method)")
    parser.add_argument("--reuse", action="store_true", help="keep a ledger this script built before with these sizes")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON document at the end")
    parser.add_argument("--child", choices=("aggregate", "rows"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    backend = "pg" if args.ledger_url else "sqlite"
    home = args.home or ROOT / "var" / "bench-notices" / f"{args.users}-{args.partitions}p-{backend}"
    env = {"ENTITLE_HOME": str(home / "var"), "ENTITLE_PARTITIONS": str(args.partitions)}
    if args.ledger_url:
        env["ENTITLE_LEDGER_URL"] = args.ledger_url
    if args.child:
        return child_export({k: v for k, v in os.environ.items() if k.startswith("ENTITLE_")}, args.child, args.workers)

    ledger = build_ledger(args, home, env)
    figures: list[dict[str, Any]] = []
    methods = ("rows", "aggregate") if args.method == "both" else (args.method,)
    print(
        f"notices bench: {ledger['users']:,} users, {ledger['grants']:,} grants, {args.partitions} partitions, "
        f"{'PostgreSQL' if args.ledger_url else 'SQLite'}, {os.cpu_count()} CPUs, home {home}",
        flush=True,
    )
    print(
        f"{'method':<10} {'run':>3} {'users':>11} {'seconds':>8} {'CPU s':>7} {'users/s':>11} {'peak RSS MB':>12} "
        f"{'workers MB':>11} {'48M users s':>12}"
    )
    for method in methods:
        for attempt in range(1, args.repeat + 1):
            result = run_child(args, env, method)
            result.update(method=method, attempt=attempt)
            result["users_per_s"] = result["users"] / result["seconds"]
            result["seconds_48m"] = result["seconds"] * TARGET_USERS / result["users"]
            figures.append(result)
            print(
                f"{method:<10} {attempt:>3} {result['users']:>11,} {result['seconds']:>8.2f} {result['cpu_s']:>7.1f} "
                f"{result['users_per_s']:>11,.0f} {result['rss_mb']:>12,.0f} {result['worker_rss_mb']:>11,.0f} "
                f"{result['seconds_48m']:>12.0f}",
                flush=True,
            )
    best = {m: min(f["seconds"] for f in figures if f["method"] == m) for m in methods}
    identical = None
    if len(methods) == 2:
        digests = {json.dumps(f["digests"], sort_keys=True) for f in figures}
        identical = len(digests) == 1
        print(
            f"aggregate is {best['rows'] / best['aggregate']:.1f}x the row-by-row export (best runs); "
            f"files identical: {identical}"
        )
    if "aggregate" in best:
        scaled = best["aggregate"] * TARGET_USERS / ledger["users"]
        target = f"target <= {TARGET_SECONDS:.0f} s on SQLite" if not args.ledger_url else "PostgreSQL: no target"
        print(f"aggregate, scaled linearly to {TARGET_USERS:,} users: {scaled:.0f} s ({target})")
    if args.json:
        for f in figures:
            f.pop("digests")
        document = {
            "users": ledger["users"],
            "grants": ledger["grants"],
            "partitions": args.partitions,
            "backend": "postgresql" if args.ledger_url else "sqlite",
            "cpus": os.cpu_count(),
            "runs": figures,
            "best_seconds": best,
            "files_identical": identical,
        }
        print(json.dumps(document, indent=2))
    if identical is False:
        print("ERROR: the two methods wrote different files", file=sys.stderr)
        return 1
    return 0


def build_ledger(args: argparse.Namespace, home: Path, env: dict[str, str]) -> dict[str, Any]:
    """Users and grants through the CLI, or the ledger a previous ``--reuse`` run left."""
    marker = home / LEDGER_MARKER
    wanted = {"users": args.users, "partitions": args.partitions, "ledger_url": args.ledger_url}
    if args.reuse and marker.exists():
        built = dict(json.loads(marker.read_text(encoding="utf-8")))
        if all(built.get(k) == v for k, v in wanted.items()):
            return built
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    if args.ledger_url:
        _fresh_database(args.ledger_url)
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("ENTITLE_")} | env
    users = home / "users.parquet"
    entitle = str(BIN / "entitle")
    subprocess.run(
        [entitle, "demo-users", "--count", str(args.users), "--out", str(users)],
        env=run_env,
        check=True,
        capture_output=True,
    )
    started = time.perf_counter()
    done = subprocess.run(
        [entitle, "run", "--users", str(users), "--no-progress", "--json"],
        env=run_env,
        check=True,
        capture_output=True,
        text=True,
    )
    print(f"ledger built in {time.perf_counter() - started:.1f} s (entitle run)", flush=True)
    granted = json.loads(done.stdout)
    built = {**wanted, "grants": int(granted["written"]), "run_id": granted["run_id"]}
    built["users"] = args.users
    marker.write_text(json.dumps(built), encoding="utf-8")
    return built


def run_child(args: argparse.Namespace, env: dict[str, str], method: str) -> dict[str, Any]:
    """One export in a fresh process (its peak RSS is the export's alone)."""
    command = [sys.executable, __file__, "--child", method]
    if args.workers is not None:
        command += ["--workers", str(args.workers)]
    run_env = {k: v for k, v in os.environ.items() if not k.startswith("ENTITLE_")} | env
    result = subprocess.run(command, capture_output=True, text=True, env=run_env, check=False)
    if result.returncode != 0:
        sys.stderr.write(result.stderr)
        raise SystemExit(f"export child failed with exit code {result.returncode}")
    return dict(json.loads(result.stdout.strip().splitlines()[-1]))


def child_export(env: dict[str, str], method: str, workers: int | None) -> int:
    from pipeline.config import load_settings
    from pipeline.grants import notices, runs

    pipeline = runs.open_pipeline(load_settings(env))
    started = time.perf_counter()
    cpu = time.process_time()
    export = notices.export_granted(pipeline, method=method, workers=workers)
    seconds = time.perf_counter() - started
    # The export's worker processes have ended (and were waited for): their CPU time and peak RSS.
    workers_usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu_s = time.process_time() - cpu + workers_usage.ru_utime + workers_usage.ru_stime
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(Path(export.directory).iterdir())}
    print(
        json.dumps(
            {
                "users": export.users,
                "seconds": seconds,
                "cpu_s": cpu_s,
                "rss_mb": self_rss_mb(),
                "worker_rss_mb": workers_usage.ru_maxrss / 1024,
                "run_id": export.detail["run_id"],
                "digests": digests,
            }
        )
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
