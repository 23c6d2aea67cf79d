"""What to do after ``make demo``: each step a command that works here, with this demo's paths and a real user.

    python ops/demo_next_steps.py     # ENTITLE_HOME and AIRFLOW_HOME as the Makefile exports them

Airflow's UI, the ledger through ``entitle query``, the reconciliation report, and SQL on the
SQLite ledger. Paths are shown relative to the current folder when they are under it (the
Makefile runs from the project root).
"""

from __future__ import annotations

import os
import shlex
import shutil
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import polars as pl
from sqlalchemy.engine import make_url

from pipeline.config import load_settings

AIRFLOW_URL = "http://127.0.0.1:8080"  # airflow.cfg [api] host and port
AIRFLOW_PASSWORD_FILE = "simple_auth_manager_passwords.json.generated"  # written when Airflow first starts
SMALLER_DEMO = "DEMO_USERS=10000"
LEDGER_SQL = "SELECT item_sku, count(*) AS grants FROM grant_ledger GROUP BY item_sku ORDER BY item_sku"


@dataclass(frozen=True)
class Step:
    """One next step: what it shows, and the command."""

    what: str
    command: str


def shown(path: Path, cwd: Path) -> str:
    """``path`` relative to ``cwd`` when it is under it, else absolute (symbolic links kept as they are)."""
    try:
        return str(path.absolute().relative_to(cwd.absolute()))
    except ValueError:
        return str(path.absolute())


def demo_user(users_file: Path) -> int | None:
    """A user the demo granted: the smallest valid id of its user file (None without the file)."""
    if not users_file.exists():
        return None
    valid = pl.scan_parquet(users_file).filter(pl.col("user_id") > 0).select(pl.col("user_id").min()).collect()
    value = valid.item()
    return None if value is None else int(value)


def next_steps(environ: Mapping[str, str], cwd: Path, entitle: Path) -> list[Step]:
    """The next steps for the demo under ENTITLE_HOME (and AIRFLOW_HOME) of ``environ``."""
    settings = load_settings(environ)
    home = settings.home
    airflow_home = Path(environ.get("AIRFLOW_HOME", str(home / "airflow")))
    cli = shown(entitle, cwd)
    if home.resolve() != (cwd / "var").resolve():  # not the default: the commands must name it
        cli = f"ENTITLE_HOME={shlex.quote(shown(home, cwd))} {cli}"
    password_file = shlex.quote(shown(airflow_home / AIRFLOW_PASSWORD_FILE, cwd))
    steps = [
        Step(f"Airflow's UI on {AIRFLOW_URL} (user admin; Ctrl-C stops it)", "make airflow"),
        Step("its password, once it has started", f"cat {password_file}"),
        Step("the named queries on the ledger", f"{cli} query --list"),
    ]
    user = demo_user(home / "incoming" / "users.parquet")
    if user is not None:
        steps.append(Step(f"the grants of user {user}", f"{cli} query user_grants --param user_id={user}"))
    report_dir = shown(home / "report", cwd)
    steps.append(
        Step(
            f"the latest reconciliation as an HTML page and a PNG chart ({report_dir}/report.html)",
            f"{cli} report --out {shlex.quote(report_dir)}",
        )
    )
    url = make_url(settings.ledger_url)
    if url.get_backend_name() == "sqlite" and url.database:
        ledger_file = shown(Path(url.database), cwd)
        if shutil.which("sqlite3"):
            sql = f"sqlite3 -readonly {shlex.quote(ledger_file)} {shlex.quote(LEDGER_SQL)}"
            steps.append(Step("SQL on the ledger (read only)", sql))
        if shutil.which("duckdb"):
            literal = "'" + ledger_file.replace("'", "''") + "'"
            attach = f"ATTACH {literal} AS ledger (TYPE sqlite, READ_ONLY); "
            query = LEDGER_SQL.replace("FROM grant_ledger", "FROM ledger.grant_ledger")
            steps.append(Step("the same from DuckDB", f"duckdb -c {shlex.quote(attach + query)}"))
    steps.append(Step("start again, e.g. smaller (make clean deletes var/)", f"make clean && make demo {SMALLER_DEMO}"))
    return steps


def main() -> int:
    steps = next_steps(os.environ, Path.cwd(), Path(sys.executable).parent / "entitle")
    print("\nNext steps:")
    for step in steps:
        print(f"  {step.what}:\n    {step.command}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
