"""Run a DAG of this project once, in-process, with ``dag.test()`` — no scheduler needed.

    python ops/run_dag.py entitlement_grant '{"snapshot_uri": "var/demo/users.parquet"}'
    python ops/run_dag.py merchant_cash '{}' 2023-01-16T03:00:00+09:00   # a logical date in its schedule

Needs AIRFLOW_HOME/AIRFLOW_CONFIG (the Makefile sets them) and a migrated
metadata DB (`airflow db migrate`). Prints one JSON line last:
{"dag_id", "run_id", "state"}. Exit 0 when the run succeeded, 1 when it failed,
2 when the conf was refused (a Param did not validate).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from datetime import datetime
from pathlib import Path

from airflow.configuration import conf
from airflow.sdk import DAG, DagRunState
from airflow.sdk.exceptions import ParamValidationError


def find_dag(dag_id: str) -> DAG | None:
    """The DAG ``dag_id`` from the dags folder: ``<dag_id>.py`` first, then every other DAG file."""
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


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[1] in ("-h", "--help"):
        print(__doc__)
        return 0 if len(argv) >= 2 else 2
    dag_id = argv[1]
    run_conf = json.loads(argv[2]) if len(argv) > 2 else {}
    logical_date = datetime.fromisoformat(argv[3]) if len(argv) > 3 else None
    dag = find_dag(dag_id)
    if dag is None:
        print(f"run_dag: no DAG {dag_id!r} in {conf.get('core', 'dags_folder')}", file=sys.stderr)
        return 2
    try:
        run = dag.test(run_conf=run_conf, logical_date=logical_date) if logical_date else dag.test(run_conf=run_conf)
    except ParamValidationError as exc:
        print(f"run_dag: the run conf was refused: {exc}", file=sys.stderr)
        print(json.dumps({"dag_id": dag_id, "run_id": None, "state": "refused", "error": str(exc)}))
        return 2
    print(json.dumps({"dag_id": dag_id, "run_id": run.run_id, "state": str(run.state)}))
    return 0 if run.state == DagRunState.SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv))
