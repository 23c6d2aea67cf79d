"""ops/demo_next_steps.py: the next steps `make demo` prints are commands that work, run here as printed."""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from support import REPO_ROOT
from support.cli import BIN, cli_environment, parse_suggested, run_entitle
from support.ops import load_ops

from pipeline.grants.demo_users import write_demo_users

USERS = 3_000


next_steps = load_ops("demo_next_steps")


def demo_ledger(home: Path) -> None:
    """What `make demo` leaves behind, in small: its user file granted and reconciled."""
    users = home / "incoming" / "users.parquet"
    write_demo_users(USERS, users)
    env = cli_environment(ENTITLE_HOME=str(home), ENTITLE_PARTITIONS="2")
    assert run_entitle(["run", "--users", str(users), "--no-progress"], env).returncode == 0
    assert run_entitle(["reconcile", "--no-progress"], env).returncode == 0


def run_in_shell(command: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """The command as a person pastes it into a shell in ``cwd`` (no ENTITLE_* set)."""
    return subprocess.run(
        ["bash", "-c", command], cwd=cwd, env=cli_environment(), capture_output=True, text=True, timeout=120
    )


@pytest.mark.parametrize("home_at", ["var", "elsewhere/home"])
def test_every_next_step_works_as_printed(tmp_path: Path, home_at: str) -> None:
    cwd = tmp_path / "project"
    cwd.mkdir()
    home = tmp_path / home_at if home_at != "var" else cwd / "var"
    demo_ledger(home)
    environ = {"ENTITLE_HOME": str(home), "AIRFLOW_HOME": str(home / "airflow")}
    steps = next_steps.next_steps(environ, cwd, BIN / "entitle")
    ran = 0
    for step in steps:
        if step.command.startswith("make "):  # not run here (a server; a whole demo): the targets exist
            for part in step.command.split(" && "):
                dry = subprocess.run(
                    ["make", "-n", "-C", str(REPO_ROOT), *shlex.split(part)[1:]], capture_output=True, text=True
                )
                assert dry.returncode == 0, (part, dry.stderr)
            continue
        words = shlex.split(step.command)
        if words[0] == "cat":  # Airflow writes it when `make airflow` first starts
            assert cwd / words[1] == home / "airflow" / "simple_auth_manager_passwords.json.generated"
            continue
        program = [w for w in words if not w.startswith("ENTITLE_HOME=")]
        if Path(program[0]).name == "entitle":
            parse_suggested(shlex.join(["entitle", *program[1:]]))
        result = run_in_shell(step.command, cwd)
        assert result.returncode == 0, (step.command, result.stderr)
        assert "error" not in result.stderr, (step.command, result.stderr)
        ran += 1
        if "user_grants" in step.command:
            assert "(5 rows)" in result.stdout, result.stdout
        if words[0] == "sqlite3":
            assert len(result.stdout.splitlines()) == 5 and f"|{USERS}" in result.stdout, result.stdout
    assert ran >= 4
    assert (home / "report" / "report.html").exists(), "the report step wrote the page"
    prefixed = [s.command for s in steps if "entitle " in s.command and "make" not in s.command]
    if home_at == "var":
        assert all(not c.startswith("ENTITLE_HOME=") for c in prefixed), prefixed
    else:
        assert all(c.startswith(f"ENTITLE_HOME={home} ") for c in prefixed), prefixed
    if shutil.which("sqlite3"):
        assert any(s.command.startswith("sqlite3 -readonly") for s in steps)
