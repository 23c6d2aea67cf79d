"""Airflow glue shared by this project's DAG files: task defaults, the fail-fast rule, the ledger
Connection and the failure notifier. DAG files import from here; ``pipeline`` never does."""
