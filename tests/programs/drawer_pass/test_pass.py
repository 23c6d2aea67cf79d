"""The first-come-first-served pass: intake, strict order, the cap, outcomes, crashes, reruns, reminders.

Everything real: SQLite files and fresh PostgreSQL databases, CSV and Parquet batch files,
and for concurrency four ``entitle`` OS processes at once.
"""

from __future__ import annotations

import datetime as dt
import json
import subprocess
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import sqlalchemy as sa
from support.cli import ENTITLE_SCRIPT, cli_environment, run_entitle
from support.drawer_pass import NOW, OPENS, program_text, serving_order, synthetic, write_applications
from support.settings import build_settings

from pipeline.errors import TermsChangedError
from pipeline.grants.partitioning import user_bucket
from pipeline.ledger import queries
from pipeline.programs.drawer_pass import allocation as pass_allocation
from pipeline.programs.drawer_pass import intake, notices
from pipeline.programs.drawer_pass import reconciliation as pass_reconciliation
from pipeline.programs.drawer_pass.allocation import PassContext
from pipeline.programs.drawer_pass.program import add_months, load_program

PROCESSES = 4
FOUR_PROCESS_APPLICATIONS, FOUR_PROCESS_CAP = 50_000, 10_000
PROCESS_TIMEOUT_S = 300


def pass_holders(context: PassContext) -> set[int]:
    with context.engine.connect() as connection:
        rows = connection.execute(
            sa.text("SELECT user_id FROM grants WHERE campaign_key = :c AND item_key = :i"),
            {"c": context.campaign_key, "i": context.item_key},
        ).scalars()
        return {int(u) for u in rows}


# --------------------------------------------------------------------------- order, cap, outcomes


def test_cap_is_reached_exactly_in_order_and_later_applicants_are_sold_out(
    ledger_url: str, open_pass_program: Callable[..., PassContext], tmp_path: Path
) -> None:
    rows = synthetic(500, seed=1)
    context = open_pass_program(ledger_url, cap=120)
    for index, part in enumerate((rows[:200], rows[200:350], rows[350:])):
        report = intake.ingest(context, write_applications(tmp_path / f"b{index}.parquet", part))
        assert (report.new_applications, report.malformed, report.refused) == (len(part), 0, 0)

    allocation = pass_allocation.allocate(context)
    order = serving_order(rows)
    assert (allocation.considered, allocation.granted, allocation.sold_out) == (500, 120, 380)
    assert pass_holders(context) == set(order[:120])
    assert allocation.granted_at == NOW and allocation.valid_until == dt.datetime(2023, 2, 20, 12, 0, tzinfo=dt.UTC)

    first, last_granted, first_sold_out = order[0], order[119], order[120]
    assert pass_allocation.user_status(context, first)["outcome"] == "granted"
    assert pass_allocation.user_status(context, last_granted)["position"] == 120
    status = pass_allocation.user_status(context, first_sold_out)
    assert (status["outcome"], status["position"], status["valid_until"]) == ("sold_out", 121, None)

    stock = pass_allocation.stock(context)
    assert (stock.stock_cap, stock.granted, stock.remaining, stock.sold_out, stock.pending) == (120, 120, 0, 380, 0)
    result = queries.run_query(context.engine, "pass_stock", {"campaign_id": "drawer-pass-test"})
    row = dict(zip(result.columns, result.rows[0], strict=True))
    assert (row["stock_cap"], row["granted"], row["remaining"], row["sold_out"], row["applications"]) == (
        120,
        120,
        0,
        380,
        500,
    )
    outcomes = queries.run_query(context.engine, "pass_outcomes", {"limit": "1000"})
    by_user = {r[1]: r[3] for r in outcomes.rows}
    assert [by_user[u] for u in order] == ["granted"] * 120 + ["sold_out"] * 380
    assert pass_reconciliation.reconcile(context).verdict == "RECONCILED"


def test_ties_are_broken_by_user_bucket_then_user_id_whatever_the_file_order(
    open_pass_program: Callable[..., PassContext], tmp_path: Path
) -> None:
    instant = OPENS.astimezone(dt.UTC) + dt.timedelta(minutes=1)
    users = list(range(5_000_001, 5_000_041))
    rows = [(u, instant) for u in users]
    expected = sorted(users, key=lambda u: (user_bucket(u), u))[:10]
    assert expected != sorted(users)[:10], "the rule must not be plain id order"
    holders = []
    for run, ordered in enumerate((rows, rows[::-1])):
        url = f"sqlite:///{tmp_path / f'ledger-{run}.sqlite'}"
        context = open_pass_program(url, cap=10)
        intake.ingest(
            context, write_applications(tmp_path / f"ties-{run}.csv", [(u, a.isoformat()) for u, a in ordered])
        )
        pass_allocation.allocate(context)
        holders.append(pass_holders(context))
    assert holders[0] == holders[1] == set(expected)


def test_a_repeated_application_keeps_the_earliest_applied_at(
    open_pass_program: Callable[..., PassContext], tmp_path: Path
) -> None:
    context = open_pass_program(f"sqlite:///{tmp_path / 'l.sqlite'}", cap=1)
    t0 = OPENS.astimezone(dt.UTC) + dt.timedelta(minutes=5)
    first = intake.ingest(context, write_applications(tmp_path / "a.parquet", [(11, t0), (22, t0)]))
    earlier = t0 - dt.timedelta(minutes=1)
    again = intake.ingest(
        context, write_applications(tmp_path / "b.parquet", [(22, earlier), (11, t0 + dt.timedelta(hours=1))])
    )
    assert (first.new_applications, again.new_applications, again.earlier_repeats, again.unchanged_repeats) == (
        2,
        0,
        1,
        1,
    )
    pass_allocation.allocate(context)
    assert pass_holders(context) == {22}


# --------------------------------------------------------------------------- bad input


def test_malformed_rows_are_quarantined_with_their_reason_and_the_rest_is_stored(
    open_pass_program: Callable[..., PassContext], tmp_path: Path
) -> None:
    context = open_pass_program(f"sqlite:///{tmp_path / 'l.sqlite'}", cap=10, share=0.9)
    rows: list[tuple[object, object]] = [
        (101, "2023-01-05T00:00:01+09:00"),
        (102, "2023-01-05 00:00:02Z"),
        ("abc", "2023-01-05T00:00:03+09:00"),
        (None, "2023-01-05T00:00:03+09:00"),
        ("-5", "2023-01-05T00:00:03+09:00"),
        (103, ""),
        (104, "2023-01-05T00:00:03"),
        (105, "yesterday"),
        (106, "2023-01-04T23:59:59+09:00"),
        (107, "2023-02-05T00:00:00+09:00"),
        (108, "2023-01-25T00:00:00+09:00"),
        (101, "2023-01-05T00:00:09+09:00"),
    ]
    report = intake.ingest(context, write_applications(tmp_path / "bad.csv", rows))
    assert report.reasons == {
        "after_close": 1,
        "applied_at_not_a_time": 1,
        "applied_at_without_offset": 1,
        "before_open": 1,
        "duplicate_in_file": 1,
        "in_future": 1,
        "not_integer": 1,
        "null_applied_at": 1,
        "null_user_id": 1,
        "out_of_range": 1,
    }
    assert (report.new_applications, report.malformed, report.refused, report.duplicate_rows) == (2, 6, 3, 1)
    quarantine = pl.read_parquet(report.quarantine_file or "")
    assert quarantine["row_number"].to_list() == [3, 4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert quarantine.filter(pl.col("row_number") == 7)["reason"].item() == "applied_at_without_offset"


def test_a_file_with_too_many_malformed_rows_is_refused_whole_with_exit_3(tmp_path: Path) -> None:
    program = tmp_path / "program.toml"
    program.write_text(program_text(5), encoding="utf-8")
    batch = write_applications(
        tmp_path / "batch.csv", [(1, "2023-01-05T00:00:01+09:00"), ("x", "2023-01-05T00:00:01+09:00")]
    )
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_PASS_PROGRAM=str(program))
    result = run_entitle(["pass", "apply", "--from", str(batch), "--json"], env)
    assert result.returncode == 3, result.stderr
    assert "batch.csv: 1 of 2 rows are malformed" in result.stderr and "row 2 not_integer" in result.stderr
    assert "Traceback" not in result.stderr
    status = run_entitle(["pass", "status", "--json"], env)
    assert json.loads(status.stdout)["applications"] == 0, "nothing of a refused file is stored"
    missing = run_entitle(["pass", "apply", "--from", str(tmp_path / "nope.csv")], env)
    assert missing.returncode == 3 and "no such application file" in missing.stderr


# --------------------------------------------------------------------------- reruns, crashes, late rows


def test_rerunning_intake_and_allocation_changes_nothing(
    ledger_url: str, open_pass_program: Callable[..., PassContext], tmp_path: Path
) -> None:
    rows = synthetic(300, seed=3)
    context = open_pass_program(ledger_url, cap=50)
    batch = write_applications(tmp_path / "b.parquet", rows)
    intake.ingest(context, batch)
    assert intake.ingest(context, batch).already_ingested
    through = NOW - dt.timedelta(hours=1)
    first = pass_allocation.allocate(context, through)
    holders = pass_holders(context)
    again = pass_allocation.allocate(context, through)
    assert first.allocated and not again.allocated
    assert pass_holders(context) == holders and len(holders) == 50
    later = pass_allocation.allocate(context)  # a later window with no applications: stock unchanged
    assert (later.considered, later.granted, later.stock_granted) == (0, 0, 50)
    assert pass_reconciliation.reconcile(context).verdict == "RECONCILED"


def test_a_crash_mid_allocation_leaves_nothing_and_the_rerun_gives_the_exact_result(
    ledger_url: str, open_pass_program: Callable[..., PassContext], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    rows = synthetic(400, seed=4)
    context = open_pass_program(ledger_url, cap=100)
    intake.ingest(context, write_applications(tmp_path / "b.parquet", rows))

    def crash(*_args: object) -> None:
        raise RuntimeError("power cut after the passes were inserted")

    monkeypatch.setattr(pass_allocation, "_advance_stock", crash)
    with pytest.raises(RuntimeError, match="power cut"):
        pass_allocation.allocate(context)
    assert pass_holders(context) == set()
    with context.engine.connect() as connection:
        left = connection.execute(
            sa.text(
                "SELECT (SELECT count(*) FROM pass_allocations), (SELECT count(*) FROM runs), "
                "(SELECT granted FROM pass_programs), "
                "(SELECT count(*) FROM pass_programs WHERE allocated_through IS NULL)"
            )
        ).one()
    assert tuple(left) == (0, 0, 0, 1)

    monkeypatch.undo()
    pass_allocation.allocate(context)
    assert pass_holders(context) == set(serving_order(rows)[:100])
    assert pass_reconciliation.reconcile(context).verdict == "RECONCILED"


def test_an_application_older_than_an_allocated_window_is_refused_as_late(
    open_pass_program: Callable[..., PassContext], tmp_path: Path
) -> None:
    context = open_pass_program(f"sqlite:///{tmp_path / 'l.sqlite'}", cap=2)
    base = OPENS.astimezone(dt.UTC)
    intake.ingest(context, write_applications(tmp_path / "a.parquet", [(1, base + dt.timedelta(minutes=10))]))
    pass_allocation.allocate(context, base + dt.timedelta(hours=1))
    late = intake.ingest(
        context,
        write_applications(
            tmp_path / "b.parquet", [(2, base + dt.timedelta(minutes=5)), (3, base + dt.timedelta(hours=2))]
        ),
    )
    assert late.reasons == {"late": 1} and late.new_applications == 1
    assert pass_allocation.user_status(context, 2)["applied"] is False
    assert pass_allocation.user_status(context, 3)["outcome"] == "pending"
    pass_allocation.allocate(context)
    assert pass_holders(context) == {1, 3}


def test_the_cap_and_validity_cannot_change_once_passes_were_allocated(
    open_pass_program: Callable[..., PassContext], tmp_path: Path
) -> None:
    url = f"sqlite:///{tmp_path / 'l.sqlite'}"
    context = open_pass_program(url, cap=5)
    open_pass_program(url, cap=6)  # before any allocation the stock may still be set
    pass_allocation.allocate(context)
    with pytest.raises(TermsChangedError, match="cannot change once passes were handed out"):
        open_pass_program(url, cap=7)


# --------------------------------------------------------------------------- validity and reminders


@pytest.mark.parametrize(
    ("granted_local", "until_local"),
    [
        (dt.datetime(2023, 1, 31, 10, 0), dt.datetime(2023, 2, 28, 10, 0)),
        (dt.datetime(2024, 1, 31, 23, 30), dt.datetime(2024, 2, 29, 23, 30)),
        (dt.datetime(2023, 12, 15, 0, 0), dt.datetime(2024, 1, 15, 0, 0)),
    ],
)
def test_a_pass_is_valid_one_calendar_month_in_seoul(granted_local: dt.datetime, until_local: dt.datetime) -> None:
    program = load_program()
    granted = granted_local.replace(tzinfo=program.zone)
    assert program.valid_until(granted) == until_local.replace(tzinfo=program.zone)
    assert add_months(granted, 12, program.zone).astimezone(program.zone).year == granted.year + 1


def test_reminders_say_nothing_converts_to_paid(open_pass_program: Callable[..., PassContext], tmp_path: Path) -> None:
    context = open_pass_program(f"sqlite:///{tmp_path / 'l.sqlite'}", cap=3)
    intake.ingest(context, write_applications(tmp_path / "a.parquet", synthetic(5, seed=5)))
    pass_allocation.allocate(context)
    exports = notices.export_reminders(context, days=3)
    assert len(exports) == 1 and exports[0].users == 3
    frame = pl.read_parquet(Path(exports[0].directory) / notices.REMINDER_FILE)
    assert frame["auto_renew"].to_list() == [False] * 3 and frame["converts_to_paid"].to_list() == [False] * 3
    assert set(frame["remind_on"]) == {"2023-02-17"}  # valid until 2023-02-20 21:00 Seoul, minus 3 days
    assert set(frame["notice_key"]) == {notices.NOTICE_KEY}
    assert frame["user_id"].to_list() == sorted(pass_holders(context))
    assert (Path(exports[0].directory) / "notices.json").exists()


# --------------------------------------------------------------------------- CLI and reconciliation breaks


def test_reconcile_exits_8_when_the_counter_disagrees_with_the_ledger(tmp_path: Path) -> None:
    program = tmp_path / "program.toml"
    program.write_text(program_text(2), encoding="utf-8")
    batch = write_applications(tmp_path / "a.parquet", synthetic(4, seed=6))
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_PASS_PROGRAM=str(program))
    assert run_entitle(["pass", "apply", "--from", str(batch)], env).returncode == 0
    allocated = run_entitle(["pass", "allocate", "--json"], env)
    assert allocated.returncode == 0, allocated.stderr
    assert json.loads(allocated.stdout)["granted"] == 2
    ok = run_entitle(["pass", "reconcile", "--json"], env)
    assert ok.returncode == 0 and json.loads(ok.stdout)["verdict"] == "RECONCILED"
    engine = sa.create_engine(f"sqlite:///{tmp_path / 'var' / 'ledger.sqlite'}")
    with engine.begin() as connection:
        connection.execute(sa.text("UPDATE pass_programs SET granted = granted - 1"))
    engine.dispose()
    broken = run_entitle(["pass", "reconcile", "--json"], env)
    assert broken.returncode == 8
    assert json.loads(broken.stdout)["breaks"] == ["counter_mismatch"]
    assert "counter_mismatch (1:" in json.loads(broken.stdout)["explanation"]
    # Every reconciliation is stored for the analysts, newest first.
    listed = run_entitle(["query", "program_reconciliations", "--format", "json"], env)
    assert listed.returncode == 0, listed.stderr
    rows = json.loads(listed.stdout)  # records
    assert [(r["program"], r["verdict"], r["breaks"]) for r in rows] == [
        ("pass", "BREAKS", 1),
        ("pass", "RECONCILED", 0),
    ]
    future = run_entitle(["pass", "allocate", "--through", "2999-01-01T00:00:00+09:00"], env)
    assert future.returncode == 2 and "is in the future" in future.stderr


# --------------------------------------------------------------------------- four processes at once


def test_four_processes_grant_exactly_the_cap_to_the_earliest_applicants(ledger_url: str, tmp_path: Path) -> None:
    """50,000 applications in 4 batches, 4 `entitle` processes ingesting at once, then 4 allocating at once."""
    rows = synthetic(FOUR_PROCESS_APPLICATIONS, seed=7)
    rng = np.random.default_rng(8)
    shuffled = [rows[i] for i in rng.permutation(len(rows))]
    batches = [write_applications(tmp_path / f"batch-{p}.parquet", shuffled[p::PROCESSES]) for p in range(PROCESSES)]
    program = tmp_path / "program.toml"
    program.write_text(program_text(FOUR_PROCESS_CAP), encoding="utf-8")
    env = cli_environment(
        ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_LEDGER_URL=ledger_url, ENTITLE_PASS_PROGRAM=str(program)
    )
    # The schema and program rows first (the explicit register step), so the four processes race on
    # applications, not on DDL.
    with pass_allocation.open_pass(build_settings(tmp_path / "var", ledger_url=ledger_url), load_program(program)) as c:
        pass_allocation.register(c)

    def at_once(commands: list[list[str]]) -> list[subprocess.CompletedProcess[str]]:
        running = [
            subprocess.Popen(
                [str(ENTITLE_SCRIPT), *c], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
            )
            for c in commands
        ]
        finished = []
        for process, command in zip(running, commands, strict=True):
            out, err = process.communicate(timeout=PROCESS_TIMEOUT_S)
            finished.append(subprocess.CompletedProcess(command, process.returncode, out, err))
        return finished

    intakes = at_once([["pass", "apply", "--from", str(b), "--json"] for b in batches])
    assert [r.returncode for r in intakes] == [0] * PROCESSES, [r.stderr for r in intakes]
    assert sum(json.loads(r.stdout)["batches"][0]["new_applications"] for r in intakes) == FOUR_PROCESS_APPLICATIONS

    # Four cut-offs inside the applications' span, allocated by four processes in whatever order
    # the database serializes them: windows are served in order, so the result is the same.
    instants = sorted(a for _, a in rows)
    cutoffs = [instants[len(instants) * q // PROCESSES - 1] for q in range(1, PROCESSES + 1)]
    allocations = at_once([["pass", "allocate", "--through", c.isoformat(), "--json"] for c in cutoffs])
    assert [r.returncode for r in allocations] == [0] * PROCESSES, [r.stderr for r in allocations]
    assert sum(json.loads(r.stdout)["granted"] for r in allocations) == FOUR_PROCESS_CAP

    order = serving_order(rows)
    engine = sa.create_engine(ledger_url)
    with engine.connect() as connection:
        granted = {int(u) for u in connection.execute(sa.text("SELECT user_id FROM grants")).scalars()}
        total = connection.execute(sa.text("SELECT count(*) FROM grants")).scalar_one()
    engine.dispose()
    assert total == len(granted) == FOUR_PROCESS_CAP
    assert granted == set(order[:FOUR_PROCESS_CAP]), "exactly the 10,000 earliest applicants"

    status = json.loads(run_entitle(["pass", "status", "--json"], env).stdout)
    assert (status["granted"], status["remaining"], status["sold_out"], status["pending"]) == (
        FOUR_PROCESS_CAP,
        0,
        FOUR_PROCESS_APPLICATIONS - FOUR_PROCESS_CAP,
        0,
    )
    rerun = run_entitle(["pass", "allocate", "--through", cutoffs[-1].isoformat(), "--json"], env)
    assert json.loads(rerun.stdout)["allocated"] is False
    reconciled = run_entitle(["pass", "reconcile", "--json"], env)
    assert reconciled.returncode == 0, reconciled.stdout
