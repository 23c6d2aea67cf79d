"""Task bodies of the grant DAGs (``entitlement_grant``, ``channel_credit``): each DAG task is one call here.

Every DAG task has the name of the function it calls: ``freeze_snapshot``, ``plan_partitions``,
``grant`` (mapped, one per partition), ``reconcile``, ``notify`` and ``summary``. These functions
take and return small plain values (paths, ids, counts) that fit in XCom, typed below as
``TypedDict``s, and never import Airflow: the DAG file passes what Airflow knows (run id, params,
conf) as arguments.  A failure raises an :class:`EntitleError`, so Airflow marks that task
instance failed and retries it when the error may pass.
"""

from __future__ import annotations

import difflib
import time
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NotRequired, TypedDict, cast

from pipeline import delivery, reconciliation, storage
from pipeline.config import Settings, load_settings
from pipeline.credentials import ConnectionSecretLookup
from pipeline.errors import (
    ConfigError,
    GrantFailedError,
    ReconciliationBreaksError,
    ReconciliationIncompleteError,
    SnapshotError,
)
from pipeline.grants import notices, runs
from pipeline.grants.partitioning import load_manifest, partition_label
from pipeline.reconciliation.verdict import REPAIR_COMMAND, VOID_BREAK_COMMAND

DEFAULT_INPUT_FILE = "users.parquet"


class PreparedSnapshot(TypedDict):
    """``freeze_snapshot``'s XCom: the frozen, partitioned snapshot (references, never data)."""

    snapshot_id: str
    snapshot_dir: str
    partitions_dir: str
    partition_count: int
    eligible_users: int
    quarantine_file: str | None
    dry_run: bool


class PlannedPartition(TypedDict):
    """One item of ``plan_partitions``' XCom: a partition with work left (one mapped ``grant``)."""

    snapshot_id: str
    partition_id: int
    label: str
    rows: int


class GrantedPartition(TypedDict):
    """``grant``'s XCom: what the grant of one partition did, and its deliveries."""

    partition_id: int
    status: str
    planned: int
    written: int
    already_present: NotRequired[int]
    duration_s: NotRequired[float]
    skipped: NotRequired[bool]
    verified: NotRequired[bool]
    error: NotRequired[str | None]
    retryable: NotRequired[bool]
    label: NotRequired[str]
    deliveries: NotRequired[list[dict[str, Any]]]
    task_body_s: NotRequired[float]


class Checked(TypedDict):
    """``reconcile``'s XCom: the reconciliation's verdict and where its exports are."""

    verdict: str
    explanation: str
    reconciliation_id: NotRequired[str]
    bridge: NotRequired[dict[str, int]]
    open_breaks: NotRequired[int]
    export_dir: NotRequired[str | None]
    live_per_item: NotRequired[dict[str, int]]
    duration_s: NotRequired[float]
    partitions_failed: NotRequired[dict[str, str]]


class Notified(TypedDict):
    """``notify``'s XCom: the "granted" notices written for the run."""

    partitions_failed: dict[str, str]
    skipped: NotRequired[str]
    directory: NotRequired[str]
    users: NotRequired[int]
    partitions: NotRequired[int]


class Summary(TypedDict):
    """``summary``'s XCom: the run's outcome for the log, the alert and analysts' DAGs."""

    snapshot_id: str
    eligible_users: int
    partition_count: int
    partitions_run: int
    partitions_failed: dict[str, str]
    planned: int
    written: int
    already_present: int
    verdict: str | None
    reconciliation_id: str | None
    export_dir: str | None
    explanation: str | None
    ledger: str
    dry_run: bool
    items: NotRequired[dict[str, int]]
    total_face_value_krw: NotRequired[int]


KNOWN_CONF_HINT_MAX = 3  # close matches named for an unknown conf key


def task_settings(
    campaign: str | None = None, ledger_url: str | None = None, secret_lookup: ConnectionSecretLookup | None = None
) -> Settings:
    """The settings from the environment; ``campaign`` (a path or a bundled campaign's id) overrides the campaign.

    A DAG that serves one fixed campaign (``channel_credit``) passes it to every task; the
    nightly ``entitlement_grant`` DAG passes nothing and uses ENTITLE_CAMPAIGN. ``ledger_url``
    is the Airflow Connection ``entitle_ledger``'s, when the DAG found one and ENTITLE_LEDGER_URL
    is not set (see :func:`pipeline.config.ledger_url_from_connection`). ``secret_lookup`` gives
    an Airflow Connection's password by id: the issuers' tokens (:mod:`pipeline.credentials`).
    """
    settings = load_settings(connection_ledger_url=ledger_url, connection_secret_lookup=secret_lookup)
    return settings if campaign is None else settings.with_campaign(campaign)


def check_conf(conf: Mapping[str, Any], known: Iterable[str]) -> None:
    """Refuse a run conf with a key the DAG does not know (a typo would otherwise run on defaults)."""
    names = sorted(known)
    unknown = sorted(k for k in conf if k not in names)
    if not unknown:
        return
    hints = []
    for key in unknown:
        close = difflib.get_close_matches(key, names, n=KNOWN_CONF_HINT_MAX)
        hints.append(f"{key!r}" + (f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""))
    raise ConfigError(
        f"unknown conf key(s) {', '.join(hints)}; this DAG knows {', '.join(names)}. "
        "Nothing was run: trigger again with the right keys."
    )


def default_snapshot_uri(settings: Settings, input_file: str = DEFAULT_INPUT_FILE) -> str:
    """Where the nightly run looks for the user file when no snapshot_uri is given."""
    return str(settings.home / "incoming" / input_file)


def freeze_snapshot(
    params: Mapping[str, Any],
    campaign: str | None = None,
    input_file: str = DEFAULT_INPUT_FILE,
    ledger_url: str | None = None,
    conf: Mapping[str, Any] | None = None,
    known: Iterable[str] = (),
) -> PreparedSnapshot:
    """Freeze the user file into a snapshot and partition it; register it unless dry. Returns references.

    ``conf`` is the run's conf: a key that is not one of the DAG's ``known`` params is refused
    before anything is read (Airflow merges conf into params, so params cannot tell a typo).
    """
    if conf is not None:
        check_conf(conf, known)
    settings = task_settings(campaign, ledger_url)
    dry_run = bool(params.get("dry_run"))
    users_file = settings.location(params.get("snapshot_uri") or default_snapshot_uri(settings, input_file))
    exclusion = settings.location(params["exclusion_uri"]) if params.get("exclusion_uri") else None
    if not storage.exists(users_file):
        raise SnapshotError(
            f"{storage.missing_message(users_file)}; pass the 'snapshot_uri' param (a path or s3:// URI) "
            "or put the file there"
        )
    with runs.open_pipeline(settings) as pipeline:
        if not dry_run:  # a dry run writes content-addressed files only (a cache), never the ledger
            runs.register(pipeline)
            pipeline.campaign.require_started(settings.clock())
        report = runs.freeze(pipeline, users_file, exclusion)
        return _prepared(runs.partition(pipeline, report, record=not dry_run), dry_run=dry_run)


def _prepared(prepared: runs.PreparedSnapshot, dry_run: bool) -> PreparedSnapshot:
    return cast(PreparedSnapshot, {**prepared.as_dict(), "dry_run": dry_run})


def plan_partitions(
    prepared: PreparedSnapshot, params: Mapping[str, Any], campaign: str | None = None, ledger_url: str | None = None
) -> list[PlannedPartition]:
    """One small dict per partition that has work left, restricted to the ``partitions`` param when given.

    A partition whose grant is done for this snapshot with today's items, and whose delivery
    (when the campaign has issuers) is done with no voided grant left to revoke, needs no task
    instance: a night with nothing new maps nothing. ``verify`` and dry runs map every partition.
    """
    settings = task_settings(campaign, ledger_url)
    entries = load_manifest(settings.location(prepared["partitions_dir"]))
    count = len(entries)
    wanted = sorted(set(params.get("partitions") or [])) or list(range(count))
    unknown = [p for p in wanted if not 0 <= p < count]
    if unknown:
        raise SnapshotError(
            f"partition id(s) {unknown} do not exist; snapshot {prepared['snapshot_id']} has partitions 0..{count - 1}"
        )
    if not (prepared.get("dry_run") or params.get("verify")):
        with runs.open_pipeline(settings) as pipeline:
            finished = runs.finished_partitions(pipeline, str(prepared["snapshot_id"]), entries)
        wanted = [p for p in wanted if p not in finished]
    return [
        PlannedPartition(
            snapshot_id=prepared["snapshot_id"], partition_id=p, label=partition_label(p), rows=entries[p].rows
        )
        for p in wanted
    ]


def grant(
    run_id: str,
    partition: PlannedPartition,
    params: Mapping[str, Any],
    campaign: str | None = None,
    ledger_url: str | None = None,
    secret_lookup: ConnectionSecretLookup | None = None,
) -> GrantedPartition:
    """Grant one partition for the Airflow run ``run_id``, then deliver it to the campaign's issuers.

    Grant and delivery of a partition form one chain, so one failed partition holds up no other.
    A retry grants nothing twice (the partition's finished attempt is reused) and delivers what
    is left. The result carries ``task_body_s``, the wall time of this whole call, so the
    benchmark can tell the pipeline's work from Airflow's start-up of the task.
    """
    started = time.perf_counter()
    settings = task_settings(campaign, ledger_url, secret_lookup)
    partition_id = int(partition["partition_id"])
    if params.get("dry_run"):
        planned = int(partition["rows"]) * len(settings.campaign().items)
        return GrantedPartition(partition_id=partition_id, status="dry_run", planned=planned, written=0)
    with runs.open_pipeline(settings) as pipeline:
        runs.register(pipeline)
        run = runs.start_run(pipeline, run_id, str(partition["snapshot_id"]), trigger="airflow")
        entry = runs.select_partitions(pipeline, run, [partition_id], only_failed=False)[0]
        outcome = runs.grant(pipeline, run, [entry], bool(params.get("verify")))[0]
        if outcome.status != "done":
            raise GrantFailedError(f"{entry.label} failed: {outcome.error}", retryable=outcome.retryable)
        reports = _deliver(pipeline, partition_id)
    granted = {
        **outcome.as_dict(),
        "label": entry.label,
        "deliveries": [r.as_dict() for r in reports],
        "task_body_s": time.perf_counter() - started,
    }
    return cast(GrantedPartition, granted)


def _deliver(pipeline: runs.Pipeline, partition_id: int) -> list[delivery.DeliveryReport]:
    """Deliver one granted partition to the campaign's issuers; nothing (no ledger access) without any."""
    if not delivery.has_downstream_issuers(pipeline.campaign):
        return []
    runtimes = delivery.open_issuers(pipeline.campaign, engine=pipeline.engine)
    try:
        context, entries = runs.delivery_selection(pipeline, [partition_id])
        reports = delivery.deliver(context, runtimes, entries)
    finally:
        for runtime in runtimes.values():
            runtime.close()
    delivery.require_delivered(reports)  # failed or not attempted: the task fails and Airflow retries it
    return reports


def reconcile(
    prepared: PreparedSnapshot,
    planned: Sequence[PlannedPartition] = (),
    campaign: str | None = None,
    ledger_url: str | None = None,
    secret_lookup: ConnectionSecretLookup | None = None,
) -> Checked:
    """Reconcile the run's snapshot against the ledger (see :mod:`pipeline.reconciliation`); small result.

    ``partitions_failed`` names the run's planned partitions whose grant or delivery is not done,
    with the error each ended in, so that an INCOMPLETE verdict says which task instances to clear.
    """
    if prepared.get("dry_run"):
        return Checked(verdict="DRY_RUN", explanation="dry run: nothing was granted, nothing to check")
    with runs.open_pipeline(task_settings(campaign, ledger_url, secret_lookup)) as pipeline:
        result = reconciliation.reconcile(pipeline, str(prepared["snapshot_id"]))
        failed = runs.unfinished_partitions(
            pipeline, str(prepared["snapshot_id"]), [int(p["partition_id"]) for p in planned]
        )
    return Checked(
        reconciliation_id=result.reconciliation_id,
        verdict=result.verdict,
        explanation=result.explanation,
        bridge=result.bridge,
        open_breaks=result.open_breaks,
        export_dir=result.export_dir,
        live_per_item={i["item_sku"]: i["live"] for i in result.items},
        duration_s=result.duration_s,
        partitions_failed=failed,
    )


def notify(
    run_id: str,
    prepared: PreparedSnapshot,
    planned: Sequence[PlannedPartition] = (),
    campaign: str | None = None,
    ledger_url: str | None = None,
) -> Notified:
    """Write the run's "granted" notices for the messaging system (one Parquet file per partition).

    Notices are written for what was granted; when some of the run's partitions failed the
    folder is not marked complete, the result says so (``partitions_failed``) and the DAG fails
    the task after writing, so that clearing the failed task instances writes the notices again
    with the late partitions in, and marks the folder complete.
    """
    if prepared.get("dry_run"):
        return Notified(skipped="dry run", partitions_failed={})
    with runs.open_pipeline(task_settings(campaign, ledger_url)) as pipeline:
        failed = runs.unfinished_partitions(
            pipeline, str(prepared["snapshot_id"]), [int(p["partition_id"]) for p in planned]
        )
        if not runs.run_wrote_grants(pipeline, run_id):
            return Notified(skipped="the run granted nothing", users=0, partitions_failed=failed)
        export = notices.export_granted(pipeline, run_id, complete=not failed)
    return Notified(
        directory=str(export.directory), users=export.users, partitions=export.partitions, partitions_failed=failed
    )


def require_notices_complete(written: Notified) -> None:
    """Fail (after writing) when some of the run's partitions failed, so that clearing them writes the notices again."""
    failed = dict(written.get("partitions_failed") or {})
    if failed:
        raise GrantFailedError(
            f"notices written for what was granted; {len(failed)} partition(s) of the run failed "
            f"({', '.join(failed)}): clear the failed task instances once the cause is fixed, and the "
            "notices are written again with them"
        )


def summary(
    run_id: str,
    prepared: PreparedSnapshot,
    planned: Sequence[PlannedPartition],
    checked: Checked | None,
    campaign: str | None = None,
    ledger_url: str | None = None,
) -> Summary:
    """One small summary of the run for the log and XCom, from the ledger's record of the run.

    ``checked`` is what the reconcile task reported, None when it did not get that far.
    """
    settings = task_settings(campaign, ledger_url)
    checked = checked or Checked(verdict="NOT_RUN", explanation="the reconcile task did not finish; its log says why")
    failed = dict(checked.get("partitions_failed") or {})
    outcomes: list[dict[str, Any]] = []
    if not prepared.get("dry_run"):
        with runs.open_pipeline(settings) as pipeline:
            outcomes = runs.run_outcomes(pipeline, run_id)
            if not failed:
                failed = runs.unfinished_partitions(
                    pipeline, str(prepared["snapshot_id"]), [int(p["partition_id"]) for p in planned]
                )
    result = Summary(
        snapshot_id=prepared["snapshot_id"],
        eligible_users=prepared["eligible_users"],
        partition_count=prepared["partition_count"],
        partitions_run=len(planned),
        partitions_failed=failed,
        planned=sum(int(o.get("planned") or 0) for o in outcomes),
        written=sum(int(o.get("written") or 0) for o in outcomes),
        already_present=sum(int(o.get("already_present") or 0) for o in outcomes),
        verdict=checked.get("verdict"),
        reconciliation_id=checked.get("reconciliation_id"),
        export_dir=checked.get("export_dir"),
        explanation=checked.get("explanation"),
        ledger=settings.describe_ledger(),
        dry_run=bool(prepared.get("dry_run")),
    )
    live_per_item = checked.get("live_per_item")
    if live_per_item is not None:
        # The check counted live grants per item moments ago; counting 240M rows again would
        # double the tail of the run, so reuse its figures.
        loaded = settings.campaign()
        live = dict(live_per_item)
        result["items"] = live
        result["total_face_value_krw"] = sum(live.get(i.sku, 0) * (i.amount_krw or 0) for i in loaded.items)
    return result


def render_summary(result: Summary) -> str:
    """The summary as lines for the task log."""
    lines = [
        f"snapshot {result['snapshot_id']}: {result['eligible_users']:,} eligible users, "
        f"{result['partitions_run']} of {result['partition_count']} partitions run"
        f"{' (dry run)' if result['dry_run'] else ''}"
        + (f", {len(result['partitions_failed'])} failed" if result.get("partitions_failed") else ""),
        f"planned {result['planned']:,}, written {result['written']:,}, already present {result['already_present']:,}",
        f"check: {result['verdict']} — {result['explanation']}",
        *(
            [f"reconciliation: {result['reconciliation_id']} (exports in {result['export_dir']})"]
            if result.get("reconciliation_id")
            else []
        ),
        f"ledger: {result['ledger']}",
    ]
    for label, error in (result.get("partitions_failed") or {}).items():
        lines.append(f"  {label} FAILED: {error}")
    for sku, count in (result.get("items") or {}).items():
        lines.append(f"  {sku:<20} {count:>14,} live grants")
    if "total_face_value_krw" in result:
        lines.append(f"  total face value ₩{result['total_face_value_krw']:,}")
    return "\n".join(lines)


def require_reconciled(result: Checked | Summary) -> None:
    """Fail (after the summary was logged) unless reconciliation says RECONCILED or it was a dry run."""
    verdict = result.get("verdict")
    failed = dict(result.get("partitions_failed") or {})
    if verdict in ("RECONCILED", "DRY_RUN") and not failed:
        return
    where = f"; failed partitions: {', '.join(failed)}" if failed else ""
    advice = (
        "clear the failed task instances of this run (Clear → Only failed) once the cause is fixed"
        if failed or verdict in ("INCOMPLETE", "NOT_RUN")
        else f"list the breaks with `entitle query open_breaks`, then `{REPAIR_COMMAND}` / `{VOID_BREAK_COMMAND}`"
    )
    message = (
        f"reconciliation verdict {verdict}: {result.get('explanation')}{where}. The grants are committed; {advice}."
    )
    if verdict == "BREAKS":
        raise ReconciliationBreaksError(message)
    raise ReconciliationIncompleteError(message)
