"""
### merchant_cash — merchant cash claims: intake, tiers, payouts and reconciliation, daily

Every day of the intake window (read from the program file, by default
`pipeline/campaigns/merchant_cash_2022.toml`; `ENTITLE_MERCHANT_PROGRAM` names
another) at 03:00 Asia/Seoul:

1. `ingest_claims` validates and records every new claims file (CSV or Parquet)
   in `$ENTITLE_HOME/incoming/<program id>/`; malformed rows go to a quarantine
   file, a file already ingested changes nothing, a refused file does not stop
   the others;
2. `assign_tiers` re-derives every undecided case from its claims and the tier
   table (≤ ₩300,000 → ₩30,000, ≤ ₩500,000 → ₩50,000, above → review);
3. `pay` writes one ledger grant per payable case (auto tier, or approved by a
   reviewer with `entitle review approve`), at most one per merchant, idempotent;
4. `reconcile` compares payouts with claims, tiers and decisions, and `check`
   fails the run on a refused file or a break — after everything payable was paid.

Every task body is one call into `pipeline.programs.merchant_cash.dag_tasks`. Reviews go on
after intake closes: `entitle claims pay` pays the cases decided afterwards
(see docs/how-to/operate-merchant-cash.md).
"""

from __future__ import annotations

import datetime as dt
import importlib.util
import os
import tomllib
from datetime import timedelta
from pathlib import Path
from typing import Any

import pendulum
from airflow.sdk import dag, get_current_context, task
from entitle_airflow.defaults import LEDGER_WRITERS_POOL, default_args, failing_fast

# The run at 03:00 on the day after the last window closes picks up that day's claims.
RUN_AFTER_CLOSE = timedelta(days=1, hours=3)
# The bundled program, found without importing the package (parsing stays cheap).
_PACKAGE = importlib.util.find_spec("pipeline")
DEFAULT_PROGRAM = Path(next(iter(_PACKAGE.submodule_search_locations or ()))) / "campaigns" / "merchant_cash_2022.toml"


def intake_bounds(path: Path) -> tuple[pendulum.DateTime, pendulum.DateTime]:
    """First opening and last closing (+ one run) of the program's intake windows: a small TOML read, no pipeline."""
    document = tomllib.loads(path.read_text(encoding="utf-8"))
    zone = document["program"]["time_zone"]
    windows = document["intake"]
    opens: dt.date = windows[0]["opens"]
    closes: dt.date = windows[-1]["closes"]
    start = pendulum.datetime(opens.year, opens.month, opens.day, tz=zone)
    end = pendulum.datetime(closes.year, closes.month, closes.day, tz=zone) + RUN_AFTER_CLOSE
    return start, end


# ENTITLE_MERCHANT_PROGRAM as pipeline.config reads it; read here too because a DAG file must not
# import the package at parse time.
START, END = intake_bounds(Path(os.environ.get("ENTITLE_MERCHANT_PROGRAM") or DEFAULT_PROGRAM).expanduser())


@dag(
    dag_id="merchant_cash",
    schedule="0 3 * * *",
    start_date=START,
    end_date=END,
    catchup=False,
    max_active_runs=1,
    tags=["entitlements", "ledger", "merchant-cash", "daily"],
    doc_md=__doc__,
    default_args=default_args(execution_timeout_s=3600),
)
def merchant_cash() -> None:
    # Task bodies import pipeline lazily: the scheduler re-imports this file often. Bad input and
    # refused ledger writes fail at once (failing_fast); a locked or unreachable ledger is retried.
    @task
    def ingest_claims() -> dict[str, Any]:
        from pipeline.programs.merchant_cash import dag_tasks

        with failing_fast():
            return dag_tasks.ingest_claims()

    @task
    def assign_tiers(ingested: dict[str, Any]) -> dict[str, Any]:
        from pipeline.programs.merchant_cash import dag_tasks

        with failing_fast():
            return dag_tasks.assign_tiers()

    @task(pool=LEDGER_WRITERS_POOL)
    def pay(assigned: dict[str, Any]) -> dict[str, Any]:
        from pipeline.programs.merchant_cash import dag_tasks

        with failing_fast():
            return dag_tasks.pay(get_current_context()["run_id"])

    @task
    def reconcile(paid: dict[str, Any]) -> dict[str, Any]:
        from pipeline.programs.merchant_cash import dag_tasks

        with failing_fast():
            return dag_tasks.reconcile()

    @task
    def check(ingested: dict[str, Any], reconciled: dict[str, Any]) -> None:
        from pipeline.programs.merchant_cash import dag_tasks

        with failing_fast():
            dag_tasks.check(ingested, reconciled)

    ingested = ingest_claims()
    check(ingested, reconcile(pay(assign_tiers(ingested))))


merchant_cash_dag = merchant_cash()
