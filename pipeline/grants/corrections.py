"""Corrections by compensating entries: void grants, repair the breaks a reconciliation found.

Nothing here updates or deletes a grant (the ledger's triggers would refuse):
a void is a new row in ``grant_voids`` naming one grant issue, with who,
when and why; a grant with wrong terms is voided and reissued under the next
``issue_no``.  Every command is one transaction and all-or-nothing: a request
that names a grant that does not exist, or one already voided, is refused
with the row that said so, and nothing is written.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

import polars as pl
import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

from pipeline import delivery, ledger
from pipeline.campaigns import Campaign
from pipeline.errors import CorrectionError
from pipeline.grants import runs
from pipeline.grants.partitioning import partition_of, user_bucket
from pipeline.ledger import delivery_answers, grant_voids, grants, recon_breaks, recon_runs, write_transaction
from pipeline.reconciliation.verdict import REPAIR_COMMAND

REASON_CHARS_MAX = 1_000
ACTOR_CHARS_MAX = 128
ERRORS_IN_MESSAGE_MAX = 10
VOID_FILE_ROWS_MAX = 1_000_000


@dataclass(frozen=True)
class VoidRequest:
    """Void the live grant(s) of one user (one item, or all of the campaign's), or the row of one break."""

    reason: str
    user_id: int | None = None
    item_sku: str | None = None
    break_id: str | None = None
    source: str = "command line"  # where the request came from, for error messages ("file.csv row 7")


@dataclass(frozen=True)
class VoidedGrant:
    """One grant issue that was voided."""

    user_id: int
    item_sku: str
    issue_no: int
    amount_krw: int | None
    reason: str

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return asdict(self)


def _check_text(value: str, name: str, limit: int, where: str) -> str:
    text = value.strip()
    if not text:
        raise CorrectionError(f"{where}: {name} is empty; say {'why' if name == 'reason' else 'who'} (it is audited)")
    if len(text) > limit:
        raise CorrectionError(f"{where}: {name} has {len(text)} characters; at most {limit}")
    return text


class VoidScope(Protocol):
    """What voiding needs of a campaign: a :class:`runs.Pipeline`, or a merchant program (``claims void``)."""

    @property
    def engine(self) -> Engine:
        """The ledger."""

    @property
    def keys(self) -> ledger.CampaignKeys:
        """The campaign's keys in the ledger."""

    @property
    def campaign(self) -> Campaign:
        """The campaign (its id and items name the grants in messages)."""


def void_grants(pipeline: VoidScope, requests: list[VoidRequest], actor: str, now: dt.datetime) -> list[VoidedGrant]:
    """Void every grant the requests name, in one transaction; refuse the whole batch on any bad request."""
    actor = _check_text(actor, "actor", ACTOR_CHARS_MAX, "--actor")
    if not requests:
        raise CorrectionError("nothing to void: no request given")
    skus = pipeline.keys.item_keys
    sku_of = {key: sku for sku, key in skus.items()}
    problems: list[str] = []
    planned: list[tuple[dict[str, Any], VoidRequest]] = []
    seen: dict[tuple[int, int, int, int], str] = {}
    with write_transaction(pipeline.engine) as connection:
        for request in requests:
            try:
                reason = _check_text(request.reason, "reason", REASON_CHARS_MAX, request.source)
                targets = _void_targets(connection, pipeline, request)
            except CorrectionError as exc:
                problems.append(str(exc))
                continue
            for target in targets:
                key = (target["user_bucket"], target["user_id"], target["item_key"], target["issue_no"])
                if key in seen:
                    problems.append(f"{request.source}: voids the same grant as {seen[key]}")
                    continue
                seen[key] = request.source
                planned.append(({**target, "reason": reason}, request))
        if problems:
            shown = "; ".join(problems[:ERRORS_IN_MESSAGE_MAX])
            more = (
                f" (and {len(problems) - ERRORS_IN_MESSAGE_MAX} more)" if len(problems) > ERRORS_IN_MESSAGE_MAX else ""
            )
            raise CorrectionError(f"nothing was voided: {shown}{more}")
        connection.execute(
            grant_voids.insert(),
            [
                {
                    "campaign_key": pipeline.keys.campaign_key,
                    "user_bucket": t["user_bucket"],
                    "user_id": t["user_id"],
                    "item_key": t["item_key"],
                    "issue_no": t["issue_no"],
                    "reason": t["reason"],
                    "actor": actor,
                    "voided_at": now,
                }
                for t, _ in planned
            ],
        )
    return [
        VoidedGrant(
            t["user_id"], sku_of.get(t["item_key"], f"#{t['item_key']}"), t["issue_no"], t["amount"], t["reason"]
        )
        for t, _ in planned
    ]


def _void_targets(connection: Connection, pipeline: VoidScope, request: VoidRequest) -> list[dict[str, Any]]:
    """The live grant rows a request names; :class:`CorrectionError` when there are none."""
    campaign_key = pipeline.keys.campaign_key
    if request.break_id is not None:
        found = connection.execute(
            sa.select(
                recon_breaks.c.user_bucket,
                recon_breaks.c.user_id,
                recon_breaks.c.item_key,
                recon_breaks.c.issue_no,
                recon_breaks.c.break_class,
                recon_breaks.c.status,
            ).where(recon_breaks.c.break_id == request.break_id, recon_breaks.c.campaign_key == campaign_key)
        ).first()
        if found is None:
            raise CorrectionError(f"{request.source}: no break {request.break_id!r} in this campaign")
        if found.issue_no is None:
            raise CorrectionError(
                f"{request.source}: break {request.break_id} is '{found.break_class}': there is no grant to void "
                f"(`{REPAIR_COMMAND}` grants missing ones)"
            )
        if found.status != "open":
            raise CorrectionError(f"{request.source}: break {request.break_id} is already resolved")
        keys = [(int(found.user_bucket), int(found.user_id), int(found.item_key), int(found.issue_no))]
        return _live_rows(connection, campaign_key, keys, request, exact_issue=True)
    if request.user_id is None:
        raise CorrectionError(f"{request.source}: name a user (--user) or a break (--break)")
    if request.item_sku is not None:
        item_key = pipeline.keys.item_keys.get(request.item_sku)
        if item_key is None:
            raise CorrectionError(
                f"{request.source}: item_sku {request.item_sku!r} is not an item of campaign "
                f"{pipeline.campaign.campaign_id!r} ({', '.join(sorted(pipeline.keys.item_keys))})"
            )
        item_keys = [item_key]
    else:
        item_keys = sorted(pipeline.keys.item_keys.values())
    bucket = user_bucket(request.user_id)
    keys = [(bucket, request.user_id, k, -1) for k in item_keys]
    return _live_rows(connection, campaign_key, keys, request, exact_issue=False)


def _grants_and_their_voids() -> sa.Join:
    """Grants left-joined to the void of the same issue (void columns are NULL for a live grant)."""
    return grants.outerjoin(grant_voids, ledger.void_of_grant())


def _live_rows(
    connection: Connection,
    campaign_key: int,
    keys: list[tuple[int, int, int, int]],
    request: VoidRequest,
    exact_issue: bool,
) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    voided_before: list[str] = []
    for bucket, user_id, item_key, issue_no in keys:
        conditions = [
            grants.c.campaign_key == campaign_key,
            grants.c.user_bucket == bucket,
            grants.c.user_id == user_id,
            grants.c.item_key == item_key,
        ]
        if exact_issue:
            conditions.append(grants.c.issue_no == issue_no)
        rows = connection.execute(
            sa.select(grants.c.issue_no, grants.c.amount_krw, grant_voids.c.actor, grant_voids.c.voided_at)
            .select_from(_grants_and_their_voids())
            .where(*conditions)
            .order_by(grants.c.issue_no)
        ).all()
        for row in rows:
            if row.actor is None:
                found.append(
                    {
                        "user_bucket": bucket,
                        "user_id": user_id,
                        "item_key": item_key,
                        "issue_no": int(row.issue_no),
                        "amount": row.amount_krw,
                    }
                )
            else:
                voided_before.append(f"issue {row.issue_no} voided {row.voided_at:%Y-%m-%d %H:%M} UTC by {row.actor}")
    if not found:
        what = f"break {request.break_id}" if request.break_id else f"user {request.user_id}"
        item = f" item {request.item_sku!r}" if request.item_sku else ""
        history = f" (already voided: {'; '.join(voided_before)})" if voided_before else " (no such grant)"
        raise CorrectionError(f"{request.source}: {what}{item} has no live grant to void{history}")
    return found


def read_void_file(path: Path, default_reason: str | None) -> list[VoidRequest]:
    """Void requests from a CSV or Parquet file with user_id, optional item_sku and optional reason columns."""
    try:
        if path.suffix.lower() == ".parquet":
            frame = pl.read_parquet(path)
        else:
            frame = pl.read_csv(path, infer_schema=False)
    except FileNotFoundError as exc:
        raise CorrectionError(f"{path}: file not found") from exc
    except (OSError, pl.exceptions.PolarsError) as exc:
        raise CorrectionError(
            f"{path}: cannot read it as {'Parquet' if path.suffix == '.parquet' else 'CSV'} ({exc})"
        ) from exc
    if "user_id" not in frame.columns and "break_id" not in frame.columns:
        raise CorrectionError(
            f"{path}: needs a 'user_id' column (and optionally 'item_sku' and 'reason'), or a 'break_id' column "
            f"(a breaks export); found {frame.columns}"
        )
    if frame.height > VOID_FILE_ROWS_MAX:
        raise CorrectionError(f"{path}: {frame.height:,} rows; at most {VOID_FILE_ROWS_MAX:,} per command")
    if frame.height == 0:
        raise CorrectionError(f"{path}: no rows to void")
    requests = []
    problems = []
    for number, row in enumerate(frame.iter_rows(named=True), start=1):
        where = f"{path} row {number}"
        reason = row.get("reason") or default_reason
        if not reason:
            problems.append(f"{where}: no reason (add a 'reason' column or pass --reason)")
            continue
        break_id = row.get("break_id")
        if break_id:
            requests.append(VoidRequest(str(reason), break_id=str(break_id), source=where))
            continue
        raw = row.get("user_id")
        try:
            user_id = int(str(raw).strip())
            if user_id <= 0:
                raise ValueError
        except ValueError:
            problems.append(f"{where}: user_id {raw!r} is not a positive whole number")
            continue
        sku = row.get("item_sku")
        requests.append(VoidRequest(str(reason), user_id, str(sku) if sku else None, source=where))
    if problems:
        raise CorrectionError("nothing was voided: " + "; ".join(problems[:ERRORS_IN_MESSAGE_MAX]))
    return requests


# --------------------------------------------------------------------------- repair


@dataclass(frozen=True)
class RepairReport:
    """What a repair did, per kind of break."""

    reconciliation_id: str
    run_id: str
    granted_missing: int
    reissued: int
    already_fixed: int
    partitions_granted: list[int]
    needs_decision: dict[str, int]
    # issuer_missing breaks: grants delivered again, and the outcome of that delivery
    issuer_redriven: int = 0
    issuer_delivery: dict[str, int] | None = None

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON."""
        return asdict(self)


def latest_reconciliation(pipeline: runs.Pipeline) -> dict[str, Any]:
    """The campaign's latest reconciliation row; :class:`CorrectionError` if there is none."""
    with pipeline.engine.connect() as connection:
        row = connection.execute(
            sa.select(recon_runs)
            .where(recon_runs.c.campaign_key == pipeline.keys.campaign_key)
            .order_by(recon_runs.c.reconciliation_key.desc())
            .limit(1)
        ).first()
    if row is None:
        raise CorrectionError(
            f"campaign {pipeline.campaign.campaign_id!r} has no reconciliation yet; run `entitle reconcile` first"
        )
    return dict(row._mapping)


def repair(pipeline: runs.Pipeline, actor: str, run_id: str | None = None) -> RepairReport:
    """Grant what the latest reconciliation found missing and reissue grants with wrong terms (idempotent)."""
    actor = _check_text(actor, "actor", ACTOR_CHARS_MAX, "--actor")
    recon = latest_reconciliation(pipeline)
    current = runs.snapshot_row(pipeline, None)
    if recon["snapshot_id"] != current["snapshot_id"]:
        raise CorrectionError(
            f"the latest reconciliation ({recon['reconciliation_id']}) is of snapshot {recon['snapshot_id']}, "
            f"but the current snapshot is {current['snapshot_id']}; run `entitle reconcile` first"
        )
    run = runs.start_run(pipeline, run_id, str(current["snapshot_id"]), trigger="repair")
    now = pipeline.settings.clock()
    # Partitions not granted at all are granted the normal way (one transaction each).
    with pipeline.engine.connect() as connection:
        not_granted = [
            int(p)
            for p in connection.execute(
                sa.select(ledger.recon_partitions.c.partition_id).where(
                    ledger.recon_partitions.c.reconciliation_key == recon["reconciliation_key"],
                    ledger.recon_partitions.c.state == "not_granted",
                )
            ).scalars()
        ]
        open_breaks = connection.execute(
            sa.select(recon_breaks).where(
                recon_breaks.c.campaign_key == pipeline.keys.campaign_key, recon_breaks.c.status == "open"
            )
        ).all()
    if not_granted:
        entries = runs.select_partitions(pipeline, run, not_granted, only_failed=False)
        runs.require_all_done(runs.grant(pipeline, run, entries))
    terms = {i.sku: i for i in pipeline.campaign.items}
    sku_of = {key: sku for sku, key in pipeline.keys.item_keys.items()}
    granted = reissued = already = 0
    needs: dict[str, int] = {}
    partition_count = int(current["partition_count"])
    with write_transaction(pipeline.engine) as connection:
        for brk in open_breaks:
            sku = sku_of.get(int(brk.item_key))
            if brk.break_class == "issuer_missing":
                continue  # delivered again below, after the ledger's own repairs committed
            if brk.break_class not in ("missing", "terms_mismatch") or sku is None:
                needs[brk.break_class] = needs.get(brk.break_class, 0) + 1
                continue
            item = terms[sku]
            values = {
                "campaign_key": pipeline.keys.campaign_key,
                "user_bucket": user_bucket(int(brk.user_id)),
                "user_id": int(brk.user_id),
                "item_key": int(brk.item_key),
                "partition_id": partition_of(int(brk.user_id), partition_count),
                "run_key": run.run_key,
                "amount_krw": item.amount_krw,
                "valid_from": item.valid_from,
                "valid_until": item.valid_until,
                "granted_at": now,
            }
            if brk.break_class == "missing":
                if _issues(connection, values):
                    already += 1
                    continue
                connection.execute(grants.insert().values(issue_no=0, **values))
                granted += 1
                continue
            issue = int(brk.issue_no)
            issues = _issues(connection, values)
            if issue not in issues or issues[issue] or max(issues) != issue:
                already += 1  # voided or reissued since the reconciliation
                continue
            connection.execute(
                grant_voids.insert().values(
                    campaign_key=values["campaign_key"],
                    user_bucket=values["user_bucket"],
                    user_id=values["user_id"],
                    item_key=values["item_key"],
                    issue_no=issue,
                    reason=f"repair of break {brk.break_id}: {str(brk.detail).split('; `')[0]}"[:REASON_CHARS_MAX],
                    actor=actor,
                    voided_at=now,
                )
            )
            connection.execute(grants.insert().values(issue_no=issue + 1, **values))
            reissued += 1
    redrive = [b for b in open_breaks if b.break_class == "issuer_missing"]
    redriven, delivered = _redeliver(pipeline, redrive, actor, now) if redrive else (0, None)
    return RepairReport(
        str(recon["reconciliation_id"]),
        run.run_id,
        granted,
        reissued,
        already,
        not_granted,
        needs,
        redriven,
        delivered,
    )


def _redeliver(pipeline: runs.Pipeline, breaks: list[Any], actor: str, now: dt.datetime) -> tuple[int, dict[str, int]]:
    """Deliver the grants of ``issuer_missing`` breaks again; returns (grants re-driven, delivery totals).

    The issuer does not hold these grants although the ledger may have recorded a final
    answer (``created``/``exists``) for them: that answer is reset to ``failed``, naming the
    break and the actor, so that delivery sends the grant again under the same grant id
    (the issuer's idempotency key: a grant it does hold answers ``exists``). Grants voided
    since the reconciliation are left alone. Then the breaks' partitions are delivered to
    the breaks' issuers as ``entitle deliver --partitions`` would.
    """
    redriven = 0
    with write_transaction(pipeline.engine) as connection:
        for brk in breaks:
            key = {
                "campaign_key": pipeline.keys.campaign_key,
                "user_bucket": int(brk.user_bucket),
                "user_id": int(brk.user_id),
                "item_key": int(brk.item_key),
            }
            issues = _issues(connection, key)
            issue = int(brk.issue_no)
            if issue not in issues or issues[issue]:
                continue  # voided (or never granted) since the reconciliation: nothing to deliver
            redriven += 1
            connection.execute(
                delivery_answers.update()
                .where(*(delivery_answers.c[name] == value for name, value in key.items()))
                .where(delivery_answers.c.issue_no == issue, delivery_answers.c.outcome != "failed")
                .values(
                    outcome="failed",
                    detail=f"not held by issuer {brk.issuer!r} (break {brk.break_id}); delivered again by repair "
                    f"({actor})",
                    answered_at=now,
                )
            )
    context, entries = runs.delivery_selection(pipeline, sorted({int(b.partition_id) for b in breaks}))
    runtimes = delivery.open_issuers(pipeline.campaign, sorted({str(b.issuer) for b in breaks}), pipeline.engine)
    try:
        reports = delivery.deliver(context, runtimes, entries)
    finally:
        for runtime in runtimes.values():
            runtime.close()
    totals = {c: sum(getattr(r, c) for r in reports) for c in ("planned", *delivery.OUTCOME_COUNTS, "sent")}
    return redriven, totals


def _issues(connection: Connection, key: dict[str, Any]) -> dict[int, bool]:
    """Every issue of one (campaign, user, item) and whether it is voided."""
    rows = connection.execute(
        sa.select(grants.c.issue_no, grant_voids.c.actor)
        .select_from(_grants_and_their_voids())
        .where(
            grants.c.campaign_key == key["campaign_key"],
            grants.c.user_bucket == key["user_bucket"],
            grants.c.user_id == key["user_id"],
            grants.c.item_key == key["item_key"],
        )
    ).all()
    return {int(r.issue_no): r.actor is not None for r in rows}


def open_break_ids(pipeline: runs.Pipeline, classes: Iterable[str]) -> list[str]:
    """Ids of the campaign's open breaks of the given classes, in a stable order."""
    with pipeline.engine.connect() as connection:
        return [
            str(b)
            for b in connection.execute(
                sa.select(recon_breaks.c.break_id)
                .where(
                    recon_breaks.c.campaign_key == pipeline.keys.campaign_key,
                    recon_breaks.c.status == "open",
                    recon_breaks.c.break_class.in_(list(classes)),
                )
                .order_by(recon_breaks.c.break_id)
            ).scalars()
        ]
