"""Task defaults, the retry rule and the ledger of every DAG of this project.

Retries are for failures that may pass (a locked or unreachable database, an issuer that is
down): they back off exponentially, 20 s, 40 s, 80 s (capped at 10 min). Errors that fail the
same way every time (bad input, edited terms, a changed partition file, reconciliation breaks)
fail at once, without retries, with their message as the task log's last line.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import timedelta
from typing import Any

from airflow.sdk import Asset

LEDGER_WRITERS_POOL = "ledger_writers"
LEDGER_CONNECTION_ID = "entitle_ledger"
# What an analyst's DAG schedules on: the grant ledger, updated and reconciled by a nightly run.
LEDGER_ASSET = Asset(name="entitle_ledger", uri="entitle://ledger/grants", group="entitle")
RETRY_DELAY_MAX_S = 600
EXECUTION_TIMEOUT_S = 2 * 3600


def default_args(execution_timeout_s: int = EXECUTION_TIMEOUT_S) -> dict[str, Any]:
    """Owner, retry backoff and the time limit of every task of this project's DAGs.

    The number of retries and the first delay are Airflow's own settings, ``[core] default_task_retries``
    and ``default_task_retry_delay`` (3 and 20 s in the project's airflow.cfg).
    """
    return {
        "owner": "entitlements",
        "retry_exponential_backoff": 2.0,
        "max_retry_delay": timedelta(seconds=RETRY_DELAY_MAX_S),
        "execution_timeout": timedelta(seconds=execution_timeout_s),
        "on_failure_callback": [log_failure_reason],
    }


def log_failure_reason(context: Any) -> None:
    """Log why the task failed as one line, so that it is the last line an operator reads in its log."""
    exception = context.get("exception")
    if exception is None:
        return
    reason = " ".join(str(exception).split())
    logging.getLogger("entitle.task").error("FAILED: %s", reason)


@contextmanager
def failing_fast() -> Iterator[None]:
    """Turn the pipeline's errors that cannot pass by retrying into AirflowFailException (no retries)."""
    from airflow.sdk.exceptions import AirflowFailException

    from pipeline.errors import EntitleError

    try:
        yield
    except EntitleError as exc:
        if exc.retryable:
            raise
        raise AirflowFailException(f"{type(exc).__name__}: {exc}") from exc


@functools.cache
def connection_password(conn_id: str) -> str | None:
    """The password of the Airflow Connection ``conn_id`` (an issuer's token), or None when there is none.

    Asked once per task process: the settings resolve their issuers' tokens each time they load the campaign.
    """
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    try:
        return Connection.get(conn_id).password or None
    except AirflowNotFoundException:
        return None


def ledger_connection_url() -> str | None:
    """The ledger URL of the Airflow Connection ``entitle_ledger``, or None when there is none.

    ENTITLE_LEDGER_URL, when set, still wins (``pipeline.config.load_settings`` decides).
    """
    from airflow.sdk import Connection
    from airflow.sdk.exceptions import AirflowNotFoundException

    from pipeline.config import ledger_url_from_connection

    try:
        connection = Connection.get(LEDGER_CONNECTION_ID)
    except AirflowNotFoundException:
        return None
    with failing_fast():
        return ledger_url_from_connection(
            connection.conn_type,
            connection.host,
            connection.login,
            connection.password,
            connection.schema,
            connection.port,
            connection.extra_dejson,
        )
