"""
### drawer_pass — the first-come-first-served "cloud-drawer" pass, hourly

Stores the application batches dropped in `$ENTITLE_HOME/incoming/pass/<program id>/`
(CSV or Parquet with `user_id`, `applied_at` with its offset; one mapped task per file,
a file stored before is skipped by its content hash; bad rows go to a quarantine file),
then allocates: every application up to *now minus the program's intake lag* is served
strictly in `(applied_at, user_bucket, user_id)` order, a pass each until the stock cap,
`sold_out` after, in one ledger transaction. It then reconciles the program (a break fails
the run) and writes the expiry reminders, which say that nothing renews or converts to a
paid subscription.

The program file is `$ENTITLE_PASS_PROGRAM` (default: the bundled `drawer_pass_2022.toml`,
3,000,000 passes). Every task body is one call into `pipeline.programs.drawer_pass.dag_tasks`. Reruns are
safe: a stored batch is not stored twice and an allocated window is never allocated again.
Operators see the stock with `entitle pass status` and one user with `entitle pass status --user ID`.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import dag, task
from entitle_airflow.defaults import LEDGER_WRITERS_POOL, default_args, failing_fast


@dag(
    dag_id="drawer_pass",
    schedule="0 * * * *",
    start_date=pendulum.datetime(2023, 1, 5, tz="Asia/Seoul"),
    catchup=False,
    max_active_runs=1,
    tags=["entitlements", "ledger", "pass"],
    doc_md=__doc__,
    default_args=default_args(execution_timeout_s=3600),
)
def drawer_pass() -> None:
    # Task bodies import pipeline lazily: the scheduler re-imports this file often. Bad input and
    # refused ledger writes fail at once (failing_fast); a locked or unreachable ledger is retried.
    @task
    def list_batches() -> list[str]:
        from pipeline.programs.drawer_pass import dag_tasks

        with failing_fast():
            return dag_tasks.list_batches()

    @task(pool=LEDGER_WRITERS_POOL)
    def ingest(path: str) -> dict[str, Any]:
        from pipeline.programs.drawer_pass import dag_tasks

        with failing_fast():
            return dag_tasks.ingest(path)

    # none_failed: with no new file the mapped ingest is skipped, and allocation still runs.
    @task(pool=LEDGER_WRITERS_POOL, trigger_rule="none_failed")
    def allocate(stored: list[dict[str, Any]]) -> dict[str, Any]:
        from pipeline.programs.drawer_pass import dag_tasks

        with failing_fast():
            return dag_tasks.allocate()

    @task
    def reconcile(allocated: dict[str, Any]) -> dict[str, Any]:
        from pipeline.programs.drawer_pass import dag_tasks

        with failing_fast():
            return dag_tasks.reconcile()

    @task
    def reminders(checked: dict[str, Any]) -> dict[str, Any]:
        from pipeline.programs.drawer_pass import dag_tasks

        with failing_fast():
            return dag_tasks.reminders()

    stored = ingest.expand(path=list_batches())
    reminders(reconcile(allocate(stored)))


drawer_pass_dag = drawer_pass()
