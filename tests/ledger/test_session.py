"""Opening the ledger has no side effects; registering is the explicit first write of a real run."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
import sqlalchemy as sa
from support.settings import build_settings

from pipeline import ledger
from pipeline.errors import LedgerError
from pipeline.grants import dag_tasks, runs


def test_opening_reads_and_writes_nothing(tmp_path: Path) -> None:
    home = tmp_path / "var"
    settings = build_settings(home)
    with runs.open_pipeline(settings) as pipeline:
        with pytest.raises(LedgerError, match="no schema yet: run `entitle db upgrade`"):
            _ = pipeline.keys
    assert not home.exists(), "opening made no folder and no ledger file"
    with ledger.open_ledger(settings.ledger_url) as opened:
        with pytest.raises(LedgerError, match="no schema yet"):
            ledger.require_current_schema(opened.engine)
    assert not home.exists()


def test_register_is_the_write_and_a_later_open_finds_the_keys(tmp_path: Path) -> None:
    settings = build_settings(tmp_path / "var")
    with runs.open_pipeline(settings) as pipeline:
        keys = runs.register(pipeline)
    ledger_file = tmp_path / "var" / "ledger.sqlite"
    assert ledger_file.exists()
    with runs.open_pipeline(settings) as reopened:
        assert reopened.registered is None, "nothing is looked up until asked"
        assert reopened.keys == keys
    with sa.create_engine(f"sqlite:///{ledger_file}").connect() as connection:
        assert connection.execute(sa.text("SELECT count(*) FROM campaigns")).scalar_one() == 1


def test_an_unregistered_campaign_is_named_with_what_registers_it(tmp_path: Path) -> None:
    settings = build_settings(tmp_path / "var")
    with runs.open_pipeline(settings) as pipeline:
        runs.register(pipeline)
    other = settings.with_campaign("channel-credit-2022")
    with runs.open_pipeline(other) as pipeline:
        with pytest.raises(LedgerError, match=r"channel-credit-2022 is not registered .* \(`entitle run --users FILE`"):
            _ = pipeline.keys


def test_a_dry_run_takes_the_same_path_and_leaves_the_ledger_alone(
    tmp_path: Path, write_users: Callable[..., Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    home = tmp_path / "var"
    users = write_users(tmp_path / "users.parquet", list(range(1_000, 1_400)))
    monkeypatch.setenv("ENTITLE_HOME", str(home))
    monkeypatch.setenv("ENTITLE_PARTITIONS", "2")
    prepared = dag_tasks.freeze_snapshot({"snapshot_uri": str(users), "dry_run": True})
    assert prepared["dry_run"] and prepared["partition_count"] == 2 and prepared["eligible_users"] == 400
    assert Path(prepared["partitions_dir"]).is_dir(), "the partition files are written (a cache)"
    assert not (home / "ledger.sqlite").exists(), "the ledger is not"
    real = dag_tasks.freeze_snapshot({"snapshot_uri": str(users)})
    assert real["snapshot_id"] == prepared["snapshot_id"], "the dry run froze exactly what the real run freezes"
    assert (home / "ledger.sqlite").exists()
