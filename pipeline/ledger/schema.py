"""The ledger's schema: create it, check its version, migrate it (Alembic), its views and its roles."""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine
from sqlalchemy.exc import SQLAlchemyError

from pipeline.errors import ConfigError, LedgerError
from pipeline.ledger.engine import write_transaction
from pipeline.ledger.instants_sql import expand as expand_instants
from pipeline.ledger.tables import ledger_meta, metadata
from pipeline.ledger.zones import record_time_zones

# 2: issue_no, reconciliation tables; 3: grants partitioned (PostgreSQL); 4: delivery tables;
# 5: three-way reconciliation; 6: first-come-first-served pass tables; 7: merchant cash claims, cases,
# decisions and intake files; 8: revocations at the issuers; 9: program reconciliations; 10: the issuers'
# shared rate budgets; 11: no applied_at index on pass_applications; 12: the worker of each partition
# attempt. pipeline/ledger/migrations
SCHEMA_VERSION = 12

MIGRATIONS_DIR = Path(str(resources.files("pipeline.ledger.migrations")))

# The views of sql/<dialect>/views.sql; migrations drop them and create_schema re-applies the file.
LEDGER_VIEWS = (
    "grant_ledger",
    "grant_history",
    "reconciliation_runs",
    "reconciliation_breaks",
    "campaign_coverage",
    "partition_status",
)

# The repository's sql/ folder, shipped in the package as pipeline.sql.
SQL_DIR = Path(str(resources.files("pipeline.sql")))


def _make_sqlite_folder(engine: Engine) -> None:
    """Create the folder of an SQLite ledger file: creating or migrating the schema is where it gets made."""
    database = engine.url.database
    if engine.dialect.name == "sqlite" and database and database != ":memory:" and not database.startswith("file:"):
        Path(database).expanduser().parent.mkdir(parents=True, exist_ok=True)


def create_schema(engine: Engine) -> None:
    """Create tables, views and append-only triggers if absent (idempotent); refuse other schema versions.

    A new ledger gets the current tables directly and is stamped with the newest
    migration; an older ledger is refused until ``entitle db upgrade`` migrates it.
    Every task opens the ledger, so the common case (schema and views current) is one
    read and no write: a schema write in SQLite also invalidates every other connection's
    prepared statements.
    """
    views_digest = hashlib.sha256(view_sql(engine.dialect.name).encode()).hexdigest()[:16]
    _make_sqlite_folder(engine)
    try:
        if _schema_is_current(engine, views_digest):
            return
        with write_transaction(engine, serialized=True) as connection:
            existing = _recorded_version(connection)
            if existing is None:
                metadata.create_all(connection)
                connection.execute(
                    ledger_meta.insert().values(meta_key="schema_version", meta_value=str(SCHEMA_VERSION))
                )
                _stamp_head(connection)
            elif existing < SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger schema version {existing}, this program needs {SCHEMA_VERSION}: back the ledger up, "
                    "then run `entitle db upgrade`"
                )
            elif existing > SCHEMA_VERSION:
                raise LedgerError(
                    f"ledger schema version {existing}, this program needs {SCHEMA_VERSION}: the ledger was "
                    "upgraded by a newer release; run that release"
                )
            for statement in split_sql(view_sql(engine.dialect.name)):
                if engine.dialect.name == "postgresql":
                    statement = statement.replace("%", "%%")  # psycopg's paramstyle
                connection.exec_driver_sql(statement)
            record_time_zones(connection)
            connection.execute(ledger_meta.delete().where(ledger_meta.c.meta_key == "views_sha256"))
            connection.execute(ledger_meta.insert().values(meta_key="views_sha256", meta_value=views_digest))
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot create the ledger schema at {engine.url!r}: {exc}") from exc


def recorded_version(engine: Engine) -> int | None:
    """The schema version recorded in the ledger (None: an empty database)."""
    try:
        with engine.connect() as connection:
            return _recorded_version(connection)
    except SQLAlchemyError as exc:
        raise LedgerError(f"cannot read the ledger at {engine.url!r}: {getattr(exc, 'orig', exc)}") from exc


def _recorded_version(connection: Connection) -> int | None:
    """The ledger's schema version, or None for an empty database."""
    if not sa.inspect(connection).has_table("ledger_meta"):
        return None
    value = connection.execute(
        sa.select(ledger_meta.c.meta_value).where(ledger_meta.c.meta_key == "schema_version")
    ).scalar()
    return None if value is None else int(value)


def alembic_config(connection: Connection) -> Any:
    """Alembic's config for pipeline/ledger/migrations, running on ``connection`` (no alembic.ini, no URL)."""
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.attributes["connection"] = connection
    return config


def _stamp_head(connection: Connection) -> None:
    """Record in Alembic's table that a new ledger is at the newest migration."""
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    script = ScriptDirectory.from_config(alembic_config(connection))
    MigrationContext.configure(connection).stamp(script, "head")


@dataclass(frozen=True)
class UpgradeResult:
    """What ``entitle db upgrade`` did."""

    from_version: int | None
    to_version: int
    migrations: list[str]

    def as_dict(self) -> dict[str, Any]:
        """Plain values for --json."""
        return {"from_version": self.from_version, "to_version": self.to_version, "migrations": self.migrations}


def upgrade(engine: Engine) -> UpgradeResult:
    """Migrate the ledger to this program's schema version in one transaction (Alembic); idempotent.

    Ledgers made before Alembic (versions 1 and 2 recorded only in ledger_meta) are
    stamped with their version first. Views are re-applied afterwards, and on
    PostgreSQL the roles' rights too when the roles exist.
    """
    from alembic import command
    from alembic.runtime.migration import MigrationContext

    _make_sqlite_folder(engine)
    try:
        with write_transaction(engine) as connection:
            before = _recorded_version(connection)
            applied: list[str] = []
            if before is not None:
                if before > SCHEMA_VERSION:
                    raise LedgerError(
                        f"ledger schema version {before} is newer than this program's {SCHEMA_VERSION}; "
                        "nothing was changed"
                    )
                config = alembic_config(connection)
                current = MigrationContext.configure(connection).get_current_revision()
                if current is None:
                    command.stamp(config, f"{before:04d}")
                applied = [f"{v:04d}" for v in range(before + 1, SCHEMA_VERSION + 1)]
                command.upgrade(config, "head")
    except SQLAlchemyError as exc:
        raise LedgerError(
            f"cannot upgrade the ledger at {engine.url!r}: {getattr(exc, 'orig', exc)}; nothing was changed"
        ) from exc
    create_schema(engine)
    if engine.dialect.name == "postgresql" and before is not None and before < SCHEMA_VERSION and _roles_exist(engine):
        apply_roles(engine)
    return UpgradeResult(before, SCHEMA_VERSION, applied)


def _roles_exist(engine: Engine) -> bool:
    with engine.connect() as connection:
        found = connection.execute(
            sa.text("SELECT count(*) FROM pg_roles WHERE rolname = ANY(:names)"), {"names": list(LEDGER_ROLES)}
        ).scalar_one()
    return int(found) > 0


LEDGER_ROLES = ("entitle_writer", "entitle_operator", "entitle_analyst")


def apply_roles(engine: Engine) -> tuple[str, ...]:
    """Create the writer, operator and analyst roles and their rights (PostgreSQL; idempotent)."""
    if engine.dialect.name != "postgresql":
        raise ConfigError(
            f"roles are a PostgreSQL feature; an {engine.dialect.name} ledger has no users: protect the file "
            "with file permissions (and give analysts a read-only copy or a read-only mount)"
        )
    create_schema(engine)
    script = (SQL_DIR / "postgresql" / "roles.sql").read_text(encoding="utf-8")
    try:
        with write_transaction(engine) as connection:
            for statement in split_sql(script):
                connection.exec_driver_sql(statement.replace("%", "%%"))
    except SQLAlchemyError as exc:
        raise LedgerError(
            f"cannot apply sql/postgresql/roles.sql at {engine.url!r}: {getattr(exc, 'orig', exc)}. Run it as the "
            "ledger's owner, with the CREATEROLE right."
        ) from exc
    return LEDGER_ROLES


def _schema_is_current(engine: Engine, views_digest: str) -> bool:
    with engine.connect() as connection:
        if not sa.inspect(connection).has_table("ledger_meta"):
            return False
        stored = {
            str(k): str(v) for k, v in connection.execute(sa.select(ledger_meta.c.meta_key, ledger_meta.c.meta_value))
        }
    return stored.get("schema_version") == str(SCHEMA_VERSION) and stored.get("views_sha256") == views_digest


def view_sql(dialect_name: str) -> str:
    """The views and triggers of a dialect (``sql/<dialect>/views.sql``; SQLite's with its ISO macros expanded)."""
    if dialect_name == "postgresql":
        return (SQL_DIR / "postgresql" / "views.sql").read_text(encoding="utf-8")
    return expand_instants((SQL_DIR / "sqlite" / "views.sql").read_text(encoding="utf-8"))


def split_sql(script: str) -> list[str]:
    """Split a SQL script into statements, each ended by a line that is exactly ``-- end``.

    Trigger bodies contain semicolons, so semicolons cannot be the separator.
    """
    statements = [part.strip() for part in re.split(r"^-- end$", script, flags=re.MULTILINE)]
    return [s for s in statements if s and not all(line.startswith("--") for line in s.splitlines())]
