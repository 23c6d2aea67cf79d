"""
### entitlement_grant — grant a campaign's items to every eligible user, nightly

Freezes the user file into a snapshot, partitions it, grants each partition in
its own mapped task instance (label `part-0042`), checks the ledger and prints
a summary. After the grants, `deliver` (one mapped task per partition, one at a
time) sends the grants of items whose issuer is a downstream service; with only
the built-in `ledger` issuer it returns at once. `reconcile` runs after every delivery and, for
campaigns with issuers, compares each issuer's export with the ledger too. Every task body is
one call into `pipeline.dag_tasks`; only references (paths, ids, counts) pass between tasks.
`notify` writes the run's "granted" notices for the messaging system (one Parquet file per
partition under `$ENTITLE_HOME/campaigns/<campaign>/notices/granted/<run_id>/`).

**Nightly** at 02:00 Asia/Seoul. A night with nothing new writes nothing;
a night after new sign-ups grants only them; a night after a failure grants
what was left. Nothing is granted before the campaign start (2023-01-05
00:00 Asia/Seoul), which `pipeline` itself enforces.

**Operators** redo only failed partitions by clearing the failed task
instances of the run ("Clear → Only failed", or
`airflow dags clear entitlement_grant --run-id RUN --only-failed -y`), or by
triggering a run with `{"partitions": [3, 17]}`. See the README runbook.

**Params**: `snapshot_uri` (user file; empty = `$ENTITLE_HOME/incoming/users.parquet`),
`exclusion_uri`, `partitions` (ids to restrict the run to), `dry_run`, `verify`.
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import pendulum
from airflow.sdk import Param, dag, get_current_context, task

LEDGER_WRITERS_POOL = "ledger_writers"
PARTITION_ID_MAX = 1023
# Retries with exponential backoff: 20 s, 40 s, 80 s (capped at 10 min). Tests shorten them.
TASK_RETRIES = int(os.environ.get("ENTITLE_TASK_RETRIES", "3"))
RETRY_DELAY_S = float(os.environ.get("ENTITLE_RETRY_DELAY_S", "20"))


CHANNEL_CREDIT_DOC = """
### channel_credit — ₩50,000 of channel-message credit to every small merchant

The same pipeline as `entitlement_grant` (freeze, partition, grant per mapped
partition, deliver, reconcile, notify), over the merchant list instead of the
user list, for the bundled campaign `channel-credit-2022` (one item,
`channel-credit-50000`, kind `cash`, ₩50,000). The input file has a
`merchant_id` column; default `$ENTITLE_HOME/incoming/merchants.parquet`.
It shares the ledger with every other campaign (its own campaign key, so its
grants, reconciliation and breaks are its own).

**Daily** at 03:00 Asia/Seoul, after the user run: a day with no new
merchant writes nothing, a new merchant on the list gets the credit once.
Operators clear failed partitions as for `entitlement_grant`; analysts query
with `ENTITLE_CAMPAIGN=channel-credit-2022 entitle summary` or `entitle query
... --param campaign_id=channel-credit-2022`.

**Params**: `snapshot_uri` (merchant file; empty = the default above),
`exclusion_uri` (merchant ids to exclude), `partitions`, `dry_run`, `verify`.
"""


def grant_dag(
    dag_id: str,
    *,
    schedule: str,
    tags: list[str],
    doc_md: str,
    campaign: str | None = None,
    input_file: str = "users.parquet",
    id_label: str = "user",
) -> Any:
    """A grant DAG for one campaign (``campaign`` None: ENTITLE_CAMPAIGN, as the nightly user run)."""

    @dag(
        dag_id=dag_id,
        schedule=schedule,
        start_date=pendulum.datetime(2023, 1, 5, tz="Asia/Seoul"),
        catchup=False,
        max_active_runs=1,
        tags=tags,
        doc_md=doc_md,
        default_args={
            "owner": "entitlements",
            "retries": TASK_RETRIES,
            "retry_delay": timedelta(seconds=RETRY_DELAY_S),
            "retry_exponential_backoff": 2.0,
            "max_retry_delay": timedelta(minutes=10),
            "execution_timeout": timedelta(hours=2),
        },
        params={
            "snapshot_uri": Param(
                "", type="string", description=f"{id_label.capitalize()} file (.parquet or .csv); empty = default"
            ),
            "exclusion_uri": Param("", type="string", description=f"Optional file of {id_label} ids to exclude"),
            "partitions": Param(
                [],
                type="array",
                items={"type": "integer", "minimum": 0, "maximum": PARTITION_ID_MAX},
                uniqueItems=True,
                description="Partition ids to restrict the run to; empty = all",
            ),
            "dry_run": Param(False, type="boolean", description="Plan only: count, write nothing to the ledger"),
            "verify": Param(False, type="boolean", description="Check every planned grant row by row"),
        },
    )
    def grant_pipeline() -> None:
        # Task bodies import pipeline lazily: the scheduler re-imports this file often,
        # and importing Polars and SQLAlchemy there would slow every parse.
        @task
        def freeze_snapshot(params: dict[str, Any] | None = None) -> dict[str, Any]:
            from pipeline import dag_tasks

            return dag_tasks.freeze_and_partition(params or {}, campaign, input_file)

        @task
        def plan_partitions(prepared: dict[str, Any], params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
            from pipeline import dag_tasks

            return dag_tasks.partitions_to_grant(prepared, params or {}, campaign)

        @task(pool=LEDGER_WRITERS_POOL, map_index_template="{{ partition_label }}")
        def grant(partition: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
            from pipeline import dag_tasks

            context = get_current_context()
            context["partition_label"] = partition["label"]  # type: ignore[typeddict-unknown-key]
            return dag_tasks.grant_one(context["run_id"], partition, params or {}, campaign)

        # One delivery task at a time per run: the issuer's rate budget is shared through the ledger,
        # but its bound on requests in flight is per process.
        @task(max_active_tis_per_dagrun=1, map_index_template="{{ partition_label }}")
        def deliver(outcome: dict[str, Any]) -> dict[str, Any]:
            from pipeline import dag_tasks

            context = get_current_context()
            label = f"part-{int(outcome['partition_id']):04d}"
            context["partition_label"] = label  # type: ignore[typeddict-unknown-key]
            return dag_tasks.deliver_one(outcome, campaign)

        @task
        def reconcile(prepared: dict[str, Any], outcomes: list[dict[str, Any]]) -> dict[str, Any]:
            from pipeline import dag_tasks

            return dag_tasks.check(prepared, campaign)

        @task
        def notify(prepared: dict[str, Any], checked: dict[str, Any]) -> dict[str, Any]:
            from pipeline import dag_tasks

            return dag_tasks.granted_notices(get_current_context()["run_id"], prepared, campaign)

        @task
        def summary(
            prepared: dict[str, Any], outcomes: list[dict[str, Any]], checked: dict[str, Any]
        ) -> dict[str, Any]:
            from pipeline import dag_tasks

            result = dag_tasks.summarize(prepared, list(outcomes), checked, campaign)
            print(dag_tasks.render_summary(result))
            dag_tasks.require_reconciled(result)  # BREAKS or INCOMPLETE fail the run, after the summary is logged
            return result

        prepared = freeze_snapshot()
        outcomes = grant.expand(partition=plan_partitions(prepared))
        delivered = deliver.expand(outcome=outcomes)
        checked = reconcile(prepared, outcomes)
        delivered >> checked  # the issuers' exports are compared with the ledger after delivery, not during it
        summary(prepared, outcomes, checked)
        notify(prepared, checked)  # who this run granted something to, for the messaging system

    return grant_pipeline()


entitlement_grant_dag = grant_dag(
    "entitlement_grant", schedule="0 2 * * *", tags=["entitlements", "ledger", "nightly"], doc_md=__doc__ or ""
)
channel_credit_dag = grant_dag(
    "channel_credit",
    schedule="0 3 * * *",
    tags=["entitlements", "ledger", "merchants"],
    doc_md=CHANNEL_CREDIT_DOC,
    campaign="channel-credit-2022",
    input_file="merchants.parquet",
    id_label="merchant",
)
