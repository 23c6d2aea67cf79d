"""What the ledger's migrations share: frozen SQL files and the recorded schema version."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

import sqlalchemy as sa
from alembic import op

from pipeline.ledger import LEDGER_VIEWS, split_sql

SQL_DIR = Path(str(resources.files("pipeline.ledger.migrations"))) / "sql"


def run_frozen_sql(revision: str) -> None:
    """Run ``sql/<revision>_<dialect>.sql`` if the dialect has one (a migration may touch one dialect only)."""
    bind = op.get_bind()
    path = SQL_DIR / f"{revision}_{bind.dialect.name}.sql"
    if not path.exists():
        return
    for statement in split_sql(path.read_text(encoding="utf-8")):
        bind.exec_driver_sql(statement.replace("%", "%%") if bind.dialect.name == "postgresql" else statement)


def drop_views_and_triggers() -> None:
    """Drop the ledger's views (and, on SQLite, its triggers): the ledger re-applies views.sql after upgrading.

    Views name tables, and a migration that rebuilds or renames a table must not leave
    a view pointing at the old one.
    """
    bind = op.get_bind()
    cascade = " CASCADE" if bind.dialect.name == "postgresql" else ""
    for view in LEDGER_VIEWS:
        bind.exec_driver_sql(f"DROP VIEW IF EXISTS {view}{cascade}")
    if bind.dialect.name == "sqlite":
        names = bind.exec_driver_sql("SELECT name FROM sqlite_master WHERE type = 'trigger'").scalars().all()
        for name in names:
            bind.exec_driver_sql(f"DROP TRIGGER IF EXISTS {name}")


def set_schema_version(version: int) -> None:
    """Record the version in ledger_meta (the program's quick check) next to Alembic's own table."""
    bind = op.get_bind()
    bind.execute(sa.text("DELETE FROM ledger_meta WHERE meta_key IN ('schema_version', 'views_sha256')"))
    bind.execute(
        sa.text("INSERT INTO ledger_meta (meta_key, meta_value) VALUES ('schema_version', :v)"), {"v": str(version)}
    )
