"""
### entitlement_grant — grant a campaign's items to every eligible user, nightly

Freezes the user file into a snapshot, partitions it (about one partition per
million users), and runs one mapped `grant` task instance per partition that
still has work (label `part-0042`): it grants the partition and then delivers
its grants to the campaign's downstream issuers, if it has any. A failed
partition fails alone: the others are granted and delivered. `reconcile` and
`notify` run once every partition has finished, successfully or not:
`reconcile` checks the ledger (and the issuers' exports) against the snapshot
and fails with INCOMPLETE naming the failed partitions; `notify` writes the
"granted" notices for what was granted (one Parquet file per partition under
`$ENTITLE_HOME/campaigns/<campaign>/notices/granted/<run_id>/`). `summary` logs
the run, marks the ledger asset `entitle_ledger` updated, and fails the run
unless it reconciled. Only references (paths, ids, counts) pass between tasks.

**Nightly** at 02:00 Asia/Seoul. A night with nothing new maps no grant task
instance and writes nothing; a night after new sign-ups grants only them; a
night after a failure grants what was left. Nothing is granted before the
campaign start (2023-01-05 00:00 Asia/Seoul), which `pipeline` itself enforces.

**Operators** fix the cause, then clear the failed task instances of the run
("Clear → Only failed", or `POST /api/v2/dags/entitlement_grant/clearTaskInstances`
with `{"dag_run_id": RUN, "only_failed": true, "dry_run": false}`): the failed
partitions, `reconcile`, `notify` and `summary` run again and the run ends green.
Errors that cannot pass by retrying (bad input, edited terms, a changed
partition file, reconciliation breaks) fail at once; a locked or unreachable
database and an issuer that is down are retried with backoff. See docs/how-to/rerun-failed-partitions.md.

**Params** (an unknown key is refused before any work): `snapshot_uri` (user
file; empty = `$ENTITLE_HOME/incoming/users.parquet`), `exclusion_uri`,
`partitions` (ids to restrict the run to), `dry_run`, `verify`.
"""

from __future__ import annotations

from typing import Any

import pendulum
from airflow.sdk import Param, TriggerRule, dag, get_current_context, task
from entitle_airflow.defaults import (
    LEDGER_ASSET,
    LEDGER_WRITERS_POOL,
    connection_password,
    default_args,
    failing_fast,
    ledger_connection_url,
    log_failure_reason,
)
from entitle_airflow.notifier import FailedPartitionsNotifier

PARTITION_ID_MAX = 1023
# The partition's label, rendered when the task instance starts (and again when it ends), so the
# grid shows part-0042 while it runs and retries; before it starts Airflow shows the map index.
PARTITION_LABEL_TEMPLATE = "{{ task.op_kwargs['partition']['label'] }}"


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


def the_plan(ti: Any) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The run's snapshot and planned partitions, from the XCom of freeze_snapshot and plan_partitions."""
    from airflow.sdk.exceptions import AirflowFailException

    prepared = ti.xcom_pull(task_ids="freeze_snapshot")
    planned = ti.xcom_pull(task_ids="plan_partitions")
    if prepared is None or planned is None:
        raise AirflowFailException(
            "there is no plan to check: freeze_snapshot or plan_partitions did not finish (their log says why); "
            "clear the failed task instances of this run once the cause is fixed"
        )
    return prepared, list(planned)


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

    params = {
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
    }
    param_names = sorted(params)

    @dag(
        dag_id=dag_id,
        schedule=schedule,
        start_date=pendulum.datetime(2023, 1, 5, tz="Asia/Seoul"),
        catchup=False,
        max_active_runs=1,
        tags=tags,
        doc_md=doc_md,
        default_args=default_args(),
        params=params,
    )
    def grant_pipeline() -> None:
        # Task bodies import pipeline lazily: the scheduler re-imports this file often,
        # and importing Polars and SQLAlchemy there would slow every parse.
        @task
        def freeze_snapshot(params: dict[str, Any] | None = None) -> dict[str, Any]:
            from pipeline.grants import dag_tasks

            conf = get_current_context()["dag_run"].conf or {}
            with failing_fast():
                url = ledger_connection_url()
                return dag_tasks.freeze_snapshot(params or {}, campaign, input_file, url, conf, param_names)

        @task
        def plan_partitions(prepared: dict[str, Any], params: dict[str, Any] | None = None) -> list[dict[str, Any]]:
            from pipeline.grants import dag_tasks

            with failing_fast():
                return dag_tasks.plan_partitions(prepared, params or {}, campaign, ledger_connection_url())

        # Grant, then deliver, one partition: a chain per partition, so a failed one holds up no other.
        @task(pool=LEDGER_WRITERS_POOL, map_index_template=PARTITION_LABEL_TEMPLATE)
        def grant(partition: dict[str, Any], params: dict[str, Any] | None = None) -> dict[str, Any]:
            from pipeline.grants import dag_tasks

            run_id = get_current_context()["run_id"]
            with failing_fast():
                return dag_tasks.grant(
                    run_id, partition, params or {}, campaign, ledger_connection_url(), connection_password
                )

        # reconcile, notify and summary run once every partition finished, whatever its state (a night
        # with nothing new maps no partition: grant is skipped). They read the plan from XCom instead of
        # taking it as arguments, so that they depend on grant alone and say why when there is no plan.
        @task(trigger_rule=TriggerRule.ALL_DONE)
        def reconcile() -> dict[str, Any]:
            from pipeline.grants import dag_tasks

            ti = get_current_context()["ti"]
            prepared, planned = the_plan(ti)
            with failing_fast():
                checked = dag_tasks.reconcile(prepared, planned, campaign, ledger_connection_url(), connection_password)
                ti.xcom_push(key="reconciliation", value=checked)  # before failing: summary logs what was found
                dag_tasks.require_reconciled(checked)
            return checked

        @task(trigger_rule=TriggerRule.ALL_DONE)
        def notify() -> dict[str, Any]:
            from pipeline.grants import dag_tasks

            context = get_current_context()
            prepared, planned = the_plan(context["ti"])
            with failing_fast():
                written = dag_tasks.notify(context["run_id"], prepared, planned, campaign, ledger_connection_url())
                dag_tasks.require_notices_complete(written)
            return written

        @task(
            trigger_rule=TriggerRule.ALL_DONE,
            outlets=[LEDGER_ASSET],
            on_failure_callback=[log_failure_reason, FailedPartitionsNotifier()],
        )
        def summary() -> dict[str, Any]:
            from pipeline.grants import dag_tasks

            context = get_current_context()
            ti = context["ti"]
            prepared, planned = the_plan(ti)
            checked = ti.xcom_pull(task_ids="reconcile", key="reconciliation")
            with failing_fast():
                result = dag_tasks.summary(
                    context["run_id"], prepared, planned, checked, campaign, ledger_connection_url()
                )
                print(dag_tasks.render_summary(result))
                ti.xcom_push(key="summary", value=result)
                dag_tasks.require_reconciled(result)  # the run fails unless reconciled, after the summary is logged
            return result

        planned = plan_partitions(freeze_snapshot())
        granted = grant.expand(partition=planned)
        granted >> [reconcile(), notify()] >> summary()

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
