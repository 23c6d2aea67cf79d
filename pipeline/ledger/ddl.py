"""Render the ledger's DDL for a dialect from the SQLAlchemy metadata.

``sql/<dialect>/schema.sql`` is this output, committed so that analysts and DBAs
can read the schema without Python; a test keeps the two in agreement.
Regenerate with ``python -m pipeline.ledger.ddl sqlite > sql/sqlite/schema.sql``.
"""

from __future__ import annotations

import sys

from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.engine import Dialect
from sqlalchemy.schema import CreateIndex, CreateTable

from pipeline.errors import ConfigError
from pipeline.ledger import metadata

_DIALECTS: dict[str, Dialect] = {
    "sqlite": sqlite.dialect(),
    "postgresql": postgresql.dialect(),  # type: ignore[no-untyped-call]
}


def render_ddl(dialect_name: str) -> str:
    """CREATE TABLE and CREATE INDEX statements for every ledger table."""
    try:
        dialect = _DIALECTS[dialect_name]
    except KeyError as exc:
        raise ConfigError(f"unknown dialect {dialect_name!r}; use sqlite or postgresql") from exc
    header = (
        f"-- The ledger's tables for {dialect_name}, generated from pipeline/ledger/tables.py by\n"
        f"-- `python -m pipeline.ledger.ddl {dialect_name}`. Views and triggers: views.sql beside this file.\n"
    )
    statements: list[str] = []
    for table in metadata.sorted_tables:
        statements.append(str(CreateTable(table).compile(dialect=dialect)).strip() + ";")
        for index in sorted(table.indexes, key=lambda i: str(i.name)):
            statements.append(str(CreateIndex(index).compile(dialect=dialect)).strip() + ";")
    text = header + "\n" + "\n\n".join(statements) + "\n"
    # The psycopg dialect escapes '%' for its paramstyle; the file is for people and psql.
    return text.replace("%%", "%") if dialect_name == "postgresql" else text


def main() -> None:
    """Print the DDL for the dialect named on the command line."""
    name = sys.argv[1] if len(sys.argv) > 1 else "sqlite"
    sys.stdout.write(render_ddl(name))


if __name__ == "__main__":
    main()
