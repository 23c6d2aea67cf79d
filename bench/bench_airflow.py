"""The nightly run through Airflow's real scheduler, against the same stages run through the CLI.

    .venv/bin/python bench/bench_airflow.py --users 48000000            # make bench-airflow
    .venv/bin/python bench/bench_airflow.py --users 20000 --skip-cli    # trigger to success of a small run

Three measurements, each on a fresh ledger under --home (SQLite unless --ledger-url):

1. CLI: `entitle run` (freeze, partition, grant), `entitle reconcile`, `entitle notices granted`.
2. Scheduler: a project-local Airflow (api-server, scheduler, dag-processor, LocalExecutor, SQLite
   metadata) driven through its REST API: one triggered run of entitlement_grant on the same file,
   then a second one with nothing new. Per task: instances, summed duration, and the grant tasks'
   own body time (XCom ``task_body_s``), so start-up and scheduling show apart from ledger work.
3. With --dag-test, the same run through `dag.test` (every task in one process).

Prints a table and, with --json, one JSON document last.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
sys.path.insert(0, str(ROOT / "tests"))  # the deployment harness the tests use: tests/support
RUN_TIMEOUT_S = 4 * 3600


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--users", type=int, default=int(os.environ.get("BENCH_USERS", 48_000_000)))
    parser.add_argument("--home", type=Path, default=None, help="work folder (default var/bench-airflow/<users>)")
    parser.add_argument("--ledger-url", default=None, help="a PostgreSQL ledger (default: SQLite under --home)")
    parser.add_argument("--partitions", type=int, default=None, help="fixed partition count (default: by size)")
    parser.add_argument("--skip-cli", action="store_true", help="skip the CLI stages")
    parser.add_argument("--dag-test", action="store_true", help="also run the DAG through dag.test")
    parser.add_argument("--keep", action="store_true", help="keep the work folder afterwards")
    parser.add_argument("--json", action="store_true", help="print the figures as one JSON document at the end")
    args = parser.parse_args()
    home = (args.home or ROOT / "var" / "bench-airflow" / str(args.users)).resolve()
    if home.exists():
        shutil.rmtree(home)
    home.mkdir(parents=True)
    from pipeline.grants.demo_users import write_demo_users

    users_file = home / "users.parquet"
    write_demo_users(args.users, users_file)
    figures: dict[str, Any] = {"users": args.users, "machine": f"{os.cpu_count()} cores"}
    if not args.skip_cli:
        figures["cli"] = cli_stages(args, home / "cli", users_file)
        print(f"CLI: {json.dumps(figures['cli'])}", flush=True)
    figures["scheduler"] = scheduler_runs(args, home / "scheduler", users_file)
    if args.dag_test:
        figures["dag_test"] = dag_test_run(args, home / "dag-test", users_file)
    report(figures)
    if args.json:
        print(json.dumps(figures))
    if not args.keep:
        shutil.rmtree(home, ignore_errors=True)
    return 0


def entitle_env(args: argparse.Namespace, entitle_home: Path) -> dict[str, str]:
    """The pipeline's environment for one measurement: its own home and ledger."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ENTITLE_"))}
    env["ENTITLE_HOME"] = str(entitle_home)
    env["PATH"] = f"{BIN}:{env.get('PATH', '')}"
    if args.ledger_url:
        env["ENTITLE_LEDGER_URL"] = args.ledger_url
    if args.partitions:
        env["ENTITLE_PARTITIONS"] = str(args.partitions)
    return env


def cli_stages(args: argparse.Namespace, entitle_home: Path, users_file: Path) -> dict[str, float]:
    """Wall seconds of each CLI stage, as an operator would run them."""
    env = entitle_env(args, entitle_home)
    timings: dict[str, float] = {}
    for stage, command in (
        ("run", ["run", "--users", str(users_file), "--no-progress", "--json"]),
        ("reconcile", ["reconcile", "--no-progress", "--json"]),
        ("notices", ["notices", "granted", "--no-progress", "--json"]),
    ):
        started = time.perf_counter()
        done = subprocess.run([str(BIN / "entitle"), *command], env=env, capture_output=True, text=True, check=False)
        timings[stage] = time.perf_counter() - started
        if done.returncode != 0:
            raise SystemExit(f"entitle {stage} exited {done.returncode}: {done.stderr[-2000:]}")
    timings["total"] = sum(timings.values())
    return timings


def scheduler_runs(args: argparse.Namespace, base: Path, users_file: Path) -> dict[str, Any]:
    """A full night and a nothing-new night through the real scheduler, timed from trigger to end."""
    from support.airflow_deployment import AirflowDeployment

    env = entitle_env(args, base / "entitle")
    extra = {k: v for k, v in env.items() if k.startswith("ENTITLE_")}
    started = time.perf_counter()
    with AirflowDeployment(base, env_extra=extra, use_job_schedule=False) as airflow:
        startup_s = time.perf_counter() - started
        airflow.unpause("entitlement_grant")
        nights = {}
        for night in ("full", "nothing_new"):
            triggered = time.perf_counter()
            run_id = airflow.trigger("entitlement_grant", {"snapshot_uri": str(users_file)})
            state = airflow.wait_for_run("entitlement_grant", run_id, timeout_s=RUN_TIMEOUT_S, poll_s=2.0)
            wall = time.perf_counter() - triggered
            if state != "success":
                raise SystemExit(
                    f"{night} night ended {state}:\n{airflow.describe_task_instances('entitlement_grant', run_id)}"
                )
            figures = task_figures(airflow, run_id)
            nights[night] = {"wall_s": wall, **figures, "scheduling_s": wall - figures["critical_path_s"]}
            print(f"scheduler {night}: {wall:.1f} s", flush=True)
    return {"startup_s": startup_s, **nights}


def task_figures(airflow: Any, run_id: str) -> dict[str, Any]:
    """Per task id: instances and summed duration; grant body time from its XCom."""
    per_task: dict[str, dict[str, float]] = {}
    body_s = 0.0
    for ti in airflow.task_instances("entitlement_grant", run_id):
        if ti.get("state") == "skipped":
            continue
        entry = per_task.setdefault(ti["task_id"], {"instances": 0, "seconds": 0.0})
        entry["instances"] += 1
        entry["seconds"] += float(ti.get("duration") or 0.0)
        if ti["task_id"] == "grant":
            entry_path = f"/api/v2/dags/entitlement_grant/dagRuns/{run_id}/taskInstances/grant/xcomEntries/return_value"
            found = airflow.api("GET", entry_path, params={"map_index": ti["map_index"], "deserialize": True})
            value = found.get("value")
            value = json.loads(value) if isinstance(value, str) else value
            body_s += float((value or {}).get("task_body_s") or 0.0)
    grant_s = per_task.get("grant", {}).get("seconds", 0.0)
    # The DAG's longest path: freeze, plan, the grants one after another (one ledger writer), then the
    # longer of reconcile and notify (they run side by side), then summary.
    seconds = {task_id: entry["seconds"] for task_id, entry in per_task.items()}
    path_s = sum(seconds.get(t, 0.0) for t in ("freeze_snapshot", "plan_partitions", "grant", "summary")) + max(
        seconds.get("reconcile", 0.0), seconds.get("notify", 0.0)
    )
    return {"tasks": per_task, "grant_body_s": body_s, "grant_startup_s": grant_s - body_s, "critical_path_s": path_s}


def dag_test_run(args: argparse.Namespace, base: Path, users_file: Path) -> dict[str, float]:
    """The same run through dag.test (every task in one process), for comparison."""
    env = entitle_env(args, base / "entitle")
    airflow_home = base / "airflow"
    airflow_home.mkdir(parents=True)
    env.update(
        {
            "AIRFLOW_HOME": str(airflow_home),
            "AIRFLOW_CONFIG": str(ROOT / "airflow.cfg"),
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{airflow_home / 'airflow.db'}",
        }
    )
    subprocess.run([str(BIN / "airflow"), "db", "migrate"], env=env, capture_output=True, check=True)
    started = time.perf_counter()
    done = subprocess.run(
        [
            str(BIN / "python"),
            str(ROOT / "ops" / "run_dag.py"),
            "entitlement_grant",
            json.dumps({"snapshot_uri": str(users_file)}),
        ],
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"dag.test run failed: {done.stdout[-2000:]}{done.stderr[-2000:]}")
    return {"wall_s": time.perf_counter() - started}


def report(figures: dict[str, Any]) -> None:
    """The table: stages, per-task time, and the ratio to the CLI."""
    print(f"\n{figures['users']:,} users, {figures['machine']}")
    cli = figures.get("cli")
    if cli:
        stages = ", ".join(f"{stage} {cli[stage]:.1f} s" for stage in ("run", "reconcile", "notices"))
        print(f"CLI  {stages} = {cli['total']:.1f} s")
    scheduler = figures["scheduler"]
    print(f"Airflow start-up (not part of a night) {scheduler['startup_s']:.1f} s")
    for night in ("full", "nothing_new"):
        found = scheduler[night]
        ratio = f" = {found['wall_s'] / cli['total']:.2f}x the CLI" if cli and night == "full" else ""
        print(f"scheduler, {night} night: trigger to success {found['wall_s']:.1f} s{ratio}")
        for task_id, entry in found["tasks"].items():
            print(f"  {task_id:<16} {int(entry['instances']):>5} instance(s) {entry['seconds']:>9.1f} s")
        print(f"  scheduling between task instances (wall minus the longest path) {found['scheduling_s']:.1f} s")
        if found["tasks"].get("grant"):
            print(
                f"  grant bodies (ledger work) {found['grant_body_s']:.1f} s, start-up and wrapping "
                f"{found['grant_startup_s']:.1f} s"
            )
    if "dag_test" in figures:
        print(f"dag.test: {figures['dag_test']['wall_s']:.1f} s")


if __name__ == "__main__":
    sys.exit(main())
