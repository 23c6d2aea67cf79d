"""The scale-out smoke test's configuration, checked without starting Airflow's services.

`make scaleout-smoke` (ops/scaleout_smoke.py) runs the real deployment; these tests check
what it hands every process (one executor, broker, metadata DB, DAG folder and S3 data URI),
that each Celery worker has homes, logs and a name of its own and shares nothing else, that
Airflow itself reads that configuration as meant (the Celery provider chosen, the lost-worker
heartbeat timeout, a retry for the grant task), that the kill reaches a worker's whole process
tree, and that bad usage or a missing service exits 2 before anything is touched.
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
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
API_PORT, S3_PORT, LOG_PORTS = 18123, 18124, (18793, 18794, 18795)
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
        "ENTITLE_WORKER_NAME": "someone-else",
        "AWS_ACCESS_KEY_ID": "callers-real-key",
        "AWS_SECRET_ACCESS_KEY": "callers-real-secret",
        "AWS_PROFILE": "production",
    }
    env = smoke.build_environment(cfg, ports(smoke), keys, caller)
    return env, cfg, keys


def ports(smoke: ModuleType) -> Any:
    return smoke.Ports(api=API_PORT, s3=S3_PORT, worker_logs=LOG_PORTS)


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
    assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == keys.jwt_secret and len(keys.jwt_secret) >= 64
    assert env["AIRFLOW__API__SECRET_KEY"] == keys.api_secret_key

    # Snapshots and partitions on the S3 server the smoke starts, with the object-store settings pipeline reads.
    assert env["ENTITLE_DATA_URI"] == "s3://entitle-smoke/data"
    assert env["ENTITLE_S3_ENDPOINT_URL"] == f"http://127.0.0.1:{S3_PORT}"
    assert env["AWS_REGION"] and env["AWS_ACCESS_KEY_ID"] and env["AWS_SECRET_ACCESS_KEY"]
    # A lost worker is detected after 30 s without a heartbeat (checked every 5 s) and retried once.
    assert env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT"] == "30"
    assert env["AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL"] == "5"
    assert env["AIRFLOW__CORE__DEFAULT_TASK_RETRIES"] == "1"


def test_nothing_of_the_callers_airflow_or_ledger_leaks_in(generated: Generated) -> None:
    env, cfg, _ = generated
    work_dir = cfg.work_dir
    assert Path(env["AIRFLOW_HOME"]) == work_dir / "airflow"
    assert Path(env["AIRFLOW_HOME"]) != ROOT / "var" / "airflow"
    assert Path(env["ENTITLE_HOME"]) == work_dir / "entitle"
    assert Path(env["AIRFLOW__LOGGING__BASE_LOG_FOLDER"]).is_relative_to(work_dir)
    assert env["ENTITLE_DATA_URI"] == cfg.data_uri != "s3://someone-elses-bucket/prefix"
    assert env["AWS_ACCESS_KEY_ID"] != "callers-real-key" and "AWS_PROFILE" not in env
    assert "ENTITLE_WORKER_NAME" not in env
    assert env["ENTITLE_PARTITIONS"] == "12"
    # The worker runs the tasks with the venv's python and finds `entitle` and `airflow` on its PATH.
    first = Path(env["PATH"].split(os.pathsep)[0])
    assert (first / "airflow").exists() and (first / "entitle").exists()


def test_each_worker_has_its_own_homes_logs_and_name_and_shares_nothing_else(
    smoke: ModuleType, generated: Generated
) -> None:
    env, cfg, _ = generated
    assert cfg.worker_names == ("worker-1", "worker-2", "worker-3")
    own = {
        "AIRFLOW_HOME",
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT",
        "ENTITLE_HOME",
        "ENTITLE_WORKER_NAME",
    }
    workers = {name: smoke.worker_environment(cfg, ports(smoke), env, name) for name in cfg.worker_names}
    for name, worker in workers.items():
        assert set(worker) == set(env) | {"ENTITLE_WORKER_NAME"}
        assert {k: v for k, v in worker.items() if k not in own} == {k: v for k, v in env.items() if k not in own}
        assert worker["ENTITLE_WORKER_NAME"] == name
        home = cfg.worker_home(name)
        assert home.parent == cfg.work_dir / "workers"
        for key in ("AIRFLOW_HOME", "AIRFLOW__LOGGING__BASE_LOG_FOLDER", "ENTITLE_HOME"):
            assert Path(worker[key]).is_relative_to(home)
    for key in own:
        assert len({w[key] for w in workers.values()}) == len(workers), key
    for key in own - {"AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"}:  # the services read worker-1's log port
        assert env.get(key) not in {w[key] for w in workers.values()}, key
    homes = [Path(w["ENTITLE_HOME"]) for w in workers.values()] + [Path(env["ENTITLE_HOME"])]
    assert not any(a != b and a.is_relative_to(b) for a in homes for b in homes)

    # What a task on worker-2 sees through the pipeline's composition root: its home, S3, its name.
    from pipeline.config import load_settings
    from pipeline.storage import ObjectUri

    settings = load_settings(workers["worker-2"])
    assert settings.home == cfg.worker_home("worker-2") / "entitle"
    assert settings.worker == f"worker-2:{os.getpid()}"
    assert isinstance(settings.data_root, ObjectUri) and str(settings.data_root) == "s3://entitle-smoke/data"
    assert settings.object_store.endpoint_url == f"http://127.0.0.1:{S3_PORT}"
    assert make_url(settings.ledger_url).database == "entitle_smoke_ledger"

    commands = smoke.process_commands(cfg, ports(smoke))
    assert list(commands) == ["s3", "api-server", "scheduler", "dag-processor", *cfg.worker_names]
    assert commands["s3"][0] == str(BIN / "moto_server") and str(S3_PORT) in commands["s3"]
    assert (BIN / "moto_server").exists()
    hostnames = [c[c.index("--celery-hostname") + 1] for n, c in commands.items() if n in cfg.worker_names]
    assert hostnames == ["worker-1@%h", "worker-2@%h", "worker-3@%h"]


def test_airflow_reads_the_generated_configuration_as_a_celery_deployment(
    generated: Generated,
) -> None:
    """Airflow's own config parser, executor loader and the Celery provider, in a subprocess (no service started)."""
    env, _, _ = generated
    probe = """
import json
import importlib.util, sys
from airflow.configuration import conf
from airflow.executors.executor_loader import ExecutorLoader
from airflow.providers.celery.executors.default_celery import get_default_celery_config
celery = get_default_celery_config(conf)
dags = conf.get("core", "dags_folder")
sys.path.insert(0, dags)  # as Airflow parses the file (without a metadata DB, which this probe has not)
spec = importlib.util.spec_from_file_location("entitlement_grant", dags + "/entitlement_grant.py")
dag_file = importlib.util.module_from_spec(spec)
spec.loader.exec_module(dag_file)
executor = ExecutorLoader.import_default_executor_cls()[0]
print(json.dumps({
    "executor": f"{executor.__module__}.{executor.__name__}",
    "broker": celery["broker_url"],
    "result_backend": celery["result_backend"],
    "dags_folder": conf.get("core", "dags_folder"),
    "sql_alchemy_conn": conf.get("database", "sql_alchemy_conn"),
    "execution_api_server_url": conf.get("core", "execution_api_server_url"),
    "heartbeat_timeout": conf.getint("scheduler", "task_instance_heartbeat_timeout"),
    "heartbeat_check": conf.getfloat("scheduler", "task_instance_heartbeat_timeout_detection_interval"),
    "min_heartbeat_interval": conf.getint("workers", "min_heartbeat_interval"),
    "grant_retries": dag_file.entitlement_grant_dag.get_task("grant").retries,
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
    # The scheduler fails a task instance 30 s after its supervisor's last heartbeat (sent every 5 s);
    # the grant task, parsed as the dag-processor parses it, has the retry that then runs elsewhere.
    assert (seen["heartbeat_timeout"], seen["heartbeat_check"], seen["min_heartbeat_interval"]) == (30, 5.0, 5)
    assert seen["grant_retries"] == 1


def run_script(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(BIN / "python"), str(SCRIPT), *args], capture_output=True, text=True, timeout=120, check=False
    )


def test_help_describes_the_options_and_exit_codes() -> None:
    result = run_script("--help")
    assert result.returncode == 0, result.stderr
    for text in ("--users", "--workers", "--keep", "--json", "--stop", "default 1,000,000", "SIGKILL", "Exit codes"):
        assert text in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["--users", "0"],
        ["--users", "many"],
        ["--partitions", "2000"],
        ["--workers", "1"],
        ["--workers", "9"],
        ["--partitions", "2"],
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


def test_the_kill_reaches_every_process_of_a_workers_tree(smoke: ModuleType) -> None:
    """As a lost machine: the worker, and its task process although that runs in a process group of its own."""
    marker = smoke.Secrets.generate().marker
    script = (
        "import subprocess, sys, time\n"
        "subprocess.Popen(['sleep', '60'], start_new_session=True)\n"
        "print('started', flush=True)\n"
        "time.sleep(60)\n"
    )
    worker = subprocess.Popen(
        [sys.executable, "-c", script],
        env={**os.environ, smoke.MARKER_VAR: marker},
        stdout=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert worker.stdout is not None and worker.stdout.readline().strip() == b"started"
        tree = smoke.process_tree(worker.pid)
        assert len(tree) == 2 and tree[0] == worker.pid
        task = tree[1]
        assert os.getpgid(task) != os.getpgid(worker.pid), "the task runs in its own process group"
        frozen = smoke.freeze_tree(worker.pid)
        assert sorted(frozen) == sorted(tree)
        for pid in frozen:
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[0] != "T":
                assert time.monotonic() < deadline, f"{pid} not stopped"
                time.sleep(0.01)
        smoke.signal_all(frozen, signal.SIGKILL)
        assert worker.wait(timeout=10) == -signal.SIGKILL
        deadline = time.monotonic() + 10
        while smoke.marked_pids(marker):  # the orphaned task process, reaped by init
            assert time.monotonic() < deadline, "the task process survived"
            time.sleep(0.05)
    finally:
        smoke.kill_marked(marker)
        worker.kill()
        worker.wait()


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
