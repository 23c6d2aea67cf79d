"""Reconciliation of the ledger against the snapshot and the campaign.

This first version is a count-level check: for each item, live grants in the
ledger (counted in the database, voids excluded) against the snapshot's
eligible users, plus the state of every partition.  Row-level breaks (which
user, which class) are the full reconciliation of a later issue.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import pyarrow.parquet as pq

from pipeline import jobs
from pipeline.snapshot import snapshot_root


@dataclass(frozen=True)
class CountCheck:
    """Per-item expected and live grant counts and a verdict."""

    snapshot_id: str
    verdict: str  # RECONCILED | BREAKS | INCOMPLETE
    expected_per_item: int
    live_per_item: dict[str, int]
    partitions_not_done: list[int]
    explanation: str

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON and XCom."""
        return asdict(self)


def count_check(pipeline: jobs.Pipeline, snapshot_id: str | None = None) -> CountCheck:
    """Compare live grants per item with the snapshot's eligible users."""
    state = jobs.status(pipeline, snapshot_id)
    root = snapshot_root(pipeline.settings.home, pipeline.campaign.campaign_id)
    users_file = root / state.snapshot_id / "users.parquet"
    expected = int(pq.read_metadata(users_file).num_rows)
    live = {t.item_sku: t.grants for t in jobs.ledger_totals(pipeline)}
    live = {i.sku: live.get(i.sku, 0) for i in pipeline.campaign.items}
    not_done = [p["partition_id"] for p in state.partitions if p["status"] != "done"]
    if not_done:
        verdict = "INCOMPLETE"
        explanation = f"{len(not_done)} partition(s) not granted yet: {not_done[:20]}"
    elif all(count == expected for count in live.values()):
        verdict = "RECONCILED"
        explanation = f"every item has exactly {expected:,} live grants, one per eligible user"
    else:
        verdict = "BREAKS"
        differing = {sku: count - expected for sku, count in live.items() if count != expected}
        explanation = f"live grants minus eligible users, per item: {differing}"
    return CountCheck(state.snapshot_id, verdict, expected, live, not_done, explanation)
