"""A real Airflow deployment for integration tests, driven only through the REST API v2.

:class:`AirflowDeployment` runs Airflow the way an operator does: a fresh
AIRFLOW_HOME (SQLite metadata, LocalExecutor) on top of the project's
``airflow.cfg``, ``airflow db migrate``, the ``ledger_writers`` pool, then
``airflow api-server``, ``airflow scheduler`` and ``airflow dag-processor`` as
three separate processes (each in its own process group, logging to
``<home>/logs/<name>.log``). The test then talks to it like a user: a JWT from
the simple auth manager's ``POST /auth/token`` (user ``admin``, password from the
generated passwords file), and ``Authorization: Bearer`` on every call.

    from support.airflow_deployment import start_airflow   # tests/ is on sys.path, as for conftest

    with start_airflow(tmp_path, {"ENTITLE_HOME": str(tmp_path / "var")}) as airflow:
        airflow.unpause("entitlement_grant")
        run_id = airflow.trigger("entitlement_grant", {"snapshot_uri": str(users)})
        assert airflow.wait_for_run("entitlement_grant", run_id, timeout_s=300) == "success"
    assert airflow.leftover_processes() == {}

Every process started here and everything they start (LocalExecutor workers,
task supervisors, task processes, which Airflow puts in process groups of their
own, and what tasks start) runs in AIRFLOW_HOME and inherits a marker variable:
:meth:`AirflowDeployment.stop` stops them all and
:meth:`AirflowDeployment.leftover_processes` finds any that survived.
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import datetime as dt
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from types import TracebackType
from typing import IO, Any
from urllib.parse import quote

import httpx
import psutil

ROOT = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent  # the project's .venv/bin when pytest runs from it
DAGS_FOLDER = ROOT / "dags"
AIRFLOW_CONFIG = ROOT / "airflow.cfg"
MARKER_VAR = "AIRFLOW_TEST_DEPLOYMENT_ID"  # in the environment of every process of one deployment
ADMIN_USER = "admin"
PASSWORDS_FILE = "simple_auth_manager_passwords.json.generated"
DEFAULT_POOLS: Mapping[str, tuple[int, str]] = {"ledger_writers": (1, "Concurrent ledger writers")}
PROCESS_NAMES = ("api-server", "scheduler", "dag-processor")

# Airflow version + config -> an SQLite DB `airflow db migrate` made in this process (reuse_migrated_db).
_MIGRATED_DB_TEMPLATES: dict[str, Path] = {}

TERMINAL_RUN_STATES = frozenset({"success", "failed"})
PAGE_LIMIT = 100  # the API's [api] maximum_page_limit
STARTUP_TIMEOUT_S = 240.0
CLI_TIMEOUT_S = 300.0
HTTP_TIMEOUT_S = 30.0
# The api-server answers HTTP 500 "database is locked" now and then on SQLite (see request()); retried.
LOCKED_RETRIES = 5
LOCKED_RETRY_PAUSE_S = 1.0
STOP_GRACE_S = 20.0
POLL_INTERVAL_S = 0.5
LOG_TAIL_LINES = 60
# Keys of a structured task-log entry that are the same on every line (or rendered apart) in task_log's text.
LOG_ENTRY_CONTEXT = frozenset(
    {"timestamp", "level", "logger", "event", "dag_id", "run_id", "task_id", "map_index", "try_number", "ti_id"}
    | {"filename", "lineno"}
)


class AirflowHarnessError(AssertionError):
    """The deployment did not start, a process died, or a run did not end in time (a test failure)."""


class AirflowApiError(AirflowHarnessError):
    """A REST call answered with an unexpected status."""

    def __init__(self, method: str, path: str, status: int, body: str) -> None:
        super().__init__(f"{method} {path} -> HTTP {status}: {body[:2000]}")
        self.method = method
        self.path = path
        self.status = status
        self.body = body


# --------------------------------------------------------------------------- helpers


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port nothing listens on right now (the OS picks it)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    """The last ``lines`` lines of a text file (or why it cannot be read)."""
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _is_under(path: str, root: Path) -> bool:
    candidate = Path(path)
    return candidate == root or root in candidate.parents


def _live(proc: psutil.Process) -> bool:
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False


def _scan_processes(marker: str, home: Path) -> list[psutil.Process]:
    """Live processes (not zombies) with ``MARKER_VAR=marker`` in their environment or a cwd inside ``home``.

    Both are inherited through fork and exec. The environment alone is not enough: a process that
    sets its title (Airflow's LocalExecutor workers, the task processes forked from them) overwrites
    the memory /proc/PID/environ shows; the working directory stays.
    """
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    me = os.getpid()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        try:
            ours = needle in (entry / "environ").read_bytes().split(b"\0") or _is_under(
                os.readlink(entry / "cwd"), home
            )
        except OSError:
            continue
        if ours:
            with contextlib.suppress(psutil.Error):
                proc = psutil.Process(int(entry.name))
                if _live(proc):
                    found.append(proc)
    return found


def _sqlite_copy(source: Path, destination: Path) -> None:
    """A consistent copy of an SQLite database (the backup API, not a file copy)."""
    with contextlib.closing(sqlite3.connect(source)) as src, contextlib.closing(sqlite3.connect(destination)) as dst:
        src.backup(dst)


def _might_contain_dag(path: Path) -> bool:
    content = path.read_bytes().lower()
    return b"airflow" in content and b"dag" in content


def render_log_entry(entry: Any) -> str:
    """One line of text for a structured task-log entry of the logs endpoint (or the line itself)."""
    if not isinstance(entry, dict):
        return str(entry)
    parts = [str(entry[key]) for key in ("timestamp", "level", "logger") if entry.get(key)]
    parts.append(str(entry.get("event", "")))
    extra = {k: v for k, v in entry.items() if k not in LOG_ENTRY_CONTEXT}
    if extra:
        parts.append(json.dumps(extra, default=str, sort_keys=True))
    return " ".join(parts)


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path
    log_file: IO[bytes]


@dataclass
class AirflowDeployment:
    """One Airflow deployment (api-server, scheduler, dag-processor) in a temporary AIRFLOW_HOME.

    ``base_dir``: where AIRFLOW_HOME (``base_dir/airflow``) is made; it must not exist yet or be empty.
    ``env_extra``: added to every process's environment (ENTITLE_HOME, ENTITLE_PARTITIONS, ...); it
    reaches the DAG files (parsed in the dag-processor) and the task processes. AIRFLOW__* entries
    here override the harness's own settings.
    ``use_job_schedule``: False stops the scheduler from creating scheduled runs (only triggered runs).
    ``pools``: name -> (slots, description), set with ``airflow pools set`` before the servers start.
    ``parallelism``: LocalExecutor worker processes (Airflow forks all of them at start; 32 by default).
    ``serve_logs``: let the scheduler serve task logs over HTTP; not needed, the api-server reads the files.
    ``dags_folder``: the DAG files (default: the project's ``dags/``).
    ``reuse_migrated_db``: the first deployment of a test process runs ``airflow db migrate``, the
    next ones start from a copy of its freshly migrated database (the same schema, seconds faster).
    ``sqlite_wal``: put the metadata DB in WAL mode, so that readers and the writer do not block each
    other (fewer "database is locked" errors; writers still take turns).
    """

    base_dir: Path
    env_extra: Mapping[str, str] = field(default_factory=dict)
    use_job_schedule: bool = True
    pools: Mapping[str, tuple[int, str]] = field(default_factory=lambda: dict(DEFAULT_POOLS))
    parallelism: int = 4
    serve_logs: bool = False
    startup_timeout_s: float = STARTUP_TIMEOUT_S
    dags_folder: Path = DAGS_FOLDER
    reuse_migrated_db: bool = True
    sqlite_wal: bool = True

    home: Path = field(init=False)
    api_port: int = field(init=False)
    env: dict[str, str] = field(init=False)
    timings_s: dict[str, float] = field(init=False, default_factory=dict)
    _marker: str = field(init=False)
    _processes: dict[str, _Process] = field(init=False, default_factory=dict)
    _client: httpx.Client | None = field(init=False, default=None)
    _token: str | None = field(init=False, default=None)
    _stopped: bool = field(init=False, default=False)
    locked_retries: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        self.base_dir = Path(self.base_dir)
        self.dags_folder = Path(self.dags_folder)
        self.home = self.base_dir / "airflow"
        if self.home.exists() and any(self.home.iterdir()):
            raise AirflowHarnessError(f"{self.home} is not empty: use a fresh directory per deployment")
        self.home.mkdir(parents=True, exist_ok=True)
        (self.home / "logs").mkdir(exist_ok=True)
        self.api_port = free_port()
        self._marker = secrets.token_hex(8)
        self.env = self._build_env()

    # ----------------------------------------------------------------------- configuration

    @property
    def api_url(self) -> str:
        """Base URL of the api-server, e.g. ``http://127.0.0.1:41234`` (no trailing slash)."""
        return f"http://127.0.0.1:{self.api_port}"

    @property
    def log_paths(self) -> dict[str, Path]:
        """Log file of each long-running process: api-server, scheduler, dag-processor."""
        return {name: self.home / "logs" / f"{name}.log" for name in PROCESS_NAMES}

    @property
    def task_log_folder(self) -> Path:
        """Where Airflow writes task logs (``dag_id=.../run_id=.../task_id=.../attempt=N.log``)."""
        return self.home / "logs"

    @property
    def pids(self) -> dict[str, int]:
        """Process id (= process group id) of each long-running process started here."""
        return {name: proc.popen.pid for name, proc in self._processes.items()}

    def _build_env(self) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW", "ENTITLE_"))}
        port_logs = free_port()
        database = self.home / "airflow.db"
        env = {
            **base,
            "PATH": f"{BIN}{os.pathsep}{base.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            "AIRFLOW_HOME": str(self.home),
            "AIRFLOW_CONFIG": str(AIRFLOW_CONFIG),
            "AIRFLOW__CORE__DAGS_FOLDER": str(self.dags_folder),
            "AIRFLOW__CORE__EXECUTOR": "LocalExecutor",
            "AIRFLOW__CORE__PARALLELISM": str(self.parallelism),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{self.api_url}/execution/",
            "AIRFLOW__CORE__FERNET_KEY": base64.urlsafe_b64encode(os.urandom(32)).decode(),
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN_USER}:admin",
            "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS": "False",
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{database}",
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(self.home / "logs"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(port_logs),
            "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(free_port()),
            "AIRFLOW__LOGGING__COLORED_CONSOLE_LOG": "False",
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(self.api_port),
            "AIRFLOW__API__BASE_URL": f"{self.api_url}/",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": secrets.token_urlsafe(32),
            "AIRFLOW__API__EXPOSE_STACKTRACE": "True",
            "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(64),
            # Speed on a small machine: the dag-processor lists the folder and parses at once, the
            # scheduler loops often; nothing re-parses unchanged files in a test's lifetime.
            "AIRFLOW__DAG_PROCESSOR__REFRESH_INTERVAL": "5",
            "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "60",
            "AIRFLOW__DAG_PROCESSOR__PARSING_PROCESSES": "2",
            "AIRFLOW__DAG_PROCESSOR__PRINT_STATS_INTERVAL": "300",
            "AIRFLOW__DAG_PROCESSOR__BUNDLE_REFRESH_CHECK_INTERVAL": "1",
            "AIRFLOW__DAG_PROCESSOR__STALE_DAG_THRESHOLD": "300",
            "AIRFLOW__SCHEDULER__SCHEDULER_IDLE_SLEEP_TIME": "0.2",
            "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__JOB_HEARTBEAT_SEC": "1",
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": str(self.use_job_schedule),
            "AIRFLOW__SCHEDULER__POOL_METRICS_INTERVAL": "60",
            MARKER_VAR: self._marker,
        }
        env.update(self.env_extra)
        return env

    # ----------------------------------------------------------------------- life cycle

    def start(self) -> AirflowDeployment:
        """Migrate, set the pools, start the three processes, wait for health and parsed DAGs; returns self.

        Records phase durations in :attr:`timings_s` (``migrate``, ``pools``, ``healthy`` (the three
        processes started until all report healthy), ``dags_parsed``, ``startup`` in all). On any
        failure everything started so far is stopped.
        """
        if self._processes or self._stopped:
            raise AirflowHarnessError("a deployment starts once; make a new one (with a fresh base_dir)")
        begun = time.monotonic()
        try:
            with self._timed("migrate"):
                self._migrate()
            with self._timed("pools"):
                for name, (slots, description) in self.pools.items():
                    self.airflow_cli("pools", "set", name, str(slots), description)
            scheduler = ["scheduler"] if self.serve_logs else ["scheduler", "--skip-serve-logs"]
            for name, args in (
                ("api-server", ["api-server", "--workers", "1"]),
                ("scheduler", scheduler),
                ("dag-processor", ["dag-processor"]),
            ):
                self._spawn(name, [str(BIN / "airflow"), *args])
            with self._timed("healthy"):
                self.wait_healthy(self.startup_timeout_s - (time.monotonic() - begun))
            self._client = httpx.Client(base_url=self.api_url, timeout=HTTP_TIMEOUT_S)
            self._token = self._login()
            with self._timed("dags_parsed"):
                self.wait_for_dags(timeout_s=max(10.0, self.startup_timeout_s - (time.monotonic() - begun)))
        except BaseException:
            self.stop()
            raise
        self.timings_s["startup"] = round(time.monotonic() - begun, 2)
        return self

    def _migrate(self) -> None:
        """``airflow db migrate`` (or, with ``reuse_migrated_db``, a copy of a DB this process migrated before)."""
        database = self.home / "airflow.db"
        key = f"{metadata.version('apache-airflow')} {AIRFLOW_CONFIG}"
        template = _MIGRATED_DB_TEMPLATES.get(key)
        if self.reuse_migrated_db and template is not None and template.exists():
            _sqlite_copy(template, database)
        else:
            self.airflow_cli("db", "migrate")
            if self.reuse_migrated_db:
                cache = Path(tempfile.mkdtemp(prefix="airflow-migrated-db-"))
                atexit.register(shutil.rmtree, cache, True)
                _sqlite_copy(database, cache / "airflow.db")
                _MIGRATED_DB_TEMPLATES[key] = cache / "airflow.db"
        if self.sqlite_wal:
            with contextlib.closing(sqlite3.connect(database)) as connection:
                connection.execute("PRAGMA journal_mode=WAL")

    def __enter__(self) -> AirflowDeployment:
        return self if self._processes else self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @contextlib.contextmanager
    def _timed(self, phase: str) -> Iterator[None]:
        begun = time.monotonic()
        try:
            yield
        finally:
            self.timings_s[phase] = round(time.monotonic() - begun, 2)

    def airflow_cli(self, *args: str, timeout_s: float = CLI_TIMEOUT_S) -> subprocess.CompletedProcess[str]:
        """Run ``airflow ARGS`` in the deployment's environment; raises with its output if it fails."""
        command = [str(BIN / "airflow"), *args]
        try:
            result = subprocess.run(
                command,
                env=self.env,
                cwd=self.home,
                capture_output=True,
                text=True,
                timeout=timeout_s,
                check=False,
            )
        except subprocess.TimeoutExpired as exc:
            raise AirflowHarnessError(f"`{' '.join(command)}` did not finish within {timeout_s:.0f} s") from exc
        if result.returncode != 0:
            output = "\n".join((result.stdout + result.stderr).splitlines()[-40:])
            raise AirflowHarnessError(f"`{' '.join(command)}` exited with {result.returncode}:\n{output}")
        return result

    def _spawn(self, name: str, command: list[str]) -> None:
        log_path = self.log_paths[name]
        log_file = open(log_path, "ab")  # noqa: SIM115 - closed in stop()
        popen = subprocess.Popen(
            command,
            env=self.env,
            cwd=self.home,
            stdin=subprocess.DEVNULL,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own session and process group: stop() signals the whole group
        )
        self._processes[name] = _Process(name, popen, log_path, log_file)

    def check_alive(self) -> None:
        """Raise (with the tail of its log) if a process of the deployment has exited."""
        for proc in self._processes.values():
            code = proc.popen.poll()
            if code is not None:
                raise AirflowHarnessError(
                    f"the {proc.name} process exited with code {code}; tail of {proc.log_path}:\n{tail(proc.log_path)}"
                )

    def health(self) -> dict[str, Any] | None:
        """``GET /api/v2/monitor/health`` (no auth needed), or None while the api-server does not answer."""
        try:
            response = httpx.get(f"{self.api_url}/api/v2/monitor/health", timeout=5)
        except httpx.HTTPError:
            return None
        if response.status_code != 200:
            return None
        body: dict[str, Any] = response.json()
        return body

    def wait_healthy(self, timeout_s: float) -> dict[str, Any]:
        """Wait until the metadatabase, the scheduler and the dag-processor report healthy; returns the health."""
        deadline = time.monotonic() + timeout_s
        last: dict[str, Any] | None = None
        while True:
            self.check_alive()
            last = self.health()
            if last is not None and all(
                (last.get(part) or {}).get("status") == "healthy"
                for part in ("metadatabase", "scheduler", "dag_processor")
            ):
                return last
            if time.monotonic() > deadline:
                raise AirflowHarnessError(
                    f"not healthy within {timeout_s:.0f} s (last health: {last}){self._process_tails()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def stop(self, grace_s: float = STOP_GRACE_S) -> None:
        """Stop every process of the deployment, task processes included; safe to call twice.

        First SIGTERM to the scheduler's and the dag-processor's process groups, while the
        api-server still answers: the scheduler's LocalExecutor workers forward the signal to the
        task processes they supervise, which report their state through the Execution API (without
        the api-server they retry for many seconds), and the scheduler waits for them. Then SIGTERM
        to the api-server's group. Each step has up to ``grace_s`` to finish; then SIGKILL to the
        groups and to every process of the deployment still alive (task processes run in process
        groups of their own), repeated until :meth:`processes` finds none. Records ``stop`` in
        :attr:`timings_s`.

        Task processes are not signalled directly at first: a LocalExecutor worker inherits the
        scheduler's SIGTERM handler, and signalling the processes one by one left the scheduler
        waiting out the whole grace period for an idle worker.
        """
        if self._stopped:
            return
        self._stopped = True
        begun = time.monotonic()
        if self._client is not None:
            self._client.close()
        started = {proc.popen.pid for proc in self._processes.values()}
        others = [p for p in self.processes() if p.pid not in started]
        first = [proc for name, proc in self._processes.items() if name != "api-server"]
        for proc in first:
            self._signal_group(proc, signal.SIGTERM)
        self._wait_exited(first, others, grace_s)
        last = [proc for name, proc in self._processes.items() if name == "api-server"]
        for proc in last:
            self._signal_group(proc, signal.SIGTERM)
        self._wait_exited(last, [], grace_s)
        for proc in self._processes.values():
            self._signal_group(proc, signal.SIGKILL)  # the group's stragglers too
        for _ in range(5):
            rest = [p for p in self.processes() if p.pid not in started]
            if not rest:
                break
            for other in rest:
                with contextlib.suppress(psutil.Error):
                    other.kill()
            psutil.wait_procs(rest, timeout=5)
        for proc in self._processes.values():
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.popen.wait(timeout=10)
            proc.log_file.close()
        self.timings_s["stop"] = round(time.monotonic() - begun, 2)

    @staticmethod
    def _signal_group(proc: _Process, signum: int) -> None:
        if proc.popen.returncode is None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.popen.pid, signum)

    @staticmethod
    def _wait_exited(started: Sequence[_Process], others: Sequence[psutil.Process], timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if all(p.popen.poll() is not None for p in started) and not any(_live(p) for p in others):
                return
            time.sleep(0.1)

    def processes(self) -> list[psutil.Process]:
        """Every live process of the deployment.

        The three started here, all their descendants (LocalExecutor workers, task supervisors and
        task processes, whatever tasks start), and any process re-parented away from them that still
        carries the deployment's marker variable or runs in AIRFLOW_HOME (every process starts there).
        """
        found: dict[int, psutil.Process] = {}
        for proc in self._processes.values():
            if proc.popen.poll() is not None:
                continue
            with contextlib.suppress(psutil.Error):
                root = psutil.Process(proc.popen.pid)
                for member in (root, *root.children(recursive=True)):
                    if _live(member):
                        found[member.pid] = member
        for member in _scan_processes(self._marker, self.home):
            found.setdefault(member.pid, member)
        return list(found.values())

    def leftover_processes(self) -> dict[int, str]:
        """Processes of this deployment still running: pid -> command line (empty after a clean stop)."""
        found = {}
        for proc in self.processes():
            with contextlib.suppress(psutil.Error):
                found[proc.pid] = " ".join(proc.cmdline()) or proc.name()
        return found

    def _process_tails(self, lines: int = LOG_TAIL_LINES) -> str:
        return "".join(f"\n--- tail of {path}:\n{tail(path, lines)}" for path in self.log_paths.values())

    # ----------------------------------------------------------------------- REST

    def _login(self) -> str:
        password_file = self.home / PASSWORDS_FILE
        deadline = time.monotonic() + 30
        while not password_file.exists() or not password_file.read_text().strip():
            if time.monotonic() > deadline:
                raise AirflowHarnessError(f"{password_file} was not written by the api-server")
            time.sleep(POLL_INTERVAL_S)
        password = json.loads(password_file.read_text())[ADMIN_USER]
        assert self._client is not None
        response = self._client.post("/auth/token", json={"username": ADMIN_USER, "password": password})
        if response.status_code != 201:
            raise AirflowApiError("POST", "/auth/token", response.status_code, response.text)
        return str(response.json()["access_token"])

    def request(
        self,
        method: str,
        path: str,
        *,
        json_body: Any = None,
        params: Mapping[str, Any] | None = None,
        headers: Mapping[str, str] | None = None,
        expected: Sequence[int] = (200,),
        retry_locked: bool = True,
    ) -> httpx.Response:
        """One authenticated call (``path`` from the server root, e.g. ``/api/v2/dags``); raises on other statuses.

        A 401 (token expired) gets a fresh token and one retry. An HTTP 500 "database is locked" is
        retried up to LOCKED_RETRIES times (``retry_locked``): with SQLite, Airflow 3.3's api-server
        writes the audit log of a mutating call (PATCH, POST) from its event loop, before the endpoint
        runs, and when an Execution API request of a task holds the write lock at that moment, that
        lock cannot be released until SQLite's 5 s busy timeout fails the audit write; nothing else
        of the call was done. :attr:`locked_retries` counts these retries.
        """
        if self._client is None or self._token is None:
            raise AirflowHarnessError("the deployment is not started")
        refreshed = False
        locked = 0
        while True:
            response = self._client.request(
                method,
                path,
                json=json_body,
                params=params,
                headers={"Authorization": f"Bearer {self._token}", **(headers or {})},
            )
            if response.status_code == 401 and not refreshed:
                self._token = self._login()
                refreshed = True
                continue
            if (
                retry_locked
                and response.status_code == 500
                and "database is locked" in response.text
                and locked < LOCKED_RETRIES
            ):
                locked += 1
                self.locked_retries += 1
                time.sleep(LOCKED_RETRY_PAUSE_S)
                continue
            break
        if response.status_code not in expected:
            raise AirflowApiError(method, path, response.status_code, response.text)
        return response

    def api(self, method: str, path: str, **kwargs: Any) -> Any:
        """:meth:`request` and its JSON body."""
        return self.request(method, path, **kwargs).json()

    def _paged(self, path: str, key: str, params: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        while True:
            page = self.api("GET", path, params={**(params or {}), "limit": PAGE_LIMIT, "offset": len(items)})
            batch = page[key]
            items.extend(batch)
            if not batch or len(items) >= int(page.get("total_entries") or 0):
                return items

    @staticmethod
    def _dag_path(dag_id: str, *rest: str) -> str:
        return "/api/v2/dags/" + "/".join(quote(part, safe="") for part in (dag_id, *rest))

    def dags(self) -> list[dict[str, Any]]:
        """Every DAG the api-server knows (``GET /api/v2/dags``, all pages)."""
        return self._paged("/api/v2/dags", "dags")

    def import_errors(self) -> list[dict[str, Any]]:
        """The dag-processor's import errors (``GET /api/v2/importErrors``, all pages)."""
        return self._paged("/api/v2/importErrors", "import_errors")

    def wait_for_dags(self, dag_ids: Sequence[str] | None = None, timeout_s: float = STARTUP_TIMEOUT_S) -> list[str]:
        """Wait until the DAGs are parsed and serialized; returns the DAG ids known then.

        ``dag_ids`` None: until every ``*.py`` file at the top of the dags folder that mentions both
        "airflow" and "dag" (Airflow's own heuristic) has produced a DAG, and
        no file has an import error (an import error fails at once, with its stack trace).
        """
        deadline = time.monotonic() + timeout_s
        files = {p.name for p in self.dags_folder.glob("*.py") if _might_contain_dag(p)}
        while True:
            self.check_alive()
            errors = self.import_errors()
            if errors:
                details = "\n".join(f"{e.get('filename')}:\n{e.get('stack_trace')}" for e in errors)
                raise AirflowHarnessError(f"import errors in the dags folder:\n{details}")
            known = self.dags()
            ids = sorted(d["dag_id"] for d in known)
            parsed_files = {Path(d["fileloc"]).name for d in known}
            if (set(dag_ids) <= set(ids)) if dag_ids is not None else (files <= parsed_files):
                return ids
            if time.monotonic() > deadline:
                want = f"DAGs {sorted(dag_ids)}" if dag_ids is not None else f"DAGs from {sorted(files)}"
                raise AirflowHarnessError(
                    f"{want} not parsed within {timeout_s:.0f} s (known: {ids}){self._process_tails()}"
                )
            time.sleep(POLL_INTERVAL_S)

    def set_paused(self, dag_id: str, paused: bool) -> dict[str, Any]:
        """``PATCH /api/v2/dags/{dag_id}?update_mask=is_paused`` with ``{"is_paused": paused}``; the DAG."""
        result: dict[str, Any] = self.api(
            "PATCH", self._dag_path(dag_id), params={"update_mask": "is_paused"}, json_body={"is_paused": paused}
        )
        return result

    def unpause(self, dag_id: str) -> dict[str, Any]:
        """Unpause a DAG; with catchup=False the scheduler then creates its latest scheduled run at once."""
        return self.set_paused(dag_id, False)

    def pause(self, dag_id: str) -> dict[str, Any]:
        """Pause a DAG."""
        return self.set_paused(dag_id, True)

    def trigger(
        self,
        dag_id: str,
        conf: Mapping[str, Any] | None = None,
        logical_date: str | None = None,
        run_id: str | None = None,
    ) -> str:
        """Trigger a run (``POST /api/v2/dags/{dag_id}/dagRuns``); returns its run id.

        ``logical_date`` (ISO 8601 with an offset; Airflow refuses a naive one with 422) None sends
        ``"logical_date": null`` (the key is required in 3.x). ``run_id`` None: ``manual__<now UTC>``,
        Airflow's own form, chosen here so that a call retried after "database is locked" cannot
        create a second run (an HTTP 409 then means the earlier attempt created it).
        """
        run_id = run_id or f"manual__{dt.datetime.now(dt.UTC).isoformat()}"
        body = {"dag_run_id": run_id, "logical_date": logical_date, "conf": dict(conf or {})}
        path = self._dag_path(dag_id, "dagRuns")
        for attempt in range(LOCKED_RETRIES + 1):
            response = self.request("POST", path, json_body=body, expected=(200, 409, 500), retry_locked=False)
            if response.status_code == 200:
                return str(response.json()["dag_run_id"])
            if response.status_code == 409 and attempt > 0:
                existing = self.get_run(dag_id, run_id)
                if existing.get("conf") == body["conf"]:
                    return run_id
            if response.status_code != 500 or "database is locked" not in response.text:
                break
            self.locked_retries += 1
            time.sleep(LOCKED_RETRY_PAUSE_S)
        raise AirflowApiError("POST", path, response.status_code, response.text)

    def get_run(self, dag_id: str, run_id: str) -> dict[str, Any]:
        """``GET /api/v2/dags/{dag_id}/dagRuns/{run_id}``."""
        run: dict[str, Any] = self.api("GET", self._dag_path(dag_id, "dagRuns", run_id))
        return run

    def list_runs(self, dag_id: str, run_type: str | None = None) -> list[dict[str, Any]]:
        """The DAG's runs, oldest first (all pages); ``run_type`` e.g. ``scheduled`` or ``manual``."""
        params: dict[str, Any] = {"order_by": "run_after"}
        if run_type is not None:
            params["run_type"] = run_type
        return self._paged(self._dag_path(dag_id, "dagRuns"), "dag_runs", params)

    def wait_for_run(self, dag_id: str, run_id: str, timeout_s: float, poll_s: float = 1.0) -> str:
        """Poll until the run is ``success`` or ``failed``; returns the state.

        On timeout raises with the run's task-instance states and the tail of the scheduler's log.
        """
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            state = str(self.get_run(dag_id, run_id)["state"])
            if state in TERMINAL_RUN_STATES:
                return state
            if time.monotonic() > deadline:
                raise AirflowHarnessError(
                    f"run {dag_id}/{run_id} still {state} after {timeout_s:.0f} s; task instances:\n"
                    + self.describe_task_instances(dag_id, run_id)
                    + f"\n--- tail of {self.log_paths['scheduler']}:\n{tail(self.log_paths['scheduler'])}"
                )
            time.sleep(poll_s)

    def wait_for_scheduled_run(self, dag_id: str, timeout_s: float) -> dict[str, Any]:
        """Wait until the scheduler itself has created a run (run_type ``scheduled``); returns the newest one."""
        deadline = time.monotonic() + timeout_s
        while True:
            self.check_alive()
            runs = self.list_runs(dag_id, run_type="scheduled")
            if runs:
                return runs[-1]
            if time.monotonic() > deadline:
                raise AirflowHarnessError(
                    f"no scheduled run of {dag_id} within {timeout_s:.0f} s (is it unpaused? its schedule?)"
                    f"\n--- tail of {self.log_paths['scheduler']}:\n{tail(self.log_paths['scheduler'])}"
                )
            time.sleep(POLL_INTERVAL_S)

    def task_instances(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Every task instance of the run, mapped ones included, in ``(task_id, map_index)`` order.

        Each is the API's full record (task_id, map_index, rendered_map_index, state, try_number, ...).
        """
        tis = self._paged(self._dag_path(dag_id, "dagRuns", run_id, "taskInstances"), "task_instances")
        return sorted(tis, key=lambda ti: (ti["task_id"], ti["map_index"]))

    def describe_task_instances(self, dag_id: str, run_id: str) -> str:
        """One line per task instance: ``task_id[label] state (try N)``; for failure messages."""
        try:
            tis = self.task_instances(dag_id, run_id)
        except (AirflowHarnessError, httpx.HTTPError) as exc:
            return f"(task instances unavailable: {exc})"
        return "\n".join(
            f"  {ti['task_id']}"
            + (f"[{ti.get('rendered_map_index') or ti['map_index']}]" if ti["map_index"] >= 0 else "")
            + f" {ti['state']} (try {ti['try_number']})"
            for ti in tis
        )

    def failure_report(self, dag_id: str, run_id: str, max_failed: int = 5) -> str:
        """The run's task-instance states, then the errors logged by up to ``max_failed`` failed ones.

        For assertion messages: ``assert state == "success", airflow.failure_report(dag_id, run_id)``.
        """
        lines = [f"run {dag_id}/{run_id} (task logs under {self.task_log_folder}):"]
        lines.append(self.describe_task_instances(dag_id, run_id))
        try:
            failed = [ti for ti in self.task_instances(dag_id, run_id) if ti["state"] == "failed"]
        except (AirflowHarnessError, httpx.HTTPError):
            return "\n".join(lines)
        for ti in failed[:max_failed]:
            label = ti["task_id"] + (f"[{ti['map_index']}]" if ti["map_index"] >= 0 else "")
            try:
                entries = self.task_log_entries(dag_id, run_id, ti["task_id"], ti["try_number"], ti["map_index"])
            except (AirflowHarnessError, httpx.HTTPError) as exc:
                lines.append(f"--- {label} try {ti['try_number']}: log unavailable ({exc})")
                continue
            lines.append(f"--- {label} try {ti['try_number']}, errors logged:")
            for entry in entries:
                if not isinstance(entry, dict) or entry.get("level") not in ("error", "critical"):
                    continue
                lines.append(f"  {entry.get('event')}")
                for error in entry.get("error_detail") or []:
                    where = (error.get("frames") or [{}])[-1]
                    lines.append(
                        f"    {error.get('exc_type')}: {error.get('exc_value')}"
                        f" (at {where.get('filename')}:{where.get('lineno')})"
                    )
        return "\n".join(lines)

    def clear_failed(self, dag_id: str, run_id: str) -> list[dict[str, Any]]:
        """Clear the failed (and upstream_failed) task instances of one run; returns those it cleared.

        ``POST /api/v2/dags/{dag_id}/clearTaskInstances`` with ``dag_run_id``, ``only_failed=true``,
        ``dry_run=false``; the run goes back to ``queued``.
        """
        body = {"dag_run_id": run_id, "only_failed": True, "dry_run": False}
        result = self.api("POST", self._dag_path(dag_id, "clearTaskInstances"), json_body=body)
        cleared: list[dict[str, Any]] = result["task_instances"]
        return cleared

    def task_log_entries(
        self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1
    ) -> list[Any]:
        """The structured log of one try (``GET .../taskInstances/{task_id}/logs/{try_number}``, all chunks).

        Entries are dicts (``event``, ``timestamp``, ``level``, ``logger``, ...), or plain strings when
        Airflow could not parse the file.
        """
        path = self._dag_path(dag_id, "dagRuns", run_id, "taskInstances", task_id, "logs", str(try_number))
        params: dict[str, Any] = {"map_index": map_index, "full_content": "true"}
        entries: list[Any] = []
        for _ in range(100):
            page = self.api("GET", path, params=params, headers={"Accept": "application/json"})
            entries.extend(page.get("content") or [])
            token = page.get("continuation_token")
            if not token or not page.get("content"):
                break
            params = {"map_index": map_index, "token": token}
        return entries

    def task_log(self, dag_id: str, run_id: str, task_id: str, try_number: int, map_index: int = -1) -> str:
        """The log of one try as text, one line per entry (see :meth:`task_log_entries`)."""
        entries = self.task_log_entries(dag_id, run_id, task_id, try_number, map_index)
        return "\n".join(render_log_entry(entry) for entry in entries)


def start_airflow(base_dir: Path, env_extra: Mapping[str, str] | None = None, **options: Any) -> AirflowDeployment:
    """Create and start an :class:`AirflowDeployment` under ``base_dir`` (``options``: its other fields)."""
    return AirflowDeployment(base_dir, dict(env_extra or {}), **options).start()
