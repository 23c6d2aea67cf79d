"""Every command a message suggests works: it parses with the real parser, and following it fixes the problem.

The scan reads every string of ``pipeline/`` (docstrings aside) for an ``entitle …`` command
between backticks, or after a colon at the end of a line (``then: entitle grant --only-failed``),
and every constant named ``*_COMMAND`` (messages put them between backticks). It parses each
with :func:`pipeline.cli.build_parser`, placeholders (FILE, ID, NAME, WHY) filled in. The other
tests put operators in the situation a message is written for, run the command it names, and
check that the problem is gone.
"""

from __future__ import annotations

import ast
import json
import re
import shutil
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import polars as pl
import pytest
from support import REPO_ROOT
from support.cli import cli_environment, parse_suggested, run_entitle, run_suggested, suggested_commands
from support.settings import ITEMS_PER_USER

TRAILING = re.compile(r"(?:^|:\s)(entitle [a-z][^;:()`\"\n]*?)\s*$")  # "... then: entitle grant --only-failed"

USERS = list(range(70_000_000, 70_000_400))


def message_texts(source: str) -> Iterator[tuple[int, str]]:
    """Every string literal of a module but its docstrings, an f-string's fields as the word VALUE."""
    tree = ast.parse(source)
    docstrings = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                docstrings.add(id(first.value))
    parts = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.JoinedStr):
            parts.update(id(value) for value in node.values)
            text = "".join(v.value if isinstance(v, ast.Constant) else "VALUE" for v in node.values)
            yield node.lineno, text
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            if id(node) not in docstrings and id(node) not in parts:
                yield node.lineno, node.value


def suggestions(source: str) -> list[tuple[int, str]]:
    """(line, command) for each ``entitle …`` command the module's messages suggest, and each ``*_COMMAND``."""
    found = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, str):
            if any(isinstance(t, ast.Name) and t.id.endswith("_COMMAND") for t in node.targets):
                found.add((node.lineno, node.value.value))
    for line, text in message_texts(source):
        found.update((line, command) for command in suggested_commands(text))
        found.update((line, match.group(1)) for match in TRAILING.finditer(text))
    return sorted(found)


def refusal(command: str) -> str | None:
    """Why a suggested command does not parse (None: it does)."""
    try:
        parse_suggested(command)
    except Exception as exc:  # noqa: BLE001 - every kind of refusal is reported the same way
        return str(exc).splitlines()[-1]
    return None


def test_every_command_a_message_suggests_parses() -> None:
    bad, found = [], 0
    for path in sorted((REPO_ROOT / "pipeline").rglob("*.py")):
        relative = path.relative_to(REPO_ROOT).as_posix()
        for line, command in suggestions(path.read_text(encoding="utf-8")):
            found += 1
            why = refusal(command)
            if why is not None:
                bad.append(f"{relative}:{line}: {command!r}: {why}")
    assert found > 40, "the scan finds the messages' commands"
    assert not bad, "\n".join(bad)


def test_the_scan_catches_a_command_that_does_not_parse() -> None:
    source = (
        '"""`entitle repair` in a docstring is not a message."""\n'
        "def f(n):\n"
        '    raise ValueError(f"{n} breaks; `entitle repair` fixes them; `entitle void --user {n}` too")\n'
        'LINES = ["fix the cause, then: entitle grant --only-faild", "`entitle query nosuch`", "`entitle grant`"]\n'
        'FIX_COMMAND = "entitle repair --actor NAME"\n'
    )
    found = sorted(command for _line, command in suggestions(source))
    assert found == [
        "entitle grant",
        "entitle grant --only-faild",
        "entitle query nosuch",
        "entitle repair",
        "entitle repair --actor NAME",
        "entitle void --user VALUE",
    ]
    refused = [command for command in found if refusal(command) is not None]
    assert refused == [
        "entitle grant --only-faild",
        "entitle query nosuch",
        "entitle repair",
        "entitle void --user VALUE",
    ]


# --------------------------------------------------------------------------- following the advice


def granted_home(tmp_path: Path) -> tuple[dict[str, str], Path, Path]:
    """`entitle run` over USERS in 4 partitions: the environment, the user file and the partitions folder."""
    users_file = tmp_path / "users.parquet"
    pl.DataFrame({"user_id": USERS}, schema={"user_id": pl.Int64}).write_parquet(users_file)
    env = cli_environment(ENTITLE_HOME=str(tmp_path / "var"), ENTITLE_PARTITIONS="4", ENTITLE_RECONCILE_WORKERS="1")
    ran = run_entitle(["run", "--users", str(users_file), "--json", "--no-progress"], env)
    assert ran.returncode == 0, ran.stderr
    return env, users_file, Path(json.loads(ran.stdout)["snapshot"]["partitions_dir"])


def the_one_suggestion(stderr: str) -> str:
    commands = suggested_commands(stderr)
    assert len(commands) == 1, stderr
    return commands[0]


@pytest.mark.parametrize("damage", ["delete the folder", "corrupt the manifest"])
def test_partitions_that_cannot_be_read_name_the_command_that_writes_them_again(tmp_path: Path, damage: str) -> None:
    env, users_file, partitions = granted_home(tmp_path)
    if damage == "delete the folder":
        shutil.rmtree(partitions)
    else:
        (partitions / "manifest.parquet").write_bytes(b"not parquet")

    for args in (["reconcile", "--no-progress"], ["grant", "--no-progress"], ["deliver", "--no-progress"]):
        refused = run_entitle(args, env)
        assert refused.returncode == 4, (args, refused.stderr)
        assert "its partitions cannot be read" in refused.stderr and "Traceback" not in refused.stderr
        command = the_one_suggestion(refused.stderr)
        assert command == f"entitle run --users {users_file}", refused.stderr

    followed = run_suggested(command, env)
    assert followed.returncode == 0, followed.stderr
    assert "0 grants written, 2,000 already present" in followed.stdout
    reconciled = run_entitle(["reconcile", "--json", "--no-progress"], env)
    assert reconciled.returncode == 0, reconciled.stderr
    assert json.loads(reconciled.stdout)["bridge"]["matched"] == len(USERS) * ITEMS_PER_USER


def test_when_the_user_file_is_gone_too_the_advice_says_to_put_it_back(tmp_path: Path) -> None:
    env, users_file, partitions = granted_home(tmp_path)
    shutil.rmtree(partitions)
    kept = users_file.rename(tmp_path / "kept.parquet")
    refused = run_entitle(["reconcile", "--no-progress"], env)
    assert refused.returncode == 4, refused.stderr
    assert f"Its user file {users_file} is gone too: put it back" in refused.stderr
    kept.rename(users_file)
    assert run_suggested(the_one_suggestion(refused.stderr), env).returncode == 0
    assert run_entitle(["reconcile", "--no-progress"], env).returncode == 0


def test_a_changed_partition_file_names_the_folder_to_delete_and_the_command(tmp_path: Path) -> None:
    env, users_file, partitions = granted_home(tmp_path)
    changed = partitions / "part-0001.parquet"
    frame = pl.read_parquet(changed)
    frame.head(frame.height - 1).write_parquet(changed)  # one user fewer: the manifest's count no longer holds
    failed = run_entitle(["grant", "--verify", "--json", "--no-progress"], env)
    assert failed.returncode == 7, failed.stderr
    error = json.loads(failed.stdout)["failed_partitions"][0]["error"]
    assert f"Delete the folder {partitions}, then write it again" in error
    command = the_one_suggestion(error)
    assert command == "entitle run --users FILE"

    shutil.rmtree(partitions)
    followed = run_suggested(command, env, FILE=str(users_file))
    assert followed.returncode == 0, followed.stderr
    status = json.loads(run_entitle(["status", "--json"], env).stdout)
    assert (status["done"], status["failed"]) == (4, 0)


def test_the_commands_a_breaks_verdict_names_correct_the_breaks(tmp_path: Path) -> None:
    env, _users_file, _partitions = granted_home(tmp_path)
    # A grant deleted behind the pipeline's back (missing), and a user granted but no longer
    # in the snapshot (unexpected): a second run over the file without the last user.
    with sqlite3.connect(tmp_path / "var" / "ledger.sqlite") as connection:
        connection.execute("DROP TRIGGER grants_append_only_delete")
        connection.execute("DELETE FROM grants WHERE user_id = ? AND item_key = 1", (USERS[1],))
    fewer = tmp_path / "fewer.parquet"
    pl.DataFrame({"user_id": USERS[:-1]}, schema={"user_id": pl.Int64}).write_parquet(fewer)
    assert run_entitle(["run", "--users", str(fewer), "--no-progress"], env).returncode == 0

    broken = run_entitle(["reconcile", "--no-progress"], env)
    assert broken.returncode == 8, broken.stderr
    assert broken.stderr.startswith("entitle: error: BREAKS: 6 open breaks: 1 missing, 5 unexpected"), broken.stderr
    repair, void = suggested_commands(broken.stderr)[1:3]
    assert (repair, void) == ("entitle repair --actor NAME", "entitle void --break ID --reason WHY --actor NAME")
    unexpected = json.loads(
        run_entitle(["query", "open_breaks", "--param", "break_class=unexpected", "--json"], env).stdout
    )
    assert [b["user_id"] for b in unexpected] == [USERS[-1]] * ITEMS_PER_USER
    details = {b["detail"] for b in unexpected}
    assert all(void in detail for detail in details), details
    for found in unexpected:
        voided = run_suggested(void, env, ID=found["break_id"], WHY="left the campaign", NAME="ops-kim")
        assert voided.returncode == 0, voided.stderr
    repaired = run_suggested(repair, env, NAME="ops-kim")
    assert repaired.returncode == 0, repaired.stderr
    assert "RECONCILED" in repaired.stdout


def test_a_void_without_a_grant_names_the_repair_command(tmp_path: Path) -> None:
    env, _users_file, _partitions = granted_home(tmp_path)
    with sqlite3.connect(tmp_path / "var" / "ledger.sqlite") as connection:
        connection.execute("DROP TRIGGER grants_append_only_delete")
        connection.execute("DELETE FROM grants WHERE user_id = ? AND item_key = 1", (USERS[2],))
    assert run_entitle(["reconcile", "--no-progress"], env).returncode == 8
    (missing,) = json.loads(run_entitle(["query", "open_breaks", "--json"], env).stdout)
    refused = run_entitle(["void", "--break", missing["break_id"], "--reason", "x", "--actor", "cs"], env)
    assert refused.returncode == 5 and "there is no grant to void" in refused.stderr, refused.stderr
    repaired = run_suggested(the_one_suggestion(refused.stderr), env, NAME="cs")
    assert repaired.returncode == 0, repaired.stderr
