"""The pipeline's use cases (freeze, partition, grant, status, plan, summary), shared by the CLI and the DAG.

Each function takes an open :class:`Pipeline` and plain values and returns
plain dataclasses, so the CLI can print them and Airflow tasks can pass their
small dict form through XCom.
"""

from __future__ import annotations

import shlex
import threading
import uuid
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from os import PathLike
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import delivery, ledger, storage
from pipeline.campaigns import Campaign
from pipeline.config import Settings
from pipeline.delivery import DeliveryContext
from pipeline.errors import EntitleError, GrantFailedError, PartitionError, SnapshotError
from pipeline.grants import snapshot
from pipeline.grants.granting import GrantContext, PartitionOutcome, grant_partition
from pipeline.grants.partitioning import (
    PartitionEntry,
    load_manifest,
    partition_label,
    partition_snapshot,
    partitions_dir,
)
from pipeline.ledger import CampaignKeys, CampaignSession
from pipeline.storage import Location, ObjectUri

UserFile = str | PathLike[str] | ObjectUri  # a local path or an s3:// URI


@dataclass(eq=False)
class Pipeline(CampaignSession):
    """An open pipeline: settings, the validated campaign and the ledger engine; use it in ``with``.

    ``keys`` are the registered campaign's: :func:`register` writes them (the explicit step of
    every command that writes); a reading command finds them, read-only, on first use.
    """

    settings: Settings
    campaign: Campaign
    engine: Engine
    registered: CampaignKeys | None = None

    def ledger_campaign(self) -> Campaign:
        """The configured campaign."""
        return self.campaign


def open_pipeline(settings: Settings) -> Pipeline:
    """Validate the campaign and open the ledger: reads and writes nothing (see :func:`register`)."""
    return Pipeline(settings, settings.campaign(), ledger.create_ledger_engine(settings.ledger_url))


def register(pipeline: Pipeline) -> CampaignKeys:
    """The write step before any other: create the ledger's schema if absent, register the campaign and items.

    Idempotent, and one read when nothing changed. Refuses a ledger of another schema version
    and changed terms for items that have grants.
    """
    return pipeline.register_campaign()


@dataclass(frozen=True)
class PreparedSnapshot:
    """A frozen, partitioned snapshot registered in the ledger."""

    report: snapshot.SnapshotReport
    partitions_dir: Location
    partition_count: int

    def as_dict(self) -> dict[str, Any]:
        """Small plain values: references, never data."""
        return {
            "snapshot_id": self.report.snapshot_id,
            "snapshot_dir": self.report.directory,
            "partitions_dir": str(self.partitions_dir),
            "partition_count": self.partition_count,
            "eligible_users": self.report.eligible_users,
            "quarantine_file": self.report.quarantine_file,
        }


def freeze(
    pipeline: Pipeline, users_file: UserFile, exclusion_file: UserFile | None = None, dry_run: bool = False
) -> snapshot.SnapshotReport:
    """Validate and freeze a user file into a snapshot (no ledger writes; no writes at all when dry)."""
    settings = pipeline.settings
    return snapshot.freeze_snapshot(
        settings.location(users_file),
        settings.data_root,
        pipeline.campaign.campaign_id,
        None if exclusion_file is None else settings.location(exclusion_file),
        pipeline.settings.rejected_share_max,
        dry_run,
        pipeline.campaign.id_column,
    )


def partition(
    pipeline: Pipeline,
    report: snapshot.SnapshotReport,
    on_progress: Callable[[int], None] | None = None,
    record: bool = True,
) -> PreparedSnapshot:
    """Partition a frozen snapshot and register it as the campaign's current snapshot (``record``).

    A dry run passes ``record=False``: the partition files are written (content-addressed, a
    cache), the ledger is not.
    """
    count = pipeline.settings.partitions_for(report.eligible_users)
    out_dir = partitions_dir(report.location, count)
    partition_snapshot(report.users_file, out_dir, count, on_progress)
    if not record:
        return PreparedSnapshot(report, out_dir, count)
    ledger.register_snapshot(
        pipeline.engine,
        pipeline.keys.campaign_key,
        report.snapshot_id,
        {
            "source_file": report.source_file,
            "snapshot_dir": report.directory,
            "eligible_users": report.eligible_users,
            "rejected_rows": report.null_rows + report.not_integer_rows + report.out_of_range_rows,
            "duplicate_rows": report.duplicate_rows,
            "excluded_users": report.excluded_users,
            "partition_count": count,
        },
        pipeline.settings.clock(),
    )
    return PreparedSnapshot(report, out_dir, count)


@dataclass(frozen=True)
class RunHandle:
    """A registered run over one snapshot's partitions."""

    run_id: str
    run_key: int
    snapshot_id: str
    entries: tuple[PartitionEntry, ...]


def new_run_id(pipeline: Pipeline, trigger: str = "cli") -> str:
    """A fresh, sortable run id for runs started outside Airflow."""
    return f"{trigger}__{pipeline.settings.clock():%Y%m%dT%H%M%SZ}__{uuid.uuid4().hex[:8]}"


def start_run(
    pipeline: Pipeline, run_id: str | None = None, snapshot_id: str | None = None, trigger: str = "cli"
) -> RunHandle:
    """Register a run over the given (default: current) snapshot and load its manifest."""
    row = snapshot_row(pipeline, snapshot_id)
    entries = tuple(snapshot_partitions(pipeline, row))
    run_id = run_id or new_run_id(pipeline, trigger)
    run_key = ledger.register_run(
        pipeline.engine, run_id, pipeline.keys.campaign_key, row["snapshot_id"], trigger, pipeline.settings.clock()
    )
    return RunHandle(run_id, run_key, str(row["snapshot_id"]), entries)


def snapshot_row(pipeline: Pipeline, snapshot_id: str | None) -> dict[str, Any]:
    """The registered snapshot row (default: the campaign's current one); :class:`SnapshotError` if none."""
    if snapshot_id is None:
        row = ledger.current_snapshot(pipeline.engine, pipeline.keys.campaign_key)
        if row is None:
            raise SnapshotError(
                f"campaign {pipeline.campaign.campaign_id!r} has no snapshot in {pipeline.settings.describe_ledger()}; "
                "run `entitle run --users FILE` first"
            )
        return row
    with pipeline.engine.connect() as connection:
        found = connection.execute(
            sa.select(ledger.snapshots).where(
                ledger.snapshots.c.campaign_key == pipeline.keys.campaign_key,
                ledger.snapshots.c.snapshot_id == snapshot_id,
            )
        ).first()
    if found is None:
        raise SnapshotError(
            f"snapshot {snapshot_id!r} is not registered for campaign {pipeline.campaign.campaign_id!r}"
        )
    return dict(found._mapping)


def snapshot_partitions(pipeline: Pipeline, row: Mapping[str, Any]) -> list[PartitionEntry]:
    """A registered snapshot's partitions, from its manifest; :class:`PartitionError` saying how to write them again."""
    folder = partitions_dir(pipeline.settings.location(row["snapshot_dir"]), int(row["partition_count"]))
    try:
        return load_manifest(folder)
    except EntitleError as exc:  # no manifest (the folder was deleted), or one that cannot be read
        raise PartitionError(
            f"snapshot {row['snapshot_id']}: its partitions cannot be read ({exc}). {rebuild_advice(pipeline, row)}"
        ) from exc


def rebuild_advice(pipeline: Pipeline, row: Mapping[str, Any]) -> str:
    """How to write a registered snapshot's partitions again: ``entitle run`` over the file it was frozen from.

    The same file freezes to the same snapshot id (the id is the hash of its eligible users), so
    the run writes the missing partition files and manifest again, and every grant it plans is
    already in the ledger and skipped.
    """
    source = str(row["source_file"])
    words = ["entitle", "run", "--users", source]
    try:
        exclusion = snapshot.load_snapshot_report(pipeline.settings.location(row["snapshot_dir"])).exclusion_file
    except EntitleError:
        exclusion = "FILE" if row["excluded_users"] else None  # the exclusion file's name was in snapshot.json
    if exclusion:
        words += ["--exclude", exclusion]
    command = shlex.join(words)
    why = (
        f"the same file freezes to the same snapshot {row['snapshot_id']}, whose partitions it writes again; "
        "grants already in the ledger are skipped"
    )
    try:
        gone = not storage.exists(pipeline.settings.location(source))
    except EntitleError:  # an object store that does not answer now: say what works once it does
        gone = False
    if gone:
        return f"Its user file {source} is gone too: put it back, then run `{command}` ({why})."
    return f"Write them again from the user file the snapshot was frozen from: `{command}` ({why})."


def select_partitions(
    pipeline: Pipeline, run: RunHandle, partition_ids: Iterable[int] | None, only_failed: bool
) -> list[PartitionEntry]:
    """The run's partitions restricted to ``partition_ids`` and/or to those not finished."""
    chosen = list(run.entries)
    if partition_ids is not None:
        wanted = set(partition_ids)
        unknown = sorted(wanted - {e.partition_id for e in chosen})
        if unknown:
            raise SnapshotError(
                f"partition id(s) {unknown} do not exist; snapshot {run.snapshot_id} has "
                f"partitions 0..{len(chosen) - 1}"
            )
        chosen = [e for e in chosen if e.partition_id in wanted]
    if only_failed:
        latest = latest_attempts(pipeline, run.snapshot_id, len(run.entries))
        chosen = [e for e in chosen if latest.get(e.partition_id, {}).get("status") in ("failed", "running")]
    return chosen


def grant(
    pipeline: Pipeline,
    run: RunHandle,
    entries: Iterable[PartitionEntry],
    verify: bool = False,
    on_outcome: Callable[[PartitionOutcome], None] | None = None,
    writers: int = 1,
) -> list[PartitionOutcome]:
    """Grant the partitions, ``writers`` at a time; a failed partition does not stop the others.

    Each writer is a thread with its own ledger connection and transaction per partition
    (reading Parquet, encoding and the database's work release the GIL). SQLite takes one
    writer at a time whatever this says; PostgreSQL runs them side by side.
    """
    context = GrantContext(
        pipeline.engine,
        pipeline.campaign,
        pipeline.keys,
        run.run_key,
        run.snapshot_id,
        pipeline.settings.clock,
        pipeline.settings.worker,
    )
    pipeline.campaign.require_started(pipeline.settings.clock())
    chosen = list(entries)
    outcomes: dict[int, PartitionOutcome] = {}

    def finished(outcome: PartitionOutcome) -> None:
        outcomes[outcome.partition_id] = outcome
        if on_outcome is not None:
            on_outcome(outcome)

    if writers <= 1:
        for entry in chosen:
            finished(grant_partition(context, entry, verify))
    else:
        stop = threading.Event()

        def grant_one(entry: PartitionEntry) -> PartitionOutcome | None:
            if stop.is_set():
                return None
            try:
                return grant_partition(context, entry, verify)
            except BaseException:
                # Anything grant_partition does not turn into a failed outcome stops the run, as it
                # would with one writer: partitions not yet started are not started.
                stop.set()
                raise

        with ThreadPoolExecutor(max_workers=writers) as pool:
            futures = [pool.submit(grant_one, entry) for entry in chosen]
            for future in as_completed(futures):
                outcome = future.result()
                if outcome is not None:
                    finished(outcome)
    return [outcomes[entry.partition_id] for entry in chosen]


def latest_attempts(pipeline: Pipeline, snapshot_id: str, partition_count: int) -> dict[int, dict[str, Any]]:
    """The latest attempt per partition of a snapshot split ``partition_count`` ways, by partition id."""
    table = ledger.partition_attempts
    latest = (
        sa.select(table.c.partition_id, sa.func.max(table.c.attempt_key).label("attempt_key"))
        .where(
            table.c.campaign_key == pipeline.keys.campaign_key,
            table.c.snapshot_id == snapshot_id,
            table.c.partition_count == partition_count,
        )
        .group_by(table.c.partition_id)
        .subquery()
    )
    query = (
        sa.select(table, ledger.runs.c.run_id)
        .join(latest, latest.c.attempt_key == table.c.attempt_key)
        .join(ledger.runs, ledger.runs.c.run_key == table.c.run_key)
    )
    with pipeline.engine.connect() as connection:
        rows = connection.execute(query).all()
    return {int(r.partition_id): dict(r._mapping) for r in rows}


@dataclass(frozen=True)
class StatusReport:
    """Per-partition state of a campaign's current snapshot."""

    campaign_id: str
    snapshot_id: str
    partition_count: int
    done: int
    failed: int
    running: int
    pending: int
    partitions: list[dict[str, Any]]

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON output."""
        return asdict(self)


def status(pipeline: Pipeline, snapshot_id: str | None = None) -> StatusReport:
    """Done, failed (with the error), running and pending partitions of a snapshot."""
    row = snapshot_row(pipeline, snapshot_id)
    count = int(row["partition_count"])
    latest = latest_attempts(pipeline, str(row["snapshot_id"]), count)
    partitions = []
    for partition_id in range(count):
        attempt = latest.get(partition_id)
        state = "pending" if attempt is None else str(attempt["status"])
        partitions.append(
            {
                "partition_id": partition_id,
                "status": state,
                "planned": None if attempt is None else attempt["planned"],
                "written": None if attempt is None else attempt["written"],
                "already_present": None if attempt is None else attempt["already_present"],
                "duration_s": None if attempt is None else attempt["duration_s"],
                "run_id": None if attempt is None else attempt["run_id"],
                "error": None if attempt is None else attempt["error"],
            }
        )
    states = [p["status"] for p in partitions]
    return StatusReport(
        pipeline.campaign.campaign_id,
        str(row["snapshot_id"]),
        count,
        states.count("done"),
        states.count("failed"),
        states.count("running"),
        states.count("pending"),
        partitions,
    )


@dataclass(frozen=True)
class ItemTotal:
    """Grants of one item and their face value."""

    item_sku: str
    item_kind: str
    grants: int
    amount_krw: int | None
    face_value_krw: int


def plan_items(campaign: Campaign, users: int) -> list[ItemTotal]:
    """Per-item counts and face value if each of ``users`` receives every item."""
    return [ItemTotal(i.sku, i.kind, users, i.amount_krw, users * (i.amount_krw or 0)) for i in campaign.items]


def ledger_totals(pipeline: Pipeline) -> list[ItemTotal]:
    """Live grants per item of the campaign, counted in the ledger itself (grants minus voids)."""
    g, v, i = ledger.grants, ledger.grant_voids, ledger.campaign_items
    with pipeline.engine.connect() as connection:
        items = connection.execute(
            sa.select(i.c.item_key, i.c.item_sku, i.c.item_kind, i.c.amount_krw)
            .where(i.c.campaign_key == pipeline.keys.campaign_key)
            .order_by(i.c.item_key)
        ).all()
        # One sequential pass with a conditional sum per item: a GROUP BY would sort all
        # 240M rows in SQLite, and a per-row void probe would triple the time.
        columns = []
        for item in items:
            hit = g.c.item_key == item.item_key
            columns.append(sa.func.coalesce(sa.func.sum(sa.case((hit, 1), else_=0)), 0))
            columns.append(sa.func.coalesce(sa.func.sum(sa.case((hit, g.c.amount_krw), else_=0)), 0))
        granted = (
            connection.execute(sa.select(*columns).where(g.c.campaign_key == pipeline.keys.campaign_key)).one()
            if items
            else ()
        )
        voided = {
            int(r.item_key): (int(r.n), int(r.v or 0))
            for r in connection.execute(
                sa.select(g.c.item_key, sa.func.count().label("n"), sa.func.sum(g.c.amount_krw).label("v"))
                # The whole grant key, issue_no included: a void names one issue, and a reissue
                # (issue n+1) of a voided grant is live.
                .select_from(v.join(g, sa.and_(*(v.c[column] == g.c[column] for column in ledger.GRANT_KEY))))
                .where(v.c.campaign_key == pipeline.keys.campaign_key)
                .group_by(g.c.item_key)
            )
        }
    totals = []
    for index, item in enumerate(items):
        void_count, void_value = voided.get(int(item.item_key), (0, 0))
        count = int(granted[2 * index]) - void_count
        value = int(granted[2 * index + 1]) - void_value
        totals.append(ItemTotal(item.item_sku, item.item_kind, count, item.amount_krw, value))
    return totals


def require_all_done(outcomes: list[PartitionOutcome]) -> None:
    """Raise :class:`GrantFailedError` naming every failed partition, if any failed."""
    failed = [o for o in outcomes if o.status != "done"]
    if failed:
        listed = "; ".join(f"part-{o.partition_id:04d}: {o.error}" for o in failed[:10])
        raise GrantFailedError(
            f"{len(failed)} partition(s) failed: {listed}. Fix the cause, then `entitle grant --only-failed`."
        )


def delivery_selection(
    pipeline: Pipeline, partition_ids: Iterable[int] | None = None, only_failed: bool = False
) -> tuple[DeliveryContext, list[PartitionEntry]]:
    """The current snapshot's partitions to deliver: all, ``partition_ids``, or those not finished last time."""
    row = snapshot_row(pipeline, None)
    count = int(row["partition_count"])
    entries = snapshot_partitions(pipeline, row)
    if partition_ids is not None:
        wanted = set(partition_ids)
        unknown = sorted(wanted - {e.partition_id for e in entries})
        if unknown:
            raise SnapshotError(
                f"partition id(s) {unknown} do not exist; snapshot {row['snapshot_id']} has partitions 0..{count - 1}"
            )
        entries = [e for e in entries if e.partition_id in wanted]
    if only_failed:
        states = delivery.partition_states(pipeline.engine, pipeline.keys.campaign_key)
        unfinished = {
            partition_id
            for (_issuer, partition_id), state in states.items()
            if state["snapshot_id"] == row["snapshot_id"] and state["status"] in ("failed", "running")
        }
        entries = [e for e in entries if e.partition_id in unfinished]
    context = DeliveryContext(
        pipeline.engine, pipeline.campaign, pipeline.keys, str(row["snapshot_id"]), pipeline.settings.clock
    )
    return context, entries


def finished_partitions(pipeline: Pipeline, snapshot_id: str, entries: Iterable[PartitionEntry]) -> set[int]:
    """Partitions of the snapshot with nothing left to do: granted with today's items, and delivered.

    Granted: the latest attempt of this snapshot's partition is done with the campaign's current
    items signature. Delivered (only when the campaign has downstream issuers): every issuer's
    latest report for it is done for this snapshot, and no voided grant in it awaits revocation.
    """
    chosen = list(entries)
    count = chosen[0].partition_count if chosen else 0
    signature = pipeline.keys.items_signature(pipeline.campaign)
    latest = latest_attempts(pipeline, snapshot_id, count)
    finished = {
        e.partition_id
        for e in chosen
        if latest.get(e.partition_id, {}).get("status") == "done"
        and latest[e.partition_id]["items_signature"] == signature
    }
    if not finished or not delivery.has_downstream_issuers(pipeline.campaign):
        return finished
    states = delivery.partition_states(pipeline.engine, pipeline.keys.campaign_key)
    issuers = [s.name for s in pipeline.campaign.issuers if pipeline.campaign.items_of(s.name)]
    delivered = {
        p
        for p in finished
        if all(
            states.get((issuer, p), {}).get("status") == "done" and states[(issuer, p)]["snapshot_id"] == snapshot_id
            for issuer in issuers
        )
    }
    pending = delivery.partitions_with_pending_revocations(
        pipeline.engine, pipeline.keys.campaign_key, [e for e in chosen if e.partition_id in delivered]
    )
    return delivered - pending


def unfinished_partitions(pipeline: Pipeline, snapshot_id: str, partition_ids: Iterable[int]) -> dict[str, str]:
    """Of ``partition_ids``, those whose latest grant attempt for the snapshot is not done, with its error."""
    wanted = sorted(set(partition_ids))
    if not wanted:
        return {}
    row = snapshot_row(pipeline, snapshot_id)
    latest = latest_attempts(pipeline, snapshot_id, int(row["partition_count"]))
    unfinished = {}
    for partition_id in wanted:
        attempt = latest.get(partition_id)
        if attempt is None:
            unfinished[partition_label(partition_id)] = "never attempted"
        elif attempt["status"] != "done":
            unfinished[partition_label(partition_id)] = str(attempt["error"] or attempt["status"])
    return unfinished


def run_outcomes(pipeline: Pipeline, run_id: str) -> list[dict[str, Any]]:
    """The latest attempt per partition of one run (planned, written, already present, status)."""
    table = ledger.partition_attempts
    latest = (
        sa.select(sa.func.max(table.c.attempt_key).label("attempt_key"))
        .join(ledger.runs, ledger.runs.c.run_key == table.c.run_key)
        .where(ledger.runs.c.run_id == run_id, table.c.campaign_key == pipeline.keys.campaign_key)
        .group_by(table.c.partition_id)
        .subquery()
    )
    with pipeline.engine.connect() as connection:
        rows = connection.execute(
            sa.select(table).join(latest, latest.c.attempt_key == table.c.attempt_key).order_by(table.c.partition_id)
        ).all()
    return [dict(r._mapping) for r in rows]


def run_wrote_grants(pipeline: Pipeline, run_id: str) -> bool:
    """Whether any attempt of the run wrote a grant (a night with nothing new has no notices to write)."""
    table = ledger.partition_attempts
    with pipeline.engine.connect() as connection:
        found = connection.execute(
            sa.select(table.c.attempt_key)
            .join(ledger.runs, ledger.runs.c.run_key == table.c.run_key)
            .where(
                ledger.runs.c.run_id == run_id, table.c.campaign_key == pipeline.keys.campaign_key, table.c.written > 0
            )
            .limit(1)
        ).first()
    return found is not None
