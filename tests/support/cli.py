"""Running the installed ``entitle`` console script the way an operator does."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

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
