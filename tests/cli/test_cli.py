"""The ``entitle`` console script, run as a subprocess exactly as operators run it."""

from __future__ import annotations

import argparse
import csv
import io
import json
import sqlite3
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from support.cli import ENTITLE_SCRIPT, cli_environment, run_entitle
from support.settings import FACE_VALUE_PER_USER_KRW, ITEMS_PER_USER

from pipeline.cli import build_parser

Entitle = Callable[..., subprocess.CompletedProcess[str]]
COMMANDS = {
    "demo-users",
    "plan",
    "run",
    "grant",
    "deliver",
    "notices",
    "status",
    "summary",
    "reconcile",
    "repair",
    "void",
    "report",
    "db",
    "query",
    "pass",
    "claims",
    "review",
}
USERS = 2_000


def assert_clean_error(result: subprocess.CompletedProcess[str], exit_code: int, *fragments: str) -> None:
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("entitle: error: "), result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in {result.stderr!r}"
    assert "Traceback" not in result.stderr
    assert "Traceback" not in result.stdout


# --------------------------------------------------------------------------- help


def test_every_command_has_help(tmp_path: Path) -> None:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    assert set(sub.choices) == COMMANDS
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    invocations = [["--help"]] + [[name, "--help"] for name in sorted(COMMANDS)]
    processes = [
        (
            args,
            subprocess.Popen(
                [str(ENTITLE_SCRIPT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            ),
        )
        for args in invocations
    ]
    for args, process in processes:
        stdout, stderr = process.communicate(timeout=60)
        assert process.returncode == 0, (args, stderr)
        assert stdout.startswith("usage: entitle"), (args, stdout)
        if len(args) == 2:
            assert f"entitle {args[0]}" in stdout
    assert not (tmp_path / "var").exists(), "--help writes nothing"


def test_version_and_no_command(entitle: Entitle, tmp_path: Path) -> None:
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    version = entitle(["--version"], env)
    assert version.returncode == 0
    assert version.stdout.strip() == "entitle 0.1.0"
    bare = entitle([], env)
    assert bare.returncode == 2
    assert "usage: entitle" in bare.stdout


# --------------------------------------------------------------------------- demo users and plan


def test_demo_users_writes_a_reproducible_file(entitle: Entitle, tmp_path: Path) -> None:
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    outputs = []
    for name in ("a.parquet", "b.parquet"):
        out = tmp_path / name
        result = entitle(["demo-users", "--count", str(USERS), "--out", str(out), "--seed", "7", "--json"], env)
        assert result.returncode == 0, result.stderr
        document = json.loads(result.stdout)
        assert document["distinct_valid_users"] == USERS
        assert document["rows"] == USERS + document["bad_rows"] + document["duplicate_rows"]
        frame = pl.read_parquet(out)
        assert frame.height == document["rows"]
        assert frame.filter(pl.col("user_id") > 0)["user_id"].n_unique() == USERS
        outputs.append(out.read_bytes())
    assert outputs[0] == outputs[1], "same seed, same file"

    csv_out = tmp_path / "users.csv"
    result = entitle(["demo-users", "--count", "500", "--out", str(csv_out)], env)
    assert result.returncode == 0, result.stderr
    assert "wrote" in result.stdout
    assert csv_out.read_text(encoding="utf-8").startswith("user_id\n")


def test_demo_users_refuses_a_bad_count(entitle: Entitle, tmp_path: Path) -> None:
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    result = entitle(["demo-users", "--count", "0", "--out", str(tmp_path / "u.parquet")], env)
    assert_clean_error(result, 2, "--count 0 must be between 1 and")


def test_plan_reports_and_writes_nothing(entitle: Entitle, tmp_path: Path, write_users: Callable[..., Path]) -> None:
    users = write_users(tmp_path / "users.csv", list(range(1, 101)) + [5])
    home = tmp_path / "var"
    env = cli_environment(ENTITLE_HOME=str(home))
    result = entitle(["plan", "--users", str(users), "--json"], env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["written"] is False
    assert document["snapshot"]["eligible_users"] == 100
    assert document["snapshot"]["duplicate_rows"] == 1
    assert document["total_grants"] == 100 * ITEMS_PER_USER
    assert document["total_face_value_krw"] == 100 * FACE_VALUE_PER_USER_KRW
    assert {i["item_sku"] for i in document["items"]} == {
        "emoticon-permanent",
        "emoticon-90d-a",
        "emoticon-90d-b",
        "coupon-2000",
        "coupon-3000",
    }
    assert not home.exists(), f"plan wrote {sorted(p.name for p in home.rglob('*')) if home.exists() else []}"

    table = entitle(["plan", "--users", str(users)], env)
    assert table.returncode == 0
    assert "dry run: nothing written" in table.stdout
    assert "500,000" in table.stdout  # total face value, ₩
    assert not home.exists()


# --------------------------------------------------------------------------- run, status, summary, query


@dataclass(frozen=True)
class Ran:
    env: dict[str, str]
    home: Path
    users: list[int]
    run_document: dict[str, object]


@pytest.fixture(scope="module")
def ran(tmp_path_factory: pytest.TempPathFactory) -> Ran:
    """One `entitle run --json` over a small demo-like file, shared by the read-only tests below."""
    root = tmp_path_factory.mktemp("cli-run")
    users = list(range(50_000_000, 50_000_000 + USERS))
    users_file = root / "users.parquet"
    pl.DataFrame({"user_id": users + [users[0], None]}, schema={"user_id": pl.Int64}).write_parquet(users_file)
    env = cli_environment(ENTITLE_HOME=str(root / "var"), ENTITLE_PARTITIONS="8", ENTITLE_REJECTED_SHARE_MAX="0.01")
    result = run_entitle(["run", "--users", str(users_file), "--json"], env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)  # stdout is exactly one JSON document
    return Ran(env, root / "var", users, document)


def test_run_json_reports_every_planned_grant_written(ran: Ran) -> None:
    document = ran.run_document
    assert document["planned"] == USERS * ITEMS_PER_USER
    assert document["written"] == document["planned"]
    assert document["already_present"] == 0
    assert document["partitions"] == 8
    assert document["failed_partitions"] == []
    snapshot = document["snapshot"]
    assert isinstance(snapshot, dict)
    assert snapshot["eligible_users"] == USERS
    assert snapshot["partition_count"] == 8
    assert (ran.home / "ledger.sqlite").exists()


def test_rerunning_run_writes_nothing(ran: Ran, tmp_path: Path) -> None:
    users_file = tmp_path / "same.parquet"
    pl.DataFrame({"user_id": ran.users}, schema={"user_id": pl.Int64}).write_parquet(users_file)
    result = run_entitle(["run", "--users", str(users_file), "--json", "--no-progress"], ran.env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["written"] == 0
    assert document["already_present"] == USERS * ITEMS_PER_USER


def test_status_json(ran: Ran) -> None:
    result = run_entitle(["status", "--json"], ran.env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert (document["done"], document["failed"], document["running"], document["pending"]) == (8, 0, 0, 0)
    assert document["partition_count"] == 8
    assert sum(p["planned"] for p in document["partitions"]) == USERS * ITEMS_PER_USER
    text = run_entitle(["status", "--all"], ran.env)
    assert text.returncode == 0
    assert text.stdout.count(" done ") == 8


def test_summary_json(ran: Ran) -> None:
    result = run_entitle(["summary", "--json"], ran.env)
    assert result.returncode == 0, result.stderr
    document = json.loads(result.stdout)
    assert document["total_grants"] == USERS * ITEMS_PER_USER
    assert document["total_face_value_krw"] == USERS * FACE_VALUE_PER_USER_KRW
    assert all(item["grants"] == USERS for item in document["items"])


def test_query_face_value_as_csv(ran: Ran) -> None:
    result = run_entitle(["query", "face_value_per_item", "--format", "csv"], ran.env)
    assert result.returncode == 0, result.stderr
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == ITEMS_PER_USER
    assert {r["campaign_id"] for r in rows} == {"kakao-outage-2022"}
    assert all(int(r["live_grants"]) == USERS for r in rows)
    face = {r["item_sku"]: int(r["face_value_krw"]) for r in rows}
    assert face["coupon-2000"] == USERS * 2000 and face["coupon-3000"] == USERS * 3000
    assert face["emoticon-permanent"] == 0


def test_query_user_grants(ran: Ran) -> None:
    user_id = ran.users[123]
    result = run_entitle(["query", "user_grants", "--param", f"user_id={user_id}", "--format", "json"], ran.env)
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)  # one array of records
    assert len(rows) == ITEMS_PER_USER
    assert {r["user_id"] for r in rows} == {user_id}
    by_sku = {r["item_sku"]: r for r in rows}
    assert by_sku["coupon-2000"]["amount_krw"] == 2000
    assert by_sku["coupon-3000"]["valid_until"] == "2023-04-04T15:00:00Z"
    assert by_sku["emoticon-permanent"]["valid_until"] is None
    assert by_sku["emoticon-permanent"]["valid_from"] == "2023-01-04T15:00:00Z"

    table = run_entitle(["query", "user_grants", "--param", f"user_id={user_id}"], ran.env)
    assert table.returncode == 0
    assert "(5 rows)" in table.stdout

    nobody = run_entitle(["query", "user_grants", "--param", "user_id=1", "--format", "csv"], ran.env)
    assert nobody.returncode == 0
    assert nobody.stdout.strip().splitlines()[1:] == []


def test_query_list(ran: Ran) -> None:
    result = run_entitle(["query", "--list", "--json"], ran.env)
    assert result.returncode == 0, result.stderr
    names = {q["name"]: q["parameters"] for q in json.loads(result.stdout)["queries"]}
    assert names["user_grants"] == ["user_id"]
    assert {"coverage", "partition_status", "user_grants", "users_missing_items", "grants_per_day"} <= set(names)


def test_query_errors(ran: Ran) -> None:
    assert_clean_error(run_entitle(["query", "nosuch"], ran.env), 2, "no query named 'nosuch'", "coverage")
    assert_clean_error(
        run_entitle(["query", "coverage", "--param", "colour=red"], ran.env), 2, "has no parameter(s) ['colour']"
    )
    assert_clean_error(run_entitle(["query", "coverage", "--param", "oops"], ran.env), 2, "KEY=VALUE")


def test_grant_with_an_unknown_partition_is_a_clear_error(ran: Ran) -> None:
    result = run_entitle(["grant", "--partitions", "99999"], ran.env)
    assert_clean_error(result, 3, "partition id(s) [99999] do not exist", "partitions 0..7")
    garbled = run_entitle(["grant", "--partitions", "three"], ran.env)
    assert garbled.returncode == 2
    assert "not a comma-separated list of partition ids" in garbled.stderr


def test_grant_only_failed_with_nothing_failed_does_nothing(ran: Ran) -> None:
    result = run_entitle(["grant", "--only-failed", "--json"], ran.env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["partitions"] == 0


# --------------------------------------------------------------------------- bad input


def test_bad_users_file_exits_3_with_a_message_and_no_traceback(
    entitle: Entitle, tmp_path: Path, write_users: Callable[..., Path]
) -> None:
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    misnamed = write_users(tmp_path / "users.csv", [1, 2], column="userid")
    assert_clean_error(entitle(["run", "--users", str(misnamed)], env), 3, "Rename it to 'user_id'")

    too_bad = write_users(tmp_path / "bad.csv", [1, "x", "y"])
    result = entitle(["run", "--users", str(too_bad), "--json"], env)
    assert_clean_error(result, 3, "rows rejected", "quarantine.parquet")
    error = json.loads(result.stdout)
    assert error["exit_code"] == 3 and "rows rejected" in error["error"]

    truncated = tmp_path / "cut.parquet"
    write_users(tmp_path / "whole.parquet", list(range(1, 1000)))
    truncated.write_bytes((tmp_path / "whole.parquet").read_bytes()[:300])
    assert_clean_error(entitle(["plan", "--users", str(truncated)], env), 3, "not a readable Parquet file")

    assert_clean_error(entitle(["run", "--users", str(tmp_path / "absent.csv")], env), 3, "file not found")


def test_configuration_errors_exit_2(entitle: Entitle, tmp_path: Path, write_users: Callable[..., Path]) -> None:
    users = write_users(tmp_path / "users.csv", [1, 2])
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_PARTITIONS="0")
    assert_clean_error(entitle(["plan", "--users", str(users)], env), 2, "partition count 0 must be between 1 and 1024")
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_REJECTED_SHARE_MAX="5")
    assert_clean_error(entitle(["plan", "--users", str(users)], env), 2, "ENTITLE_REJECTED_SHARE_MAX=5.0")


def test_bad_campaign_file_exits_3(entitle: Entitle, tmp_path: Path, write_users: Callable[..., Path]) -> None:
    users = write_users(tmp_path / "users.csv", [1, 2])
    campaign = tmp_path / "campaign.toml"
    campaign.write_text(
        '[campaign]\nid = "x"\nname = "x"\ntime_zone = "Nowhere/Land"\nstart = 2023-01-05\n', encoding="utf-8"
    )
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_CAMPAIGN=str(campaign))
    assert_clean_error(entitle(["run", "--users", str(users)], env), 3, "campaign.time_zone", "Nowhere/Land")


def test_grant_before_any_run_names_the_fix(entitle: Entitle, tmp_path: Path) -> None:
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    assert_clean_error(entitle(["grant"], env), 3, "has no snapshot", "entitle run --users FILE")


def test_a_failed_partition_exits_7_and_a_rerun_recovers(
    entitle: Entitle, tmp_path: Path, write_users: Callable[..., Path]
) -> None:
    import shutil

    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_PARTITIONS="4")
    users = write_users(tmp_path / "users.parquet", list(range(1, 801)))
    first = entitle(["run", "--users", str(users), "--json", "--no-progress"], env)
    assert first.returncode == 0, first.stderr
    parts = Path(json.loads(first.stdout)["snapshot"]["partitions_dir"])

    damaged = parts / "part-0002.parquet"
    damaged.write_bytes(b"not parquet at all")
    verify = entitle(["grant", "--verify", "--json", "--no-progress"], env)  # --verify reads every partition
    assert verify.returncode == 7, verify.stderr
    document = json.loads(verify.stdout)
    assert [f["partition_id"] for f in document["failed_partitions"]] == [2]
    assert str(damaged) in document["failed_partitions"][0]["error"]
    human = entitle(["status"], env)
    assert "part-0002  failed" in human.stdout
    assert str(damaged) in human.stdout

    shutil.rmtree(parts)  # the documented fix: delete the partitions folder and run again
    again = entitle(["run", "--users", str(users), "--json", "--no-progress"], env)
    assert again.returncode == 0, again.stderr
    assert json.loads(again.stdout)["written"] == 0
    assert damaged.read_bytes().startswith(b"PAR1")
    status = json.loads(entitle(["status", "--json"], env).stdout)
    assert (status["done"], status["failed"]) == (4, 0)


@pytest.mark.parametrize("args", [["status", "--json"], ["query", "coverage", "--format", "csv"]])
def test_a_closed_stdout_is_not_reported_as_a_bug(ran: Ran, args: list[str]) -> None:
    """`entitle status --json | head -1`: the reader goes away; that is not an internal error."""
    env = {**ran.env, "PYTHONUNBUFFERED": "1"}  # every print reaches the (closed) pipe at once
    process = subprocess.Popen(
        [str(ENTITLE_SCRIPT), *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    assert process.stdout is not None and process.stderr is not None
    process.stdout.close()  # closed long before the child has imported polars and has anything to print
    stderr = process.stderr.read()
    process.stderr.close()
    exit_code = process.wait(timeout=60)
    assert "Traceback" not in stderr, stderr
    assert "internal error" not in stderr, stderr
    assert exit_code not in (1, 70), (exit_code, stderr)


def test_query_without_a_ledger_says_so_and_creates_nothing(entitle: Entitle, tmp_path: Path) -> None:
    home = tmp_path / "var"
    home.mkdir()
    result = entitle(["query", "coverage"], cli_environment(ENTITLE_HOME=str(home)))
    assert_clean_error(result, 2, "no ledger at", "entitle run")
    assert not (home / "ledger.sqlite").exists()


# --------------------------------------------------------------------------- reconcile, void, repair, report


def test_reconcile_void_repair_and_report_through_the_cli(tmp_path: Path, write_users: Callable[..., Path]) -> None:
    users = list(range(60_000_000, 60_000_400))
    users_file = write_users(tmp_path / "users.parquet", users)
    home = tmp_path / "var"
    env = cli_environment(ENTITLE_HOME=str(home), ENTITLE_PARTITIONS="4", ENTITLE_RECONCILE_WORKERS="2")
    assert run_entitle(["run", "--users", str(users_file), "--no-progress"], env).returncode == 0

    clean = run_entitle(["reconcile", "--json", "--no-progress"], env)
    assert clean.returncode == 0, clean.stderr
    document = json.loads(clean.stdout)
    assert document["verdict"] == "RECONCILED"
    assert document["bridge"]["expected"] == document["bridge"]["ledger"] == 400 * ITEMS_PER_USER

    # A grant voided on purpose is explained; voiding it again is refused with exit 5.
    voided = run_entitle(
        ["void", "--user", str(users[0]), "--item", "coupon-2000", "--reason", "closed", "--actor", "cs", "--json"],
        env,
    )
    assert voided.returncode == 0, voided.stderr
    assert json.loads(voided.stdout)["voided"][0]["item_sku"] == "coupon-2000"
    again = run_entitle(
        ["void", "--user", str(users[0]), "--item", "coupon-2000", "--reason", "closed", "--actor", "cs"], env
    )
    assert_clean_error(again, 5, f"user {users[0]} item 'coupon-2000' has no live grant to void (already voided")
    assert_clean_error(run_entitle(["void", "--user", "5", "--actor", "cs"], env), 2, "--reason is required")

    # Tamper: delete one grant behind the pipeline's back.
    with sqlite3.connect(home / "ledger.sqlite") as connection:
        connection.execute("DROP TRIGGER grants_append_only_delete")
        connection.execute("DELETE FROM grants WHERE user_id = ? AND item_key = 1", (users[1],))
    broken = run_entitle(["reconcile", "--no-progress", "--report"], env)
    assert broken.returncode == 8, broken.stderr
    assert broken.stdout.startswith("BREAKS: 1 open breaks: 1 missing")
    assert f"user {users[1]} emoticon-permanent" in broken.stdout
    html = next(home.rglob("report.html"))
    assert "BREAKS" in html.read_text(encoding="utf-8")
    assert next(home.rglob("report.png")).read_bytes().startswith(b"\x89PNG\r\n\x1a\n")

    breaks = tmp_path / "open.parquet"
    exported = run_entitle(["query", "open_breaks", "--format", "parquet", "--out", str(breaks)], env)
    assert exported.returncode == 0, exported.stderr
    frame = pl.read_parquet(breaks)
    assert frame.select("break_class", "user_id", "item_sku").rows() == [("missing", users[1], "emoticon-permanent")]
    assert_clean_error(run_entitle(["query", "open_breaks", "--format", "parquet"], env), 2, "give --out")

    repaired = run_entitle(["repair", "--actor", "ops", "--json", "--no-progress"], env)
    assert repaired.returncode == 0, repaired.stderr
    document = json.loads(repaired.stdout)
    assert document["repair"]["granted_missing"] == 1
    assert document["reconciliation"]["verdict"] == "RECONCILED"
    assert document["reconciliation"]["bridge"]["voided"] == 1

    report = run_entitle(["report", "--out", str(tmp_path / "report"), "--json"], env)
    assert report.returncode == 0, report.stderr
    paths = json.loads(report.stdout)
    assert "RECONCILED" in Path(paths["html"]).read_text(encoding="utf-8")
    history = run_entitle(["query", "user_history", "--param", f"user_id={users[0]}", "--format", "csv"], env)
    assert history.returncode == 0, history.stderr
    assert f"{users[0]},coupon-2000,0,void," in history.stdout


def test_reconcile_without_a_snapshot_is_a_clean_error(tmp_path: Path) -> None:
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    assert_clean_error(run_entitle(["reconcile", "--no-progress"], env), 3, "has no snapshot")
    assert_clean_error(run_entitle(["repair", "--actor", "ops"], env), 5, "no reconciliation yet")
    assert_clean_error(run_entitle(["report"], env), 3, "has no reconciliation yet")


def test_query_parameters_are_checked_and_json_is_records(ran: Ran) -> None:
    missing = run_entitle(["query", "user_grants"], ran.env)
    assert missing.returncode == 2 and "needs user_id: add --param user_id=VALUE" in missing.stderr
    mistyped = run_entitle(["query", "user_grants", "--param", "user_id=abc"], ran.env)
    assert mistyped.returncode == 2 and "parameter user_id must be a whole number, got 'abc'" in mistyped.stderr
    user_id = ran.users[7]
    args = ["query", "user_grants", "--param", f"user_id={user_id}", "--format"]
    records = json.loads(run_entitle([*args, "json"], ran.env).stdout)
    lines = run_entitle([*args, "ndjson"], ran.env).stdout.splitlines()
    assert [json.loads(line) for line in lines] == records and len(records) == ITEMS_PER_USER
    assert list(records[0])[:3] == ["campaign_id", "user_id", "item_sku"], "columns in the query's order"
    listed = json.loads(run_entitle(["query", "--list", "--json"], ran.env).stdout)["queries"]
    declared = {q["name"]: q["declared"] for q in listed}
    assert declared["user_grants"] == [{"name": "user_id", "type": "integer", "required": True}]


def test_status_lists_never_attempted_partitions_as_ranges(
    tmp_path: Path, prepare: Callable[..., Any], write_users: Callable[..., Path]
) -> None:
    from support.settings import build_settings

    settings = build_settings(tmp_path / "var", partitions=8)
    prepare(settings, write_users(tmp_path / "users.parquet", list(range(10_000, 12_000))))
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_PARTITIONS="8")
    every = run_entitle(["status"], env)
    assert every.returncode == 0, every.stderr
    assert "pending (never attempted; `entitle grant` grants them): part-0000..part-0007" in every.stdout
    assert "run None" not in every.stdout
    assert run_entitle(["grant", "--partitions", "2,3", "--no-progress"], env).returncode == 0
    some = run_entitle(["status"], env).stdout
    assert "part-0000..part-0001, part-0004..part-0007" in some and "run None" not in some
    assert run_entitle(["grant", "--no-progress"], env).returncode == 0, "the command the status names works"
    assert "pending (" not in run_entitle(["status"], env).stdout
