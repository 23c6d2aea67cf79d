"""``entitle notices``: export the users to notify, granted by a run or with items about to expire."""

from __future__ import annotations

import argparse

from pipeline.cli.output import emit
from pipeline.config import Settings
from pipeline.grants import runs
from pipeline.progress import Progress


def cmd_notices(args: argparse.Namespace, settings: Settings) -> int:
    """Export notices for the messaging system."""
    from pipeline.grants import notices

    with runs.open_pipeline(settings) as pipeline:
        partitions = int(runs.snapshot_row(pipeline, None)["partition_count"])
        if args.kind == "granted":
            bar = Progress("notices", partitions, enabled=not args.no_progress)
            exports = [notices.export_granted(pipeline, args.run_id, bar.advance)]
        else:
            expiries = len({i.valid_until for i in pipeline.campaign.items if i.valid_until is not None})
            bar = Progress("reminders", partitions * expiries, enabled=not args.no_progress)
            exports = notices.export_reminders(pipeline, args.days, bar.advance)
        bar.close()
        lines = [f"{e.kind}: {e.users:,} users in {e.partitions} partition files under {e.directory}" for e in exports]
        emit(args, {"exports": [e.as_dict() for e in exports]}, lines or ["no time-limited items: nothing to remind"])
        return 0
