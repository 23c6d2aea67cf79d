"""Eligibility snapshots: validate a user file, quarantine bad rows, freeze the rest.

A snapshot is the sorted set of distinct eligible user ids (input minus
exclusions), stored as Parquet under its content hash.  Freezing the same
input twice yields the same snapshot id and the same bytes.  The user file and
the snapshot folder may each be a local path or an ``s3://`` URI
(:mod:`pipeline.storage`); ``snapshot.json`` is written last, so a snapshot
folder without it is not a snapshot.  The work runs in bounded memory
(:mod:`pipeline.grants.freezing`); reading and classifying the file's rows is
:mod:`pipeline.grants.user_files`.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any

from pipeline import schemas, storage
from pipeline.errors import SnapshotError
from pipeline.grants import freezing, user_files
from pipeline.grants.partitioning import ROWS_IN_MEMORY_DEFAULT
from pipeline.grants.user_files import USER_ID_COLUMN as USER_ID_COLUMN
from pipeline.grants.user_files import load_exclusions as load_exclusions
from pipeline.storage import Location, ObjectStoreOptions

REJECTED_SHARE_MAX_DEFAULT = 0.0001  # 0.01 %
EXCLUDED_FILE_NAME = "excluded.parquet"  # snapshot users removed by the exclusion list


@dataclass(frozen=True)
class SnapshotReport:
    """What freezing a user file found and where the results are."""

    snapshot_id: str
    directory: str
    source_file: str
    exclusion_file: str | None
    rows_read: int
    eligible_users: int
    null_rows: int
    not_integer_rows: int
    out_of_range_rows: int
    duplicate_rows: int
    excluded_users: int
    rejected_share: float
    quarantine_file: str
    # How to reach ``directory`` when it is on an object store; never written out.
    store: ObjectStoreOptions | None = field(default=None, compare=False, repr=False)

    @property
    def location(self) -> Location:
        """The snapshot's folder: a local Path or an object-store URI."""
        return storage.location(self.directory, self.store)

    @property
    def users_file(self) -> Location:
        """The snapshot's Parquet file of eligible user ids."""
        return self.location / "users.parquet"

    def as_dict(self) -> dict[str, Any]:
        """Plain values for JSON output."""
        values = asdict(self)
        del values["store"]
        return values


def snapshot_root(home: Location, campaign_id: str) -> Location:
    """The folder that holds a campaign's snapshots (under ENTITLE_HOME, or ENTITLE_DATA_URI when set)."""
    return home / "campaigns" / campaign_id / "snapshots"


def freeze_snapshot(
    users_file: Location,
    home: Location,
    campaign_id: str,
    exclusion_file: Location | None = None,
    rejected_share_max: float = REJECTED_SHARE_MAX_DEFAULT,
    dry_run: bool = False,
    id_column: str = USER_ID_COLUMN,
    rows_in_memory: int = ROWS_IN_MEMORY_DEFAULT,
) -> SnapshotReport:
    """Validate ``users_file``, quarantine bad rows and freeze the eligible set.

    Raises :class:`SnapshotError` (after writing the quarantine file, which the
    message names) when the file cannot be read or too large a share is rejected.
    With ``dry_run`` nothing is written at all.  ``home`` is the data root: the
    snapshot goes to ``home/campaigns/<campaign>/snapshots/<id>/``.  ``id_column`` is the
    file's id column (the campaign's ``id_column``: ``user_id``, or e.g. ``merchant_id`` for a
    program over merchants); inside the pipeline and the ledger it is the subject's ``user_id``.
    ``rows_in_memory`` bounds the rows held at once (see :mod:`pipeline.grants.freezing`).
    """
    users_file = storage.location(users_file)
    root = snapshot_root(home, campaign_id)
    exclusions = None if exclusion_file is None else load_exclusions(storage.location(exclusion_file), id_column)
    with storage.scratch_folder(None if dry_run else root, "freeze") as scratch:
        local = user_files.readable_file(users_file, scratch, id_column)
        scanned = user_files.scan_user_file(users_file, local, id_column)
        frozen = freezing.freeze_rows(scanned, scratch, exclusions, rows_in_memory, users_file)
        return _publish(frozen, users_file, exclusion_file, root, rejected_share_max, dry_run, id_column)


def _publish(
    frozen: freezing.Frozen,
    users_file: Location,
    exclusion_file: Location | None,
    root: Location,
    rejected_share_max: float,
    dry_run: bool,
    id_column: str,
) -> SnapshotReport:
    """Check the frozen set against the limits, then move its files under the snapshot id."""
    counts = frozen.counts
    if counts.rows_read == 0:
        raise SnapshotError(f"{users_file}: the file has no data rows; expected a '{id_column}' column of ids")
    rejected = counts.null_rows + counts.not_integer_rows + counts.out_of_range_rows
    rejected_share = rejected / counts.rows_read
    if rejected_share > rejected_share_max:
        # Keep the evidence next to the input's name, not under a snapshot id that will never be used.
        failed_path = root / "rejected" / f"{users_file.name}.quarantine.parquet"
        if not dry_run:
            storage.publish_file(frozen.quarantine_file, failed_path)
        listed = user_files.describe_rows(frozen.first_rejected)
        raise SnapshotError(
            f"{users_file}: {rejected:,} of {counts.rows_read:,} rows rejected ({rejected_share:.4%}), more than the "
            f"allowed {rejected_share_max:.4%} (null {counts.null_rows:,}, not an integer {counts.not_integer_rows:,}, "
            f"out of range {counts.out_of_range_rows:,}). Nothing was granted. First rows: {listed}. "
            f"All rejected rows: {'(dry run: not written)' if dry_run else failed_path}. "
            "Fix the file, or raise ENTITLE_REJECTED_SHARE_MAX "
            "if these rows are expected."
        )
    if counts.eligible_users == 0:
        raise SnapshotError(f"{users_file}: no eligible user ids remain after validation and exclusions")
    snapshot_id = frozen.write_users(write=not dry_run)
    directory = root / snapshot_id
    report = SnapshotReport(
        snapshot_id=snapshot_id,
        directory=str(directory),
        source_file=str(users_file),
        exclusion_file=None if exclusion_file is None else str(exclusion_file),
        rejected_share=rejected_share,
        quarantine_file=str(directory / "quarantine.parquet"),
        store=storage.options_of(directory),
        **asdict(counts),
    )
    if dry_run:
        return report
    storage.makedirs(directory)
    storage.publish_file(frozen.quarantine_file, directory / "quarantine.parquet")
    storage.publish_file(frozen.users_file, report.users_file)
    if frozen.excluded_file is not None:
        storage.publish_file(frozen.excluded_file, directory / EXCLUDED_FILE_NAME)
    # Written last: a snapshot folder without snapshot.json is incomplete.
    schemas.write_json(directory / "snapshot.json", report.as_dict())
    return report


def load_snapshot_report(directory: Location) -> SnapshotReport:
    """Read a frozen snapshot's metadata; :class:`SnapshotError` if it is not complete."""
    path = directory / "snapshot.json"
    try:
        values = json.loads(storage.read_text(path))
    except FileNotFoundError as exc:
        raise SnapshotError(f"{directory}: not a frozen snapshot (no snapshot.json); freeze it again") from exc
    return SnapshotReport(**values, store=storage.options_of(directory))
