"""The third source of a reconciliation: what each issuer says it holds, against the ledger.

For every issuer a campaign declares (other than the built-in ``ledger``), the
issuer's export of the campaign (``Issuer.export``: grant_id, user_id, item_sku,
issue_no per grant) is compared with the ledger's live grants of the items that
issuer delivers, on the grant id (``{campaign}:{user}:{sku}:{issue_no}``):

- ``issuer_missing``: live in the ledger, not at the issuer. The detail says why
  as far as the ledger knows (never delivered, the last attempt failed, or the
  issuer once answered ``created``/``exists`` and has lost it since);
  ``entitle repair`` delivers these again.
- ``issuer_unexpected``: at the issuer, not live in the ledger: voided in the
  ledger but not revoked yet (``entitle deliver`` revokes voided grants), an
  item this issuer does not deliver, or a grant the ledger never made (a person
  decides; the pipeline revokes only what it voided).

Per issuer: ledger_live = matched + issuer_missing and issuer_held = matched +
issuer_unexpected, where issuer_held counts the distinct grant ids exported. An
issuer whose export cannot be read makes the reconciliation ``INCOMPLETE``.

The ledger side is read into memory (about 40 bytes a grant, with its grant id),
and so is the export: at 48 million users with two delivered items that is
about 4 GB on each side; the comparison is one Polars join.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import polars as pl
import sqlalchemy as sa

from pipeline import jobs, ledger
from pipeline.campaign import IssuerSpec
from pipeline.issuers import IssuerRejected, IssuerUnavailable, build_issuer
from pipeline.partitioning import BUCKET_MODULUS, user_bucket_expr

ISSUER_BREAK_CLASSES = ("issuer_missing", "issuer_unexpected")
EXPORT_FRAME_ROWS = 200_000  # export rows gathered per frame while streaming
LEDGER_FETCH_ROWS = 200_000
ANSWER_DETAIL_CHARS = 200
UNKNOWN_ITEM_KEY = -1  # an exported sku the campaign does not know


@dataclass
class IssuerCheck:
    """One issuer compared with the ledger: counts, and its breaks (None when the export was unreadable)."""

    issuer: str
    state: str  # compared | unreadable
    ledger_live: int
    issuer_held: int
    matched: int
    issuer_missing: int
    issuer_unexpected: int
    breaks: pl.DataFrame | None
    error: str | None = None
    duration_s: float = 0.0

    def summary(self) -> dict[str, Any]:
        """Plain values for the result document (no break rows)."""
        return {
            "issuer": self.issuer,
            "state": self.state,
            "ledger_live": self.ledger_live,
            "issuer_held": self.issuer_held,
            "matched": self.matched,
            "issuer_missing": self.issuer_missing,
            "issuer_unexpected": self.issuer_unexpected,
            "error": self.error,
            "duration_s": round(self.duration_s, 3),
        }


def delivering_issuers(pipeline: jobs.Pipeline) -> list[IssuerSpec]:
    """The campaign's declared issuers that deliver at least one item."""
    return [spec for spec in pipeline.campaign.issuers if pipeline.campaign.items_of(spec.name)]


def check_issuers(pipeline: jobs.Pipeline, partition_count: int) -> list[IssuerCheck]:
    """Compare every delivering issuer's export with the ledger (an empty list for a ledger-only campaign)."""
    return [check_issuer(pipeline, spec, partition_count) for spec in delivering_issuers(pipeline)]


def check_issuer(pipeline: jobs.Pipeline, spec: IssuerSpec, partition_count: int) -> IssuerCheck:
    """One issuer: read the ledger side, then the export, and classify every difference."""
    started = time.monotonic()
    skus = {pipeline.keys.item_keys[i.sku]: i.sku for i in pipeline.campaign.items_of(spec.name)}
    ledger_rows = _ledger_side(pipeline, skus)
    issuer = build_issuer(spec)
    try:
        export_frame = getattr(issuer, "export_frame", None)
        if callable(export_frame):
            exported = export_frame(pipeline.campaign.campaign_id)
        else:
            exported = _export_frame(issuer.export(pipeline.campaign.campaign_id))
    except (IssuerUnavailable, IssuerRejected, OSError, ValueError, KeyError, TypeError) as exc:
        return IssuerCheck(
            spec.name,
            "unreadable",
            ledger_rows.filter(~pl.col("voided")).height,
            0,
            0,
            0,
            0,
            None,
            f"the export of issuer {spec.name!r} cannot be read ({type(exc).__name__}: {exc})",
            time.monotonic() - started,
        )
    finally:
        issuer.close()
    live = ledger_rows.filter(~pl.col("voided"))
    held = exported.unique("grant_id", keep="first")
    missing = live.join(held.select("grant_id"), on="grant_id", how="anti")
    unexpected = held.join(live.select("grant_id"), on="grant_id", how="anti")
    matched = live.height - missing.height
    breaks = pl.concat(
        [
            _missing_rows(missing, spec.name, partition_count),
            _unexpected_rows(unexpected, ledger_rows, pipeline, spec.name, skus, partition_count),
        ],
        how="vertical_relaxed",
    )
    return IssuerCheck(
        spec.name,
        "compared",
        live.height,
        held.height,
        matched,
        missing.height,
        unexpected.height,
        breaks,
        None,
        time.monotonic() - started,
    )


def _ledger_side(pipeline: jobs.Pipeline, skus: dict[int, str]) -> pl.DataFrame:
    """Every grant of the issuer's items (live or voided) with its grant id and its last delivery answer."""
    schema: dict[str, Any] = {
        "user_bucket": pl.Int64,
        "user_id": pl.Int64,
        "item_key": pl.Int32,
        "issue_no": pl.Int32,
        "voided": pl.Boolean,
        "void_actor": pl.String,
        "outcome": pl.String,
        "answer_detail": pl.String,
    }
    statement = sa.text(
        "SELECT g.user_bucket, g.user_id, g.item_key, g.issue_no, v.actor IS NOT NULL AS voided, v.actor, "
        "a.outcome, a.detail FROM grants AS g "
        f"LEFT JOIN grant_voids AS v ON {ledger.same_grant('v')} "
        f"LEFT JOIN delivery_answers AS a ON {ledger.same_grant('a')} "
        "WHERE g.campaign_key = :campaign_key AND g.item_key IN :item_keys"
    ).bindparams(sa.bindparam("item_keys", expanding=True))
    frames = []
    with pipeline.engine.connect() as connection:
        result = connection.execution_options(stream_results=True).execute(
            statement, {"campaign_key": pipeline.keys.campaign_key, "item_keys": sorted(skus)}
        )
        while rows := result.fetchmany(LEDGER_FETCH_ROWS):
            frames.append(pl.DataFrame([tuple(r) for r in rows], schema=schema, orient="row"))
    frame = pl.concat(frames) if frames else pl.DataFrame(schema=schema)
    sku_names = pl.DataFrame(
        {"item_key": list(skus), "item_sku": list(skus.values())}, schema={"item_key": pl.Int32, "item_sku": pl.String}
    )
    return frame.join(sku_names, on="item_key", how="left").with_columns(
        pl.concat_str(
            [
                pl.lit(pipeline.campaign.campaign_id),
                pl.col("user_id").cast(pl.String),
                pl.col("item_sku"),
                pl.col("issue_no").cast(pl.String),
            ],
            separator=":",
        ).alias("grant_id")
    )


def _export_frame(rows: Iterator[dict[str, Any]]) -> pl.DataFrame:
    """The issuer's export as a frame, gathered in chunks so that a long export streams."""
    schema: dict[str, Any] = {"grant_id": pl.String, "user_id": pl.Int64, "item_sku": pl.String, "issue_no": pl.Int32}
    frames = []
    chunk: list[tuple[str, int, str, int]] = []
    for row in rows:
        chunk.append((str(row["grant_id"]), int(row["user_id"]), str(row["item_sku"]), int(row["issue_no"])))
        if len(chunk) >= EXPORT_FRAME_ROWS:
            frames.append(pl.DataFrame(chunk, schema=schema, orient="row"))
            chunk = []
    frames.append(pl.DataFrame(chunk, schema=schema, orient="row"))
    return pl.concat(frames)


def _partition_expr(partition_count: int) -> pl.Expr:
    return (pl.col("user_bucket") * partition_count // BUCKET_MODULUS).cast(pl.Int32)


def _missing_rows(missing: pl.DataFrame, issuer: str, partition_count: int) -> pl.DataFrame:
    details = [
        _missing_detail(issuer, gid, outcome, detail)
        for gid, outcome, detail in missing.select("grant_id", "outcome", "answer_detail").iter_rows()
    ]
    return _break_frame(
        missing.with_columns(
            pl.lit("issuer_missing").alias("break_class"),
            pl.Series("detail", details, dtype=pl.String),
            _partition_expr(partition_count).alias("partition_id"),
        ),
        issuer,
    )


def _missing_detail(issuer: str, grant_id: str, outcome: str | None, detail: str | None) -> str:
    redrive = "`entitle repair` delivers it again"
    if outcome is None:
        return f"{grant_id} was never delivered to issuer {issuer!r}; `entitle deliver` or {redrive}"
    if outcome == "failed":
        why = (detail or "no detail")[:ANSWER_DETAIL_CHARS]
        return f"{grant_id}: the last delivery to issuer {issuer!r} failed ({why}); {redrive}"
    return f"{grant_id}: issuer {issuer!r} answered {outcome} but does not hold it now (lost at the issuer?); {redrive}"


def _unexpected_rows(
    unexpected: pl.DataFrame,
    ledger_rows: pl.DataFrame,
    pipeline: jobs.Pipeline,
    issuer: str,
    skus: dict[int, str],
    partition_count: int,
) -> pl.DataFrame:
    voided = ledger_rows.filter(pl.col("voided")).select("grant_id", "void_actor")
    known = dict(pipeline.keys.item_keys)
    frame = (
        unexpected.join(voided, on="grant_id", how="left")
        .with_columns(
            pl.col("item_sku").replace_strict(known, default=UNKNOWN_ITEM_KEY, return_dtype=pl.Int32).alias("item_key"),
            user_bucket_expr("user_id").alias("user_bucket"),
        )
        .with_columns(_partition_expr(partition_count).alias("partition_id"))
    )
    delivered = set(skus.values())
    campaign_id = pipeline.campaign.campaign_id
    details = [
        _unexpected_detail(issuer, campaign_id, gid, sku, actor, delivered)
        for gid, sku, actor in frame.select("grant_id", "item_sku", "void_actor").iter_rows()
    ]
    return _break_frame(
        frame.with_columns(
            pl.lit("issuer_unexpected").alias("break_class"), pl.Series("detail", details, dtype=pl.String)
        ),
        issuer,
    )


def _unexpected_detail(
    issuer: str, campaign_id: str, grant_id: str, sku: str, void_actor: str | None, delivered: set[str]
) -> str:
    if void_actor is not None:
        return (
            f"{grant_id}: voided in the ledger by {void_actor}, still held by issuer {issuer!r}; `entitle deliver` "
            "revokes it (see delivery_revocations if it did and failed)"
        )
    decide = "revoke it at the issuer if it should not exist (the pipeline revokes only what it voided)"
    if sku not in delivered:
        why = f"{sku!r} is not an item of campaign {campaign_id!r} delivered by issuer {issuer!r}"
    else:
        why = f"issuer {issuer!r} holds it, the ledger never granted it"
    return f"{grant_id}: {why}; {decide}"


def _break_frame(frame: pl.DataFrame, issuer: str) -> pl.DataFrame:
    """The columns of the reconciliation's break rows; the ledger's terms are not compared here."""
    return frame.select(
        pl.col("break_class").cast(pl.String),
        pl.col("user_id").cast(pl.Int64),
        pl.col("user_bucket").cast(pl.Int64),
        pl.col("item_key").cast(pl.Int32),
        pl.col("issue_no").cast(pl.Int32),
        *[
            pl.lit(None, dtype=pl.Int64).alias(name)
            for name in (
                "expected_amount_krw",
                "expected_valid_from",
                "expected_valid_until",
                "ledger_amount_krw",
                "ledger_valid_from",
                "ledger_valid_until",
            )
        ],
        pl.col("item_sku").cast(pl.String),
        pl.col("detail").cast(pl.String),
        pl.col("partition_id").cast(pl.Int32),
        pl.lit(issuer, dtype=pl.String).alias("issuer"),
    )
