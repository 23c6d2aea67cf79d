"""An open merchant cash program: the validated program on the ledger, and how its writers share the ledger.

:func:`open_program` validates the program file and opens the ledger (no writes);
:func:`register` creates the ledger schema if needed and registers the program as a campaign
whose one item is the cash payout. Intake, case
assignment and payouts take :func:`lock_program` in their transactions, so that one of
them at a time writes a program's claims, cases and payouts.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline import ledger
from pipeline.campaigns import Campaign
from pipeline.config import Settings
from pipeline.ledger import CampaignKeys, CampaignSession
from pipeline.programs.merchant_cash.program import Program, load_program

SQL_IN_CHUNK_MAX = 500  # ids per IN (...) list: well under SQLite's and psycopg's parameter limits
_LOCK_PAYOUTS = -2  # second key of the PostgreSQL advisory lock that serialises a program's writers


@dataclass(eq=False)
class OpenProgram(CampaignSession):
    """An open merchant program: settings, the validated program and the ledger engine; use it in ``with``."""

    settings: Settings
    program: Program
    engine: Engine
    registered: CampaignKeys | None = None

    def ledger_campaign(self) -> Campaign:
        """The program as a campaign."""
        return self.campaign

    @property
    def campaign_key(self) -> int:
        """The program's campaign key in the ledger."""
        return self.keys.campaign_key

    @property
    def item_key(self) -> int:
        """The key of the program's cash item."""
        return self.keys.item_keys[self.program.item_sku]

    @property
    def campaign(self) -> Campaign:
        """The program as the ledger's campaign (its one item is the cash payout)."""
        return self.program.campaign()

    @property
    def folder(self) -> Path:
        """Where the program's quarantine files go: ``$ENTITLE_HOME/programs/<id>``."""
        return self.settings.home / "programs" / self.program.program_id


def open_program(settings: Settings, program_file: Path | None) -> OpenProgram:
    """Validate the program file and open the ledger: reads and writes nothing (see :func:`register`)."""
    return OpenProgram(settings, load_program(program_file), ledger.create_ledger_engine(settings.ledger_url))


def register(op: OpenProgram) -> CampaignKeys:
    """The write step before any other: create the ledger's schema if absent, register the program as a campaign."""
    return op.register_campaign()


def chunks(values: Sequence[Any]) -> Iterable[Sequence[Any]]:
    """``values`` in slices of at most ``SQL_IN_CHUNK_MAX``, one ``IN (...)`` list each."""
    for start in range(0, len(values), SQL_IN_CHUNK_MAX):
        yield values[start : start + SQL_IN_CHUNK_MAX]


def lock_program(connection: Connection, campaign_key: int) -> None:
    """Serialise a program's writers (SQLite's BEGIN IMMEDIATE already does)."""
    if connection.dialect.name == "postgresql":
        connection.execute(sa.text("SELECT pg_advisory_xact_lock(:c, :k)"), {"c": campaign_key, "k": _LOCK_PAYOUTS})
