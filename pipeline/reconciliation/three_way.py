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
issuer_unexpected, where issuer_held counts the distinct grant ids exported; that is
the bridge of the issuer's verdict (:attr:`IssuerCheck.outcome`). An issuer whose
export cannot be read makes its verdict, and the reconciliation's, ``INCOMPLETE``.

Both sides are compared on the grant's integer key (user_id, item_key,
issue_no), never its id string. The export is read as it streams and reduced
chunk by chunk to that key and its partition (rows whose id is not the
canonical one of their fields, whose sku the campaign does not know or whose
user id is not positive cannot be ledger grants and are kept whole, as
issuer_unexpected). The keys are never held all together: every
:data:`SPILL_ROWS` of them are written to a scratch folder hidden in
ENTITLE_HOME (:func:`pipeline.storage.scratch_folder`), one lz4-compressed
Arrow IPC file per partition. Then, one partition at a time, its keys are
read back and compared with the same bucket range of the ledger, in slices of
about :data:`COMPARE_KEYS_MAX` keys when the partition holds more. Memory
therefore holds one partition's exported keys, one slice of both sides with
its joins, and the breaks found, whatever the size of the export, the ledger
or their partitions (bench/bench_three_way.py prints each stage's peak: about
1 GB at 48 million users, 96 million exported grants). The scratch folder
takes up to about 16 bytes an exported grant on disk (6 measured) and is
removed at the end, on error too. The texts a break's detail needs (who
voided it, why its delivery failed) are read for the breaks only.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import sqlalchemy as sa

from pipeline import ledger, storage
from pipeline.campaigns import IssuerSpec
from pipeline.delivery.issuers import Issuer, IssuerRejected, IssuerUnavailable, build_issuer
from pipeline.errors import StorageError, invariant
from pipeline.grants import runs
from pipeline.grants.partitioning import BUCKET_MODULUS, bucket_range, split_bucket_range, user_bucket_expr
from pipeline.reconciliation.verdict import BREAKS, INCOMPLETE, REPAIR_COMMAND, Bridge, Step, Verdict, judge

ISSUER_BREAK_CLASSES = ("issuer_missing", "issuer_unexpected")
EXPORT_FRAME_ROWS = 200_000  # export rows gathered per frame while streaming
EXPORT_SCHEMA: dict[str, Any] = {
    "grant_id": pl.String,
    "user_id": pl.Int64,
    "item_sku": pl.String,
    "issue_no": pl.Int32,
}
LEDGER_FETCH_ROWS = 200_000
SPILL_ROWS = 4_000_000  # export keys held in memory before they are written out by partition (about 80 MB)
SPILL_PREFIX = "three-way"  # the scratch folder of one issuer's comparison, hidden in ENTITLE_HOME
SPILL_BYTES_PER_GRANT = 16  # the spilled keys on disk, uncompressed (lz4 makes it about 6 for ordinary ids)
COMPARE_KEYS_MAX = 1_000_000  # exported keys of a partition compared at once; more are cut into bucket ranges
STAGES = ("read the export", "compare with the ledger", "read the break details")
TEXT_LOOKUP_USERS = 500  # user ids per query when reading the breaks' texts
KEY = ["user_id", "item_key", "issue_no"]  # a grant within the campaign (with the campaign's key)
_EMPTY_KEYS = pl.DataFrame(schema={"user_id": pl.Int64, "item_key": pl.Int32, "issue_no": pl.Int32})
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
            "outcome": self.outcome.as_dict(),
        }

    @property
    def outcome(self) -> Verdict:
        """This issuer's verdict: live in the ledger - issuer_missing = matched + issuer_unexpected = held."""
        steps: tuple[Step, ...]
        if self.state == "compared":
            steps = (
                Step("issuer_missing", -self.issuer_missing),
                Step("matched", self.matched, checkpoint=True),
                Step("issuer_unexpected", self.issuer_unexpected),
            )
            reasons: tuple[str, ...] = ()
        else:
            steps = (Step("not compared: the export cannot be read", -self.ledger_live),)
            reasons = (
                f"{self.error}; its {self.ledger_live:,} live ledger grants could not be compared with it "
                "(is the issuer up? then `entitle reconcile` again)",
            )

        def explain(status: str, incomplete: tuple[str, ...]) -> str:
            if status == INCOMPLETE:
                return "; ".join(incomplete)
            if status == BREAKS:
                return (
                    f"issuer {self.issuer!r}: {self.issuer_missing:,} issuer_missing, {self.issuer_unexpected:,} "
                    f"issuer_unexpected; `{REPAIR_COMMAND}` delivers issuer_missing again; issuer_unexpected is "
                    "revoked at the issuer by a person"
                )
            return f"issuer {self.issuer!r} holds exactly the {self.matched:,} live grants it delivers"

        return judge(
            Bridge(
                "grants",
                Step(f"live in the ledger, items issuer {self.issuer!r} delivers", self.ledger_live),
                steps,
                Step(f"held by issuer {self.issuer!r}", self.issuer_held),
            ),
            {name: int(getattr(self, name)) for name in ISSUER_BREAK_CLASSES},
            reasons,
            explain=explain,
        )


def delivering_issuers(pipeline: runs.Pipeline) -> list[IssuerSpec]:
    """The campaign's declared issuers that deliver at least one item."""
    return [spec for spec in pipeline.campaign.issuers if pipeline.campaign.items_of(spec.name)]


def check_issuers(pipeline: runs.Pipeline, partition_count: int) -> list[IssuerCheck]:
    """Compare every delivering issuer's export with the ledger (an empty list for a ledger-only campaign)."""
    return [check_issuer(pipeline, spec, partition_count) for spec in delivering_issuers(pipeline)]


def check_issuer(
    pipeline: runs.Pipeline,
    spec: IssuerSpec,
    partition_count: int,
    *,
    spill_rows: int = SPILL_ROWS,
    compare_keys_max: int = COMPARE_KEYS_MAX,
    on_stage: Callable[[str], None] | None = None,
) -> IssuerCheck:
    """One issuer: spill its export's keys by partition, then compare them with the ledger a bucket range at a time.

    Memory holds one partition's exported keys, a slice of about ``compare_keys_max`` of them
    against the same bucket range of the ledger, and the breaks found, whatever the export's size;
    ``spill_rows`` keys at most wait in memory before they are written out. ``on_stage`` is called
    with each stage's name (:data:`STAGES`) as it ends.
    """
    invariant(spill_rows > 0, f"spill_rows must be positive, got {spill_rows}")
    invariant(compare_keys_max > 0, f"compare_keys_max must be positive, got {compare_keys_max}")
    started = time.monotonic()
    skus = {pipeline.keys.item_keys[i.sku]: i.sku for i in pipeline.campaign.items_of(spec.name)}
    with storage.scratch_folder(pipeline.settings.home, SPILL_PREFIX) as folder:
        issuer = build_issuer(spec)
        try:
            spill, odd = _spill_export(pipeline, issuer, partition_count, _Spill(folder, spill_rows))
        except (IssuerUnavailable, IssuerRejected, OSError, ValueError, KeyError, TypeError) as exc:
            return IssuerCheck(
                spec.name,
                "unreadable",
                _live_count(pipeline, skus),
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
        _stage_ended(on_stage, STAGES[0])
        compared = _compare(pipeline, skus, spill, partition_count, compare_keys_max)
    _stage_ended(on_stage, STAGES[1])
    breaks = pl.concat(
        [
            _missing_rows(pipeline, compared.missing, spec.name, skus, partition_count),
            _unexpected_rows(pipeline, compared.unexpected, odd, compared.voided, spec.name, skus, partition_count),
        ],
        how="vertical_relaxed",
    )
    _stage_ended(on_stage, STAGES[2])
    return IssuerCheck(
        spec.name,
        "compared",
        compared.ledger_live,
        compared.issuer_held + odd.height,
        compared.ledger_live - compared.missing.height,
        compared.missing.height,
        compared.unexpected.height + odd.height,
        breaks,
        None,
        time.monotonic() - started,
    )


def _stage_ended(on_stage: Callable[[str], None] | None, stage: str) -> None:
    if on_stage is not None:
        on_stage(stage)


@dataclass
class _Compared:
    """The breaks of every partition by key, and the counts of the bridge's keyed rows."""

    missing: pl.DataFrame  # live in the ledger, not exported (with the last answer's code)
    unexpected: pl.DataFrame  # exported by canonical key, not live in the ledger
    voided: pl.DataFrame  # those of ``unexpected`` the ledger voided
    ledger_live: int
    issuer_held: int  # distinct keys exported (the odd rows come on top)


def _compare(
    pipeline: runs.Pipeline, skus: dict[int, str], spill: _Spill, partition_count: int, compare_keys_max: int
) -> _Compared:
    """Each partition's exported keys against that partition's bucket range of the ledger, a slice at a time.

    A partition whose export holds more than ``compare_keys_max`` keys is cut into equal bucket
    ranges of about that many each, each read from the ledger on its own, so that the joins stay
    small however large the partitions are: a slice's ledger rows are the exported keys they
    match, plus breaks, which are kept anyway.
    """
    ledger_live = issuer_held = 0
    missing_parts, unexpected_parts, voided_parts = [], [], []
    for partition_id in range(partition_count):
        exported = spill.keys_of(partition_id)
        slices = split_bucket_range(
            *bucket_range(partition_id, partition_count), -(-exported.height // compare_keys_max)
        )
        if len(slices) > 1:
            exported = exported.with_columns(user_bucket_expr("user_id").alias("user_bucket"))
        for buckets in slices:
            held = exported if len(slices) == 1 else exported.filter(pl.col("user_bucket").is_between(*buckets))
            held = held.select(KEY).unique(KEY)
            rows = _ledger_side(pipeline, skus, buckets)
            live = rows.filter(~pl.col("voided"))
            missing_parts.append(live.join(held, on=KEY, how="anti"))
            unexpected = held.join(live.select(KEY), on=KEY, how="anti")
            unexpected_parts.append(unexpected)
            voided_parts.append(unexpected.join(rows.filter(pl.col("voided")).select(KEY), on=KEY, how="semi"))
            ledger_live += live.height
            issuer_held += held.height
    return _Compared(
        pl.concat(missing_parts), pl.concat(unexpected_parts), pl.concat(voided_parts), ledger_live, issuer_held
    )


def _live_count(pipeline: runs.Pipeline, skus: dict[int, str]) -> int:
    """The ledger's live grants of the issuer's items (for the report when the export is unreadable)."""
    statement = sa.text(
        f"SELECT count(*) FROM grants AS g LEFT JOIN grant_voids AS v ON {ledger.same_grant('v')} "
        "WHERE g.campaign_key = :campaign_key AND g.item_key IN :item_keys AND v.actor IS NULL"
    ).bindparams(sa.bindparam("item_keys", expanding=True))
    with pipeline.engine.connect() as connection:
        return int(
            connection.execute(
                statement, {"campaign_key": pipeline.keys.campaign_key, "item_keys": sorted(skus)}
            ).scalar_one()
        )


def _ledger_side(pipeline: runs.Pipeline, skus: dict[int, str], buckets: tuple[int, int]) -> pl.DataFrame:
    """The grants of the issuer's items in a bucket range (live or voided) by integer key, with the last answer.

    About 26 bytes a grant: the key, ``voided`` and the answer as a small code; the texts the
    break details need (who voided, why a delivery failed) are read for the breaks only.
    """
    schema: dict[str, Any] = {
        "user_bucket": pl.Int64,
        "user_id": pl.Int64,
        "item_key": pl.Int32,
        "issue_no": pl.Int32,
        "voided": pl.Int8,
        "outcome": pl.Int8,
    }
    codes = " ".join(f"WHEN '{o}' THEN {i}" for i, o in enumerate(ledger.DELIVERY_OUTCOMES))
    item_keys = ", ".join(str(int(key)) for key in sorted(skus))  # the ledger's own integers, inlined
    sql = (
        "SELECT g.user_bucket, g.user_id, g.item_key, g.issue_no, CASE WHEN v.actor IS NULL THEN 0 ELSE 1 END, "
        f"CASE a.outcome {codes} END FROM grants AS g "
        f"LEFT JOIN grant_voids AS v ON {ledger.same_grant('v')} "
        f"LEFT JOIN delivery_answers AS a ON {ledger.same_grant('a')} "
        f"WHERE g.campaign_key = {int(pipeline.keys.campaign_key)} AND g.item_key IN ({item_keys}) "
        f"AND g.user_bucket BETWEEN {int(buckets[0])} AND {int(buckets[1])}"
    )
    frames = []
    with pipeline.engine.connect() as connection:
        # The driver's own cursor: SQLAlchemy's rows cost seconds and hundreds of MB per million
        # grants here. On PostgreSQL a named (server-side) cursor, so that rows stream.
        dbapi = connection.connection.dbapi_connection
        assert dbapi is not None
        postgres = pipeline.engine.dialect.name == "postgresql"
        cursor = dbapi.cursor(name="entitle_issuer_side") if postgres else dbapi.cursor()
        try:
            cursor.execute(sql)
            while rows := cursor.fetchmany(LEDGER_FETCH_ROWS):
                columns = zip(*rows, strict=True)  # column by column: little transient memory
                frames.append(
                    pl.DataFrame([pl.Series(n, c, dtype=d) for (n, d), c in zip(schema.items(), columns, strict=True)])
                )
        finally:
            cursor.close()
        connection.rollback()
    frame = pl.concat(frames) if frames else pl.DataFrame(schema=schema)
    return frame.with_columns(pl.col("voided").cast(pl.Boolean))


def _export_chunks(pipeline: runs.Pipeline, issuer: Issuer) -> Iterator[pl.DataFrame]:
    """The issuer's export in chunks of :data:`EXPORT_COLUMNS` (its own ``export_frames`` when it has one)."""
    campaign_id = pipeline.campaign.campaign_id
    export_frames = getattr(issuer, "export_frames", None)
    if callable(export_frames):
        yield from export_frames(campaign_id)
        return
    chunk: list[tuple[str, int, str, int]] = []
    for row in issuer.export(campaign_id):
        chunk.append((str(row["grant_id"]), int(row["user_id"]), str(row["item_sku"]), int(row["issue_no"])))
        if len(chunk) >= EXPORT_FRAME_ROWS:
            yield pl.DataFrame(chunk, schema=EXPORT_SCHEMA, orient="row")
            chunk = []
    yield pl.DataFrame(chunk, schema=EXPORT_SCHEMA, orient="row")


@dataclass
class _Spill:
    """The export's integer keys on disk, one Arrow IPC file per partition and spill, in the export's order."""

    folder: Path
    spill_rows: int  # keys buffered in memory before they are written out
    buffered: list[pl.DataFrame] = field(default_factory=list)
    buffered_rows: int = 0
    spills: int = 0
    pieces: dict[int, list[Path]] = field(default_factory=dict)  # partition id -> its files, in order

    def add(self, keys: pl.DataFrame) -> None:
        """Take a chunk's keys (with ``partition_id``); write the buffer out once it holds ``spill_rows``."""
        self.buffered.append(keys)
        self.buffered_rows += keys.height
        if self.buffered_rows >= self.spill_rows:
            self.flush()

    def flush(self) -> None:
        """Write the buffered keys out, one file per partition they fall in."""
        if self.buffered_rows == 0:
            self.buffered = []
            return
        keys = pl.concat(self.buffered)
        self.buffered, self.buffered_rows = [], 0
        for (partition_id,), piece in keys.partition_by("partition_id", as_dict=True, include_key=False).items():
            path = self.folder / f"{int(partition_id):05d}-{self.spills:06d}.arrow"
            try:
                piece.write_ipc(path, compression="lz4")
            except OSError as exc:
                raise StorageError(
                    f"{self.folder}: cannot write the issuer's exported keys there ({exc}); the three-way "
                    f"reconciliation needs up to about {SPILL_BYTES_PER_GRANT} bytes an exported grant in ENTITLE_HOME "
                    f"({self.folder.parent}): free space there"
                ) from exc
            self.pieces.setdefault(int(partition_id), []).append(path)
        self.spills += 1

    def keys_of(self, partition_id: int) -> pl.DataFrame:
        """The keys exported in one partition (duplicates included), read back in the export's order."""
        paths = self.pieces.pop(partition_id, [])
        return pl.concat([pl.read_ipc(path) for path in paths]) if paths else _EMPTY_KEYS


def _spill_export(
    pipeline: runs.Pipeline, issuer: Issuer, partition_count: int, spill: _Spill
) -> tuple[_Spill, pl.DataFrame]:
    """The export reduced chunk by chunk to integer keys (16 bytes a grant) spilled by partition, and the odd rows.

    A row is kept by key when its grant id is the canonical ``{campaign}:{user}:{sku}:{issue_no}``
    of its fields and its sku an item of the campaign; any other row ("odd": a foreign id, an
    unknown sku) cannot be a ledger grant and is kept whole in memory, as issuer_unexpected.
    """
    campaign_id = pipeline.campaign.campaign_id
    known = dict(pipeline.keys.item_keys)
    canonical = _grant_id_expr(campaign_id)
    # An empty frame first: an issuer that holds nothing may yield no chunk at all.
    odd = [pl.DataFrame(schema=EXPORT_SCHEMA)]
    for chunk in _export_chunks(pipeline, issuer):
        ok = (pl.col("grant_id") == canonical) & pl.col("item_sku").is_in(list(known)) & (pl.col("user_id") > 0)
        marked = chunk.with_columns(ok.fill_null(False).alias("ok"))
        spill.add(
            marked.filter(pl.col("ok")).select(
                "user_id",
                pl.col("item_sku").replace_strict(known, return_dtype=pl.Int32).alias("item_key"),
                pl.col("issue_no").cast(pl.Int32),
                _partition_expr(partition_count, user_bucket_expr("user_id")).alias("partition_id"),
            )
        )
        odd.append(
            marked.filter(~pl.col("ok")).select("grant_id", "user_id", "item_sku", pl.col("issue_no").cast(pl.Int32))
        )
    spill.flush()
    return spill, pl.concat(odd).unique("grant_id", keep="first").cast({"issue_no": pl.Int32})


def _partition_expr(partition_count: int, bucket: pl.Expr | None = None) -> pl.Expr:
    """The partition of each row from its bucket (default: the ``user_bucket`` column)."""
    bucket = pl.col("user_bucket") if bucket is None else bucket
    return (bucket * partition_count // BUCKET_MODULUS).cast(pl.Int32)


def _grant_id_expr(campaign_id: str) -> pl.Expr:
    """The canonical grant id ``{campaign}:{user}:{sku}:{issue_no}`` from a row's fields."""
    return pl.concat_str(
        [
            pl.lit(campaign_id),
            pl.col("user_id").cast(pl.String),
            pl.col("item_sku"),
            pl.col("issue_no").cast(pl.String),
        ],
        separator=":",
    )


def _missing_rows(
    pipeline: runs.Pipeline, missing: pl.DataFrame, issuer: str, skus: dict[int, str], partition_count: int
) -> pl.DataFrame:
    failed = ledger.DELIVERY_OUTCOMES.index("failed")
    why_failed = _failure_details(pipeline, missing.filter(pl.col("outcome") == failed))
    frame = _with_grant_ids(pipeline, missing, skus).join(why_failed, on=KEY, how="left")
    details = [
        _missing_detail(issuer, gid, None if code is None else ledger.DELIVERY_OUTCOMES[code], detail)
        for gid, code, detail in frame.select("grant_id", "outcome", "answer_detail").iter_rows()
    ]
    return _break_frame(
        frame.with_columns(
            pl.lit("issuer_missing").alias("break_class"),
            pl.Series("detail", details, dtype=pl.String),
            _partition_expr(partition_count).alias("partition_id"),
        ),
        issuer,
    )


def _with_grant_ids(pipeline: runs.Pipeline, keys: pl.DataFrame, skus: dict[int, str]) -> pl.DataFrame:
    """``keys`` (user_id, item_key, issue_no) with item_sku and the canonical grant_id."""
    return keys.with_columns(
        pl.col("item_key").replace_strict(skus, return_dtype=pl.String).alias("item_sku")
    ).with_columns(_grant_id_expr(pipeline.campaign.campaign_id).alias("grant_id"))


def _texts_for(pipeline: runs.Pipeline, keys: pl.DataFrame, table: sa.Table, column: str, where: Any) -> pl.DataFrame:
    """``column`` of ``table`` for the grants in ``keys`` (normally a handful: the breaks), by their key."""
    schema: dict[str, Any] = {"user_id": pl.Int64, "item_key": pl.Int32, "issue_no": pl.Int32, column: pl.String}
    found: list[tuple[int, int, int, str]] = []
    t = table.c
    with pipeline.engine.connect() as connection:
        for start in range(0, keys.height, TEXT_LOOKUP_USERS):
            users = keys["user_id"].slice(start, TEXT_LOOKUP_USERS).unique().to_list()
            found.extend(
                tuple(row)
                for row in connection.execute(
                    sa.select(t.user_id, t.item_key, t.issue_no, t[column]).where(
                        t.campaign_key == pipeline.keys.campaign_key, t.user_id.in_(users), where
                    )
                )
            )
    return pl.DataFrame(found, schema=schema, orient="row").join(keys.select(KEY), on=KEY, how="semi")


def _failure_details(pipeline: runs.Pipeline, keys: pl.DataFrame) -> pl.DataFrame:
    """The last failed delivery's detail of each grant in ``keys``."""
    answers = ledger.delivery_answers
    return _texts_for(pipeline, keys, answers, "detail", answers.c.outcome == "failed").rename(
        {"detail": "answer_detail"}
    )


def _missing_detail(issuer: str, grant_id: str, outcome: str | None, detail: str | None) -> str:
    redrive = f"`{REPAIR_COMMAND}` delivers it again"
    if outcome is None:
        return f"{grant_id} was never delivered to issuer {issuer!r}; `entitle deliver` or {redrive}"
    if outcome == "failed":
        why = (detail or "no detail")[:ANSWER_DETAIL_CHARS]
        return f"{grant_id}: the last delivery to issuer {issuer!r} failed ({why}); {redrive}"
    return f"{grant_id}: issuer {issuer!r} answered {outcome} but does not hold it now (lost at the issuer?); {redrive}"


def _unexpected_rows(
    pipeline: runs.Pipeline,
    unexpected: pl.DataFrame,
    odd: pl.DataFrame,
    voided_keys: pl.DataFrame,
    issuer: str,
    skus: dict[int, str],
    partition_count: int,
) -> pl.DataFrame:
    voided = ledger.grant_voids
    actors = _texts_for(pipeline, voided_keys, voided, "actor", sa.true()).rename({"actor": "void_actor"})
    every_sku = {key: sku for sku, key in pipeline.keys.item_keys.items()}
    frame = pl.concat(
        [
            _with_grant_ids(pipeline, unexpected, every_sku)
            .join(actors, on=KEY, how="left")
            .select("grant_id", "user_id", "item_sku", "issue_no", "item_key", "void_actor"),
            odd.with_columns(
                pl.col("item_sku")
                .replace_strict(dict(pipeline.keys.item_keys), default=UNKNOWN_ITEM_KEY, return_dtype=pl.Int32)
                .alias("item_key"),
                pl.lit(None, dtype=pl.String).alias("void_actor"),
            ).select("grant_id", "user_id", "item_sku", "issue_no", "item_key", "void_actor"),
        ]
    ).with_columns(user_bucket_expr("user_id").alias("user_bucket"))
    frame = frame.with_columns(_partition_expr(partition_count).alias("partition_id"))
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
