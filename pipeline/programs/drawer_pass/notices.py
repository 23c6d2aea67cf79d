"""Expiry reminders for first-come-first-served passes, marked so that nothing converts to a paid subscription.

Each allocation grants its passes at one instant, so passes end on a few distinct
instants. For every local expiry day, one Parquet file lists the holders of a live
pass (granted, not voided) ending that day, with ``remind_on`` = the end minus the
lead days, ``auto_renew = false``, ``converts_to_paid = false`` and the message key
``pass_expiry_no_auto_renewal``. Layout and completeness marker follow
:mod:`pipeline.grants.notices`: ``campaigns/<program>/notices/reminders/<YYYY-MM-DD>-<N>d/pass.parquet``,
then ``notices.json``; files are sorted by user id and written atomically, so a rerun
rewrites identical files.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import polars as pl
import sqlalchemy as sa

from pipeline import ledger, schemas
from pipeline.errors import ConfigError
from pipeline.grants.notices import COMPLETE_MARKER, NoticeExport
from pipeline.ledger import Instant
from pipeline.programs.drawer_pass.allocation import PassContext
from pipeline.programs.drawer_pass.program import REMINDER_DAYS_MAX

NOTICE_KEY = "pass_expiry_no_auto_renewal"
REMINDER_FILE = "pass.parquet"

_LIVE_PASSES = sa.text(
    "SELECT g.user_id, g.valid_from, g.valid_until FROM grants AS g "
    f"WHERE g.campaign_key = :c AND g.item_key = :i AND {ledger.LIVE_GRANT_SQL}"
).columns(sa.column("user_id", sa.BigInteger), sa.column("valid_from", Instant()), sa.column("valid_until", Instant()))


def notices_root(context: PassContext) -> Path:
    """``$ENTITLE_HOME/campaigns/<program>/notices``."""
    return context.settings.home / "campaigns" / context.program.program_id / "notices"


def export_reminders(context: PassContext, days: int | None = None) -> list[NoticeExport]:
    """One reminder file per local expiry day of the program's live passes, ``days`` days ahead."""
    lead = context.program.reminder_days if days is None else days
    if not 0 <= lead <= REMINDER_DAYS_MAX:
        raise ConfigError(f"reminder lead time {lead} days must be between 0 and {REMINDER_DAYS_MAX}")
    with context.engine.connect() as connection:
        rows = connection.execute(_LIVE_PASSES, {"c": context.campaign_key, "i": context.item_key}).all()
    passes = pl.DataFrame(
        rows,
        schema={"user_id": pl.Int64, "valid_from": pl.Datetime("us", "UTC"), "valid_until": pl.Datetime("us", "UTC")},
        orient="row",
    )
    if passes.height == 0:
        return []
    zone = context.program.time_zone
    passes = passes.with_columns(pl.col("valid_until").dt.convert_time_zone(zone).dt.date().alias("expiry_day"))
    exports = []
    for (expiry_day,), group in sorted(passes.group_by("expiry_day"), key=lambda g: g[0][0]):
        remind_on = expiry_day - dt.timedelta(days=lead)
        frame = group.sort("user_id").select(
            "user_id",
            pl.lit(context.program.program_id).alias("campaign_id"),
            pl.lit(context.program.sku).alias("item_sku"),
            "valid_from",
            "valid_until",
            pl.lit(remind_on.isoformat()).alias("remind_on"),
            pl.lit(False).alias("auto_renew"),
            pl.lit(False).alias("converts_to_paid"),
            pl.lit(NOTICE_KEY).alias("notice_key"),
        )
        out_dir = notices_root(context) / "reminders" / f"{expiry_day.isoformat()}-{lead}d"
        schemas.write_parquet(frame, "pass_reminder", out_dir / REMINDER_FILE)
        detail = {
            "expiry_day": expiry_day.isoformat(),
            "remind_on": remind_on.isoformat(),
            "lead_days": lead,
            "items": [context.program.sku],
            "auto_renew": False,
            "converts_to_paid": False,
            "notice_key": NOTICE_KEY,
        }
        schemas.write_json(out_dir / COMPLETE_MARKER, {"kind": "pass_reminders", **detail, "users": frame.height})
        exports.append(NoticeExport("pass_reminders", str(out_dir), frame.height, 1, detail))
    return exports
