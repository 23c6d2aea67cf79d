"""Prepared pipelines and probes of what the ledger holds."""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import ledger
from pipeline.grants import runs


@dataclasses.dataclass(frozen=True)
class Prepared:
    """An open pipeline with a frozen, partitioned snapshot and a registered run."""

    pipeline: runs.Pipeline
    snapshot: runs.PreparedSnapshot
    run: runs.RunHandle

    @property
    def engine(self) -> Engine:
        return self.pipeline.engine


def prepare_pipeline(pipeline: runs.Pipeline, users_file: Path, exclusion_file: Path | None = None) -> Prepared:
    """Register, freeze, partition and start a run, exactly as ``entitle run`` does before granting."""
    runs.register(pipeline)
    report = runs.freeze(pipeline, users_file, exclusion_file)
    prepared = runs.partition(pipeline, report)
    run = runs.start_run(pipeline, snapshot_id=report.snapshot_id)
    return Prepared(pipeline, prepared, run)


def grant_pairs(engine: Engine) -> set[tuple[int, str]]:
    """Every (user_id, item_sku) in the ledger's grants table."""
    with engine.connect() as connection:
        rows = connection.execute(
            sa.select(ledger.grants.c.user_id, ledger.campaign_items.c.item_sku).join(
                ledger.campaign_items, ledger.campaign_items.c.item_key == ledger.grants.c.item_key
            )
        ).all()
    return {(int(u), str(s)) for u, s in rows}


def grant_counts(engine: Engine) -> tuple[int, int]:
    """(rows in grants, distinct (campaign, user, item) triples in grants)."""
    with engine.connect() as connection:
        total = connection.execute(sa.text("SELECT count(*) FROM grants")).scalar_one()
        distinct = connection.execute(
            sa.text("SELECT count(*) FROM (SELECT DISTINCT campaign_key, user_id, item_key FROM grants) AS d")
        ).scalar_one()
    return int(total), int(distinct)


def grants_per_partition(engine: Engine) -> dict[int, int]:
    """Grant rows per partition id as recorded in the ledger."""
    with engine.connect() as connection:
        rows = connection.execute(sa.text("SELECT partition_id, count(*) FROM grants GROUP BY partition_id")).all()
    return {int(p): int(n) for p, n in rows}


def planned_pairs(users: Sequence[int], skus: Sequence[str]) -> set[tuple[int, str]]:
    """The exact set of grants a campaign with ``skus`` plans for ``users``."""
    return {(u, s) for u in users for s in skus}


class LedgerProbe:
    """The ledger probes above, handed to tests by the ``ledger_probe`` fixture."""

    grant_pairs = staticmethod(grant_pairs)
    grant_counts = staticmethod(grant_counts)
    grants_per_partition = staticmethod(grants_per_partition)
    planned_pairs = staticmethod(planned_pairs)


def describe_schema(engine: Engine, schema: str | None = None) -> dict[str, Any]:
    """Tables, columns, keys, constraints and indexes as reflected by SQLAlchemy."""
    inspector = sa.inspect(engine)
    described: dict[str, Any] = {}
    for table in sorted(inspector.get_table_names(schema=schema)):
        described[table] = {
            "columns": [
                (c["name"], str(c["type"]), c["nullable"]) for c in inspector.get_columns(table, schema=schema)
            ],
            "pk": inspector.get_pk_constraint(table, schema=schema)["constrained_columns"],
            "fks": sorted(
                (tuple(f["constrained_columns"]), f["referred_table"], tuple(f["referred_columns"]))
                for f in inspector.get_foreign_keys(table, schema=schema)
            ),
            "unique": sorted(tuple(u["column_names"]) for u in inspector.get_unique_constraints(table, schema=schema)),
            "checks": sorted(
                (c["name"], " ".join(c["sqltext"].split()))
                for c in inspector.get_check_constraints(table, schema=schema)
            ),
            "indexes": sorted(
                (i["name"], tuple(i["column_names"]), bool(i["unique"]))
                for i in inspector.get_indexes(table, schema=schema)
            ),
        }
    return described
