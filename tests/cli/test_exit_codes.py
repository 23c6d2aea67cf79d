"""Every exit code of ``entitle``, produced in a situation that calls for it.

Each test puts the command in that situation and checks the code, that standard error names
what is wrong (``entitle: error: …``, one line) and that no Python traceback is shown. The
installed console script runs every case but two, which run the CLI in-process: a payout
batch meeting another writer (the race is made certain by hiding the other payouts from the
batch's check) and an internal error (an exception the pipeline does not classify).
:data:`EXIT_CODES_TESTED` maps each code to its test; the parser's help and
docs/reference/exit-codes.md list exactly these codes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
from pathlib import Path

import httpx
import polars as pl
import pytest
from support import REPO_ROOT
from support.cli import ENTITLE_SCRIPT, cli_environment, run_entitle, suggested_commands
from support.delivery import CAMPAIGN, Service, write_campaign
from support.merchant_cash import claim, write_claims

from pipeline.cli import build_parser
from pipeline.delivery import grant_id
from pipeline.grants.demo_users import write_demo_users

EXIT_CODES_TESTED: dict[int, str] = {
    0: "test_exit_0_success",
    1: "test_exit_1_a_payout_batch_met_another_writer",
    2: "test_exit_2_usage_or_configuration",
    3: "test_exit_3_bad_input",
    4: "test_exit_4_partition_files",
    5: "test_exit_5_ledger_refused",
    6: "test_exit_6_campaign_not_started",
    7: "test_exit_7_partitions_failed",
    8: "test_exit_8_reconciliation_breaks",
    9: "test_exit_9_reconciliation_incomplete",
    10: "test_exit_10_issuer_conflict",
    70: "test_exit_70_internal_error",
    130: "test_exit_130_interrupted",
    141: "test_exit_141_output_closed",
}

USERS = list(range(80_000_000, 80_000_400))
INTERRUPTED_USERS = 300_000  # long enough a run (~2 s) for Ctrl-C to land while it partitions or grants


def assert_exit(result: subprocess.CompletedProcess[str], code: int, *fragments: str) -> None:
    """The exit code; for an error, one `entitle: error:` line (after argparse's usage) naming every fragment."""
    assert result.returncode == code, (result.returncode, result.stdout[-2000:], result.stderr[-2000:])
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout, result.stderr
    if code == 0:
        assert "error" not in result.stderr, result.stderr
        return
    errors = [line for line in result.stderr.splitlines() if line.startswith("entitle")]
    assert len(errors) == 1 and ": error: " in errors[0], result.stderr
    for fragment in fragments:
        assert fragment in errors[0], f"{fragment!r} not in {errors[0]!r}"


def granted(tmp_path: Path, **environ: str) -> tuple[dict[str, str], Path, Path]:
    """`entitle run` over USERS in 4 partitions: the environment, the user file and the partitions folder."""
    users_file = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": USERS}, schema={"user_id": pl.Int64}).write_parquet(users_file)
    env = cli_environment(
        ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_PARTITIONS="4", ENTITLE_RECONCILE_WORKERS="1", **environ
    )
    ran = run_entitle(["run", "--users", str(users_file), "--json", "--no-progress"], env)
    assert_exit(ran, 0)
    return env, users_file, Path(json.loads(ran.stdout)["snapshot"]["partitions_dir"])


def test_exit_1_a_payout_batch_met_another_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """Another process pays a merchant between this batch's check and its insert: the batch writes nothing."""
    from pipeline.cli import dispatch
    from pipeline.programs.merchant_cash import payouts

    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    claims_file = write_claims(tmp_path / "claims.csv", [claim("a", 91, 300_000), claim("b", 92, 300_000)])
    assert_exit(run_entitle(["claims", "ingest", "--from", str(claims_file)], env), 0)
    ledger_file = tmp_path / "var" / "ledger.sqlite"
    with sqlite3.connect(ledger_file) as connection:
        payable = connection.execute("SELECT merchant_id, state FROM merchant_cases").fetchall()
    assert_exit(run_entitle(["claims", "pay"], env), 0)  # the other writer pays both merchants
    with sqlite3.connect(ledger_file) as connection:  # ... after this batch read the cases and checked
        connection.executemany(
            "UPDATE merchant_cases SET state = ? WHERE merchant_id = ?", [(s, m) for m, s in payable]
        )
        grants_before = connection.execute("SELECT count(*) FROM grants").fetchone()
    for name in [k for k in os.environ if k.startswith("ENTITLE_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("ENTITLE_HOME", str(tmp_path / "var"))
    monkeypatch.setattr(payouts, "_granted", lambda connection, op, merchants: set())  # its check saw no payout
    assert dispatch.main(["claims", "pay"]) == 1
    err = capsys.readouterr().err
    assert "written by another process meanwhile; nothing of this batch was written" in err and "Traceback" not in err
    with sqlite3.connect(ledger_file) as connection:
        assert connection.execute("SELECT count(*) FROM grants").fetchone() == grants_before
        states = dict(connection.execute("SELECT merchant_id, state FROM merchant_cases").fetchall())
    assert states == dict(payable), "the batch marked no case paid"


def test_exit_70_internal_error(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    """Any exception the pipeline does not classify is a bug: exit 70, one line, no traceback, how to report it."""
    from pipeline.cli import dispatch

    def broken() -> None:
        raise ZeroDivisionError("division by zero")

    monkeypatch.delenv("ENTITLE_DEBUG", raising=False)
    monkeypatch.setattr(dispatch, "load_settings", broken)
    assert dispatch.main(["status"]) == 70
    err = capsys.readouterr().err
    assert err.startswith("entitle: error: internal error (ZeroDivisionError: division by zero). This is a bug")
    assert "ENTITLE_DEBUG=1" in err and "Traceback" not in err


def test_exit_0_success(tmp_path: Path) -> None:
    env, _users_file, _partitions = granted(tmp_path)
    reconciled = run_entitle(["reconcile", "--no-progress"], env)
    assert_exit(reconciled, 0)
    assert reconciled.stdout.startswith("RECONCILED: all 2,000 expected grants are in the ledger")


def test_exit_2_usage_or_configuration(tmp_path: Path) -> None:
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    usage = run_entitle(["grant", "--partitions", "3,x"], env)
    assert_exit(usage, 2, "argument --partitions: '3,x' is not a comma-separated list of partition ids")
    assert usage.stderr.startswith("usage: entitle grant")

    bare = run_entitle([], env)  # no command: the help, exit 2
    assert bare.returncode == 2 and bare.stdout.startswith("usage: entitle"), bare.stderr

    users = tmp_path / "users.csv"
    users.write_text("user_id\n1\n2\n", encoding="utf-8")
    zero = run_entitle(["plan", "--users", str(users)], {**env, "ENTITLE_PARTITIONS": "0"})
    assert_exit(zero, 2, "partition count 0 must be between 1 and 1024")
    other_database = run_entitle(["status"], {**env, "ENTITLE_LEDGER_URL": "mysql://u@db.example/ledger"})
    assert_exit(other_database, 2, "ENTITLE_LEDGER_URL")
    assert not (tmp_path / "var").exists(), "nothing written"


def test_exit_3_bad_input(tmp_path: Path) -> None:
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"))
    absent = tmp_path / "absent.parquet"
    assert_exit(run_entitle(["run", "--users", str(absent), "--no-progress"], env), 3, str(absent), "file not found")
    misnamed = tmp_path / "ids.csv"
    misnamed.write_text("uid\n1\n2\n", encoding="utf-8")
    assert_exit(run_entitle(["plan", "--users", str(misnamed)], env), 3, "no 'user_id' column")


def test_exit_4_partition_files(tmp_path: Path) -> None:
    env, users_file, partitions = granted(tmp_path)
    shutil.rmtree(partitions)
    refused = run_entitle(["grant", "--no-progress"], env)
    assert_exit(refused, 4, "its partitions cannot be read", f"{partitions}/manifest.parquet: no manifest")
    assert suggested_commands(refused.stderr) == [f"entitle run --users {users_file}"]


def test_exit_5_ledger_refused(tmp_path: Path) -> None:
    env, _users_file, _partitions = granted(tmp_path)
    stranger = run_entitle(["void", "--user", "12345", "--reason", "test", "--actor", "cs"], env)
    assert_exit(stranger, 5, "user 12345", "no live grant to void")


def test_exit_6_campaign_not_started(tmp_path: Path) -> None:
    campaign = tmp_path / "campaign.toml"
    bundled = REPO_ROOT / "pipeline" / "campaigns" / "kakao_outage_2022.toml"
    text = bundled.read_text(encoding="utf-8")
    campaign.write_text(text.replace("start = 2023-01-05T00:00:00", "start = 2099-01-05T00:00:00"), encoding="utf-8")
    users = tmp_path / "users.csv"
    users.write_text("user_id\n1\n2\n", encoding="utf-8")
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_CAMPAIGN=str(campaign))
    early = run_entitle(["run", "--users", str(users), "--no-progress"], env)
    assert_exit(early, 6, "campaign 'kakao-outage-2022' starts at 2099-01-05T00:00:00+09:00", "Nothing is granted")


def test_exit_7_partitions_failed(tmp_path: Path) -> None:
    env, _users_file, partitions = granted(tmp_path)
    (partitions / "part-0002.parquet").write_bytes(b"not parquet at all")
    failed = run_entitle(["grant", "--verify", "--json", "--no-progress"], env)
    assert_exit(failed, 7, "1 of 4 partitions failed (part-0002;", "then: entitle grant --only-failed")
    assert [f["partition_id"] for f in json.loads(failed.stdout)["failed_partitions"]] == [2]


def test_exit_8_reconciliation_breaks(tmp_path: Path) -> None:
    env, _users_file, _partitions = granted(tmp_path)
    with sqlite3.connect(tmp_path / "var" / "ledger.sqlite") as connection:  # a grant deleted behind its back
        connection.execute("DROP TRIGGER grants_append_only_delete")
        connection.execute("DELETE FROM grants WHERE user_id = ? AND item_key = 1", (USERS[1],))
    broken = run_entitle(["reconcile", "--json", "--no-progress"], env)
    assert_exit(broken, 8, "BREAKS: 1 open breaks: 1 missing", "`entitle repair --actor NAME` fixes missing")
    assert json.loads(broken.stdout)["verdict"] == "BREAKS", "stdout keeps the JSON document"


def test_exit_9_reconciliation_incomplete(tmp_path: Path) -> None:
    env, _users_file, partitions = granted(tmp_path)
    damaged = partitions / "part-0002.parquet"
    damaged.write_bytes(b"not parquet at all")
    incomplete = run_entitle(["reconcile", "--no-progress"], env)
    assert_exit(incomplete, 9, "INCOMPLETE: 1 partition file(s) unreadable", str(damaged))


def test_exit_10_issuer_conflict(tmp_path: Path) -> None:
    service = Service(tmp_path / "issuer.sqlite")
    service.start()
    try:
        campaign = write_campaign(tmp_path / "campaign.toml")
        issuer = {"ENTITLE_CAMPAIGN": str(campaign), "ENTITLE_ISSUER_SHOP_URL": service.url}
        env, _users_file, _partitions = granted(tmp_path, **issuer)
        # Another system already holds one user's coupon under the same grant id, with another amount.
        taken = grant_id(CAMPAIGN, USERS[0], "coupon-2000", 0)
        body = {
            "grant_id": taken,
            "campaign_id": CAMPAIGN,
            "user_id": USERS[0],
            "item_sku": "coupon-2000",
            "issue_no": 0,
            "amount_krw": 9999,
            "valid_from": "2023-01-05T00:00:00+09:00",
            "valid_until": "2023-04-05T00:00:00+09:00",
        }
        assert httpx.put(f"{service.url}/v1/grants/{taken}", json=body).status_code == 201
        delivered = run_entitle(["deliver", "--no-progress"], env)
    finally:
        service.stop()
    assert_exit(delivered, 10, "an issuer answered conflict for 1 grant(s)", "entitle query delivery_conflicts")


def test_exit_130_interrupted(tmp_path: Path) -> None:
    users_file = tmp_path / "users.parquet"
    write_demo_users(INTERRUPTED_USERS, users_file, seed=9)
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_PARTITIONS="8", PYTHONUNBUFFERED="1")
    args = [str(ENTITLE_SCRIPT), "run", "--users", str(users_file), "--no-progress"]
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    first = process.stdout.readline()  # printed once the file is frozen: the command is running its work
    assert first.startswith("snapshot "), first
    process.send_signal(signal.SIGINT)  # Ctrl-C
    stdout, stderr = process.communicate(timeout=120)
    interrupted = subprocess.CompletedProcess(args, process.returncode, first + stdout, stderr)
    assert_exit(interrupted, 130, "interrupted", "rerun the same command to finish")

    again = run_entitle(args[1:], env)  # the advice: the same command
    assert_exit(again, 0)
    status = json.loads(run_entitle(["status", "--json"], env).stdout)
    assert (status["done"], status["partition_count"]) == (8, 8)


def test_exit_141_output_closed(tmp_path: Path) -> None:
    """`entitle status --json | head -c 1`: the reader went away; nothing more to say."""
    env, _users_file, _partitions = granted(tmp_path)
    args = [str(ENTITLE_SCRIPT), "status", "--json"]
    env = {**env, "PYTHONUNBUFFERED": "1"}  # the first print reaches the closed pipe at once
    process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    assert process.stdout is not None
    process.stdout.close()  # long before the child has imported polars and has anything to print
    _, stderr = process.communicate(timeout=60)
    assert process.returncode == 141, (process.returncode, stderr)
    assert stderr == "", "a closed pipe is not an error to report"


# --------------------------------------------------------------------------- the table itself


def test_every_exit_code_has_its_test_and_every_documented_one_is_covered() -> None:
    tests = {name for name, value in globals().items() if name.startswith("test_exit_") and callable(value)}
    assert set(EXIT_CODES_TESTED.values()) == tests
    for code, name in EXIT_CODES_TESTED.items():
        assert name.startswith(f"test_exit_{code}_"), (code, name)
    listed = (build_parser().epilog or "").split("Exit codes", 1)[-1]  # "...: 0 ok, 2 usage/config, ..."
    documented = {int(code) for code in re.findall(r"[:,] (\d+) [a-z]", listed)}
    assert {0, 2, 7, 10, 70} <= documented, listed
    assert documented <= set(EXIT_CODES_TESTED), sorted(documented)
    reference = (REPO_ROOT / "docs" / "reference" / "exit-codes.md").read_text(encoding="utf-8")
    in_reference = {int(code) for code in re.findall(r"^\| (\d+) \|", reference, flags=re.MULTILINE)}
    assert in_reference == set(EXIT_CODES_TESTED), "docs/reference/exit-codes.md lists exactly the tested codes"
