"""Local spill files of work too large for memory: rows grouped by a number, one folder per group.

Freezing and partitioning stream their input once into ``<folder>/group=<n>/`` (Polars'
streaming engine, one partitioned sink), then read one group at a time.  The groups are
numbered folders; a group no row fell in has no folder.
"""

from __future__ import annotations

from pathlib import Path

import polars as pl


def spill_by_group(rows: pl.LazyFrame, folder: Path) -> None:
    """Stream ``rows`` into ``folder``, one sub-folder per value of their integer ``group`` column (not kept).

    One sink only: several sinks over one scan make Polars buffer the rows one sink has not
    taken yet, and memory would grow with the input.
    """
    rows.sink_ipc(pl.PartitionBy(folder, key="group", include_key=False), mkdir=True, engine="streaming")


def numbered_folders(folder: Path) -> dict[int, Path]:
    """The sub-folders of ``folder`` by their number (``group=3`` or ``000003``), in number order."""
    if not folder.exists():
        return {}
    found = {int(child.name.rpartition("=")[2]): child for child in folder.iterdir()}
    return dict(sorted(found.items()))


def read_group(group: Path) -> pl.DataFrame:
    """Every row spilled into one group folder."""
    return pl.scan_ipc(sorted(group.glob("*.*"))).collect()


def group_rows(group: Path) -> int:
    """How many rows a group folder holds (from the files' metadata)."""
    return int(pl.scan_ipc(sorted(group.glob("*.*"))).select(pl.len()).collect().item())


def new_piece(folder: Path, number: int) -> Path:
    """A file name for piece ``number`` in ``folder`` (made if needed)."""
    folder.mkdir(parents=True, exist_ok=True)
    return folder / f"{number:06d}.arrow"
