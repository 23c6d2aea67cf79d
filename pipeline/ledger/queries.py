"""Named analyst queries: ``sql/queries/NAME.sql``, run with bound parameters only.

A query may have a dialect-specific variant ``NAME.<dialect>.sql``.  The first
comment lines describe it; a ``-- Params:`` line lists its parameters.  Input
is never interpolated into SQL text.
"""

from __future__ import annotations

import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline.errors import QueryError
from pipeline.ledger import SQL_DIR

QUERIES_DIR = SQL_DIR / "queries"
RESULT_ROWS_MAX = 1_000_000
_NAME = re.compile(r"^[a-z0-9_]+$")
_PARAM = re.compile(r"(?<!:):([a-z_][a-z0-9_]*)")


@dataclass(frozen=True)
class NamedQuery:
    """A query file: its name, description, parameters and SQL."""

    name: str
    description: str
    parameters: tuple[str, ...]
    sql: str


@dataclass(frozen=True)
class QueryResult:
    """Column names and rows of a named query."""

    columns: list[str]
    rows: list[tuple[Any, ...]]


def list_queries() -> list[str]:
    """Names of the available queries."""
    return sorted({p.name.split(".")[0] for p in QUERIES_DIR.glob("*.sql")})


def load_query(name: str, dialect: str) -> NamedQuery:
    """The query ``name``, in its dialect-specific variant when one exists."""
    if not _NAME.match(name):
        raise QueryError(f"query name {name!r} must be lowercase letters, digits and '_'")
    specific = QUERIES_DIR / f"{name}.{dialect}.sql"
    generic = QUERIES_DIR / f"{name}.sql"
    path = specific if specific.exists() else generic
    if not path.exists():
        raise QueryError(f"no query named {name!r}; available: {', '.join(list_queries())}")
    sql = path.read_text(encoding="utf-8")
    comments = [line[2:].strip() for line in sql.splitlines() if line.startswith("--")]
    description = " ".join(c for c in comments if not c.startswith("Params:"))
    parameters = tuple(dict.fromkeys(_PARAM.findall(_strip_comments(sql))))
    return NamedQuery(name, description, parameters, sql)


def run_query(engine: Engine, name: str, params: dict[str, str], connection: Connection | None = None) -> QueryResult:
    """Run a named query with bound parameters; unknown parameters are an error.

    ``connection``: run on this open connection (a service answering many lookups)
    instead of checking one out of the engine's pool for this query alone.
    """
    query = load_query(name, engine.dialect.name)
    unknown = sorted(set(params) - set(query.parameters))
    if unknown:
        raise QueryError(
            f"query {name!r} has no parameter(s) {unknown}; its parameters: {', '.join(query.parameters) or 'none'}"
        )
    bound = {p: _coerce(params.get(p)) for p in query.parameters}
    try:
        with nullcontext(connection) if connection is not None else engine.connect() as open_connection:
            result = open_connection.execute(sa.text(query.sql), bound)
            columns = list(result.keys())
            rows = [tuple(r) for r in result.fetchmany(RESULT_ROWS_MAX)]
    except SQLAlchemyError as exc:
        original = getattr(exc, "orig", exc)
        raise QueryError(f"query {name!r} failed: {original}. Check its parameters: {query.parameters}") from exc
    return QueryResult(columns, rows)


def _coerce(value: str | None) -> Any:
    """Whole numbers bind as integers, everything else as text."""
    if value is None:
        return None
    return int(value) if re.fullmatch(r"-?[0-9]+", value) else value


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))


def query_path(name: str) -> Path:
    """The generic file of a query (for documentation)."""
    return QUERIES_DIR / f"{name}.sql"


def write_parquet(result: QueryResult, path: Path) -> int:
    """Write a query result as Parquet (types inferred from the values), atomically; returns the row count."""
    import polars as pl

    from pipeline.schemas import replaced_atomically

    frame = pl.DataFrame([list(r) for r in result.rows], schema=result.columns, orient="row", infer_schema_length=None)
    with replaced_atomically(path) as temporary:
        frame.write_parquet(temporary)
    return frame.height
