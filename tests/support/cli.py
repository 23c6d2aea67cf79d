"""Running the installed ``entitle`` console script the way an operator does."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import shlex
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pipeline.cli import build_parser
from pipeline.ledger import queries
from support import REPO_ROOT

BIN = Path(sys.executable).parent  # the virtualenv's scripts: entitle, airflow
ENTITLE_SCRIPT = BIN / "entitle"

CLI_TIMEOUT_S = 120


def cli_environment(**entitle_vars: str) -> dict[str, str]:
    """The current environment without any ENTITLE_* variable, plus ``entitle_vars``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ENTITLE_")}
    env.update(entitle_vars)
    return env


def run_entitle(args: Sequence[str], env: dict[str, str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    """Run the installed console script and capture its output."""
    return subprocess.run(
        [str(ENTITLE_SCRIPT), *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT_S,
        check=False,
    )


def run_dag(
    env: dict[str, str], conf: dict[str, Any] | None = None, dag_id: str = "entitlement_grant"
) -> tuple[int, dict[str, Any], str]:
    """Run a DAG (default entitlement_grant) once with dag.test; returns exit code, the result line, and stderr."""
    result = subprocess.run(
        [str(BIN / "python"), str(REPO_ROOT / "ops" / "run_dag.py"), dag_id, json.dumps(conf or {})],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    last = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else "{}"
    return result.returncode, json.loads(last), result.stdout[-4000:] + result.stderr[-4000:]


# A word the reader fills in, in a suggested command: FILE, ID, NAME, WHY (also after KEY= in KEY=VALUE).
PLACEHOLDER = re.compile(r"\b[A-Z][A-Z_]*[A-Z]\b")
PLACEHOLDER_VALUE = "1"  # parses wherever a placeholder stands: an id, a path, a name, a reason
BACKTICKED = re.compile(r"`([^`]+)`")


def suggested_commands(message: str) -> list[str]:
    """The `entitle …` commands a message suggests between backticks."""
    return [text for text in BACKTICKED.findall(message) if text.split(" ", 1)[0] == "entitle"]


def parse_suggested(command: str) -> argparse.Namespace:
    """Parse a suggested ``entitle …`` command with the real parser, placeholders filled; AssertionError if it fails.

    A named query must exist and get its required parameters, as ``entitle query`` checks them.
    """
    words = shlex.split(command)
    assert words and Path(words[0]).name == "entitle", f"{command!r} is not an entitle command"
    filled = [PLACEHOLDER.sub(PLACEHOLDER_VALUE, word) for word in words[1:]]
    complaint = io.StringIO()
    try:
        with contextlib.redirect_stderr(complaint), contextlib.redirect_stdout(io.StringIO()):
            args = build_parser().parse_args(filled)
    except SystemExit as exc:
        raise AssertionError(f"{command!r} does not parse (exit {exc.code}): {complaint.getvalue().strip()}") from None
    if args.command == "query" and args.name:
        query = queries.load_query(args.name, "sqlite")
        params = {}
        for item in args.param:
            key, _, value = item.partition("=")
            params[key] = value
        queries.bind_parameters(query, params)
    return args


def run_suggested(command: str, env: dict[str, str], **fill: str) -> subprocess.CompletedProcess[str]:
    """Run a suggested ``entitle …`` command with the installed script, each placeholder replaced by ``fill[NAME]``."""
    parse_suggested(command)
    words = [PLACEHOLDER.sub(lambda m: fill[m.group(0)], word) for word in shlex.split(command)]
    return run_entitle(words[1:], env)
