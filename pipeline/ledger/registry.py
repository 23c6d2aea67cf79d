"""Registration: the campaign, its items, snapshots and runs recorded in the ledger, and their keys.

Registering writes; opening the ledger does not (:func:`pipeline.ledger.session.open_ledger`).
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
from dataclasses import dataclass
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline.campaigns import Campaign, Item
from pipeline.errors import LedgerError, TermsChangedError, invariant
from pipeline.ledger.engine import write_transaction
from pipeline.ledger.tables import (
    PROGRAM_RECON_PROGRAMS,
    campaign_items,
    campaigns,
    grants,
    program_recon_runs,
    runs,
    snapshots,
)
from pipeline.ledger.zones import record_time_zones


def record_program_reconciliation(
    engine: Engine,
    campaign_key: int,
    program: str,
    result: dict[str, Any],
    started_at: dt.datetime,
    finished_at: dt.datetime,
) -> None:
    """Store one program reconciliation (``result`` has verdict, explanation and a list of breaks)."""
    invariant(program in PROGRAM_RECON_PROGRAMS, f"unknown program kind {program!r}")
    with write_transaction(engine) as connection:
        connection.execute(
            program_recon_runs.insert().values(
                campaign_key=campaign_key,
                program=program,
                verdict=result["verdict"],
                explanation=result["explanation"],
                breaks=len(result["breaks"]),
                result_json=json.dumps(result, default=str, sort_keys=True),
                started_at=started_at,
                finished_at=finished_at,
            )
        )


@dataclass(frozen=True)
class CampaignKeys:
    """A registered campaign's surrogate keys: the campaign and each item by sku."""

    campaign_key: int
    item_keys: dict[str, int]

    def items_signature(self, campaign: Campaign) -> str:
        """Digest of (item_key, terms_hash) pairs: equal means the same grants are planned per user."""
        parts = ",".join(
            f"{self.item_keys[i.sku]}:{i.terms_hash()}" for i in sorted(campaign.items, key=lambda i: i.sku)
        )
        return hashlib.sha256(parts.encode()).hexdigest()[:16]


def register_campaign(engine: Engine, campaign: Campaign, now: dt.datetime) -> CampaignKeys:
    """Record the campaign and its items; refuse changed terms for items that have grants."""
    registered = registered_keys(engine, campaign)
    if registered is not None:
        return registered
    with write_transaction(engine, serialized=True) as connection:
        row = connection.execute(
            sa.select(campaigns.c.campaign_key).where(campaigns.c.campaign_id == campaign.campaign_id)
        ).first()
        if row is None:
            campaign_key = int(
                connection.execute(
                    campaigns.insert().values(
                        campaign_id=campaign.campaign_id,
                        name=campaign.name,
                        time_zone=campaign.time_zone,
                        starts_at=campaign.starts_at,
                        registered_at=now,
                    )
                ).inserted_primary_key[0]  # type: ignore[index]
            )
        else:
            campaign_key = int(row[0])
            connection.execute(
                campaigns.update()
                .where(campaigns.c.campaign_key == campaign_key)
                .values(name=campaign.name, time_zone=campaign.time_zone, starts_at=campaign.starts_at)
            )
        item_keys = {item.sku: _register_item(connection, campaign, campaign_key, item) for item in campaign.items}
        record_time_zones(connection)
    return CampaignKeys(campaign_key, item_keys)


def registered_keys(engine: Engine, campaign: Campaign) -> CampaignKeys | None:
    """The keys when the campaign and every item are already registered exactly as in the file (reads only)."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.select(campaigns.c.campaign_key, campaigns.c.name, campaigns.c.time_zone, campaigns.c.starts_at).where(
                campaigns.c.campaign_id == campaign.campaign_id
            )
        ).first()
        if row is None or (row.name, row.time_zone, row.starts_at) != (
            campaign.name,
            campaign.time_zone,
            campaign.starts_at,
        ):
            return None
        stored = {
            r.item_sku: (int(r.item_key), r.terms_hash)
            for r in connection.execute(
                sa.select(campaign_items.c.item_sku, campaign_items.c.item_key, campaign_items.c.terms_hash).where(
                    campaign_items.c.campaign_key == row.campaign_key
                )
            )
        }
    keys: dict[str, int] = {}
    for item in campaign.items:
        found = stored.get(item.sku)
        if found is None or found[1] != item.terms_hash():
            return None
        keys[item.sku] = found[0]
    return CampaignKeys(int(row.campaign_key), keys)


def _register_item(connection: Connection, campaign: Campaign, campaign_key: int, item: Item) -> int:
    values = {
        "item_kind": item.kind,
        "amount_krw": item.amount_krw,
        "validity_days": item.validity_days,
        "valid_from": item.valid_from,
        "valid_until": item.valid_until,
        "terms_hash": item.terms_hash(),
    }
    row = connection.execute(
        sa.select(campaign_items.c.item_key, campaign_items.c.terms_hash).where(
            campaign_items.c.campaign_key == campaign_key, campaign_items.c.item_sku == item.sku
        )
    ).first()
    if row is None:
        return int(
            connection.execute(
                campaign_items.insert().values(campaign_key=campaign_key, item_sku=item.sku, **values)
            ).inserted_primary_key[0]  # type: ignore[index]
        )
    item_key, stored_hash = int(row[0]), str(row[1])
    if stored_hash == values["terms_hash"]:
        return item_key
    has_grants = connection.execute(
        sa.select(sa.literal(1))
        .select_from(grants)
        .where(grants.c.campaign_key == campaign_key, grants.c.item_key == item_key)
        .limit(1)
    ).first()
    if has_grants is not None:
        stored = connection.execute(sa.select(campaign_items).where(campaign_items.c.item_key == item_key)).one()
        raise TermsChangedError(
            f"{campaign.source}: item {item.sku!r} of campaign {campaign.campaign_id!r} already has grants with "
            f"amount_krw={stored.amount_krw}, valid_from={stored.valid_from.isoformat()}, "
            f"valid_until={None if stored.valid_until is None else stored.valid_until.isoformat()}; the file now "
            f"says amount_krw={item.amount_krw}, valid_from={item.valid_from.isoformat()}, "
            f"valid_until={None if item.valid_until is None else item.valid_until.isoformat()}. Terms of granted "
            "items cannot change: restore the old terms, or add a new item with a new sku."
        )
    connection.execute(campaign_items.update().where(campaign_items.c.item_key == item_key).values(**values))
    return item_key


def register_run(
    engine: Engine, run_id: str, campaign_key: int, snapshot_id: str, trigger: str, now: dt.datetime
) -> int:
    """The run's key, creating the run row on first use (retries of a run share it)."""
    with engine.connect() as connection:
        row = connection.execute(sa.select(runs.c.run_key, runs.c.snapshot_id).where(runs.c.run_id == run_id)).first()
    if row is not None and row[1] == snapshot_id:
        return int(row[0])
    with write_transaction(engine, serialized=True) as connection:
        row = connection.execute(sa.select(runs.c.run_key, runs.c.snapshot_id).where(runs.c.run_id == run_id)).first()
        if row is not None:
            if row[1] != snapshot_id:
                raise LedgerError(
                    f"run {run_id!r} already belongs to snapshot {row[1]}, not {snapshot_id}; use a new run id"
                )
            return int(row[0])
        return int(
            connection.execute(
                runs.insert().values(
                    run_id=run_id, campaign_key=campaign_key, snapshot_id=snapshot_id, trigger=trigger, started_at=now
                )
            ).inserted_primary_key[0]  # type: ignore[index]
        )


def register_snapshot(
    engine: Engine,
    campaign_key: int,
    snapshot_id: str,
    values: dict[str, Any],
    now: dt.datetime,
) -> None:
    """Record a frozen snapshot (idempotent); the latest registered is the campaign's current one."""
    with write_transaction(engine, serialized=True) as connection:
        exists = connection.execute(
            sa.select(snapshots.c.snapshot_id).where(
                snapshots.c.campaign_key == campaign_key, snapshots.c.snapshot_id == snapshot_id
            )
        ).first()
        if exists is None:
            connection.execute(
                snapshots.insert().values(
                    campaign_key=campaign_key, snapshot_id=snapshot_id, registered_at=now, **values
                )
            )
        else:
            connection.execute(
                snapshots.update()
                .where(snapshots.c.campaign_key == campaign_key, snapshots.c.snapshot_id == snapshot_id)
                .values(
                    registered_at=now, snapshot_dir=values["snapshot_dir"], partition_count=values["partition_count"]
                )
            )


def current_snapshot(engine: Engine, campaign_key: int) -> dict[str, Any] | None:
    """The campaign's most recently registered snapshot row, or ``None``."""
    with engine.connect() as connection:
        row = connection.execute(
            sa.select(snapshots)
            .where(snapshots.c.campaign_key == campaign_key)
            .order_by(snapshots.c.registered_at.desc())
            .limit(1)
        ).first()
    return None if row is None else dict(row._mapping)


def find_campaign_key(engine: Engine, campaign_id: str) -> int | None:
    """The campaign's key if it is registered in this ledger."""
    with engine.connect() as connection:
        value = connection.execute(
            sa.select(campaigns.c.campaign_key).where(campaigns.c.campaign_id == campaign_id)
        ).scalar()
    return None if value is None else int(value)
