"""The failure notifier of the grant DAGs: one line naming the run, its verdict and its failed partitions."""

from __future__ import annotations

import logging
from typing import Any

from airflow.sdk import BaseNotifier

ALERT_LOGGER = "entitle.alerts"


class FailedPartitionsNotifier(BaseNotifier):
    """Report a failed run in one line (to the ``entitle.alerts`` logger; subclass to page someone).

    Attached to the task that decides the run's outcome (``summary``), it reads the summary that
    task pushed before failing, so the line names the failed partitions and the verdict.
    """

    template_fields = ()

    def notify(self, context: Any) -> None:
        """Log the one-line report of the failed run."""
        line = self.render_line(context)
        logging.getLogger(ALERT_LOGGER).error(line)
        print(line, flush=True)

    @staticmethod
    def render_line(context: Any) -> str:
        """The line: DAG, run, verdict and failed partitions with their errors (cut to stay one line)."""
        ti = context["ti"]
        summary = ti.xcom_pull(task_ids=ti.task_id, key="summary") or {}
        failed = summary.get("partitions_failed") or {}
        listed = ", ".join(failed) or "none"
        first_error = next(iter(failed.values()), "")
        reason = f"; first error: {first_error}" if first_error else ""
        line = (
            f"ENTITLE ALERT {ti.dag_id} run {ti.run_id} failed: verdict {summary.get('verdict', 'unknown')}, "
            f"failed partitions: {listed}{reason}"
        )
        return " ".join(line.split())[:1000]
