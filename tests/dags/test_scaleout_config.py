"""The scale-out smoke test's configuration, checked without starting Airflow's services.

`make scaleout-smoke` (ops/scaleout_smoke.py) runs the real deployment; these tests check
what it hands every process (one executor, broker, metadata DB and DAG folder), that
Airflow itself reads that configuration as meant (the Celery provider installed and
chosen), and that bad usage or a missing service exits 2 before anything is touched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from sqlalchemy.engine import Engine, make_url
from support import REPO_ROOT

ROOT = REPO_ROOT
SCRIPT = ROOT / "ops" / "scaleout_smoke.py"
BIN = Path(sys.executable).parent
API_PORT, LOG_PORT = 18123, 18793
Generated = tuple[dict[str, str], Any, Any]  # environment, SmokeConfig, Secrets


@pytest.fixture(scope="module")
def smoke() -> ModuleType:
    spec = importlib.util.spec_from_file_location("scaleout_smoke", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["scaleout_smoke"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def generated(smoke: ModuleType, tmp_path: Path) -> Generated:
    """The environment for a work dir under tmp, built over a caller's environment full of other settings."""
    cfg = smoke.SmokeConfig(work_dir=tmp_path / "scaleout")
    keys = smoke.Secrets.generate()
    caller = {
        "PATH": "/usr/bin:/bin",
        "HOME": str(tmp_path),
        "AIRFLOW_HOME": str(ROOT / "var" / "airflow"),  # what the Makefile exports
        "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": "sqlite:////tmp/other.db",
        "ENTITLE_LEDGER_URL": "sqlite:////tmp/other-ledger.sqlite",
        "ENTITLE_DATA_URI": "s3://someone-elses-bucket/prefix",
    }
    env = smoke.build_environment(cfg, smoke.Ports(api=API_PORT, worker_logs=LOG_PORT), keys, caller)
    return env, cfg, keys


def test_every_process_gets_one_celery_deployment(generated: Generated) -> None:
    env, cfg, keys = generated
    assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert env["AIRFLOW__CELERY__BROKER_URL"] == "redis://127.0.0.1:6379/5"

    metadata = make_url(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"])
    assert (metadata.get_backend_name(), metadata.get_driver_name()) == ("postgresql", "psycopg")
    assert (metadata.host, metadata.port, metadata.database) == ("127.0.0.1", 5432, "entitle_smoke_airflow")
    # Celery keeps its results in the metadata DB; the async engine reaches the same DB through psycopg.
    assert env["AIRFLOW__CELERY__RESULT_BACKEND"] == "db+" + env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    async_url = make_url(env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC"])
    assert async_url.get_driver_name() == "psycopg_async" and async_url.database == metadata.database

    ledger = make_url(env["ENTITLE_LEDGER_URL"])
    assert ledger.get_backend_name() == "postgresql" and ledger.database == "entitle_smoke_ledger"
    assert ledger.database != metadata.database

    assert env["AIRFLOW__CORE__DAGS_FOLDER"] == str(ROOT / "dags")
    assert (Path(env["AIRFLOW__CORE__DAGS_FOLDER"]) / "entitlement_grant.py").is_file()
    assert env["AIRFLOW__CORE__LOAD_EXAMPLES"] == "False"
    assert env["AIRFLOW__API__PORT"] == str(API_PORT)
    assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == f"http://127.0.0.1:{API_PORT}/execution/"
    assert env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] == str(LOG_PORT)
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == keys.jwt_secret and len(keys.jwt_secret) >= 64
    assert env["AIRFLOW__API__SECRET_KEY"] == keys.api_secret_key


def test_nothing_of_the_callers_airflow_or_ledger_leaks_in(generated: Generated) -> None:
    env, cfg, _ = generated
    work_dir = cfg.work_dir
    assert Path(env["AIRFLOW_HOME"]) == work_dir / "airflow"
    assert Path(env["AIRFLOW_HOME"]) != ROOT / "var" / "airflow"
    assert Path(env["ENTITLE_HOME"]) == work_dir / "entitle"
    assert Path(env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]).is_relative_to(work_dir)
    assert "ENTITLE_DATA_URI" not in env
    assert env["ENTITLE_PARTITIONS"] == "8"
    # The worker runs the tasks with the venv's python and finds `entitle` and `airflow` on its PATH.
    first = Path(env["PATH"].split(os.pathsep)[0])
    assert (first / "airflow").exists() and (first / "entitle").exists()


def test_airflow_reads_the_generated_configuration_as_a_celery_deployment(
    generated: Generated,
) -> None:
    """Airflow's own config parser, executor loader and the Celery provider, in a subprocess (no service started)."""
    env, _, _ = generated
    probe = """
import json
from airflow.configuration import conf
from airflow.executors.executor_loader import ExecutorLoader
from airflow.providers.celery.executors.default_celery import get_default_celery_config
celery = get_default_celery_config(conf)
executor = ExecutorLoader.import_default_executor_cls()[0]
print(json.dumps({
    "executor": f"{executor.__module__}.{executor.__name__}",
    "broker": celery["broker_url"],
    "result_backend": celery["result_backend"],
    "dags_folder": conf.get("core", "dags_folder"),
    "sql_alchemy_conn": conf.get("database", "sql_alchemy_conn"),
    "execution_api_server_url": conf.get("core", "execution_api_server_url"),
}))
"""
    result = subprocess.run(
        [str(BIN / "python"), "-c", probe], env=env, capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr[-3000:]
    seen = json.loads(result.stdout.strip().splitlines()[-1])
    assert seen["executor"] == "airflow.providers.celery.executors.celery_executor.CeleryExecutor"
    assert seen["broker"] == env["AIRFLOW__CELERY__BROKER_URL"]
    assert seen["result_backend"] == env["AIRFLOW__CELERY__RESULT_BACKEND"]
    assert seen["dags_folder"] == str(ROOT / "dags")
    assert seen["sql_alchemy_conn"] == env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"]
    assert seen["execution_api_server_url"] == f"http://127.0.0.1:{API_PORT}/execution/"


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "python"), str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_help_describes_the_options_and_exit_codes() -> None:
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for text in ("--users", "--keep", "--json", "--stop", "default 100,000", "CeleryExecutor", "Exit codes"):
        assert text in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--users", "0"],
        ["--users", "many"],
        ["--partitions", "2000"],
        ["--timeout", "-5"],
        ["--broker", "amqp://guest@127.0.0.1:5672//"],
        ["--postgres", "sqlite:///x.db"],
        ["--work-dir", str(ROOT / "var" / "airflow")],
        ["--no-such-option"],
    ],
)
def test_bad_usage_exits_2_before_touching_anything(smoke: ModuleType, tmp_path: Path, args: list[str]) -> None:
    work = tmp_path / "work"
    argv = args if "--work-dir" in args else [*args, "--work-dir", str(work)]
    try:
        code = smoke.main(argv)
    except SystemExit as exc:  # argparse's own refusals
        code = exc.code
    assert code == 2
    assert not work.exists()
    assert not (ROOT / "var" / "airflow" / ".scaleout-smoke.lock").exists()


def test_an_unreachable_postgresql_is_an_environment_problem(tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = run_script("--postgres", "postgresql+psycopg://postgres@127.0.0.1:1", "--work-dir", str(work))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "PostgreSQL at postgresql+psycopg://postgres@127.0.0.1:1 does not answer" in result.stderr
    assert not (work / "airflow").exists()


@pytest.fixture
def pg_server(pg_admin: Engine) -> str:
    """The test PostgreSQL server as a URL without database (skips or fails as conftest says when it is down)."""
    return pg_admin.url.set(database=None).render_as_string(hide_password=False)


def test_an_unreachable_redis_is_an_environment_problem(pg_server: str, tmp_path: Path) -> None:
    work = tmp_path / "work"
    result = run_script("--postgres", pg_server, "--broker", "redis://127.0.0.1:1/5", "--work-dir", str(work))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "Redis at redis://127.0.0.1:1/5 does not answer" in result.stderr


def test_a_folder_that_is_not_its_own_is_never_emptied(tmp_path: Path) -> None:
    work = tmp_path / "work"
    (work / "airflow").mkdir(parents=True)
    precious = work / "airflow" / "precious.txt"
    precious.write_text("keep me")
    result = run_script("--work-dir", str(work))
    assert result.returncode == 2, result.stderr[-2000:]
    assert "not a scale-out smoke work dir" in result.stderr
    assert precious.read_text() == "keep me"


@pytest.fixture
def marked_sleeper(smoke: ModuleType) -> Iterator[tuple[subprocess.Popen[bytes], str]]:
    marker = smoke.Secrets.generate().marker
    env = {**os.environ, smoke.MARKER_VAR: marker}
    proc = subprocess.Popen(["sleep", "60"], env=env)
    # Until the child has exec'd, /proc shows the parent's environment (no marker): wait for it.
    deadline = time.monotonic() + 10
    while smoke.marked_pids(marker) != [proc.pid] and time.monotonic() < deadline:
        time.sleep(0.01)
    try:
        yield proc, marker
    finally:
        proc.kill()
        proc.wait()


def test_the_final_sweep_finds_and_kills_only_this_runs_processes(
    smoke: ModuleType, marked_sleeper: tuple[subprocess.Popen[bytes], str]
) -> None:
    proc, marker = marked_sleeper
    assert smoke.marked_pids(marker) == [proc.pid]
    assert smoke.marked_pids(marker + "0") == []
    assert smoke.kill_marked(marker) == 1
    assert proc.wait(timeout=10) == -9


def test_a_failed_tasks_exception_is_read_from_its_json_log(smoke: ModuleType, tmp_path: Path) -> None:
    """CI keeps the tail of the smoke's output: the failure line itself names the task's exception."""
    error = {
        "exc_type": "LedgerError",
        "exc_value": "duplicate key value violates unique constraint",
        "frames": [
            {"filename": "/x/airflow/sdk/execution_time/task_runner.py", "lineno": 1579, "name": "_run"},
            {"filename": "/x/pipeline/ledger/registry.py", "lineno": 1001, "name": "register_run"},
        ],
    }
    log = tmp_path / "attempt=1.log"
    log.write_text(
        "\n".join(
            [
                json.dumps({"level": "info", "event": "::group::Pre Execute"}),
                "not json: a line some handler wrote",
                json.dumps({"level": "error", "event": "Task failed with exception", "error_detail": [error]}),
            ]
        )
    )
    assert smoke.task_log_errors(log) == [
        "LedgerError: duplicate key value violates unique constraint (at registry.py:1001 in register_run)"
    ]
