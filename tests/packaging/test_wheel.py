"""The wheel installs and runs outside the checkout: package data, migrations and the CLI.

The project is copied (no .git, .venv or var), built into a wheel, and installed into a
fresh virtualenv in a temporary folder; its dependencies come from the package index at the
versions of requirements.lock (pip's cache makes this quick after the first time). Then the
installed ``entitle`` migrates an empty ledger and grants a small user file there, from a
working directory that is not the checkout, and the test reads the result with SQL.
"""

from __future__ import annotations

import json
import os
import shutil
import sqlite3
import subprocess
import sys
import venv
from pathlib import Path

import pytest
from support import REPO_ROOT

ROOT = REPO_ROOT
LOCK = ROOT / "requirements.lock"
INSTALL_TIMEOUT_S = 900
RUN_TIMEOUT_S = 300
USERS = 3_000
ITEMS_PER_USER = 5

pytestmark = pytest.mark.slow


def _run(command: list[str], cwd: Path, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False)
    assert result.returncode == 0, f"{' '.join(command)} exited {result.returncode}:\n{result.stdout}\n{result.stderr}"
    return result


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh virtualenv outside the checkout with the project's wheel installed; (its bin, env)."""
    work = tmp_path_factory.mktemp("wheel")
    source = work / "source"
    shutil.copytree(
        ROOT,
        source,
        ignore=shutil.ignore_patterns(".git", ".venv", "var", "build", "*.egg-info", "__pycache__", ".*_cache"),
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PYTHON", "ENTITLE_", "VIRTUAL_ENV"))}
    dist = work / "dist"
    _run(
        [sys.executable, "-m", "pip", "wheel", "--quiet", "--no-deps", "-w", str(dist), "."],
        source,
        env,
        INSTALL_TIMEOUT_S,
    )
    wheels = sorted(dist.glob("entitle-*.whl"))
    assert len(wheels) == 1, f"expected one wheel in {dist}, found {wheels}"
    target = work / "venv"
    venv.EnvBuilder(with_pip=True).create(target)
    bin_dir = target / "bin"
    _run(
        [str(bin_dir / "python"), "-m", "pip", "install", "--quiet", "-c", str(LOCK), str(wheels[0])],
        work,
        env,
        INSTALL_TIMEOUT_S,
    )
    shutil.rmtree(source)  # nothing of the checkout is left to lean on
    return bin_dir, env


def test_the_wheel_holds_the_package_data(installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, env = installed
    probe = (
        "import json, importlib.resources as r, pipeline;"
        "names = ['pipeline.sql', 'pipeline.json_schemas', 'pipeline.ledger.migrations', 'pipeline.campaigns'];"
        "print(json.dumps({'package': pipeline.__file__,"
        " 'files': {n: sorted(p.name for p in r.files(n).iterdir()) for n in names},"
        " 'typed': r.files('pipeline').joinpath('py.typed').is_file()}))"
    )
    found = json.loads(_run([str(bin_dir / "python"), "-c", probe], tmp_path, env, RUN_TIMEOUT_S).stdout)
    assert Path(found["package"]).is_relative_to(bin_dir.parent), f"pipeline imported from {found['package']}"
    assert found["typed"], "py.typed is missing from the wheel"
    files = found["files"]
    assert {"postgresql", "sqlite", "queries"} <= set(files["pipeline.sql"])
    assert {"snapshot.json", "partition.json", "manifest.json"} <= set(files["pipeline.json_schemas"])
    assert {"env.py", "script.py.mako", "sql", "versions"} <= set(files["pipeline.ledger.migrations"])
    assert "kakao_outage_2022.toml" in files["pipeline.campaigns"]


def test_installed_entitle_migrates_and_grants(installed: tuple[Path, dict[str, str]], tmp_path: Path) -> None:
    bin_dir, base_env = installed
    entitle = str(bin_dir / "entitle")
    env = {**base_env, "ENTITLE_HOME": str(tmp_path / "var")}
    upgraded = json.loads(_run([entitle, "db", "upgrade", "--json"], tmp_path, env, RUN_TIMEOUT_S).stdout)
    assert upgraded["to_version"] >= 11
    users = tmp_path / "users.parquet"
    _run([entitle, "demo-users", "--count", str(USERS), "--out", str(users)], tmp_path, env, RUN_TIMEOUT_S)
    _run([entitle, "run", "--users", str(users), "--no-progress"], tmp_path, env, RUN_TIMEOUT_S)
    again = json.loads(_run([entitle, "run", "--users", str(users), "--json"], tmp_path, env, RUN_TIMEOUT_S).stdout)
    with sqlite3.connect(tmp_path / "var" / "ledger.sqlite") as connection:
        grants, granted_users = connection.execute("SELECT count(*), count(DISTINCT user_id) FROM grants").fetchone()
    assert grants == granted_users * ITEMS_PER_USER
    assert USERS * 0.99 < granted_users <= USERS, "the demo file has a few bad rows, quarantined"
    assert json.dumps(again).count('"written": 0') >= 1, "a second run writes nothing"
    checked = json.loads(_run([entitle, "reconcile", "--json"], tmp_path, env, RUN_TIMEOUT_S).stdout)
    assert checked["verdict"] == "RECONCILED"
    coverage = json.loads(_run([entitle, "query", "coverage", "--json"], tmp_path, env, RUN_TIMEOUT_S).stdout)
    rows = coverage  # one array of records
    assert len(rows) == ITEMS_PER_USER and {r["granted"] for r in rows} == {granted_users}
