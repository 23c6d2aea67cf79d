"""Execute the not-yet-finished task instances of an EXISTING dag run in-process (no scheduler).

Intended after:  airflow dags clear <dag_id> --run-id <run_id> --only-failed -y
Usage:           python resume_run.py <dag_file> <dag_id> <run_id>

This is dag.test()'s run loop minus its "clear everything + delete/re-create the run" prologue.
It uses the private helper airflow.sdk.definitions.dag._run_task (Airflow 3.3.x) -- pin the version.
Successful task instances are left untouched; only TIs in state None/scheduled/up_for_retry run.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

from airflow import settings
from airflow.dag_processing.dagbag import DagBag
from airflow.models.dagbag import DBDagBag
from airflow.models.dagrun import DagRun
from airflow.sdk import timezone
from airflow.sdk.definitions.dag import _run_task
from airflow.utils.state import DagRunState, TaskInstanceState
from sqlalchemy import select

FINISHED = {
    TaskInstanceState.SUCCESS,
    TaskInstanceState.FAILED,
    TaskInstanceState.SKIPPED,
    TaskInstanceState.UPSTREAM_FAILED,
    TaskInstanceState.REMOVED,
}


def main(dag_file: str, dag_id: str, run_id: str) -> int:
    folder = str(Path(dag_file).resolve().parent)
    if folder not in sys.path:
        sys.path.append(folder)  # as Airflow's workers do: the dags folder is importable (entitle_airflow/)
    bag = DagBag(dag_folder=dag_file)  # parse the DAG file (Task-SDK DAG objects)
    if bag.import_errors:
        raise SystemExit(f"import errors: {bag.import_errors}")
    sdk_dag = bag.dags[dag_id]

    session = settings.Session()
    dr = session.scalar(select(DagRun).where(DagRun.dag_id == dag_id, DagRun.run_id == run_id))
    if dr is None:
        raise SystemExit(f"no dag run {dag_id}/{run_id}")
    dr.dag = DBDagBag().get_dag_for_run(dr, session=session)  # serialized (scheduler-side) DAG
    if dr.state != DagRunState.RUNNING:
        dr.state = DagRunState.RUNNING  # 'queued' after a clear; the scheduler would do this
    session.commit()

    t0 = time.time()
    while dr.state == DagRunState.RUNNING:
        session.expire_all()
        schedulable, _ = dr.update_state(session=session)
        for ti in schedulable:
            if ti.state != TaskInstanceState.UP_FOR_RESCHEDULE:
                ti.try_number += 1
            ti.state = TaskInstanceState.SCHEDULED
            ti.scheduled_dttm = timezone.utcnow()
        session.commit()
        all_tis = set(dr.get_task_instances(session=session))
        scheduled = [ti for ti in all_tis if ti.state == TaskInstanceState.SCHEDULED]
        if not scheduled and any(ti.state not in FINISHED for ti in all_tis):
            time.sleep(1)  # e.g. waiting for an up_for_retry delay
        for ti in scheduled:
            try:
                _run_task(ti=ti, task=sdk_dag.task_dict[ti.task_id])
            except Exception as exc:  # same behaviour as dag.test: log and let update_state decide
                print(f"task failed: {ti}: {exc!r}")
    print(f"RESUME_RESULT run_id={dr.run_id} state={dr.state} seconds={time.time() - t0:.2f}")
    return 0 if dr.state == DagRunState.SUCCESS else 1


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:4]))
