"""entitle: bulk entitlement distribution with an idempotent SQL ledger.

The package never imports Airflow; ``dags/`` calls into it.
"""

__version__ = "0.1.0"
