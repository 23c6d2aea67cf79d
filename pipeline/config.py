"""The composition root: read the environment once and build the objects the jobs use.

Nothing below this module reads the environment; everything receives its
settings as arguments.

| variable                    | default                               |
|-----------------------------|---------------------------------------|
| ENTITLE_HOME                | ./var                                 |
| ENTITLE_LEDGER_URL          | the Airflow Connection entitle_ledger, else sqlite:///$ENTITLE_HOME/ledger.sqlite |
| ENTITLE_CAMPAIGN            | the bundled kakao-outage-2022 (a file's path, or a bundled id) |
| ENTITLE_PARTITIONS          | by size: users / ENTITLE_PARTITION_USERS, 1..1024 |
| ENTITLE_PARTITION_USERS     | 1000000 (users per partition when ENTITLE_PARTITIONS is unset) |
| ENTITLE_REJECTED_SHARE_MAX  | 0.0001 (0.01 %)                       |
| ENTITLE_RECONCILE_WORKERS   | 2 (the cores, at most 2)              |
| ENTITLE_WORKER_NAME         | the host name (recorded with the pid on every partition attempt) |
| ENTITLE_DATA_URI            | $ENTITLE_HOME (snapshots, partitions); e.g. s3://bucket/prefix |
| ENTITLE_S3_ENDPOINT_URL     | AWS_ENDPOINT_URL_S3, AWS_ENDPOINT_URL, else AWS's endpoint |
| AWS_REGION                  | AWS_DEFAULT_REGION, else the AWS SDK's |
| AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN | the AWS SDK's default chain (~/.aws, instance role) |
| ENTITLE_ISSUER_<NAME>_URL   | the url of [issuers.<name>] in the campaign file (NAME upper-cased, '-' as '_') |
| ENTITLE_ISSUER_<NAME>_TOKEN | the token of an issuer with auth = "bearer" (or Connection entitle_issuer_<name>) |
| ENTITLE_PASS_PROGRAM        | the bundled drawer-pass-2022 (a pass program file) |
| ENTITLE_MERCHANT_PROGRAM    | the bundled merchant-cash-2022 (a merchant cash program file) |
| ENTITLE_DEBUG               | unset (set: the CLI prints a traceback after an unexpected error) |
"""

from __future__ import annotations

import datetime as dt
import os
import socket
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from pipeline import storage
from pipeline.campaigns import Campaign, load_campaign
from pipeline.credentials import ConnectionSecretLookup, Secret, issuer_tokens, resolve_token
from pipeline.errors import ConfigError
from pipeline.grants.partitioning import (
    PARTITION_USERS_TARGET_DEFAULT,
    PARTITION_USERS_TARGET_MIN,
    check_partition_count,
    partition_count_for,
)
from pipeline.grants.snapshot import REJECTED_SHARE_MAX_DEFAULT
from pipeline.storage import Location, ObjectStoreOptions

RECONCILE_WORKERS_DEFAULT = max(1, min(2, os.cpu_count() or 1))  # reader processes; more than cores only queues
RECONCILE_WORKERS_MAX = 32
ISSUER_URL_PREFIX, ISSUER_URL_SUFFIX = "ENTITLE_ISSUER_", "_URL"
S3_ENDPOINT_VARIABLES = ("ENTITLE_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL")  # first set wins
WORKER_NAME_CHARS_MAX = 200  # with ":<pid>" it fits partition_attempts.worker (255)


def utc_now() -> dt.datetime:
    """The current instant, timezone-aware (the only clock the jobs use)."""
    return dt.datetime.now(dt.UTC)


@dataclass(frozen=True)
class Settings:
    """Deployment settings, resolved from the environment."""

    home: Path
    ledger_url: str
    campaign_file: Path | None
    partition_count: int | None  # None: by the snapshot's size, see partitions_for
    rejected_share_max: float
    reconcile_workers: int = 2
    clock: Callable[[], dt.datetime] = field(default=utc_now, compare=False)
    data_uri: str | None = None  # where snapshots and partitions go; None = under home
    object_store: ObjectStoreOptions = field(default_factory=ObjectStoreOptions)
    # ENTITLE_ISSUER_<NAME>_URL, keyed by the variable's NAME part (upper case, '_' for '-').
    issuer_urls: dict[str, str] = field(default_factory=dict)
    # ENTITLE_ISSUER_<NAME>_TOKEN by variable name, and under Airflow the Connections' passwords.
    issuer_tokens: dict[str, Secret] = field(default_factory=dict, repr=False)
    issuer_secret_lookup: ConnectionSecretLookup | None = field(default=None, repr=False, compare=False)
    partition_users_target: int = PARTITION_USERS_TARGET_DEFAULT
    pass_program_file: Path | None = None  # None: the bundled drawer pass program
    merchant_program_file: Path | None = None  # None: the bundled merchant cash program
    # Who writes: "<ENTITLE_WORKER_NAME or host name>:<pid>", recorded on every partition attempt.
    worker: str | None = field(default=None, compare=False)

    def partitions_for(self, eligible_users: int) -> int:
        """The partition count of a snapshot of ``eligible_users``: ENTITLE_PARTITIONS, else by size."""
        if self.partition_count is not None:
            return self.partition_count
        return partition_count_for(eligible_users, self.partition_users_target)

    @property
    def data_root(self) -> Location:
        """The root of snapshots and partitions: ENTITLE_DATA_URI (local or s3://), else ENTITLE_HOME."""
        return self.location(self.data_uri) if self.data_uri else self.home

    def location(self, value: str | os.PathLike[str] | storage.ObjectUri) -> Location:
        """A local path or an object-store URI (``s3://bucket/key``) reached with these settings."""
        return storage.location(value, self.object_store)

    def with_campaign(self, campaign: str) -> Settings:
        """These settings for another campaign: a campaign file's path, or a bundled campaign's id."""
        return replace(self, campaign_file=Path(campaign).expanduser())

    def campaign(self) -> Campaign:
        """Load and validate the configured campaign, with this deployment's issuer URLs."""
        campaign = load_campaign(self.campaign_file)
        overrides = {
            spec.name: self.issuer_urls[issuer_env_name(spec.name)]
            for spec in campaign.issuers
            if issuer_env_name(spec.name) in self.issuer_urls
        }
        tokens = {
            spec.name: token
            for spec in campaign.issuers
            if spec.auth != "none"
            and (token := resolve_token(spec.name, self.issuer_tokens, self.issuer_secret_lookup)) is not None
        }
        return campaign.with_deployment(overrides, tokens)

    def describe_ledger(self) -> str:
        """The ledger URL with any password hidden."""
        from sqlalchemy.engine import make_url

        return make_url(self.ledger_url).render_as_string(hide_password=True)


def load_settings(
    environ: Mapping[str, str] | None = None,
    connection_ledger_url: str | None = None,
    connection_secret_lookup: ConnectionSecretLookup | None = None,
) -> Settings:
    """Settings from ``environ`` (default ``os.environ``), validated.

    ``connection_ledger_url`` is the ledger of an Airflow Connection (``entitle_ledger``); it is
    used when ENTITLE_LEDGER_URL is not set. ``connection_secret_lookup`` gives an Airflow
    Connection's password by id: the issuers' tokens when ENTITLE_ISSUER_<NAME>_TOKEN is not set.
    """
    env = os.environ if environ is None else environ
    home = Path(env.get("ENTITLE_HOME", "var")).expanduser().resolve()
    if env.get("ENTITLE_LEDGER_URL"):
        ledger_url, ledger_source = env["ENTITLE_LEDGER_URL"], "ENTITLE_LEDGER_URL"
    elif connection_ledger_url:
        ledger_url, ledger_source = connection_ledger_url, "the Airflow connection entitle_ledger"
    else:
        ledger_url, ledger_source = f"sqlite:///{home / 'ledger.sqlite'}", "the default (ENTITLE_HOME)"
    check_ledger_url(ledger_url, ledger_source)
    campaign_value = env.get("ENTITLE_CAMPAIGN")
    campaign_file = Path(campaign_value).expanduser() if campaign_value else None
    partition_count: int | None = None
    if env.get("ENTITLE_PARTITIONS"):
        partition_count = _int(env, "ENTITLE_PARTITIONS", 0)
        check_partition_count(partition_count)
    users_target = _int(env, "ENTITLE_PARTITION_USERS", PARTITION_USERS_TARGET_DEFAULT)
    if users_target < PARTITION_USERS_TARGET_MIN:
        raise ConfigError(
            f"ENTITLE_PARTITION_USERS={users_target} is below {PARTITION_USERS_TARGET_MIN:,}; "
            "set ENTITLE_PARTITIONS for an exact count instead"
        )
    share = _float(env, "ENTITLE_REJECTED_SHARE_MAX", REJECTED_SHARE_MAX_DEFAULT)
    if not 0.0 <= share <= 1.0:
        raise ConfigError(f"ENTITLE_REJECTED_SHARE_MAX={share} must be a share between 0 and 1 (0.0001 = 0.01 %)")
    workers = _int(env, "ENTITLE_RECONCILE_WORKERS", RECONCILE_WORKERS_DEFAULT)
    if not 1 <= workers <= RECONCILE_WORKERS_MAX:
        raise ConfigError(f"ENTITLE_RECONCILE_WORKERS={workers} must be between 1 and {RECONCILE_WORKERS_MAX}")
    object_store = _object_store(env)
    data_uri = _data_uri(env, object_store)
    issuer_urls = _issuer_urls(env)
    return Settings(
        home,
        ledger_url,
        campaign_file,
        partition_count,
        share,
        workers,
        data_uri=data_uri,
        object_store=object_store,
        issuer_urls=issuer_urls,
        issuer_tokens=issuer_tokens(env),
        issuer_secret_lookup=connection_secret_lookup,
        partition_users_target=users_target,
        pass_program_file=_path(env, "ENTITLE_PASS_PROGRAM"),
        merchant_program_file=merchant_program_file(env),
        worker=worker_identity(env),
    )


def worker_identity(env: Mapping[str, str]) -> str:
    """``<name>:<pid>`` of this process: ENTITLE_WORKER_NAME, else the host name, then the process id.

    Several workers on one machine share its host name; ENTITLE_WORKER_NAME tells them apart.
    """
    name = env.get("ENTITLE_WORKER_NAME") or ""
    if len(name) > WORKER_NAME_CHARS_MAX or any(c.isspace() or not c.isprintable() for c in name):
        raise ConfigError(
            f"ENTITLE_WORKER_NAME={name[:40]!r}: a worker name is at most {WORKER_NAME_CHARS_MAX} printable "
            "characters without spaces"
        )
    name = name or socket.gethostname()[:WORKER_NAME_CHARS_MAX] or "unknown-host"
    return f"{name}:{os.getpid()}"


def merchant_program_file(environ: Mapping[str, str] | None = None) -> Path | None:
    """ENTITLE_MERCHANT_PROGRAM: the merchant cash program file (None: the bundled one)."""
    return _path(os.environ if environ is None else environ, "ENTITLE_MERCHANT_PROGRAM")


def debug_enabled(environ: Mapping[str, str] | None = None) -> bool:
    """ENTITLE_DEBUG: the CLI shows a traceback after an unexpected error."""
    return bool((os.environ if environ is None else environ).get("ENTITLE_DEBUG"))


LEDGER_URL_EXAMPLES = "sqlite:////path/to/ledger.sqlite or postgresql+psycopg://user@host:5432/database"


def check_ledger_url(url: str, source: str) -> None:
    """Refuse a ledger URL that is not an SQLite or PostgreSQL SQLAlchemy URL, naming where it came from."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        raise ConfigError(f"{source}: {url!r} is not a database URL; use {LEDGER_URL_EXAMPLES}") from None
    backend = parsed.get_backend_name()
    if backend not in ("sqlite", "postgresql"):
        shown = parsed.render_as_string(hide_password=True)
        raise ConfigError(
            f"{source}: {shown!r} is a {backend} URL; the ledger is SQLite or PostgreSQL: {LEDGER_URL_EXAMPLES}"
        )
    if backend == "postgresql" and not parsed.host:
        raise ConfigError(f"{source}: the PostgreSQL URL names no host; use {LEDGER_URL_EXAMPLES}")


# Airflow connection types and the SQLAlchemy driver each names.
CONNECTION_DRIVERS = {"postgres": "postgresql+psycopg", "postgresql": "postgresql+psycopg", "sqlite": "sqlite"}


def ledger_url_from_connection(
    conn_type: str | None,
    host: str | None,
    login: str | None = None,
    password: str | None = None,
    schema: str | None = None,
    port: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The SQLAlchemy URL of the ledger an Airflow Connection describes.

    An ``sqlalchemy_url`` in the connection's extra wins; otherwise a ``postgres`` connection is
    reached with psycopg 3, and an ``sqlite`` one names the database file in its host field.
    """
    from sqlalchemy.engine import URL

    if extra and extra.get("sqlalchemy_url"):
        return str(extra["sqlalchemy_url"])
    driver = CONNECTION_DRIVERS.get((conn_type or "").lower())
    if driver is None:
        raise ConfigError(
            f"Airflow connection entitle_ledger has type {conn_type!r}; use postgres or sqlite, or put the "
            'ledger\'s SQLAlchemy URL in its extra as {"sqlalchemy_url": "..."}'
        )
    if driver == "sqlite":
        if not host:
            raise ConfigError("Airflow connection entitle_ledger (sqlite) names no database file in its host field")
        return f"sqlite:///{host}"
    url = URL.create(
        driver, username=login or None, password=password or None, host=host or None, port=port, database=schema or None
    )
    return url.render_as_string(hide_password=False)


def issuer_env_name(issuer: str) -> str:
    """The NAME of ENTITLE_ISSUER_<NAME>_URL for an issuer called ``issuer``."""
    return issuer.upper().replace("-", "_")


def _issuer_urls(env: Mapping[str, str]) -> dict[str, str]:
    urls: dict[str, str] = {}
    for variable, value in env.items():
        if not (variable.startswith(ISSUER_URL_PREFIX) and variable.endswith(ISSUER_URL_SUFFIX)) or not value:
            continue
        name = variable[len(ISSUER_URL_PREFIX) : -len(ISSUER_URL_SUFFIX)]
        if not name:
            continue
        if not value.startswith(("http://", "https://")):
            raise ConfigError(f"{variable}={value!r} must be an http:// or https:// URL")
        urls[name] = value.rstrip("/")
    return urls


def _object_store(env: Mapping[str, str]) -> ObjectStoreOptions:
    """Endpoint, region and credentials of the object store (S3 or any S3-compatible server)."""
    endpoint = None
    for name in S3_ENDPOINT_VARIABLES:
        endpoint = env.get(name) or None
        if endpoint is not None:
            storage.check_endpoint_url(name, endpoint)
            break
    access_key = env.get("AWS_ACCESS_KEY_ID") or None
    secret_key = env.get("AWS_SECRET_ACCESS_KEY") or None
    if (access_key is None) != (secret_key is None):
        raise ConfigError(
            "AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY must be set together (or neither, to use ~/.aws or the "
            "instance's role)"
        )
    return ObjectStoreOptions(
        endpoint_url=endpoint.rstrip("/") if endpoint else None,
        region=env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or None,
        access_key=access_key,
        secret_key=secret_key,
        session_token=env.get("AWS_SESSION_TOKEN") or None,
    )


def _data_uri(env: Mapping[str, str], object_store: ObjectStoreOptions) -> str | None:
    raw = env.get("ENTITLE_DATA_URI") or None
    if raw is None:
        return None
    try:
        where = storage.location(raw, object_store)
    except ConfigError as exc:
        raise ConfigError(f"ENTITLE_DATA_URI: {exc}") from exc
    if isinstance(where, Path):
        return str(where.expanduser().resolve())
    return str(where)


def _path(env: Mapping[str, str], name: str) -> Path | None:
    raw = env.get(name)
    return Path(raw).expanduser() if raw else None


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return int(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a whole number") from exc


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name)
    if raw is None or raw == "":
        return default
    try:
        return float(raw)
    except ValueError as exc:
        raise ConfigError(f"{name}={raw!r} is not a number") from exc
