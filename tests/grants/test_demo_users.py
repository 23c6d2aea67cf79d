"""pipeline.grants.demo_users: synthetic user files that exercise validation but pass it."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from support import REPO_ROOT
from support.cli import cli_environment, run_entitle

from pipeline.config import Settings
from pipeline.errors import ConfigError, LedgerError
from pipeline.grants.demo_users import FIRST_ID, RECENT_ID_BASE, refuse_replacing_granted_users, write_demo_users
from pipeline.grants.snapshot import REJECTED_SHARE_MAX_DEFAULT, freeze_snapshot


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_demo_file_counts_are_what_it_reports(suffix: str, tmp_path: Path) -> None:
    out = tmp_path / f"users{suffix}"
    demo = write_demo_users(60_000, out, seed=3)
    frame = pl.read_csv(out, schema_overrides={"user_id": pl.String}) if suffix == ".csv" else pl.read_parquet(out)
    assert frame.height == demo.rows
    ids = frame["user_id"].cast(pl.Int64, strict=False)
    valid = ids.filter(ids > 0)
    assert valid.n_unique() == demo.distinct_valid_users == 60_000
    assert valid.len() - valid.n_unique() == demo.duplicate_rows
    assert demo.rows == 60_000 + demo.duplicate_rows + demo.bad_rows
    unique = valid.unique()
    assert unique.min() > FIRST_ID  # type: ignore[operator]
    assert unique.filter(unique >= RECENT_ID_BASE).len() == int(60_000 * 0.02), "2 % recent sign-ups"


@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
def test_a_large_file_is_made_slice_by_slice(suffix: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.grants import demo_users

    monkeypatch.setattr(demo_users, "SLICE_USERS", 20_000)
    seen: list[int] = []
    out = tmp_path / f"users{suffix}"
    demo = write_demo_users(70_000, out, seed=3, before_write=lambda users: seen.append(users.height))
    assert seen == [20_000, 20_000, 20_000, 10_000]  # each slice is shown before it is written
    frame = pl.read_csv(out, schema_overrides={"user_id": pl.String}) if suffix == ".csv" else pl.read_parquet(out)
    ids = frame["user_id"].cast(pl.Int64, strict=False)
    valid = ids.filter(ids > 0)
    assert frame.height == demo.rows == 70_000 + demo.duplicate_rows + demo.bad_rows
    assert valid.n_unique() == demo.distinct_valid_users == 70_000  # no id repeats across slices
    assert valid.len() - valid.n_unique() == demo.duplicate_rows
    report = freeze_snapshot(out, tmp_path / "var", "demo")
    assert report.eligible_users == 70_000


def test_a_refused_slice_leaves_no_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from pipeline.grants import demo_users

    monkeypatch.setattr(demo_users, "SLICE_USERS", 1_000)
    seen: list[int] = []

    def refuse_the_third(users: pl.DataFrame) -> None:
        seen.append(users.height)
        if len(seen) == 3:
            raise LedgerError("refused")

    out = tmp_path / "users.parquet"
    with pytest.raises(LedgerError):
        write_demo_users(5_000, out, before_write=refuse_the_third)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == []


def test_same_seed_same_file_other_seed_other_file(tmp_path: Path) -> None:
    a, b, c = tmp_path / "a.parquet", tmp_path / "b.parquet", tmp_path / "c.parquet"
    write_demo_users(5_000, a, seed=1)
    write_demo_users(5_000, b, seed=1)
    write_demo_users(5_000, c, seed=2)
    assert a.read_bytes() == b.read_bytes()
    assert set(pl.read_parquet(a)["user_id"].to_list()) != set(pl.read_parquet(c)["user_id"].to_list())


def test_bad_arguments_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="--count 0 must be between 1 and"):
        write_demo_users(0, tmp_path / "u.parquet")
    with pytest.raises(ConfigError, match="use a .parquet or .csv file name"):
        write_demo_users(10, tmp_path / "u.json")


# The module promises "a handful of bad rows ... exercise validation without tripping the 0.01 % limit".
@pytest.mark.parametrize("suffix", [".parquet", ".csv"])
@pytest.mark.parametrize("count", [5_000, 50_000])
def test_demo_file_passes_the_default_rejected_share(count: int, suffix: str, tmp_path: Path) -> None:
    out = tmp_path / f"users{suffix}"
    demo = write_demo_users(count, out)
    assert demo.bad_rows > 0 or demo.duplicate_rows > 0, "the file exercises validation"
    report = freeze_snapshot(out, tmp_path / "var", "demo", rejected_share_max=REJECTED_SHARE_MAX_DEFAULT)
    assert report.eligible_users == count
    assert report.rejected_share <= REJECTED_SHARE_MAX_DEFAULT


def test_demo_program_inputs_go_through_their_programs(tmp_path: Path) -> None:
    """ops/demo_programs.py (make demo): its files pass intake, and the pass demo sells out in order."""
    import json
    import subprocess
    import sys

    from support.cli import cli_environment, run_entitle

    home = tmp_path / "var"
    write_demo_users(5_000, home / "incoming" / "users.parquet", seed=5)
    script = REPO_ROOT / "ops" / "demo_programs.py"
    sizes = ["--merchants", "600", "--claims", "500", "--applications", "2000", "--pass-cap", "300"]
    subprocess.run([sys.executable, str(script), str(home), *sizes], check=True, capture_output=True)
    env = cli_environment(ENTITLE_HOME=str(home), ENTITLE_PASS_PROGRAM=str(home / "demo" / "drawer_pass_demo.toml"))

    merchants = pl.read_parquet(home / "incoming" / "merchants.parquet")
    assert merchants["merchant_id"].n_unique() == 600 and merchants.height == 603
    ingested = run_entitle(
        ["claims", "ingest", "--from", str(next((home / "incoming").glob("merchant-*/*.csv"))), "--json"], env
    )
    assert ingested.returncode == 0, ingested.stderr
    claims = json.loads(ingested.stdout)
    assert claims["quarantined_rows"] == 1 and claims["claims_new"] >= 500, claims
    assert claims["by_status"]["accepted"] > 0
    for batch in sorted((home / "incoming" / "pass").glob("*/*.parquet")):
        applied = run_entitle(["pass", "apply", "--from", str(batch)], env)
        assert applied.returncode == 0, applied.stderr
    assert run_entitle(["pass", "allocate"], env).returncode == 0
    status = json.loads(run_entitle(["pass", "status", "--json"], env).stdout)
    assert (status["granted"], status["sold_out"]) == (300, 1_700), status


# --------------------------------------------------------------------------- a demo over another demo's ledger


def test_a_smaller_demo_over_a_granted_larger_one_stops_naming_make_clean(tmp_path: Path) -> None:
    """`make demo DEMO_USERS=5000` after `make demo`: refused before the file is written, exit 5."""
    home = tmp_path / "var"
    users_file = home / "incoming" / "users.parquet"
    env = cli_environment(ENTITLE_HOME=str(home), ENTITLE_PARTITIONS="4")
    assert run_entitle(["demo-users", "--count", "20000", "--out", str(users_file)], env).returncode == 0
    assert not (home / "ledger.sqlite").exists(), "demo-users creates no ledger"
    assert run_entitle(["run", "--users", str(users_file), "--no-progress"], env).returncode == 0
    granted = users_file.read_bytes()

    refused = run_entitle(["demo-users", "--count", "5000", "--out", str(users_file)], env)
    assert refused.returncode == 5, refused.stderr
    assert refused.stderr.startswith(f"entitle: error: {users_file} is the user file of campaign kakao-outage-2022")
    assert "granted to 20,000 users; 15,000 of them are not among the 5,000 users" in refused.stderr
    assert "Nothing was written. Start afresh: `make clean && make demo DEMO_USERS=5000`" in refused.stderr
    assert "Traceback" not in refused.stderr
    assert users_file.read_bytes() == granted, "the granted file is left as it was"

    # The same demo again, a larger one (its users include these), or another file: no refusal.
    assert run_entitle(["demo-users", "--count", "20000", "--out", str(users_file)], env).returncode == 0
    assert users_file.read_bytes() == granted
    elsewhere = run_entitle(["demo-users", "--count", "5000", "--out", str(tmp_path / "other.parquet")], env)
    assert elsewhere.returncode == 0, elsewhere.stderr
    larger = run_entitle(["demo-users", "--count", "40000", "--out", str(users_file)], env)
    assert larger.returncode == 0, larger.stderr

    # The advice: `make clean` deletes var/ (here ENTITLE_HOME), after which the smaller demo is written.
    clean = subprocess.run(
        ["make", "-n", "--no-print-directory", "-C", str(REPO_ROOT), "clean"],
        capture_output=True,
        text=True,
        check=True,
    )
    assert clean.stdout.strip() == "rm -rf var"
    shutil.rmtree(home)
    again = run_entitle(["demo-users", "--count", "5000", "--out", str(users_file)], env)
    assert again.returncode == 0, again.stderr


def test_users_outside_the_new_file_are_counted_from_the_granted_snapshot(
    tmp_path: Path, settings_for: Callable[..., Settings], prepare: Callable[..., Any]
) -> None:
    """The check compares user sets: a file of other users is refused even at the same size."""
    settings = settings_for(tmp_path / "var", partitions=2)
    users_file = tmp_path / "var" / "incoming" / "users.parquet"
    write_demo_users(3_000, users_file, seed=1)
    prepare(settings, users_file)  # registered as the campaign's current snapshot

    def check(users: pl.DataFrame) -> None:
        refuse_replacing_granted_users(settings, users_file, users)

    written = users_file.read_bytes()
    with pytest.raises(LedgerError, match=r"granted to 3,000 users; [\d,]+ of them are not among the 3,000 users"):
        write_demo_users(3_000, users_file, seed=2, before_write=check)
    assert users_file.read_bytes() == written
    write_demo_users(3_000, users_file, seed=1, before_write=check)  # the same users: written again
    refuse_replacing_granted_users(settings, tmp_path / "elsewhere.parquet", pl.DataFrame({"user_id": [1]}))


def test_an_out_path_that_cannot_be_written_is_a_config_error(tmp_path: Path) -> None:
    (tmp_path / "a-file").write_text("", encoding="utf-8")
    with pytest.raises(ConfigError, match=r"--out .*a-file/u.parquet: cannot write it \(File exists: .*a-file\)"):
        write_demo_users(10, tmp_path / "a-file" / "u.parquet")
