"""Reconcile a campaign: its snapshot and items against the ledger, and the issuers' exports, to one verdict.

Expected is every snapshot user (exclusions removed) times every campaign item, with
the item's terms; the ledger side is the live grants (grants minus voids). Neither
side is taken from the pipeline's own run records, so a row deleted, added or edited
directly in the database shows up.

:func:`reconcile` checks every partition (:mod:`pipeline.reconciliation.compare`, in
worker processes when asked), compares every delivering issuer's export with the
ledger (:mod:`pipeline.reconciliation.three_way`), judges
(:mod:`pipeline.reconciliation.verdict`), then stores the run and its breaks and
exports them (:mod:`pipeline.reconciliation.store`). The verdict's bridge, in grants::

    snapshot users x items - excluded users x items - in unreadable partition files
      = expected (counted from the partition files)
      - missing - voided - terms_mismatch = matched (counted)
      + terms_mismatch + unexpected + duplicate + in unreadable partitions + stray
      = ledger (live grants, counted by the database)

A bridge that does not add up, a partition file that cannot be read, a partition not
granted yet, a stray grant or an issuer whose export cannot be read make the verdict
``INCOMPLETE``, with the reasons; otherwise open breaks make it ``BREAKS``.
"""

from __future__ import annotations

import datetime as dt
import os
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import closing
from dataclasses import asdict, dataclass, field
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Engine

from pipeline import ledger, storage
from pipeline.errors import invariant
from pipeline.grants import runs
from pipeline.grants.partitioning import (
    BUCKET_MODULUS,
    PartitionEntry,
    partition_label,
)
from pipeline.grants.snapshot import EXCLUDED_FILE_NAME
from pipeline.reconciliation import store, three_way
from pipeline.reconciliation.checksums import item_terms
from pipeline.reconciliation.compare import (
    BREAK_CLASSES,
    PartitionCheck,
    PartitionTask,
    Tally,
    check_partition,
    dispose_engines,
)
from pipeline.reconciliation.three_way import ISSUER_BREAK_CLASSES
from pipeline.reconciliation.verdict import (
    BREAKS,
    INCOMPLETE,
    REPAIR_COMMAND,
    VOID_BREAK_COMMAND,
    Bridge,
    Judged,
    Step,
    Verdict,
    judge,
)
from pipeline.worker_processes import map_in_processes

METHODS = ("checksum", "rows")
TOP_BREAKS_IN_RESULT = 100


@dataclass(frozen=True)
class Reconciliation(Judged):
    """One reconciliation: verdict, bridge, per item and per partition figures, and where the exports are."""

    reconciliation_id: str
    campaign_id: str
    snapshot_id: str
    partition_count: int
    method: str
    started_at: str
    finished_at: str
    duration_s: float
    outcome: Verdict  # status and explanation are the document's "verdict" and "explanation"
    bridge: dict[str, int]
    items: list[dict[str, Any]]
    partitions: list[dict[str, Any]]
    breaks_by_class: dict[str, int]
    open_breaks: int
    breaks_itemized: int
    resolved_breaks: int
    top_breaks: list[dict[str, Any]]
    export_dir: str
    breaks_file: str
    checksum_partitions: int = 0
    row_partitions: int = 0
    grants_checked: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
    issuers: list[dict[str, Any]] = field(default_factory=list)  # the third source, per issuer
    time_zone: str = "UTC"  # the campaign's: the report shows times in it

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON, XCom and the report; the whole verdict comes last, as ``outcome``."""
        document: dict[str, Any] = {}
        for name, value in asdict(self).items():
            if name == "outcome":
                document["verdict"] = self.verdict
                document["explanation"] = self.explanation
            else:
                document[name] = value
        document["outcome"] = self.outcome.as_dict()
        return document

    def comparable(self) -> dict[str, Any]:
        """The result without what differs between two runs on the same data (ids, times, paths, memory)."""
        document = self.as_dict()
        for name in ("reconciliation_id", "started_at", "finished_at", "duration_s", "export_dir", "breaks_file"):
            document.pop(name)
        for partition in document["partitions"]:
            partition.pop("duration_s", None)
        for issuer in document["issuers"]:
            issuer.pop("duration_s", None)
        document["extra"].pop("worker_peak_rss_mb", None)
        return document


def new_reconciliation_id(now: dt.datetime) -> str:
    """A sortable, unique reconciliation id."""
    return f"rec-{now:%Y%m%dT%H%M%SZ}-{os.urandom(4).hex()}"


def reconcile(
    pipeline: runs.Pipeline,
    snapshot_id: str | None = None,
    method: str = "checksum",
    workers: int | None = None,
    on_partition: Callable[[PartitionCheck], None] | None = None,
) -> Reconciliation:
    """Reconcile the campaign's snapshot against the ledger, store the result and export it."""
    invariant(method in METHODS, f"unknown reconciliation method {method!r}")
    started_mono = time.monotonic()
    started = pipeline.settings.clock()
    row = runs.snapshot_row(pipeline, snapshot_id)
    snapshot_id = str(row["snapshot_id"])
    count = int(row["partition_count"])
    snapshot_dir = pipeline.settings.location(row["snapshot_dir"])
    entries = runs.snapshot_partitions(pipeline, row)
    latest = runs.latest_attempts(pipeline, snapshot_id, count)
    known = _known_skus(pipeline)
    terms = item_terms(pipeline)
    excluded = snapshot_dir / EXCLUDED_FILE_NAME
    tasks = [
        PartitionTask(
            pipeline.settings.ledger_url,
            pipeline.keys.campaign_key,
            snapshot_id,
            terms,
            known,
            entry,
            latest.get(entry.partition_id, {}).get("status") == "done",
            method,
            excluded if storage.exists(excluded) else None,
        )
        for entry in entries
    ]
    checks = list(_run_checks(tasks, workers or pipeline.settings.reconcile_workers, on_partition))
    stray = _stray_grants(pipeline.engine, pipeline.keys.campaign_key)
    tally = Tally.of(checks, three_way.check_issuers(pipeline, count), stray, terms)
    verdict = _judge(tally, row, entries, len(terms))
    reconciliation_id = new_reconciliation_id(started)
    exports = pipeline.settings.home / "campaigns" / pipeline.campaign.campaign_id / "reconciliations"
    run = store.RunContext(
        reconciliation_id, snapshot_id, count, method, started, started_mono, exports / reconciliation_id, dict(known)
    )
    stored = store.store_run(pipeline, run, tally, verdict)
    result = _result(pipeline, run, tally, verdict, stored)
    store.write_result(run, result.as_dict())
    return result


def _known_skus(pipeline: runs.Pipeline) -> tuple[tuple[int, str], ...]:
    table = ledger.campaign_items
    with pipeline.engine.connect() as connection:
        rows = connection.execute(
            sa.select(table.c.item_key, table.c.item_sku).where(table.c.campaign_key == pipeline.keys.campaign_key)
        ).all()
    return tuple((int(k), str(s)) for k, s in rows)


def _run_checks(
    tasks: list[PartitionTask], workers: int, on_partition: Callable[[PartitionCheck], None] | None
) -> Iterator[PartitionCheck]:
    if workers <= 1 or len(tasks) <= 1:
        try:
            for task in tasks:
                check = check_partition(task)
                if on_partition is not None:
                    on_partition(check)
                yield check
        finally:
            # In-process, the per-URL engines would outlive the reconciliation (and hold connections).
            dispose_engines()
        return
    # Separate processes: the checksum scans run inside SQLite/PostgreSQL on one core each.  They are
    # fresh interpreters (pipeline.worker_processes), not multiprocessing children: Polars must not be
    # forked after its thread pool started, "spawn" re-imports the parent's __main__ (the airflow
    # console script under Airflow's task supervisor, which dies there), and a daemonic process (a
    # Celery prefork worker's child) may not start multiprocessing children at all.
    with closing(map_in_processes(check_partition, tasks, min(workers, len(tasks)))) as checks:
        for check in checks:
            if on_partition is not None:
                on_partition(check)
            yield check


def _stray_grants(engine: Engine, campaign_key: int) -> int:
    """Grants whose user_bucket lies outside every partition (only possible with the CHECK bypassed)."""
    with engine.connect() as connection:
        return int(
            connection.execute(
                # Two range seeks on the key; an OR of both would make SQLite scan every grant.
                sa.text(
                    "SELECT (SELECT count(*) FROM grants WHERE campaign_key = :ck AND user_bucket < 0) "
                    "+ (SELECT count(*) FROM grants WHERE campaign_key = :ck AND user_bucket >= :m)"
                ),
                {"ck": campaign_key, "m": BUCKET_MODULUS},
            ).scalar_one()
        )


# --------------------------------------------------------------------------- the verdict


def _bridge(tally: Tally, snapshot: Mapping[str, Any], entries: Sequence[PartitionEntry], item_count: int) -> Bridge:
    """From the snapshot's users to the ledger's live grants (see the module docstring)."""
    totals, document = tally.totals, tally.bridge_document()
    rows = {e.partition_id: e.rows for e in entries}
    eligible, excluded = int(snapshot["eligible_users"]), int(snapshot["excluded_users"])
    # The database's live count: what the partitions classified plus what they left over.
    counted_ledger = document["ledger"] + document["residual_ledger"] - tally.stray - tally.unreadable_live
    return Bridge(
        "grants",
        Step("snapshot users x items", (eligible + excluded) * item_count),
        (
            Step("excluded users x items", -excluded * item_count),
            Step("in unreadable partition files", -sum(rows[c.partition_id] for c in tally.unreadable) * item_count),
            Step("expected", totals["expected"], checkpoint=True),
            Step("missing", -totals["missing"]),
            Step("voided", -totals["voided"]),
            Step("terms_mismatch: the campaign's terms", -totals["terms_mismatch"]),
            Step("matched", totals["matched"], checkpoint=True),
            Step("terms_mismatch: other terms", totals["terms_mismatch"]),
            Step("unexpected", totals["unexpected"]),
            Step("duplicate", totals["duplicate"]),
            Step("in unreadable partitions' key ranges", tally.unreadable_live),
            Step("stray: user_bucket outside every partition", tally.stray),
        ),
        Step("ledger", counted_ledger),
    )


def _judge(tally: Tally, snapshot: Mapping[str, Any], entries: Sequence[PartitionEntry], item_count: int) -> Verdict:
    """The campaign's verdict: its bridge, the open breaks by class, the reasons it may be incomplete."""
    bridge = _bridge(tally, snapshot, entries, item_count)
    reasons = _incomplete_reasons(tally)

    def explain(status: str, _reasons: tuple[str, ...]) -> str:
        if status == INCOMPLETE:
            return _incomplete_text(tally, bridge, reasons)
        if status == BREAKS:
            return _breaks_text(tally)
        return _reconciled_text(tally)

    return judge(bridge, tally.open_by_class(), reasons, explain=explain)


def _incomplete_reasons(tally: Tally) -> list[str]:
    """What could not be compared: issuers' exports, partition files, partitions not granted, stray grants."""
    reasons = [reason for check in tally.issuer_checks for reason in check.outcome.incomplete]
    if tally.unreadable:
        ids = [c.partition_id for c in tally.unreadable]
        reasons.append(
            f"{len(ids)} partition file(s) unreadable ({ids[:10]}: {tally.unreadable[0].error}); their "
            f"{tally.unreadable_live:,} ledger grants could not be compared"
        )
    if tally.not_granted:
        ids = [c.partition_id for c in tally.not_granted]
        missing = sum(int(c.counts.get("missing") or 0) for c in tally.not_granted)
        reasons.append(f"{len(ids)} partition(s) not granted yet ({ids[:10]}; {missing:,} grants to go)")
    if tally.stray:
        reasons.append(
            f"{tally.stray:,} grants have a user_bucket outside every partition (the CHECK constraint was bypassed)"
        )
    return reasons


def _incomplete_text(tally: Tally, bridge: Bridge, reasons: list[str]) -> str:
    """The reasons, and what the counts leave unexplained (each side's residual, or the bridge's)."""
    document = tally.bridge_document()
    said = list(reasons)
    if document["residual_expected"] or document["residual_ledger"] - tally.stray - tally.unreadable_live:
        said.append(
            f"unexplained residual: expected side {document['residual_expected']:,}, ledger side "
            f"{document['residual_ledger']:,} (a bug: please report it)"
        )
    elif not bridge.adds_up():
        said.append(bridge.mismatch())
    return "; ".join(said)


def _breaks_text(tally: Tally) -> str:
    """How many open breaks of which class, and what repairs them."""
    document = tally.bridge_document()
    open_breaks = sum(tally.open_by_class().values())
    classes = ", ".join(f"{document[c]:,} {c}" for c in BREAK_CLASSES + ISSUER_BREAK_CLASSES if document[c])
    note = "" if tally.itemized >= open_breaks else f" (first {tally.itemized:,} itemized)"
    issuer_note = (
        f"; `{REPAIR_COMMAND}` delivers issuer_missing again; issuer_unexpected is revoked at the issuer by a person"
        if document["issuer_missing"] or document["issuer_unexpected"]
        else ""
    )
    return (
        f"{open_breaks:,} open breaks: {classes}{note}; list them with `entitle query open_breaks`; "
        f"`{REPAIR_COMMAND}` fixes missing and terms_mismatch, `{VOID_BREAK_COMMAND}` the rest{issuer_note}"
    )


def _reconciled_text(tally: Tally) -> str:
    document = tally.bridge_document()
    voided = f", {document['voided']:,} voided on purpose" if document["voided"] else ""
    held = "".join(f"; {i.outcome.explanation}" for i in tally.issuer_checks)  # each: the issuer holds exactly ...
    return f"all {document['expected']:,} expected grants are in the ledger with the campaign's terms{voided}{held}"


# --------------------------------------------------------------------------- the result


def _result(
    pipeline: runs.Pipeline, run: store.RunContext, tally: Tally, verdict: Verdict, stored: store.StoredRun
) -> Reconciliation:
    """The result document of a stored run."""
    document = tally.bridge_document()
    checks = tally.checks
    keys = pipeline.keys.item_keys
    amounts = {keys[i.sku]: i.amount_krw for i in pipeline.campaign.items if i.sku in keys}
    return Reconciliation(
        reconciliation_id=run.reconciliation_id,
        campaign_id=pipeline.campaign.campaign_id,
        snapshot_id=run.snapshot_id,
        partition_count=run.partition_count,
        method=run.method,
        started_at=run.started.isoformat(),
        finished_at=stored.finished.isoformat(),
        duration_s=round(time.monotonic() - run.started_mono, 3),
        outcome=verdict,
        bridge=document,
        items=[
            {"item_sku": run.item_skus.get(k, f"#{k}"), "item_key": k, "amount_krw": amounts.get(k), **c}
            for k, c in sorted(tally.per_item.items())
        ],
        time_zone=pipeline.campaign.time_zone,
        partitions=[
            {
                "partition_id": c.partition_id,
                "label": partition_label(c.partition_id),
                "state": c.state,
                "method": c.method,
                "expected": c.counts.get("expected"),
                "live": c.counts.get("live"),
                "breaks": sum(int(c.counts.get(n) or 0) for n in BREAK_CLASSES),
                "error": c.error,
                "duration_s": round(c.duration_s, 3),
            }
            for c in checks
        ],
        breaks_by_class={c: tally.totals[c] for c in BREAK_CLASSES}
        | ({c: document[c] for c in ISSUER_BREAK_CLASSES} if tally.issuer_checks else {}),
        open_breaks=verdict.open_breaks,
        breaks_itemized=tally.itemized,
        resolved_breaks=stored.resolved,
        top_breaks=[
            {
                "break_id": r["break_id"],
                "break_class": r["break_class"],
                "user_id": r["user_id"],
                "item_sku": r["item_sku"],
                "partition_id": r["partition_id"],
                "detail": r["detail"],
            }
            for r in stored.breaks.head(TOP_BREAKS_IN_RESULT).iter_rows(named=True)
        ],
        export_dir=str(run.export_dir),
        breaks_file=str(run.breaks_file),
        checksum_partitions=sum(1 for c in checks if c.method == "checksum"),
        row_partitions=sum(1 for c in checks if c.method == "rows"),
        grants_checked=document["ledger"],
        extra={
            "stray_grants": tally.stray,
            "worker_peak_rss_mb": round(max((c.peak_rss_mb for c in checks), default=0.0)),
        },
        issuers=[i.summary() for i in tally.issuer_checks],
    )
