"""Named analyst queries: ``sql/queries/NAME.sql``, run with bound parameters only.

A query may have a dialect-specific variant ``NAME.<dialect>.sql``.  The first
comment lines describe it; a ``-- Params:`` line declares every parameter with
its type and whether it is required, e.g.
``-- Params: user_id: integer (required), limit: integer (optional, default 1000)``.
Types are ``integer``, ``text`` and ``timestamp`` (ISO 8601 with an offset).  A
missing required parameter, an unknown one or a value that is not of its type is
refused (exit 2) before the query runs.  Input is never interpolated into SQL text.
"""

from __future__ import annotations

import datetime as dt
import re
from contextlib import nullcontext
from dataclasses import dataclass
from decimal import Decimal
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
_DECLARED = re.compile(r"([a-z_][a-z0-9_]*):\s*(integer|text|timestamp)\s*\((required|optional)([^)]*)\)")
PARAMETER_TYPES = ("integer", "text", "timestamp")


@dataclass(frozen=True)
class Parameter:
    """A declared parameter of a named query."""

    name: str
    type: str  # integer | text | timestamp
    required: bool
    note: str = ""  # what the declaration says beyond type and required-ness (a default, the values)

    def describe(self) -> str:
        """``name: type (required)`` as the query file declares it."""
        return f"{self.name}: {self.type} ({'required' if self.required else 'optional'}{self.note})"


@dataclass(frozen=True)
class NamedQuery:
    """A query file: its name, description, declared parameters and SQL."""

    name: str
    description: str
    declared: tuple[Parameter, ...]
    sql: str

    @property
    def parameters(self) -> tuple[str, ...]:
        """The parameters' names, in declaration order."""
        return tuple(p.name for p in self.declared)


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
    declarations = " ".join(c[len("Params:") :] for c in comments if c.startswith("Params:"))
    declared = tuple(
        Parameter(n, t, r == "required", note.rstrip()) for n, t, r, note in _DECLARED.findall(declarations)
    )
    used = tuple(dict.fromkeys(_PARAM.findall(_strip_comments(sql))))
    if sorted(used) != sorted(p.name for p in declared):
        raise QueryError(
            f"{path}: its SQL uses parameters {list(used)} but its '-- Params:' line declares "
            f"{[p.name for p in declared]}; declare each as 'name: integer|text|timestamp (required|optional)'"
        )
    return NamedQuery(name, description, declared, sql)


def run_query(
    engine: Engine, name: str | NamedQuery, params: dict[str, str], connection: Connection | None = None
) -> QueryResult:
    """Run a named query (its name, or the query already loaded) with bound parameters.

    ``connection``: run on this open connection (a service answering many lookups)
    instead of checking one out of the engine's pool for this query alone.
    """
    query = load_query(name, engine.dialect.name) if isinstance(name, str) else name
    bound = bind_parameters(query, params)
    try:
        with nullcontext(connection) if connection is not None else engine.connect() as open_connection:
            result = open_connection.execute(sa.text(query.sql), bound)
            columns = list(result.keys())
            rows = [tuple(_plain(v) for v in r) for r in result.fetchmany(RESULT_ROWS_MAX)]
    except SQLAlchemyError as exc:
        original = getattr(exc, "orig", exc)
        raise QueryError(f"query {query.name!r} failed: {original}. Check its parameters: {query.parameters}") from exc
    return QueryResult(columns, rows)


def _plain(value: Any) -> Any:
    """PostgreSQL's numeric (a sum of bigints, say) as the int or float it is, so JSON and Parquet keep numbers."""
    if isinstance(value, Decimal):
        return int(value) if value == value.to_integral_value() else float(value)
    return value


def bind_parameters(query: NamedQuery, params: dict[str, str]) -> dict[str, Any]:
    """The values to bind, each of its declared type; :class:`QueryError` (exit 2) names what is wrong."""
    declared = ", ".join(p.describe() for p in query.declared) or "none"
    unknown = sorted(set(params) - set(query.parameters))
    if unknown:
        raise QueryError(f"query {query.name!r} has no parameter(s) {unknown}; its parameters: {declared}")
    missing = [p.name for p in query.declared if p.required and not params.get(p.name)]
    if missing:
        example = " ".join(f"--param {m}=VALUE" for m in missing)
        raise QueryError(f"query {query.name!r} needs {', '.join(missing)}: add {example} (its parameters: {declared})")
    return {p.name: _typed(query.name, p, params.get(p.name)) for p in query.declared}


def _typed(query: str, parameter: Parameter, value: str | None) -> Any:
    if value is None or value == "":
        return None
    if parameter.type == "integer":
        if not re.fullmatch(r"-?[0-9]+", value.strip()):
            raise QueryError(f"query {query!r}: parameter {parameter.name} must be a whole number, got {value!r}")
        return int(value)
    if parameter.type == "timestamp":
        try:
            instant = dt.datetime.fromisoformat(value)
        except ValueError:
            instant = None
        if instant is None or instant.tzinfo is None:
            raise QueryError(
                f"query {query!r}: parameter {parameter.name} must be an ISO 8601 instant with an offset "
                f"(e.g. 2023-01-05T00:00:00+09:00), got {value!r}"
            )
        return instant
    return value


def _strip_comments(sql: str) -> str:
    return "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))


def query_path(name: str) -> Path:
    """The generic file of a query (for documentation)."""
    return QUERIES_DIR / f"{name}.sql"


def write_parquet(result: QueryResult, path: Path) -> int:
    """Write a query result as Parquet, atomically; returns the row count.

    Column types come from the values: whole numbers are Int64, other numbers Float64, text
    String (ISO-8601 instants included), PostgreSQL instants Datetime; a column with no value
    at all is String.
    """
    import polars as pl

    from pipeline.schemas import replaced_atomically

    frame = pl.DataFrame([list(r) for r in result.rows], schema=result.columns, orient="row", infer_schema_length=None)
    frame = frame.with_columns(pl.col(pl.Null).cast(pl.String))
    with replaced_atomically(path) as temporary:
        frame.write_parquet(temporary)
    return frame.height
