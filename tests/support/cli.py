"""Running the installed ``entitle`` console script the way an operator does."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

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
