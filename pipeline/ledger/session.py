"""The one way to open the ledger: an engine with a lifetime, and nothing else.

Opening reads and writes nothing: no schema is created, no campaign registered, no file or
folder made. The core pipeline and every program open their context through
:class:`LedgerSession` and close it with ``with``::

    with runs.open_pipeline(settings) as pipeline:      # opens; no writes
        runs.register(pipeline)                         # the explicit write step of a real run
        ...

Writing steps say so: :func:`pipeline.ledger.schema.create_schema` and the registry's
``register_*`` functions. Reading steps check that the schema is this program's version
(:func:`require_current_schema`) and find what was registered.
"""

from __future__ import annotations

from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Self

from sqlalchemy.engine import Engine

from pipeline.campaigns import Campaign
from pipeline.errors import LedgerError
from pipeline.ledger.engine import create_ledger_engine
from pipeline.ledger.registry import CampaignKeys, register_campaign, registered_keys
from pipeline.ledger.schema import SCHEMA_VERSION, create_schema, recorded_version

if TYPE_CHECKING:
    from pipeline.config import Settings


class LedgerSession:
    """An open ledger: its engine, disposed when the ``with`` block (or :meth:`close`) ends."""

    engine: Engine

    def close(self) -> None:
        """Close every pooled connection (on SQLite the last close checkpoints the WAL)."""
        self.engine.dispose()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, trace: TracebackType | None
    ) -> None:
        self.close()


class CampaignSession(LedgerSession):
    """A ledger session for one campaign (the core's or a program's): settings, engine and its keys.

    ``keys`` are written by the context's ``register`` step (:meth:`register_campaign`), or found,
    read-only, on first use by a command that only reads.
    """

    settings: Settings
    registered: CampaignKeys | None

    def ledger_campaign(self) -> Campaign:
        """The campaign this session registers and reads (its items are what the ledger grants)."""
        raise NotImplementedError

    @property
    def keys(self) -> CampaignKeys:
        """The campaign's and its items' keys in the ledger; refused, saying why, when not registered."""
        if self.registered is None:
            self.registered = registered_keys_of(self.engine, self.ledger_campaign())
        return self.registered

    def register_campaign(self) -> CampaignKeys:
        """Create the ledger's schema if absent and register the campaign (idempotent; one read when unchanged)."""
        self.settings.home.mkdir(parents=True, exist_ok=True)
        create_schema(self.engine)
        self.registered = register_campaign(self.engine, self.ledger_campaign(), self.settings.clock())
        return self.registered


class OpenLedger(LedgerSession):
    """Just the ledger, for commands that need no campaign (``entitle db``, named queries)."""

    def __init__(self, url: str) -> None:
        self.engine = create_ledger_engine(url)


def open_ledger(url: str) -> OpenLedger:
    """Open the ledger at ``url`` (a SQLAlchemy URL); use it in a ``with`` block."""
    return OpenLedger(url)


def registered_keys_of(engine: Engine, campaign: Campaign) -> CampaignKeys:
    """The keys of ``campaign`` as registered with exactly these terms (reads only); refused, saying why, if not."""
    require_current_schema(engine)
    found = registered_keys(engine, campaign)
    if found is None:
        raise LedgerError(
            f"campaign {campaign.campaign_id} is not registered in the ledger with the terms of {campaign.source}: "
            "the command or DAG task that writes its first grants registers it "
            "(`entitle run --users FILE`, a program's intake)"
        )
    return found


def require_current_schema(engine: Engine) -> None:
    """Refuse a ledger without this program's schema version, saying which command fixes it (reads only)."""
    database = engine.url.database
    missing_file = engine.dialect.name == "sqlite" and bool(database) and not Path(str(database)).exists()
    version = None if missing_file else recorded_version(engine)  # connecting would create the file
    if version is None:
        raise LedgerError(
            f"the ledger at {engine.url.render_as_string(hide_password=True)} has no schema yet: "
            "run `entitle db upgrade` (or a first `entitle run --users FILE`, which creates it)"
        )
    if version != SCHEMA_VERSION:
        advice = "back the ledger up, then run `entitle db upgrade`" if version < SCHEMA_VERSION else "run that release"
        raise LedgerError(f"ledger schema version {version}, this program needs {SCHEMA_VERSION}: {advice}")
