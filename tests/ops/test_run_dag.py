"""ops/run_dag.py as `make demo` runs it: the DAG's progress on the terminal, Airflow's log in a file.

The progress line is checked on its own (ops/dag_progress.py takes plain rows), and once on a
real ``dag.test`` run of entitlement_grant, whose mapped grant task instances count one each.
"""

from __future__ import annotations

import json
import re
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from support import REPO_ROOT
from support.cli import BIN
from support.ops import load_ops
from support.settings import DAG_TEST_PARTITIONS

from pipeline.grants.demo_users import write_demo_users

progress = load_ops("dag_progress")

# The task instances of an entitlement_grant run part-way: of 4 partitions, 2 granted, 1 failed, 1 running.
PART_WAY = [
    ("freeze_snapshot", -1, "success"),
    ("plan_partitions", -1, "success"),
    ("grant", 0, "success"),
    ("grant", 1, "success"),
    ("grant", 2, "failed"),
    ("grant", 3, "running"),
    ("reconcile", -1, None),
    ("notify", -1, None),
    ("summary", -1, None),
]


def test_progress_counts_each_mapped_task_instance() -> None:
    text = progress.progress_text("entitlement_grant", PART_WAY)
    assert text == "entitlement_grant: 5/9 task instances done (grant 3/4), 1 failed; running: grant"
    before_expansion = [("freeze_snapshot", -1, "running"), ("grant", -1, None), ("summary", -1, None)]
    assert progress.progress_text("entitlement_grant", before_expansion) == (
        "entitlement_grant: 0/3 task instances done; running: freeze_snapshot"
    )
    assert [progress.elapsed_text(s) for s in (7, 65, 3_725)] == ["7s", "1m05s", "1h02m"]


def wait_until(condition: Callable[[], bool], timeout_s: float = 5.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.01)


def test_the_reporter_writes_a_line_when_something_changed() -> None:
    clock = [0.0]
    states = [[("grant", 0, "running"), ("grant", 1, None)]]
    lines: list[str] = []
    reporter = progress.ProgressReporter(
        "d", lambda: states[0], lines.append, interval_s=0.01, quiet_line_s=100, clock=lambda: clock[0]
    )
    reporter.start()
    wait_until(lambda: len(lines) == 1)
    clock[0] = 5.0
    states[0] = [("grant", 0, "success"), ("grant", 1, "running")]
    wait_until(lambda: len(lines) == 2)
    time.sleep(0.1)  # ten more polls of the same states: no new line
    assert len(lines) == 2, lines
    states[0] = [("grant", 0, "success"), ("grant", 1, "success")]
    clock[0] = 65.0
    final = reporter.finish("run success")
    assert lines[0] == "d: 0/2 task instances done (grant 0/2); running: grant [0s]"
    assert lines[1] == "d: 1/2 task instances done (grant 1/2); running: grant [5s]"
    assert final == lines[-1] == "d: 2/2 task instances done (grant 2/2) in 1m05s: run success"


def test_the_reporter_says_it_is_alive_after_a_quiet_while() -> None:
    clock = [0.0]
    lines: list[str] = []
    reporter = progress.ProgressReporter(
        "d", lambda: [("t", -1, "running")], lines.append, interval_s=0.01, quiet_line_s=30, clock=lambda: clock[0]
    )
    reporter.start()
    wait_until(lambda: len(lines) == 1)
    clock[0] = 31.0
    wait_until(lambda: len(lines) == 2)
    reporter.stop()
    assert lines == ["d: 0/1 task instances done; running: t [0s]", "d: 0/1 task instances done; running: t [31s]"]


def test_a_failing_read_skips_a_line_and_never_stops_the_run() -> None:
    def broken() -> list[tuple[str, int, str | None]]:
        raise RuntimeError("database is locked")

    lines: list[str] = []
    reporter = progress.ProgressReporter("d", broken, lines.append, interval_s=0.01)
    reporter.start()
    time.sleep(0.1)
    assert reporter.finish("run success") == "d: 0/0 task instances done in 0s: run success"
    assert lines == ["d: 0/0 task instances done in 0s: run success"]


@pytest.mark.airflow
@pytest.mark.slow
def test_make_demo_shows_progress_and_logs_to_the_file(airflow_env: dict[str, str], tmp_path: Path) -> None:
    env = {**airflow_env, "ENTITLE_HOME": str(tmp_path / "var")}
    users = tmp_path / "var" / "incoming" / "users.parquet"
    write_demo_users(2_000, users)
    log = tmp_path / "demo-run.log"
    command = [str(BIN / "python"), str(REPO_ROOT / "ops" / "run_dag.py"), "--log", str(log), "--progress"]
    result = subprocess.run(
        [*command, "entitlement_grant", json.dumps({"snapshot_uri": str(users)})],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert result.returncode == 0, log.read_text(encoding="utf-8")[-4000:] if log.exists() else result.stderr
    assert result.stdout == "", "everything but the progress goes to the log file"
    lines = result.stderr.splitlines()
    parts = DAG_TEST_PARTITIONS
    total = parts + 5  # freeze_snapshot, plan_partitions, one grant per partition, reconcile, notify, summary
    final = rf"entitlement_grant: {total}/{total} task instances done \(grant {parts}/{parts}\)"
    assert re.fullmatch(final + r" in \d+s: run success", lines[-1]), lines
    for line in lines[:-1]:
        assert re.fullmatch(r"entitlement_grant: \d+/\d+ task instances done.* \[\d+s\]", line), line
    logged = log.read_text(encoding="utf-8")
    assert "[DAG TEST] starting task_id=grant" in logged, "Airflow's own log is in the file"
    outcome = json.loads(logged.strip().splitlines()[-1])
    assert (outcome["dag_id"], outcome["state"]) == ("entitlement_grant", "success")
