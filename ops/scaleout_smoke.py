"""Scale-out smoke test: the nightly DAG on three Celery workers, one of them lost in the middle of the grant.

Starts, on this machine, every process of a distributed Airflow deployment as a
separate process — `airflow api-server`, `airflow scheduler`, `airflow
dag-processor`, three `airflow celery worker`s and moto's S3 server — with
PostgreSQL as Airflow's metadata database, Redis as the Celery broker, the
PostgreSQL ledger, and the snapshots and partitions on S3 (ENTITLE_DATA_URI
s3://entitle-smoke/data on the moto server; the user file is uploaded there
too). Each worker has its own empty AIRFLOW_HOME and ENTITLE_HOME, its own log
file, Celery host name (worker-N@host) and ENTITLE_WORKER_NAME (worker-N): the
workers share nothing but S3 and the databases. It grants N synthetic users
(default 1,000,000) through the DAG `entitlement_grant`, and while the grant
tasks run it kills one worker with SIGKILL — the worker, its task supervisor and
task process, as a lost machine — when the ledger shows it granting a partition
('running' in partition_attempts). Then it checks:

  * Airflow's scheduler finds the lost task instance (no heartbeat for
    [scheduler] task_instance_heartbeat_timeout, looked for every
    task_instance_heartbeat_timeout_detection_interval) and retries it on a
    surviving worker; the times from the kill to the detection and to the
    retry's start are printed;
  * the DAG run ends in state success, and no task instance but the lost one
    needed a second try;
  * every task instance went through a Celery worker (its id in a worker's log,
    a success in Celery's result backend for each);
  * `entitle reconcile --json` on the PostgreSQL ledger exits 0 with verdict
    RECONCILED and expected = ledger = matched = N x the campaign's items;
    `entitle summary --json` counts N live grants of every item;
  * the ledger says which worker wrote which partition (partition_attempts.worker,
    printed as a table): more than one worker did, and the partition the lost
    worker was granting (its attempt left 'running') was granted by another;
  * the partitions are on S3, and no worker's home holds a snapshot.

Everything is configured by AIRFLOW__... and ENTITLE_... environment variables on
top of the project's airflow.cfg (the shared part printed to WORK_DIR/env.sh).
Each run drops and recreates the PostgreSQL databases `entitle_smoke_airflow`
(Airflow metadata and Celery results) and `entitle_smoke_ledger` (the ledger),
flushes the Redis database of the broker URL, and uses WORK_DIR (default
var/scaleout; never the project's var/airflow) for the homes and the processes'
logs. The S3 server keeps its objects in memory: they go when it stops.

All processes are stopped at the end (each in its own process group), also on a
failure, Ctrl-C or SIGTERM, unless --keep leaves them running for inspection
(then `--stop`, or the next run, stops them). After a successful run without
--keep, the work dir's contents and both databases are removed; after a failure
they stay, and the tail of each process's log is printed.

Exit codes: 0 the smoke passed; 1 it failed (or was interrupted); 2 bad usage or
environment (PostgreSQL or Redis not answering, the Celery provider or moto
missing, the work dir in use or not this tool's).

Run with the project's virtualenv: `.venv/bin/python ops/scaleout_smoke.py`, or
`make scaleout-smoke`.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import fcntl
import functools
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
import traceback
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent
DAG_ID = "entitlement_grant"
GRANT_TASK = "grant"
POOL = "ledger_writers"
MARKER_VAR = "ENTITLE_SCALEOUT_SMOKE_RUN"  # set in every process started here; the final sweep looks for it
LOCK_NAME = ".scaleout-smoke.lock"  # also marks a work dir as this tool's (so its contents may be removed)
SERVICE_NAMES = ("s3", "api-server", "scheduler", "dag-processor")
WORK_ENTRIES = ("airflow", "entitle", "workers", "logs", "users.parquet", "env.sh", "pids.json")
DB_NAME_RE = re.compile(r"^[a-z_][a-z0-9_]{0,62}$")
PARTITIONS_MAX = 1024
WORKERS_MIN, WORKERS_MAX = 2, 8  # one is killed: at least one must survive

# The object store: moto's S3 server on loopback. moto accepts any key pair; these only have to be set
# (pyarrow's client would otherwise look for ~/.aws or an instance role).
BUCKET = "entitle-smoke"
DATA_PREFIX = "data"
USERS_KEY = "incoming/users.parquet"
S3_REGION = "us-east-1"
S3_ACCESS_KEY, S3_SECRET_KEY = "smoke-access-key", "smoke-secret-key"

# Lost-worker detection. The task supervisor heartbeats every [workers] min_heartbeat_interval (5 s,
# Airflow's default); the scheduler fails a running task instance whose last heartbeat is older than
# HEARTBEAT_TIMEOUT_S, looking every HEARTBEAT_CHECK_S. Production keeps Airflow's 300 s and 10 s.
HEARTBEAT_TIMEOUT_S = 30
HEARTBEAT_CHECK_S = 5
RETRIES = 1  # the lost task instance's retry; the check allows no second try anywhere else
RETRY_DELAY_S = 5  # the first retry waits 5-10 s (exponential backoff 2.0 with jitter, dags/entitle_airflow)

KILL_AFTER_SHARE = 4  # the kill waits until a quarter of the partitions are granted: the middle of the grant
FREEZE_SETTLE_S = 0.5  # a frozen worker's last statement (a COMMIT already sent) lands within this
KILL_POLL_S = 0.2
DETECTION_SLACK_S = 120.0  # beyond the heartbeat timeout, before "not detected" fails the smoke

EXIT_OK, EXIT_FAILED, EXIT_USAGE = 0, 1, 2

Say = Callable[[str], None]


class SmokeFailed(Exception):
    """The deployment ran but did not do what it should (exit 1)."""


class EnvironmentProblem(Exception):
    """A prerequisite is missing: a service, a package, the work dir (exit 2)."""


class Interrupted(Exception):
    """Ctrl-C or SIGTERM (exit 1 after cleanup)."""


# --------------------------------------------------------------------------- configuration


@dataclass(frozen=True)
class SmokeConfig:
    """What one smoke run uses; everything else is derived from it."""

    users: int = 1_000_000
    partitions: int = 12
    workers: int = 3
    concurrency: int = 1
    pool_slots: int = 4
    timeout_s: float = 900.0
    postgres: str = "postgresql+psycopg://postgres@127.0.0.1:5432"
    broker_url: str = "redis://127.0.0.1:6379/5"
    airflow_db: str = "entitle_smoke_airflow"
    ledger_db: str = "entitle_smoke_ledger"
    work_dir: Path = ROOT / "var" / "scaleout"
    bin_dir: Path = BIN
    keep: bool = False
    json: bool = False

    @property
    def airflow_home(self) -> Path:
        """AIRFLOW_HOME of the api-server, scheduler, dag-processor and the commands run here."""
        return self.work_dir / "airflow"

    @property
    def entitle_home(self) -> Path:
        """ENTITLE_HOME of the services and of the `entitle` commands run here (not the workers')."""
        return self.work_dir / "entitle"

    @property
    def logs_dir(self) -> Path:
        return self.work_dir / "logs"

    @property
    def users_file(self) -> Path:
        return self.work_dir / "users.parquet"

    @property
    def worker_names(self) -> tuple[str, ...]:
        return tuple(f"worker-{n}" for n in range(1, self.workers + 1))

    def worker_home(self, name: str) -> Path:
        """The folder of one worker's own AIRFLOW_HOME and ENTITLE_HOME (empty at its start)."""
        return self.work_dir / "workers" / name

    @property
    def data_uri(self) -> str:
        return f"s3://{BUCKET}/{DATA_PREFIX}"

    @property
    def users_uri(self) -> str:
        return f"s3://{BUCKET}/{USERS_KEY}"

    def db_url(self, database: str) -> str:
        """SQLAlchemy URL (psycopg 3 driver) of one database on the configured server."""
        from sqlalchemy.engine import make_url

        return make_url(self.postgres).set(drivername="postgresql+psycopg", database=database).render_as_string(False)

    def libpq_url(self, database: str) -> str:
        """The same database as a libpq URI, for psycopg.connect."""
        from sqlalchemy.engine import make_url

        return make_url(self.db_url(database)).set(drivername="postgresql").render_as_string(False)


@dataclass(frozen=True)
class Secrets:
    """Generated per run; every Airflow process gets the same values."""

    jwt_secret: str
    api_secret_key: str
    fernet_key: str
    marker: str

    @classmethod
    def generate(cls) -> Secrets:
        return cls(
            jwt_secret=secrets.token_urlsafe(64),
            api_secret_key=secrets.token_urlsafe(32),
            fernet_key=base64.urlsafe_b64encode(os.urandom(32)).decode(),
            marker=secrets.token_hex(8),
        )


@dataclass(frozen=True)
class Ports:
    api: int
    s3: int
    worker_logs: tuple[int, ...]  # each worker's log server (they share one host here)

    @classmethod
    def free(cls, workers: int) -> Ports:
        return cls(api=free_port(), s3=free_port(), worker_logs=tuple(free_port() for _ in range(workers)))


def build_environment(
    cfg: SmokeConfig, ports: Ports, keys: Secrets, base_env: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The environment of every process of the deployment (and of the `airflow`/`entitle` commands run here).

    Starts from ``base_env`` (default ``os.environ``) without any AIRFLOW*, ENTITLE_* or AWS_* variable, so
    nothing of the caller's Airflow (the Makefile exports var/airflow), ledger or cloud account leaks in.
    The workers add their own homes on top: :func:`worker_environment`.
    """
    base = os.environ if base_env is None else base_env
    env = {k: v for k, v in base.items() if not k.startswith(("AIRFLOW", "ENTITLE_", "AWS_"))}
    metadata_url = cfg.db_url(cfg.airflow_db)
    api_url = f"http://127.0.0.1:{ports.api}"
    env.update(
        {
            "PATH": f"{cfg.bin_dir}{os.pathsep}{env.get('PATH', '')}",
            "PYTHONUNBUFFERED": "1",
            # Airflow: the project's airflow.cfg, everything below overrides it.
            "AIRFLOW_HOME": str(cfg.airflow_home),
            "AIRFLOW_CONFIG": str(ROOT / "airflow.cfg"),
            "AIRFLOW__CORE__EXECUTOR": "CeleryExecutor",
            "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
            "AIRFLOW__CORE__LOAD_EXAMPLES": "False",
            "AIRFLOW__CORE__DAGS_ARE_PAUSED_AT_CREATION": "True",
            "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{api_url}/execution/",
            "AIRFLOW__CORE__FERNET_KEY": keys.fernet_key,
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": metadata_url,
            # Airflow 3.3 derives its async engine's URL with asyncpg, which is not installed: psycopg 3 does both.
            "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN_ASYNC": metadata_url.replace("+psycopg://", "+psycopg_async://", 1),
            "AIRFLOW__CELERY__BROKER_URL": cfg.broker_url,
            "AIRFLOW__CELERY__RESULT_BACKEND": f"db+{metadata_url}",
            "AIRFLOW__CELERY__WORKER_CONCURRENCY": str(cfg.concurrency),
            "AIRFLOW__API__HOST": "127.0.0.1",
            "AIRFLOW__API__PORT": str(ports.api),
            "AIRFLOW__API__BASE_URL": f"{api_url}/",
            "AIRFLOW__API__WORKERS": "1",
            "AIRFLOW__API__SECRET_KEY": keys.api_secret_key,
            "AIRFLOW__API_AUTH__JWT_SECRET": keys.jwt_secret,
            "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(cfg.airflow_home / "logs"),
            "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(ports.worker_logs[0]),
            # Only the triggered run: no scheduled run of the nightly schedule competes with it.
            "AIRFLOW__SCHEDULER__USE_JOB_SCHEDULE": "False",
            # A lost worker's task instance is failed after HEARTBEAT_TIMEOUT_S without a heartbeat, then
            # retried once; no other task instance may need that retry (checked after the run).
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": str(HEARTBEAT_TIMEOUT_S),
            "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": str(HEARTBEAT_CHECK_S),
            "AIRFLOW__CORE__DEFAULT_TASK_RETRIES": str(RETRIES),
            "AIRFLOW__CORE__DEFAULT_TASK_RETRY_DELAY": str(RETRY_DELAY_S),
            # The pipeline, in the tasks on the workers: ledger on PostgreSQL, snapshots and partitions on S3.
            "ENTITLE_HOME": str(cfg.entitle_home),
            "ENTITLE_LEDGER_URL": cfg.db_url(cfg.ledger_db),
            "ENTITLE_PARTITIONS": str(cfg.partitions),
            "ENTITLE_DATA_URI": cfg.data_uri,
            "ENTITLE_S3_ENDPOINT_URL": f"http://127.0.0.1:{ports.s3}",
            "AWS_REGION": S3_REGION,
            "AWS_ACCESS_KEY_ID": S3_ACCESS_KEY,
            "AWS_SECRET_ACCESS_KEY": S3_SECRET_KEY,
            MARKER_VAR: keys.marker,
        }
    )
    return env


def worker_environment(cfg: SmokeConfig, ports: Ports, env: Mapping[str, str], name: str) -> dict[str, str]:
    """One Celery worker's environment: the deployment's, with its own homes, log folder, log port and name."""
    index = cfg.worker_names.index(name)
    home = cfg.worker_home(name)
    return {
        **env,
        "AIRFLOW_HOME": str(home / "airflow"),
        "AIRFLOW__LOGGING__BASE_LOG_FOLDER": str(home / "airflow" / "logs"),
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(ports.worker_logs[index]),
        "ENTITLE_HOME": str(home / "entitle"),
        "ENTITLE_WORKER_NAME": name,
    }


def process_commands(cfg: SmokeConfig, ports: Ports) -> dict[str, list[str]]:
    """The long-running processes of the deployment: the S3 server, the three services, the workers."""
    airflow = str(cfg.bin_dir / "airflow")
    commands = {
        "s3": [str(cfg.bin_dir / "moto_server"), "--host", "127.0.0.1", "--port", str(ports.s3)],
        "api-server": [airflow, "api-server", "--workers", "1"],
        "scheduler": [airflow, "scheduler", "--skip-serve-logs"],
        "dag-processor": [airflow, "dag-processor"],
    }
    for name in cfg.worker_names:
        commands[name] = [
            *(airflow, "celery", "worker", "--concurrency", str(cfg.concurrency)),
            *("--celery-hostname", f"{name}@%h", "--without-mingle"),
        ]
    return commands


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------- command line


def _positive_int(text: str) -> int:
    try:
        value = int(text.replace("_", ""))
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from exc
    if value < 1:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from exc
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be more than 0")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="scaleout_smoke.py",
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]) if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    d = SmokeConfig()
    parser.add_argument("--users", type=_positive_int, default=d.users, help=f"synthetic users (default {d.users:,})")
    parser.add_argument(
        "--partitions", type=_positive_int, default=d.partitions, help=f"ENTITLE_PARTITIONS (default {d.partitions})"
    )
    parser.add_argument(
        "--workers",
        type=_positive_int,
        default=d.workers,
        help=f"Celery workers, one of them killed ({WORKERS_MIN}-{WORKERS_MAX}, default {d.workers})",
    )
    parser.add_argument(
        "--concurrency",
        type=_positive_int,
        default=d.concurrency,
        help=f"task processes of each Celery worker (default {d.concurrency})",
    )
    parser.add_argument(
        "--pool-slots", type=_positive_int, default=d.pool_slots, help=f"slots of the {POOL} pool (default 4)"
    )
    parser.add_argument(
        "--timeout",
        type=_positive_float,
        default=d.timeout_s,
        metavar="SECONDS",
        help="how long the DAG run may take once triggered (default 900)",
    )
    parser.add_argument(
        "--postgres",
        default=d.postgres,
        help=f"PostgreSQL server, as an SQLAlchemy URL without database ({d.postgres})",
    )
    parser.add_argument(
        "--broker", default=d.broker_url, help=f"Celery broker, a Redis URL; its database is flushed ({d.broker_url})"
    )
    parser.add_argument("--work-dir", type=Path, default=d.work_dir, help="the homes and the logs of every process")
    parser.add_argument("--keep", action="store_true", help="leave the processes running and the work dir for a look")
    parser.add_argument("--stop", action="store_true", help="only stop the processes a --keep run left, then exit")
    parser.add_argument("--json", action="store_true", help="print one JSON summary on stdout (progress on stderr)")
    return parser


def config_from_args(args: argparse.Namespace) -> SmokeConfig:
    """Validate what argparse cannot; raises EnvironmentProblem (exit 2)."""
    if args.partitions > PARTITIONS_MAX:
        raise EnvironmentProblem(f"--partitions {args.partitions}: at most {PARTITIONS_MAX}")
    if not WORKERS_MIN <= args.workers <= WORKERS_MAX:
        raise EnvironmentProblem(
            f"--workers {args.workers}: {WORKERS_MIN} to {WORKERS_MAX} (one is killed, another must take over)"
        )
    if args.partitions < args.workers:
        raise EnvironmentProblem(
            f"--partitions {args.partitions}: at least one per worker ({args.workers}), so that several grant"
        )
    if not args.broker.startswith("redis://"):
        raise EnvironmentProblem(f"--broker {args.broker!r}: this smoke test uses a Redis broker (redis://...)")
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        url = make_url(args.postgres)
    except ArgumentError as exc:
        raise EnvironmentProblem(f"--postgres {args.postgres!r} is not a database URL") from exc
    if url.get_backend_name() != "postgresql":
        raise EnvironmentProblem(f"--postgres {args.postgres!r} is not a PostgreSQL URL")
    work_dir = args.work_dir.expanduser().resolve()
    if work_dir in (ROOT, ROOT / "var", ROOT / "var" / "airflow") or (ROOT / "var" / "airflow") in work_dir.parents:
        raise EnvironmentProblem(f"--work-dir {work_dir}: not the project's own var/ or var/airflow")
    return SmokeConfig(
        users=args.users,
        partitions=args.partitions,
        workers=args.workers,
        concurrency=args.concurrency,
        pool_slots=args.pool_slots,
        timeout_s=args.timeout,
        postgres=args.postgres,
        broker_url=args.broker,
        work_dir=work_dir,
        keep=args.keep,
        json=args.json,
    )


# --------------------------------------------------------------------------- output


class Reporter:
    """Progress lines on stderr with the elapsed time, and phase timings."""

    def __init__(self) -> None:
        self.started = time.monotonic()
        self.phases: dict[str, float] = {}

    def say(self, message: str) -> None:
        print(f"[scaleout {time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        begun = time.monotonic()
        self.say(f"{name} ...")
        try:
            yield
        finally:
            self.phases[name] = round(time.monotonic() - begun, 1)
            self.say(f"{name}: {self.phases[name]:.1f} s")


# --------------------------------------------------------------------------- processes


@dataclass
class Deployment:
    """The processes started here, each in its own session (process group)."""

    cfg: SmokeConfig
    env: dict[str, str]
    processes: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    log_files: dict[str, IO[bytes]] = field(default_factory=dict)
    killed: set[str] = field(default_factory=set)  # killed on purpose: not a failure when found dead

    def log_path(self, name: str) -> Path:
        return self.cfg.logs_dir / f"{name}.log"

    def start(self, name: str, command: list[str], env: Mapping[str, str] | None = None) -> None:
        handle = open(self.log_path(name), "ab")  # noqa: SIM115 - closed in stop()
        self.log_files[name] = handle
        self.processes[name] = subprocess.Popen(
            command,
            env=dict(self.env if env is None else env),
            cwd=self.cfg.work_dir,
            stdin=subprocess.DEVNULL,
            stdout=handle,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def check_alive(self) -> None:
        for name, proc in self.processes.items():
            code = proc.poll()
            if code is not None and name not in self.killed:
                raise SmokeFailed(f"the {name} process exited with code {code} (log: {self.log_path(name)})")

    def write_pids(self) -> None:
        document = {"marker": self.env[MARKER_VAR], "groups": {n: p.pid for n, p in self.processes.items()}}
        (self.cfg.work_dir / "pids.json").write_text(json.dumps(document, indent=1) + "\n")

    def stop(self, say: Say, grace_s: float = 15.0) -> None:
        """SIGTERM every process group, SIGKILL what is left after ``grace_s``, then sweep by marker."""
        for proc in self.processes.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        deadline = time.monotonic() + grace_s
        for name, proc in self.processes.items():
            try:
                proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                say(f"{name} did not stop within {grace_s:.0f} s: SIGKILL")
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # also any child left in the group
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(timeout=10)
        left = kill_marked(self.env[MARKER_VAR])
        if left:
            say(f"killed {left} leftover process(es) of this run outside their groups")
        for handle in self.log_files.values():
            handle.close()
        self.processes.clear()
        self.log_files.clear()


def process_tree(root: int) -> list[int]:
    """``root`` and every process descended from it (Airflow's task processes have process groups of their own)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        parent = int(stat.rpartition(")")[2].split()[1])  # "pid (comm) state ppid ...": comm may hold spaces
        children.setdefault(parent, []).append(int(entry.name))
    found, todo = [], [root]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, []))
    return found


def signal_all(pids: list[int], signum: int) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signum)


def freeze_tree(root: int) -> list[int]:
    """SIGSTOP ``root`` and all its descendants (again for any forked meanwhile); the frozen pids."""
    frozen: list[int] = []
    for _ in range(5):
        new = [pid for pid in process_tree(root) if pid not in frozen]
        if not new:
            break
        signal_all(new, signal.SIGSTOP)
        frozen.extend(new)
    return frozen


def marked_pids(marker: str) -> list[int]:
    """Processes whose environment carries this run's marker (only processes started by this tool have it)."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_marked(marker: str) -> int:
    pids = marked_pids(marker)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    return len(pids)


def stop_kept(work_dir: Path, say: Say) -> int:
    """Stop the processes a --keep run left in ``work_dir`` (checked by their marker); how many were running."""
    pids_file = work_dir / "pids.json"
    if not pids_file.exists():
        return 0
    try:
        document = json.loads(pids_file.read_text())
        marker = str(document["marker"])
    except (ValueError, KeyError, TypeError):
        return 0
    pids = marked_pids(marker)
    if not pids:
        pids_file.unlink()
        return 0
    say(f"stopping {len(pids)} process(es) left running by an earlier --keep run")
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + 30
    while marked_pids(marker) and time.monotonic() < deadline:
        time.sleep(0.5)
    kill_marked(marker)
    pids_file.unlink()
    return len(pids)


def tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"({path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


# --------------------------------------------------------------------------- services


def task_log_errors(path: Path) -> list[str]:
    """The exceptions in an Airflow 3 task log (JSON lines): ``Type: message (at file:line in function)``."""
    found = []
    for line in path.read_text(errors="replace").splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        for error in record.get("error_detail") or [] if isinstance(record, dict) else []:
            frames = error.get("frames") or [{}]
            where = frames[-1]
            found.append(
                f"{error.get('exc_type')}: {error.get('exc_value')} "
                f"(at {Path(str(where.get('filename'))).name}:{where.get('lineno')} in {where.get('name')})"
            )
    return found


def check_prerequisites(cfg: SmokeConfig) -> None:
    """Everything the run needs that this tool does not start; raises EnvironmentProblem."""
    from importlib import metadata

    for tool in ("airflow", "entitle", "moto_server"):
        if not (cfg.bin_dir / tool).exists():
            raise EnvironmentProblem(f"{cfg.bin_dir / tool} is missing: run `make venv` and use .venv/bin/python")
    for package in ("apache-airflow-providers-celery", "moto", "boto3"):
        try:
            metadata.version(package)
        except metadata.PackageNotFoundError as exc:
            raise EnvironmentProblem(f"{package} is not installed in this virtualenv: `make venv` installs it") from exc
    import psycopg

    try:
        with psycopg.connect(cfg.libpq_url("postgres"), connect_timeout=5) as conn:
            conn.execute("SELECT 1")
    except psycopg.Error as exc:
        raise EnvironmentProblem(f"PostgreSQL at {cfg.postgres} does not answer: {exc}".strip()) from exc
    import redis

    try:
        redis.Redis.from_url(cfg.broker_url, socket_connect_timeout=3, socket_timeout=3).ping()
    except redis.RedisError as exc:
        raise EnvironmentProblem(f"Redis at {cfg.broker_url} does not answer: {exc}") from exc
    for name in (cfg.airflow_db, cfg.ledger_db):
        if not DB_NAME_RE.match(name):
            raise EnvironmentProblem(f"database name {name!r} is not a plain identifier")


DROP_TIMEOUT_MS = 60_000


def recreate_databases(cfg: SmokeConfig, say: Say) -> None:
    """Drop and create both databases; where a drop cannot finish, empty the database instead.

    PostgreSQL 15's DROP DATABASE waits until every backend of the server, in any database,
    accepts a ProcSignalBarrier: one stuck session elsewhere blocks it for good. After a minute
    the drop is cancelled and the database emptied (its schemas dropped) instead, which is as fresh.
    """
    import psycopg

    with psycopg.connect(cfg.libpq_url("postgres"), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"SET statement_timeout = {DROP_TIMEOUT_MS}")
        for name in (cfg.airflow_db, cfg.ledger_db):
            try:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except psycopg.errors.QueryCanceled:
                say(
                    f"DROP DATABASE {name} did not finish in {DROP_TIMEOUT_MS // 1000} s "
                    "(a stuck backend elsewhere); emptying it instead"
                )
                _empty_database(cfg, name)
                continue
            conn.execute(f'CREATE DATABASE "{name}"')


def _empty_database(cfg: SmokeConfig, name: str) -> None:
    import psycopg

    with psycopg.connect(cfg.libpq_url("postgres"), autocommit=True, connect_timeout=10) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
    with psycopg.connect(cfg.libpq_url(name), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"SET statement_timeout = {DROP_TIMEOUT_MS}")
        schemas = [
            str(row[0])
            for row in conn.execute(
                "SELECT nspname FROM pg_namespace WHERE nspname <> 'information_schema' AND nspname NOT LIKE 'pg\\_%'"
            ).fetchall()
        ]
        for schema in schemas:
            conn.execute(f'DROP SCHEMA "{schema}" CASCADE')
        conn.execute("CREATE SCHEMA public")


def drop_databases(cfg: SmokeConfig, say: Say) -> None:
    import psycopg

    with psycopg.connect(cfg.libpq_url("postgres"), autocommit=True, connect_timeout=10) as conn:
        conn.execute(f"SET statement_timeout = {DROP_TIMEOUT_MS}")
        for name in (cfg.airflow_db, cfg.ledger_db):
            try:
                conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            except psycopg.errors.QueryCanceled:
                say(f"DROP DATABASE {name} did not finish in {DROP_TIMEOUT_MS // 1000} s; the next run empties it")


def flush_broker(cfg: SmokeConfig) -> None:
    import redis

    redis.Redis.from_url(cfg.broker_url, socket_connect_timeout=3).flushdb()


def metadata_query(cfg: SmokeConfig, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(cfg.libpq_url(cfg.airflow_db), connect_timeout=5) as conn:
        return list(conn.execute(sql, params).fetchall())


def partition_attempts(cfg: SmokeConfig) -> list[dict[str, Any]]:
    """Every row of the ledger's partition_attempts (none before the first task created the schema)."""
    import psycopg
    from psycopg.rows import dict_row

    with psycopg.connect(cfg.libpq_url(cfg.ledger_db), connect_timeout=5, row_factory=dict_row) as conn:
        exists = conn.execute("SELECT to_regclass('partition_attempts') IS NOT NULL AS found").fetchone()
        if not exists or not exists["found"]:
            return []
        return list(
            conn.execute(
                "SELECT attempt_key, snapshot_id, partition_id, status, worker, started_at, finished_at, written "
                "FROM partition_attempts ORDER BY attempt_key"
            ).fetchall()
        )


def worker_name(attempt: Mapping[str, Any]) -> str:
    """The ENTITLE_WORKER_NAME part of an attempt's worker ("worker-2:12345" -> "worker-2")."""
    return str(attempt.get("worker") or "").rpartition(":")[0]


def worker_pid(attempt: Mapping[str, Any]) -> int | None:
    text = str(attempt.get("worker") or "").rpartition(":")[2]
    return int(text) if text.isdigit() else None


def run_command(
    command: list[str], env: Mapping[str, str], timeout_s: float, what: str, *, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """Run a command to completion; a non-zero exit is a SmokeFailed with its output's tail."""
    try:
        result = subprocess.run(
            command, env=dict(env), cwd=cwd, capture_output=True, text=True, timeout=timeout_s, check=False
        )
    except subprocess.TimeoutExpired as exc:
        raise SmokeFailed(f"{what} did not finish within {timeout_s:.0f} s: {' '.join(command)}") from exc
    if result.returncode != 0:
        output = "\n".join((result.stdout + result.stderr).splitlines()[-30:])
        raise SmokeFailed(f"{what} exited with {result.returncode}: {' '.join(command)}\n{output}")
    return result


def wait_until(
    predicate: Callable[[], bool], timeout_s: float, what: str, deployment: Deployment, interval_s: float = 1.0
) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        deployment.check_alive()
        if predicate():
            return
        if time.monotonic() > deadline:
            raise SmokeFailed(f"{what}: not within {timeout_s:.0f} s")
        time.sleep(interval_s)


def api_healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v2/monitor/health", timeout=3) as response:
            return bool(response.status == 200)
    except (OSError, urllib.error.URLError):
        return False


def dag_parsed(cfg: SmokeConfig) -> bool:
    try:
        rows = metadata_query(cfg, "SELECT count(*) FROM serialized_dag WHERE dag_id = %s", (DAG_ID,))
    except Exception:  # noqa: BLE001 - the table appears with the first parse
        return False
    return bool(rows and rows[0][0])


def worker_ready(deployment: Deployment, name: str) -> bool:
    return " ready." in deployment.log_path(name).read_text(errors="replace")


def s3_client(ports: Ports) -> Any:
    """A boto3 client on the moto server: this tool's own view of the bucket."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=f"http://127.0.0.1:{ports.s3}",
        aws_access_key_id=S3_ACCESS_KEY,
        aws_secret_access_key=S3_SECRET_KEY,
        region_name=S3_REGION,
    )


def create_bucket(ports: Ports) -> bool:
    """Create the bucket once the S3 server answers; False while it does not."""
    from botocore.exceptions import BotoCoreError, ClientError

    try:
        s3_client(ports).create_bucket(Bucket=BUCKET)
    except (BotoCoreError, ClientError, OSError):
        return False
    return True


def s3_keys(ports: Ports, prefix: str) -> list[str]:
    paginator = s3_client(ports).get_paginator("list_objects_v2")
    return [
        item["Key"] for page in paginator.paginate(Bucket=BUCKET, Prefix=prefix) for item in page.get("Contents", [])
    ]


# --------------------------------------------------------------------------- the run


def task_instances(cfg: SmokeConfig, run_id: str) -> list[dict[str, Any]]:
    rows = metadata_query(
        cfg,
        "SELECT id, task_id, map_index, state, hostname, queue, try_number, pid, rendered_map_index "
        "FROM task_instance WHERE dag_id = %s AND run_id = %s ORDER BY task_id, map_index",
        (DAG_ID, run_id),
    )
    keys = ("id", "task_id", "map_index", "state", "hostname", "queue", "try_number", "pid", "label")
    return [dict(zip(keys, row, strict=True)) for row in rows]


def run_state(cfg: SmokeConfig, run_id: str) -> str:
    rows = metadata_query(cfg, "SELECT state FROM dag_run WHERE dag_id = %s AND run_id = %s", (DAG_ID, run_id))
    return str(rows[0][0]) if rows else "missing"


def partition_label(partition_id: int) -> str:
    return f"part-{partition_id:04d}"  # as pipeline.grants.partitioning labels it (the grant task's map index)


@dataclass
class Kill:
    """The worker killed in the middle of the grant, and what Airflow did about it."""

    worker: str
    partition_id: int
    attempt_key: int
    task_pid: int
    pids: list[int]
    map_index: int
    try_number: int
    killed_at: float  # time.monotonic()
    granted_before: int  # partitions done when the worker was killed
    detected_s: float | None = None  # kill -> the task instance left 'running' (heartbeat timeout)
    detected_state: str | None = None
    retry_started_s: float | None = None  # kill -> its next try running on another worker
    retry_worker: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "worker": self.worker,
            "partition": partition_label(self.partition_id),
            "attempt_key": self.attempt_key,
            "task_pid": self.task_pid,
            "processes_killed": len(self.pids),
            "partitions_done_before": self.granted_before,
            "detected_s": self.detected_s,
            "detected_state": self.detected_state,
            "retry_started_s": self.retry_started_s,
            "retry_worker": self.retry_worker,
            "heartbeat_timeout_s": HEARTBEAT_TIMEOUT_S,
            "detection_interval_s": HEARTBEAT_CHECK_S,
        }


def kill_mid_grant(cfg: SmokeConfig, deployment: Deployment, run_id: str, rep: Reporter) -> Kill:
    """SIGKILL a worker while the ledger shows it granting a partition, once a quarter of them are granted.

    The worker is frozen (SIGSTOP, its whole process tree) first, and its attempt read again:
    one that committed meanwhile is let go (SIGCONT) and the next is waited for, so that the
    killed attempt is one the worker can never finish.
    """
    deadline = time.monotonic() + cfg.timeout_s
    granted_first = max(1, cfg.partitions // KILL_AFTER_SHARE)
    passed_over: set[int] = set()
    while True:
        deployment.check_alive()
        state = run_state(cfg, run_id)
        if state in ("success", "failed"):
            raise SmokeFailed(
                f"the DAG run ended {state} before a worker could be killed in the middle of the grant; "
                "give it more --users or --partitions"
            )
        if time.monotonic() > deadline:
            raise SmokeFailed(f"no worker was granting a partition within {cfg.timeout_s:.0f} s of the trigger")
        attempts = partition_attempts(cfg)
        done = {a["partition_id"] for a in attempts if a["status"] == "done"}
        running = [
            a
            for a in attempts
            if a["status"] == "running"
            and worker_name(a) in deployment.processes
            and a["attempt_key"] not in passed_over
        ]
        if len(done) < granted_first or not running:
            time.sleep(KILL_POLL_S)
            continue
        # Rather a worker that granted a partition already (the ledger then shows it among the writers too);
        # any worker once half of the partitions are granted.
        proven = {worker_name(a) for a in attempts if a["status"] == "done"}
        candidates = [a for a in running if worker_name(a) in proven]
        if not candidates and len(done) < max(granted_first, cfg.partitions // 2):
            time.sleep(KILL_POLL_S)
            continue
        target = (candidates or running)[-1]  # the latest to start: the most of its work still ahead
        name, task_pid = worker_name(target), worker_pid(target)
        frozen = freeze_tree(deployment.processes[name].pid)
        time.sleep(FREEZE_SETTLE_S)
        now = {a["attempt_key"]: a for a in partition_attempts(cfg)}
        if now[target["attempt_key"]]["status"] != "running":
            signal_all(frozen, signal.SIGCONT)
            passed_over.add(target["attempt_key"])
            rep.say(
                f"{name} finished {partition_label(target['partition_id'])} while being frozen; waiting for another"
            )
            continue
        if task_pid not in frozen:
            signal_all(frozen, signal.SIGCONT)
            raise SmokeFailed(
                f"attempt {target['attempt_key']} names worker {target['worker']!r}, but pid {task_pid} is not "
                f"a process of {name} (pids {sorted(frozen)}): the ledger's worker column is wrong"
            )
        label = partition_label(target["partition_id"])
        tis = [t for t in task_instances(cfg, run_id) if t["task_id"] == GRANT_TASK and t["state"] == "running"]
        matching = [t for t in tis if t["pid"] == task_pid] or [t for t in tis if t["label"] == label]
        if not matching:
            signal_all(frozen, signal.SIGCONT)
            raise SmokeFailed(f"no running task instance of {GRANT_TASK} has pid {task_pid} or label {label}")
        signal_all(frozen, signal.SIGKILL)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(deployment.processes[name].pid, signal.SIGKILL)
        killed_at = time.monotonic()
        deployment.killed.add(name)
        deployment.processes[name].wait(timeout=30)
        rep.say(
            f"SIGKILL {name} ({len(frozen)} processes) while it granted {label} (attempt {target['attempt_key']}, "
            f"task pid {task_pid}, try {matching[0]['try_number']}); {len(done)} of {cfg.partitions} partitions done"
        )
        return Kill(
            worker=name,
            partition_id=int(target["partition_id"]),
            attempt_key=int(target["attempt_key"]),
            task_pid=task_pid,
            pids=sorted(frozen),
            map_index=int(matching[0]["map_index"]),
            try_number=int(matching[0]["try_number"]),
            killed_at=killed_at,
            granted_before=len(done),
        )


def watch_recovery(cfg: SmokeConfig, deployment: Deployment, run_id: str, kill: Kill, rep: Reporter) -> None:
    """Time Airflow's detection of the lost task instance and the start of its retry (fills ``kill``)."""
    deadline = kill.killed_at + HEARTBEAT_TIMEOUT_S + DETECTION_SLACK_S + RETRY_DELAY_S * 2
    while kill.retry_started_s is None:
        deployment.check_alive()
        rows = metadata_query(
            cfg,
            "SELECT state, try_number, pid FROM task_instance "
            "WHERE dag_id = %s AND run_id = %s AND task_id = %s AND map_index = %s",
            (DAG_ID, run_id, GRANT_TASK, kill.map_index),
        )
        state, try_number, pid = rows[0] if rows else ("missing", kill.try_number, None)
        elapsed = time.monotonic() - kill.killed_at
        if kill.detected_s is None and (state != "running" or try_number > kill.try_number):
            kill.detected_s, kill.detected_state = round(elapsed, 1), str(state)
            rep.say(f"the scheduler marked the lost task instance {state} {elapsed:.1f} s after the kill")
        if try_number > kill.try_number and state in ("running", "success"):
            kill.retry_started_s = round(elapsed, 1)
            rep.say(f"its try {try_number} started {elapsed:.1f} s after the kill (task pid {pid})")
        if time.monotonic() > deadline:
            what = "retried" if kill.detected_s is not None else "detected"
            raise SmokeFailed(
                f"the task instance lost with {kill.worker} was not {what} within {elapsed:.0f} s of the kill "
                f"(state {state}, try {try_number}; heartbeat timeout {HEARTBEAT_TIMEOUT_S} s)"
            )
        time.sleep(0.5)


def wait_for_run(cfg: SmokeConfig, deployment: Deployment, run_id: str, rep: Reporter, deadline: float) -> str:
    """Poll the run until success or failed (or the deadline); prints progress; returns the final state."""
    last_line, last_print = "", 0.0
    while True:
        deployment.check_alive()
        state = run_state(cfg, run_id)
        counts: dict[str, int] = {}
        for ti in task_instances(cfg, run_id):
            key = str(ti["state"] or "none")
            counts[key] = counts.get(key, 0) + 1
        line = f"run {state}; task instances: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
        if line != last_line or time.monotonic() - last_print > 30:
            rep.say(line)
            last_line, last_print = line, time.monotonic()
        if state in ("success", "failed"):
            return state
        if time.monotonic() > deadline:
            raise SmokeFailed(f"the DAG run {run_id} was still {state} after {cfg.timeout_s:.0f} s")
        time.sleep(2)


def check_tries(tis: list[dict[str, Any]], kill: Kill) -> None:
    """The lost task instance took one more try; every other one succeeded on its first."""
    lost = [t for t in tis if t["task_id"] == GRANT_TASK and t["map_index"] == kill.map_index]
    if not lost or lost[0]["try_number"] != kill.try_number + 1:
        raise SmokeFailed(
            f"the lost task instance {GRANT_TASK}[{kill.map_index}]: {lost}; want try {kill.try_number + 1}"
        )
    retried = [
        f"{t['task_id']}[{t['map_index']}] try {t['try_number']}"
        for t in tis
        if t["try_number"] != 1 and not (t["task_id"] == GRANT_TASK and t["map_index"] == kill.map_index)
    ]
    if retried:
        raise SmokeFailed(f"task instances that needed a retry although their worker lived: {', '.join(retried)}")


def check_celery(cfg: SmokeConfig, deployment: Deployment, tis: list[dict[str, Any]]) -> dict[str, Any]:
    """Every task instance went through a Celery worker: its id in a worker's log, a SUCCESS in the backend."""
    worker_logs = {name: deployment.log_path(name).read_text(errors="replace") for name in cfg.worker_names}
    ran_on = {str(t["id"]): [n for n, text in worker_logs.items() if str(t["id"]) in text] for t in tis}
    not_in_log = [f"{t['task_id']}[{t['map_index']}]" for t in tis if not ran_on[str(t["id"])]]
    if not_in_log:
        raise SmokeFailed(f"task instances not run by a Celery worker (in no worker's log): {', '.join(not_in_log)}")
    # The worker stores a task's result just after the task instance reported its state (and the run
    # may already be success): give the last results a moment.
    deadline = time.monotonic() + 30
    while True:
        try:
            statuses = dict(metadata_query(cfg, "SELECT status, count(*) FROM celery_taskmeta GROUP BY status"))
        except Exception:  # noqa: BLE001 - no table yet: Celery stored no result at all
            statuses = {}
        successes = int(statuses.get("SUCCESS", 0))
        if successes >= len(tis) or time.monotonic() > deadline:
            break
        time.sleep(1)
    if successes < len(tis):
        raise SmokeFailed(f"Celery's result backend recorded {successes} successes for {len(tis)} task instances")
    bad_queue = sorted({str(t["queue"]) for t in tis if t["queue"] != "default"})
    if bad_queue:
        raise SmokeFailed(f"task instances in unexpected queues: {bad_queue}")
    per_worker = {name: sum(1 for names in ran_on.values() if name in names) for name in cfg.worker_names}
    return {
        "task_instances_in_worker_logs": len(tis),
        "task_instances_per_worker_log": per_worker,
        "result_backend": {str(k): int(v) for k, v in statuses.items()},
        "queues": sorted({str(t["queue"]) for t in tis}),
    }


def check_ledger(cfg: SmokeConfig, env: Mapping[str, str]) -> dict[str, Any]:
    """`entitle reconcile` and `entitle summary` on the PostgreSQL ledger, compared with users x items."""
    from pipeline.campaigns import load_campaign

    items = len(load_campaign(None).items)
    expected = cfg.users * items
    entitle = str(cfg.bin_dir / "entitle")
    result = subprocess.run(
        [entitle, "reconcile", "--json", "--no-progress"],
        env=dict(env),
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    try:
        document = json.loads(result.stdout)
    except ValueError as exc:
        raise SmokeFailed(f"entitle reconcile exited {result.returncode}, no JSON: {result.stderr[-2000:]}") from exc
    bridge = document.get("bridge", {})
    verdict = document.get("verdict")
    problems = []
    if result.returncode != 0 or verdict != "RECONCILED":
        problems.append(f"entitle reconcile exited {result.returncode} with verdict {verdict}")
    for key in ("expected", "ledger", "matched"):
        if bridge.get(key) != expected:
            problems.append(f"reconcile {key} = {bridge.get(key)}, want {cfg.users:,} users x {items} items")
    summary = json.loads(run_command([entitle, "summary", "--json"], env, 300, "entitle summary").stdout)
    if summary.get("total_grants") != expected:
        problems.append(f"summary total_grants = {summary.get('total_grants')}, want {expected}")
    short = [i for i in summary.get("items", []) if i.get("grants") != cfg.users]
    if short or len(summary.get("items", [])) != items:
        problems.append(f"summary items not {cfg.users} each: {summary.get('items')}")
    if problems:
        raise SmokeFailed("the ledger check failed: " + "; ".join(problems))
    return {
        "ledger": summary.get("ledger"),
        "verdict": verdict,
        "expected": bridge["expected"],
        "ledger_rows": bridge["ledger"],
        "matched": bridge["matched"],
        "items": items,
        "total_grants": summary["total_grants"],
        "reconcile_s": document.get("duration_s"),
    }


def check_workers(cfg: SmokeConfig, kill: Kill, say: Say) -> dict[str, Any]:
    """From the ledger: which worker granted which partition; several did, and the lost partition was taken over."""
    attempts = partition_attempts(cfg)
    by_partition: dict[int, list[dict[str, Any]]] = {}
    for attempt in attempts:
        by_partition.setdefault(int(attempt["partition_id"]), []).append(attempt)
    granted_by: dict[int, str] = {}
    for partition_id, tried in by_partition.items():
        done = [a for a in tried if a["status"] == "done"]
        if done:
            granted_by[partition_id] = worker_name(done[-1])
    rows = [
        f"  {partition_label(p):<10} {granted_by.get(p, '-'):<10} "
        + ", ".join(f"{worker_name(a) or '?'} {a['status']}" for a in by_partition[p])
        for p in sorted(by_partition)
    ]
    say("partition  granted by attempts (in order)\n" + "\n".join(rows))
    problems = []
    missing = sorted(set(range(cfg.partitions)) - set(granted_by))
    if missing:
        problems.append(f"partitions without a done attempt: {', '.join(partition_label(p) for p in missing)}")
    unnamed = [a["attempt_key"] for a in attempts if worker_name(a) not in cfg.worker_names]
    if unnamed:
        problems.append(f"attempts whose worker is not one of {', '.join(cfg.worker_names)}: {unnamed}")
    writers = sorted(set(granted_by.values()))
    if len(writers) < 2:
        problems.append(f"only {writers} granted partitions: the work did not spread over several workers")
    lost = next((a for a in attempts if a["attempt_key"] == kill.attempt_key), None)
    taken_over = [
        a
        for a in by_partition.get(kill.partition_id, [])
        if a["attempt_key"] > kill.attempt_key and a["status"] == "done" and worker_name(a) != kill.worker
    ]
    if lost is None or lost["status"] != "running" or worker_name(lost) != kill.worker:
        problems.append(f"the killed attempt {kill.attempt_key} should be {kill.worker}'s and still 'running': {lost}")
    if not taken_over:
        problems.append(
            f"{partition_label(kill.partition_id)}, lost with {kill.worker}, was not granted by another worker"
        )
    if problems:
        raise SmokeFailed("the workers check failed: " + "; ".join(problems))
    kill.retry_worker = worker_name(taken_over[0])
    per_worker = {name: sum(1 for w in granted_by.values() if w == name) for name in cfg.worker_names}
    return {
        "granted_by": {partition_label(p): w for p, w in sorted(granted_by.items())},
        "partitions_per_worker": per_worker,
        "attempts": len(attempts),
        "lost_partition_granted_by": kill.retry_worker,
    }


def check_storage(cfg: SmokeConfig, ports: Ports) -> dict[str, Any]:
    """The snapshot and its partitions are on S3; no worker's own home holds any of them."""
    keys = s3_keys(ports, f"{DATA_PREFIX}/")
    parts = [k for k in keys if re.search(rf"/partitions-{cfg.partitions:04d}/part-\d{{4}}\.parquet$", k)]
    problems = []
    if len(parts) != cfg.partitions:
        problems.append(f"{len(parts)} partition files under {cfg.data_uri}, want {cfg.partitions}")
    local = [str(p) for name in cfg.worker_names for p in cfg.worker_home(name).rglob("snapshots")]
    if local:
        problems.append(f"snapshots in a worker's local home: {', '.join(local)}")
    if problems:
        raise SmokeFailed("the storage check failed: " + "; ".join(problems))
    return {"objects": len(keys), "partition_files": len(parts), "data_uri": cfg.data_uri}


def check_work_dir(cfg: SmokeConfig) -> None:
    """Only an empty folder, or one this tool made (it holds the lock file), is used: its contents are removed."""
    work = cfg.work_dir
    if work.exists() and (not work.is_dir() or (any(work.iterdir()) and not (work / LOCK_NAME).exists())):
        raise EnvironmentProblem(f"{work} is not empty and not a scale-out smoke work dir; choose another --work-dir")


def prepare_work_dir(cfg: SmokeConfig, rep: Reporter) -> IO[str]:
    """Lock the work dir (one smoke at a time), stop a --keep run's leftovers, empty it; returns the lock."""
    work = cfg.work_dir
    check_work_dir(cfg)
    work.mkdir(parents=True, exist_ok=True)
    lock = open(work / LOCK_NAME, "a+")  # noqa: SIM115 - held for the whole run
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError as exc:
        lock.close()
        raise EnvironmentProblem(f"another scale-out smoke test is running in {work}") from exc
    stop_kept(work, rep.say)
    clear_work_dir(cfg)
    homes = [cfg.worker_home(n) / sub for n in cfg.worker_names for sub in ("airflow", "entitle")]
    for path in (cfg.airflow_home, cfg.entitle_home, cfg.logs_dir, *homes):
        path.mkdir(parents=True)
    return lock


def clear_work_dir(cfg: SmokeConfig) -> None:
    for name in WORK_ENTRIES:
        path = cfg.work_dir / name
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        elif path.exists() or path.is_symlink():
            path.unlink()


def write_env_file(cfg: SmokeConfig, env: Mapping[str, str]) -> Path:
    """WORK_DIR/env.sh: `. var/scaleout/env.sh` gives a shell the deployment's airflow and entitle settings."""
    path = cfg.work_dir / "env.sh"
    shared = ("AIRFLOW", "ENTITLE_", "AWS_")
    lines = [f"export {k}={_shell_quote(v)}" for k, v in sorted(env.items()) if k.startswith(shared)]
    lines.append(f'export PATH={_shell_quote(str(cfg.bin_dir))}:"$PATH"')
    path.write_text("# the scale-out smoke deployment's settings (secrets: keep private)\n" + "\n".join(lines) + "\n")
    path.chmod(0o600)
    return path


def _shell_quote(value: str) -> str:
    return "'" + value.replace("'", "'\"'\"'") + "'"


def smoke(cfg: SmokeConfig, rep: Reporter, outcome: dict[str, Any]) -> None:
    """The whole run; raises SmokeFailed / EnvironmentProblem / Interrupted. Fills ``outcome``."""
    with rep.phase("preflight"):
        check_work_dir(cfg)
        check_prerequisites(cfg)
        lock = prepare_work_dir(cfg, rep)
    keys = Secrets.generate()
    ports = Ports.free(cfg.workers)
    env = build_environment(cfg, ports, keys)
    deployment = Deployment(cfg, env)
    outcome.update(
        {"work_dir": str(cfg.work_dir), "api_url": f"http://127.0.0.1:{ports.api}", "logs": str(cfg.logs_dir)}
    )
    passed = False
    failed_logs: list[Path] = []
    try:
        write_env_file(cfg, env)
        commands = process_commands(cfg, ports)
        with rep.phase("databases, S3 server"):
            recreate_databases(cfg, rep.say)
            flush_broker(cfg)
            deployment.start("s3", commands.pop("s3"))
            wait_until(lambda: create_bucket(ports), 60, f"the S3 server on port {ports.s3}", deployment)
        with rep.phase("airflow db migrate"):
            run_command([str(cfg.bin_dir / "airflow"), "db", "migrate"], env, 600, "airflow db migrate")
            run_command(
                [str(cfg.bin_dir / "airflow"), "pools", "set", POOL, str(cfg.pool_slots), "Concurrent ledger writers"],
                env,
                120,
                "airflow pools set",
            )
        with rep.phase(f"demo users ({cfg.users:,}, to S3)"):
            run_command(
                [str(cfg.bin_dir / "entitle"), "demo-users", "--count", str(cfg.users), "--out", str(cfg.users_file)],
                env,
                300,
                "entitle demo-users",
            )
            s3_client(ports).upload_file(str(cfg.users_file), BUCKET, USERS_KEY)
        with rep.phase(f"start api-server, scheduler, dag-processor, {cfg.workers} celery workers"):
            for name, command in commands.items():
                worker_env = worker_environment(cfg, ports, env, name) if name in cfg.worker_names else None
                deployment.start(name, command, worker_env)
            deployment.write_pids()
            wait_until(lambda: api_healthy(ports.api), 180, "the api-server's health endpoint", deployment)
            for name in cfg.worker_names:
                wait_until(
                    functools.partial(worker_ready, deployment, name), 180, f"the Celery {name} ready", deployment
                )
            wait_until(lambda: dag_parsed(cfg), 180, f"the dag-processor parsing {DAG_ID}", deployment)
        run_id = f"scaleout_smoke__{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}"
        outcome["run_id"] = run_id
        with rep.phase("trigger"):
            airflow = str(cfg.bin_dir / "airflow")
            run_command([airflow, "dags", "unpause", DAG_ID], env, 120, "airflow dags unpause")
            conf = json.dumps({"snapshot_uri": cfg.users_uri})
            run_command(
                [airflow, "dags", "trigger", DAG_ID, "--run-id", run_id, "--conf", conf],
                env,
                120,
                "airflow dags trigger",
            )
        run_deadline = time.monotonic() + cfg.timeout_s
        with rep.phase("DAG run"):
            kill = kill_mid_grant(cfg, deployment, run_id, rep)
            outcome["kill"] = kill.as_dict()
            watch_recovery(cfg, deployment, run_id, kill, rep)
            outcome["kill"] = kill.as_dict()
            state = wait_for_run(cfg, deployment, run_id, rep, run_deadline)
        tis = task_instances(cfg, run_id)
        outcome["dag_run_state"] = state
        outcome["task_instances"] = len(tis)
        if state != "success":
            failed = [t for t in tis if t["state"] not in ("success",)]
            outcome["failed_task_instances"] = [f"{t['task_id']}[{t['map_index']}] {t['state']}" for t in failed]
            for t in [t for t in failed if t["state"] == "failed"][:3]:
                mapped = f"map_index={t['map_index']}/" if t["map_index"] >= 0 else ""
                for home in [cfg.worker_home(n) / "airflow" for n in cfg.worker_names]:
                    run_logs = home / "logs" / f"dag_id={DAG_ID}" / f"run_id={run_id}"
                    failed_logs.extend(sorted(run_logs.glob(f"task_id={t['task_id']}/{mapped}*.log")))
            errors = [f"{log.parent.name}/{log.name}: {e}" for log in failed_logs for e in task_log_errors(log)]
            raise SmokeFailed(
                f"the DAG run {run_id} ended {state}: {', '.join(outcome['failed_task_instances'])}"
                + "".join(f"\n  {e}" for e in errors)
            )
        with rep.phase("checks (tries, Celery, ledger, workers, S3)"):
            check_tries(tis, kill)
            outcome["celery"] = check_celery(cfg, deployment, tis)
            outcome["ledger"] = check_ledger(cfg, env)
            outcome["workers"] = check_workers(cfg, kill, rep.say)
            outcome["kill"] = kill.as_dict()
            outcome["storage"] = check_storage(cfg, ports)
        writers = outcome["workers"]["partitions_per_worker"]
        rep.say(
            f"ok: {len(tis)} task instances on {cfg.workers} Celery workers; partitions granted per worker "
            + ", ".join(f"{n} {c}" for n, c in writers.items())
            + f"; {kill.worker} killed mid-grant, detected after {kill.detected_s:.1f} s, "
            f"{partition_label(kill.partition_id)} retried after {kill.retry_started_s:.1f} s and granted by "
            f"{kill.retry_worker}; ledger {outcome['ledger']['verdict']}, {outcome['ledger']['total_grants']:,} "
            f"grants = {cfg.users:,} users x {outcome['ledger']['items']} items"
        )
        passed = True
    except (SmokeFailed, Interrupted, KeyboardInterrupt):
        for name in deployment.processes:
            rep.say(f"--- tail of {deployment.log_path(name)}:\n{tail(deployment.log_path(name))}")
        for log in failed_logs:  # last, so that a CI log cut to its tail still shows why the task failed
            rep.say(f"--- failed task's log {log}:\n{tail(log, 60)}")
        raise
    finally:
        # Cleanup must not be cut short by a second Ctrl-C or SIGTERM.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        if cfg.keep:
            rep.say(
                f"--keep: processes left running (API {outcome['api_url']}); `. {cfg.work_dir}/env.sh` for the airflow "
                f"and entitle commands; stop them with `{cfg.bin_dir}/python {Path(__file__).relative_to(ROOT)} --stop`"
            )
        else:
            with rep.phase("stop"):
                deployment.stop(rep.say)
            if passed:
                clear_work_dir(cfg)
                drop_databases(cfg, rep.say)
        lock.close()


def installed_versions() -> dict[str, str]:
    from importlib import metadata

    found = {}
    for name in ("apache-airflow", "apache-airflow-providers-celery", "celery", "redis", "psycopg", "moto"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            found[name] = metadata.version(name)
    return found


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)  # exits 2 on bad usage
    rep = Reporter()
    try:
        cfg = config_from_args(args)
    except EnvironmentProblem as exc:
        parser.print_usage(sys.stderr)
        print(f"scaleout_smoke.py: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    if args.stop:
        stopped = stop_kept(cfg.work_dir, rep.say)
        rep.say(f"stopped {stopped} process(es)" if stopped else "nothing to stop")
        return EXIT_OK

    def on_sigterm(signum: int, _frame: Any) -> None:
        raise Interrupted(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_sigterm)
    outcome: dict[str, Any] = {
        "users": cfg.users,
        "partitions": cfg.partitions,
        "celery_workers": cfg.workers,
        "concurrency": cfg.concurrency,
        "versions": installed_versions(),
    }
    code = EXIT_FAILED
    try:
        smoke(cfg, rep, outcome)
        code = EXIT_OK
    except EnvironmentProblem as exc:
        outcome["error"] = str(exc)
        code = EXIT_USAGE
    except SmokeFailed as exc:
        outcome["error"] = str(exc)
    except (Interrupted, KeyboardInterrupt) as exc:
        outcome["error"] = f"interrupted ({str(exc) or 'Ctrl-C'})"
    except Exception as exc:  # noqa: BLE001 - a fault of this tool or a service: report it, exit 1
        traceback.print_exc()
        outcome["error"] = f"{type(exc).__name__}: {exc}"
    outcome["ok"] = code == EXIT_OK
    outcome["phases_s"] = rep.phases
    outcome["total_s"] = round(time.monotonic() - rep.started, 1)
    if code != EXIT_OK:
        rep.say(f"FAILED: {outcome['error']}")
        if code == EXIT_FAILED and not cfg.keep:
            rep.say(f"logs kept in {cfg.logs_dir} and {cfg.work_dir / 'workers'}/*/airflow/logs")
    if args.json:
        print(json.dumps(outcome, indent=1, default=str))
    else:
        timings = ", ".join(f"{k} {v:.1f} s" for k, v in rep.phases.items())
        kill = outcome.get("kill") or {}
        detection = (
            f"; lost worker detected in {kill['detected_s']:.1f} s, retry started in {kill['retry_started_s']:.1f} s"
            if kill.get("retry_started_s") is not None
            else ""
        )
        print(
            f"scale-out smoke {'passed' if code == EXIT_OK else 'FAILED'} in {outcome['total_s']:.1f} s "
            f"({timings}){detection}"
        )
    return code


if __name__ == "__main__":
    sys.exit(main())
