"""Run a DAG of this project once, in-process, with ``dag.test()`` — no scheduler needed.

    python ops/run_dag.py entitlement_grant '{"snapshot_uri": "var/demo/users.parquet"}'
    python ops/run_dag.py merchant_cash '{}' 2023-01-16T03:00:00+09:00   # a logical date in its schedule
    python ops/run_dag.py --log var/airflow/demo-run.log --progress entitlement_grant '{}'   # what make demo does

Needs AIRFLOW_HOME/AIRFLOW_CONFIG (the Makefile sets them) and a migrated
metadata DB (`airflow db migrate`). Prints one JSON line last:
{"dag_id", "run_id", "state"}. Exit 0 when the run succeeded, 1 when it failed,
2 when the conf was refused (a Param did not validate).

--log FILE sends everything the process prints (Airflow's and the tasks' logs, and the
JSON line) to FILE; --progress prints the run's progress on standard error as it goes
(task instances done of all, each mapped one counted: see ops/dag_progress.py) and a last
line when it ends. Together, the terminal shows the progress and the file holds the log.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from pathlib import Path
from typing import IO, Any

from dag_progress import ProgressReporter, TaskInstanceRow


def find_dag(dag_id: str) -> Any:
    """The DAG ``dag_id`` from the dags folder: ``<dag_id>.py`` first, then every other DAG file."""
    from airflow.configuration import conf
    from airflow.sdk import DAG

    folder = Path(conf.get("core", "dags_folder"))
    # As Airflow's dag-processor and workers do: the dags folder is importable (entitle_airflow/).
    if str(folder) not in sys.path:
        sys.path.append(str(folder))
    files = [folder / f"{dag_id}.py"] + sorted(p for p in folder.glob("*.py") if p.stem != dag_id)
    for dag_file in files:
        if not dag_file.exists():
            continue
        spec = importlib.util.spec_from_file_location(f"{dag_file.stem}_dagfile", dag_file)
        if spec is None or spec.loader is None:
            continue
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        for value in vars(module).values():
            if isinstance(value, DAG) and value.dag_id == dag_id:
                return value
    return None


def task_states_reader(dag_id: str, run_after: datetime) -> Callable[[], Sequence[TaskInstanceRow]]:
    """Reads the task instances of the run of ``dag_id`` that ``dag.test`` creates with ``run_after``.

    Its own engine without a pool: each read is one short connection of the polling thread,
    never dag.test's session.
    """
    import sqlalchemy as sa
    from airflow.configuration import conf
    from airflow.models.dagrun import DagRun
    from airflow.models.taskinstance import TaskInstance

    engine = sa.create_engine(conf.get("database", "sql_alchemy_conn"), poolclass=sa.pool.NullPool)
    ti, run = TaskInstance.__table__, DagRun.__table__
    query = (
        sa.select(ti.c.task_id, ti.c.map_index, ti.c.state)
        .join(run, sa.and_(run.c.dag_id == ti.c.dag_id, run.c.run_id == ti.c.run_id))
        .where(run.c.dag_id == dag_id, run.c.run_after == run_after)
    )

    def read() -> list[TaskInstanceRow]:
        with engine.connect() as connection:
            return [(str(t), int(m), None if s is None else str(s)) for t, m, s in connection.execute(query)]

    return read


def send_output_to(log_file: Path) -> IO[str]:
    """Send this process's standard output and error to ``log_file`` (at the descriptors: every library's
    writes too); return a stream on the former standard error, for the progress lines."""
    sys.stdout.flush()
    sys.stderr.flush()
    terminal = os.fdopen(os.dup(sys.stderr.fileno()), "w", buffering=1)
    log_file.parent.mkdir(parents=True, exist_ok=True)
    with open(log_file, "w", encoding="utf-8") as log:
        os.dup2(log.fileno(), sys.stdout.fileno())
        os.dup2(log.fileno(), sys.stderr.fileno())
    return terminal


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="run_dag.py", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--log", type=Path, help="write everything printed (Airflow's logs, the result) to this file")
    parser.add_argument("--progress", action="store_true", help="print the run's progress on standard error")
    parser.add_argument("dag_id")
    parser.add_argument("conf", nargs="?", default="{}", help="the run conf, a JSON object (default {})")
    parser.add_argument("logical_date", nargs="?", type=datetime.fromisoformat, help="ISO 8601 with an offset")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    run_conf = json.loads(args.conf)
    terminal = send_output_to(args.log) if args.log else sys.stderr

    def say(line: str) -> None:
        print(line, file=terminal, flush=True)

    # Airflow is imported after the output went to the log: its import-time warnings go there too.
    from airflow.configuration import conf
    from airflow.sdk import DagRunState, timezone
    from airflow.sdk.exceptions import ParamValidationError

    dag = find_dag(args.dag_id)
    if dag is None:
        message = f"run_dag: no DAG {args.dag_id!r} in {conf.get('core', 'dags_folder')}"
        print(message, file=sys.stderr)
        if args.log:
            say(message)
        return 2
    # Both instants given here (dag.test's own defaults are the same "now"), so that the progress
    # reader finds the run dag.test creates by its run_after.
    run_after = timezone.coerce_datetime(timezone.utcnow())
    logical_date = args.logical_date or run_after
    reporter = ProgressReporter(args.dag_id, task_states_reader(args.dag_id, run_after), say) if args.progress else None
    if reporter is not None:
        reporter.start()
    try:
        run = dag.test(run_conf=run_conf, logical_date=logical_date, run_after=run_after)
    except ParamValidationError as exc:
        print(f"run_dag: the run conf was refused: {exc}", file=sys.stderr)
        print(json.dumps({"dag_id": args.dag_id, "run_id": None, "state": "refused", "error": str(exc)}))
        if reporter is not None:
            reporter.stop()
            say(f"{args.dag_id}: the run conf was refused: {exc}")
        return 2
    if reporter is not None:
        reporter.finish(f"run {run.state}")
    print(json.dumps({"dag_id": args.dag_id, "run_id": run.run_id, "state": str(run.state)}))
    return 0 if run.state == DagRunState.SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
