"""Alembic environment: migrations run on the connection pipeline.ledger hands over.

There is no alembic.ini and no URL here: ``pipeline.ledger.upgrade`` builds the
Alembic config in code and passes an open connection as ``config.attributes["connection"]``.
"""

from __future__ import annotations

from alembic import context

from pipeline import ledger

connection = context.config.attributes["connection"]
context.configure(
    connection=connection,
    target_metadata=ledger.metadata,
    render_as_batch=connection.dialect.name == "sqlite",  # SQLite alters tables by copying them
    transaction_per_migration=False,
)
with context.begin_transaction():
    context.run_migrations()
