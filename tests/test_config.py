"""pipeline.config: the composition root reads the environment once and validates it."""

from __future__ import annotations

import dataclasses
import datetime as dt
import os
import re
import socket
from pathlib import Path

import pytest

from pipeline.config import ledger_url_from_connection, load_settings
from pipeline.errors import ConfigError
from pipeline.grants.partitioning import PARTITION_USERS_TARGET_DEFAULT


def test_defaults(tmp_path: Path) -> None:
    settings = load_settings({"ENTITLE_HOME": str(tmp_path / "home")})
    assert settings.home == tmp_path / "home"
    assert settings.ledger_url == f"sqlite:///{tmp_path / 'home' / 'ledger.sqlite'}"
    assert settings.partition_count is None  # by the snapshot's size
    assert settings.partition_users_target == PARTITION_USERS_TARGET_DEFAULT
    assert settings.rejected_share_max == 0.0001
    assert settings.campaign_file is None
    assert settings.campaign().campaign_id == "kakao-outage-2022"
    now = settings.clock()
    assert now.tzinfo is not None and now.utcoffset() == dt.timedelta(0)


def test_environment_values_are_used(tmp_path: Path) -> None:
    campaign = tmp_path / "c.toml"
    settings = load_settings(
        {
            "ENTITLE_HOME": str(tmp_path),
            "ENTITLE_LEDGER_URL": "postgresql+psycopg://u:secret@db.example:5432/ledger",
            "ENTITLE_CAMPAIGN": str(campaign),
            "ENTITLE_PARTITIONS": "16",
            "ENTITLE_REJECTED_SHARE_MAX": "0.5",
        }
    )
    assert settings.ledger_url.endswith("@db.example:5432/ledger")
    assert settings.campaign_file == campaign
    assert (settings.partition_count, settings.rejected_share_max) == (16, 0.5)
    described = settings.describe_ledger()
    assert "secret" not in described
    assert described == "postgresql+psycopg://u:***@db.example:5432/ledger"


def test_empty_values_mean_the_default(tmp_path: Path) -> None:
    settings = load_settings(
        {"ENTITLE_HOME": str(tmp_path), "ENTITLE_LEDGER_URL": "", "ENTITLE_PARTITIONS": "", "ENTITLE_CAMPAIGN": ""}
    )
    assert settings.ledger_url == f"sqlite:///{tmp_path / 'ledger.sqlite'}"
    assert settings.partition_count is None  # by the snapshot's size
    assert settings.partition_users_target == PARTITION_USERS_TARGET_DEFAULT
    assert settings.campaign_file is None


def test_relative_home_is_made_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    assert load_settings({"ENTITLE_HOME": "var"}).home == tmp_path / "var"
    assert load_settings({}).home == tmp_path / "var"


def test_os_environ_is_the_default_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ENTITLE_HOME", str(tmp_path / "from-env"))
    monkeypatch.setenv("ENTITLE_PARTITIONS", "3")
    settings = load_settings()
    assert settings.home == tmp_path / "from-env"
    assert settings.partition_count == 3


@pytest.mark.parametrize(
    ("name", "value", "message"),
    [
        ("ENTITLE_REJECTED_SHARE_MAX", "1.5", "must be a share between 0 and 1"),
        ("ENTITLE_REJECTED_SHARE_MAX", "-0.1", "must be a share between 0 and 1"),
        ("ENTITLE_REJECTED_SHARE_MAX", "lots", "ENTITLE_REJECTED_SHARE_MAX='lots' is not a number"),
        ("ENTITLE_PARTITIONS", "2.5", "ENTITLE_PARTITIONS='2.5' is not a whole number"),
        ("ENTITLE_PARTITIONS", "2000", "partition count 2000 must be between 1 and 1024"),
    ],
)
def test_bad_values_are_config_errors(name: str, value: str, message: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")) as caught:
        load_settings({"ENTITLE_HOME": str(tmp_path), name: value})
    assert caught.value.exit_code == 2


def test_the_worker_is_named_by_the_variable_or_the_host_and_the_pid(tmp_path: Path) -> None:
    pid = os.getpid()
    assert load_settings({"ENTITLE_HOME": str(tmp_path)}).worker == f"{socket.gethostname()}:{pid}"
    named = load_settings({"ENTITLE_HOME": str(tmp_path), "ENTITLE_WORKER_NAME": "worker-2"})
    assert named.worker == f"worker-2:{pid}"
    assert named == load_settings({"ENTITLE_HOME": str(tmp_path)}), "the worker is not part of a settings' identity"
    for bad in ("two words", "x" * 201):
        with pytest.raises(ConfigError, match="ENTITLE_WORKER_NAME=.*at most 200 printable characters"):
            load_settings({"ENTITLE_HOME": str(tmp_path), "ENTITLE_WORKER_NAME": bad})


def test_settings_are_frozen(tmp_path: Path) -> None:
    settings = load_settings({"ENTITLE_HOME": str(tmp_path)})
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.partition_count = 4  # type: ignore[misc]
    fixed = dt.datetime(2023, 1, 5, tzinfo=dt.UTC)
    replaced = dataclasses.replace(settings, clock=lambda: fixed)
    assert replaced.clock() == fixed
    assert replaced == settings, "the clock is not part of a settings' identity"


@pytest.mark.parametrize(
    ("users", "target", "count"),
    [
        (0, 1_000_000, 1),
        (20_000, 1_000_000, 1),
        (1_000_000, 1_000_000, 1),
        (1_000_001, 1_000_000, 2),
        (48_000_000, 1_000_000, 48),
        (480_000_000, 1_000_000, 480),
        (5_000_000_000, 1_000_000, 1024),
    ],
)
def test_the_partition_count_follows_the_data(users: int, target: int, count: int, tmp_path: Path) -> None:
    settings = load_settings({"ENTITLE_HOME": str(tmp_path), "ENTITLE_PARTITION_USERS": str(target)})
    assert settings.partitions_for(users) == count


def test_an_explicit_partition_count_wins_and_a_tiny_target_is_refused(tmp_path: Path) -> None:
    fixed = load_settings({"ENTITLE_HOME": str(tmp_path), "ENTITLE_PARTITIONS": "16"})
    assert fixed.partitions_for(48_000_000) == 16 and fixed.partitions_for(10) == 16
    with pytest.raises(ConfigError, match="ENTITLE_PARTITION_USERS=10 is below 1,000"):
        load_settings({"ENTITLE_HOME": str(tmp_path), "ENTITLE_PARTITION_USERS": "10"})


def test_the_ledger_comes_from_the_airflow_connection_unless_the_variable_is_set(tmp_path: Path) -> None:
    from_connection = ledger_url_from_connection("postgres", "db.internal", "writer", "s3cret/x", "entitle", 5433)
    assert from_connection == "postgresql+psycopg://writer:s3cret%2Fx@db.internal:5433/entitle"
    settings = load_settings({"ENTITLE_HOME": str(tmp_path)}, connection_ledger_url=from_connection)
    assert settings.ledger_url == from_connection
    assert "s3cret" not in settings.describe_ledger()
    overridden = load_settings(
        {"ENTITLE_HOME": str(tmp_path), "ENTITLE_LEDGER_URL": "sqlite:////x/ledger.sqlite"},
        connection_ledger_url=from_connection,
    )
    assert overridden.ledger_url == "sqlite:////x/ledger.sqlite"
    assert ledger_url_from_connection("sqlite", "/data/ledger.sqlite") == "sqlite:////data/ledger.sqlite"
    extra = {"sqlalchemy_url": "postgresql+psycopg://a@b/c"}
    assert ledger_url_from_connection("generic", None, extra=extra) == "postgresql+psycopg://a@b/c"
    with pytest.raises(ConfigError, match="type 'mysql'; use postgres or sqlite"):
        ledger_url_from_connection("mysql", "db")
    with pytest.raises(ConfigError, match="names no database file"):
        ledger_url_from_connection("sqlite", "")


@pytest.mark.parametrize(
    ("url", "said"),
    [
        ("bogus", "ENTITLE_LEDGER_URL: 'bogus' is not a database URL; use sqlite:///"),
        ("mysql://me@db.example/ledger", "ENTITLE_LEDGER_URL: 'mysql://me@db.example/ledger' is a mysql URL"),
        ("postgresql+psycopg:///ledger", "ENTITLE_LEDGER_URL: the PostgreSQL URL names no host"),
    ],
)
def test_a_ledger_url_that_is_not_sqlite_or_postgresql_is_a_config_error(url: str, said: str) -> None:
    with pytest.raises(ConfigError, match=re.escape(said)):
        load_settings({"ENTITLE_LEDGER_URL": url})


def test_an_unreachable_ledger_is_exit_2_naming_the_host_and_no_library_link(tmp_path: Path) -> None:
    from support.cli import cli_environment, run_entitle

    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    env = cli_environment(
        ENTITLE_HOME=str(tmp_path), ENTITLE_LEDGER_URL=f"postgresql+psycopg://postgres@127.0.0.1:{port}/ledger"
    )
    for command in (["status"], ["summary", "--json"], ["db", "version"], ["query", "coverage"]):
        result = run_entitle(command, env)
        assert result.returncode == 2, (command, result.stderr)
        assert f"cannot connect to the ledger database 'ledger' on 127.0.0.1:{port}" in result.stderr, command
        assert "Check ENTITLE_LEDGER_URL" in result.stderr and "sqlalche.me" not in result.stderr + result.stdout
    bogus = run_entitle(["status"], cli_environment(ENTITLE_HOME=str(tmp_path), ENTITLE_LEDGER_URL="bogus"))
    assert bogus.returncode == 2 and "ENTITLE_LEDGER_URL: 'bogus' is not a database URL" in bogus.stderr
