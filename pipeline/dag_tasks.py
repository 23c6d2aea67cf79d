"""Task bodies of the grant DAGs (``entitlement_grant``, ``channel_credit``): each DAG task is one call here.

These functions take and return small plain values (paths, ids, counts) that
fit in XCom, and never import Airflow: the DAG file passes what Airflow knows
(run id, params) as arguments.  A failure raises an :class:`EntitleError`, so
Airflow marks that task instance failed and retries it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

from pipeline import delivery, jobs, notices, reconciliation, snapshot, storage
from pipeline.config import Settings, load_settings
from pipeline.errors import (
    GrantFailedError,
    ReconciliationBreaksError,
    ReconciliationIncompleteError,
    SnapshotError,
)
from pipeline.partitioning import load_manifest, partition_label, partition_snapshot, partitions_dir

DEFAULT_INPUT_FILE = "users.parquet"


def task_settings(campaign: str | None = None) -> Settings:
    """The settings from the environment; ``campaign`` (a path or a bundled campaign's id) overrides the campaign.

    A DAG that serves one fixed campaign (``channel_credit``) passes it to every task; the
    nightly ``entitlement_grant`` DAG passes nothing and uses ENTITLE_CAMPAIGN.
    """
    settings = load_settings()
    return settings if campaign is None else settings.with_campaign(campaign)


def default_snapshot_uri(settings: Settings, input_file: str = DEFAULT_INPUT_FILE) -> str:
    """Where the nightly run looks for the user file when no snapshot_uri is given."""
    return str(settings.home / "incoming" / input_file)


def freeze_and_partition(
    params: Mapping[str, Any], campaign: str | None = None, input_file: str = DEFAULT_INPUT_FILE
) -> dict[str, Any]:
    """Freeze the user file into a snapshot and partition it; register it unless dry. Returns references."""
    settings = task_settings(campaign)
    dry_run = bool(params.get("dry_run"))
    users_file = settings.location(params.get("snapshot_uri") or default_snapshot_uri(settings, input_file))
    exclusion = settings.location(params["exclusion_uri"]) if params.get("exclusion_uri") else None
    if not storage.exists(users_file):
        raise SnapshotError(
            f"{storage.missing_message(users_file)}; pass the 'snapshot_uri' param (a path or s3:// URI) "
            "or put the file there"
        )
    if dry_run:
        # A dry run writes content-addressed files only (a cache), never the ledger.
        loaded = settings.campaign()
        report = snapshot.freeze_snapshot(
            users_file,
            settings.data_root,
            loaded.campaign_id,
            exclusion,
            settings.rejected_share_max,
            id_column=loaded.id_column,
        )
        out_dir = partitions_dir(report.location, settings.partition_count)
        partition_snapshot(report.users_file, out_dir, settings.partition_count)
        return {**jobs.PreparedSnapshot(report, out_dir, settings.partition_count).as_dict(), "dry_run": True}
    pipeline = jobs.open_pipeline(settings)
    pipeline.campaign.require_started(settings.clock())
    report = jobs.freeze(pipeline, users_file, exclusion)
    return {**jobs.partition(pipeline, report).as_dict(), "dry_run": False}


def partitions_to_grant(
    prepared: Mapping[str, Any], params: Mapping[str, Any], campaign: str | None = None
) -> list[dict[str, Any]]:
    """One small dict per partition to map over, restricted to the ``partitions`` param when given."""
    entries = load_manifest(task_settings(campaign).location(prepared["partitions_dir"]))
    count = len(entries)
    wanted = sorted(set(params.get("partitions") or [])) or list(range(count))
    unknown = [p for p in wanted if not 0 <= p < count]
    if unknown:
        raise SnapshotError(
            f"partition id(s) {unknown} do not exist; snapshot {prepared['snapshot_id']} has partitions 0..{count - 1}"
        )
    return [
        {
            "snapshot_id": prepared["snapshot_id"],
            "partition_id": p,
            "label": partition_label(p),
            "rows": entries[p].rows,
        }
        for p in wanted
    ]


def grant_one(
    run_id: str, partition: Mapping[str, Any], params: Mapping[str, Any], campaign: str | None = None
) -> dict[str, Any]:
    """Grant one partition for the Airflow run ``run_id``; raise if it failed.

    The result carries ``task_body_s``, the wall time of this whole call, so the
    benchmark can tell the pipeline's work from Airflow's start-up of the task.
    """
    started = time.perf_counter()
    settings = task_settings(campaign)
    if params.get("dry_run"):
        planned = int(partition["rows"]) * len(settings.campaign().items)
        return {"partition_id": partition["partition_id"], "status": "dry_run", "planned": planned, "written": 0}
    pipeline = jobs.open_pipeline(settings)
    try:
        run = jobs.start_run(pipeline, run_id, str(partition["snapshot_id"]), trigger="airflow")
        entry = jobs.select_partitions(pipeline, run, [int(partition["partition_id"])], only_failed=False)[0]
        outcome = jobs.grant(pipeline, run, [entry], bool(params.get("verify")))[0]
    finally:
        # Close the ledger inside the task: on SQLite the last connection's close checkpoints
        # the WAL, which is ledger work and belongs to this task's time.
        pipeline.engine.dispose()
    if outcome.status != "done":
        raise GrantFailedError(f"{entry.label} failed: {outcome.error}")
    return {**outcome.as_dict(), "task_body_s": time.perf_counter() - started}


def deliver_one(outcome: Mapping[str, Any], campaign: str | None = None) -> dict[str, Any]:
    """Deliver one granted partition to the campaign's issuers; a no-op (no ledger access) without any."""
    settings = task_settings(campaign)
    loaded = settings.campaign()
    if outcome.get("status") == "dry_run" or not any(loaded.items_of(s.name) for s in loaded.issuers):
        return {"partition_id": outcome["partition_id"], "reports": [], "skipped": True}
    pipeline = jobs.open_pipeline(settings)
    runtimes = delivery.open_issuers(pipeline.campaign, engine=pipeline.engine)
    try:
        context, entries = jobs.delivery_selection(pipeline, [int(outcome["partition_id"])])
        reports = delivery.deliver(context, runtimes, entries)
    finally:
        for runtime in runtimes.values():
            runtime.close()
        pipeline.engine.dispose()
    delivery.require_delivered(reports)  # failed or not attempted: the task fails and Airflow retries it
    return {"partition_id": outcome["partition_id"], "reports": [r.as_dict() for r in reports], "skipped": False}


def check(prepared: Mapping[str, Any], campaign: str | None = None) -> dict[str, Any]:
    """Reconcile the run's snapshot against the ledger (see :mod:`pipeline.reconciliation`); small result."""
    if prepared.get("dry_run"):
        return {"verdict": "DRY_RUN", "explanation": "dry run: nothing was granted, nothing to check"}
    pipeline = jobs.open_pipeline(task_settings(campaign))
    try:
        result = reconciliation.reconcile(pipeline, str(prepared["snapshot_id"]))
    finally:
        pipeline.engine.dispose()
    return {
        "reconciliation_id": result.reconciliation_id,
        "verdict": result.verdict,
        "explanation": result.explanation,
        "bridge": result.bridge,
        "open_breaks": result.open_breaks,
        "export_dir": result.export_dir,
        "live_per_item": {i["item_sku"]: i["live"] for i in result.items},
        "duration_s": result.duration_s,
    }


def granted_notices(run_id: str, prepared: Mapping[str, Any], campaign: str | None = None) -> dict[str, Any]:
    """Write the run's "granted" notices for the messaging system (one Parquet file per partition)."""
    if prepared.get("dry_run"):
        return {"skipped": "dry run"}
    pipeline = jobs.open_pipeline(task_settings(campaign))
    try:
        export = notices.export_granted(pipeline, run_id)
    finally:
        pipeline.engine.dispose()
    return {"directory": export.directory, "users": export.users, "partitions": export.partitions}


def summarize(
    prepared: Mapping[str, Any],
    outcomes: list[Mapping[str, Any]],
    checked: Mapping[str, Any],
    campaign: str | None = None,
) -> dict[str, Any]:
    """One small summary of the run for the log and XCom."""
    settings = task_settings(campaign)
    result: dict[str, Any] = {
        "snapshot_id": prepared["snapshot_id"],
        "eligible_users": prepared["eligible_users"],
        "partitions_run": len(outcomes),
        "planned": sum(int(o.get("planned") or 0) for o in outcomes),
        "written": sum(int(o.get("written") or 0) for o in outcomes),
        "already_present": sum(int(o.get("already_present") or 0) for o in outcomes),
        "verdict": checked.get("verdict"),
        "reconciliation_id": checked.get("reconciliation_id"),
        "export_dir": checked.get("export_dir"),
        "explanation": checked.get("explanation"),
        "ledger": settings.describe_ledger(),
        "dry_run": bool(prepared.get("dry_run")),
    }
    if not prepared.get("dry_run"):
        # The check counted live grants per item moments ago; counting 240M rows again would
        # double the tail of the run, so reuse its figures.
        loaded = settings.campaign()
        live = dict(checked.get("live_per_item") or {})
        result["items"] = live
        result["total_face_value_krw"] = sum(live.get(i.sku, 0) * (i.amount_krw or 0) for i in loaded.items)
    return result


def render_summary(result: Mapping[str, Any]) -> str:
    """The summary as lines for the task log."""
    lines = [
        f"snapshot {result['snapshot_id']}: {result['eligible_users']:,} eligible users, "
        f"{result['partitions_run']} partitions run{' (dry run)' if result['dry_run'] else ''}",
        f"planned {result['planned']:,}, written {result['written']:,}, already present {result['already_present']:,}",
        f"check: {result['verdict']} — {result['explanation']}",
        *(
            [f"reconciliation: {result['reconciliation_id']} (exports in {result['export_dir']})"]
            if result.get("reconciliation_id")
            else []
        ),
        f"ledger: {result['ledger']}",
    ]
    for sku, count in (result.get("items") or {}).items():
        lines.append(f"  {sku:<20} {count:>14,} live grants")
    if "total_face_value_krw" in result:
        lines.append(f"  total face value ₩{result['total_face_value_krw']:,}")
    return "\n".join(lines)


def require_reconciled(result: Mapping[str, Any]) -> None:
    """Fail the run (after its summary was logged) unless reconciliation says RECONCILED or it was a dry run."""
    verdict = result.get("verdict")
    if verdict in ("RECONCILED", "DRY_RUN"):
        return
    message = (
        f"reconciliation verdict {verdict}: {result.get('explanation')}. The grants are committed; "
        "list the breaks with `entitle query open_breaks`, then `entitle repair` / `entitle void`."
    )
    if verdict == "BREAKS":
        raise ReconciliationBreaksError(message)
    raise ReconciliationIncompleteError(message)
