"""Snapshots and partitions on an object store: the pipeline against a real S3-compatible server.

The server is moto's, started in this process on 127.0.0.1 (a free port) for
the module; the pipeline reaches it through pyarrow's S3 client exactly as it
would reach AWS S3 or MinIO (ENTITLE_DATA_URI, AWS_ENDPOINT_URL, AWS_* keys).
The test's own view of the bucket goes through boto3, independent of the code
under test.
"""

from __future__ import annotations

import dataclasses
import io
import json
import logging
import os
import random
import socket
import subprocess
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import polars as pl
import pytest
from support.cli import cli_environment
from support.ledger_state import grant_counts, grant_pairs, planned_pairs, prepare_pipeline
from support.settings import ITEMS_PER_USER

from pipeline import ledger, schemas, storage
from pipeline.config import load_settings
from pipeline.errors import ConfigError, PartitionError, SnapshotError, StorageError
from pipeline.grants import dag_tasks, runs
from pipeline.grants.partitioning import load_manifest, partition_of, partition_snapshot, read_partition

Entitle = Callable[..., subprocess.CompletedProcess[str]]
CAMPAIGN = "kakao-outage-2022"
SKUS = ("emoticon-permanent", "emoticon-90d-a", "emoticon-90d-b", "coupon-2000", "coupon-3000")
USERS = 3_000
DUPLICATES = 40
PARTITIONS = 6
ACCESS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_REGION": "us-east-1"}


# --------------------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.fixture(scope="module")
def s3_endpoint() -> Iterator[str]:
    """A moto S3 server on 127.0.0.1 for this module; its endpoint URL."""
    try:
        from moto.server import ThreadedMotoServer
    except ImportError as exc:  # pinned in requirements.lock: missing means a broken install, not a skip
        pytest.fail(f"moto is not installed ({exc}); pip install -r requirements.lock", pytrace=False)
    logging.getLogger("werkzeug").setLevel(logging.ERROR)  # no request log on stderr
    port = free_port()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


@pytest.fixture
def s3(s3_endpoint: str) -> Any:
    """A boto3 S3 client on the test server (the test's independent view of the bucket)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=s3_endpoint,
        aws_access_key_id=ACCESS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=ACCESS["AWS_SECRET_ACCESS_KEY"],
        region_name=ACCESS["AWS_REGION"],
    )


@pytest.fixture
def bucket(s3: Any) -> str:
    """A fresh, empty bucket."""
    name = f"entitle-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


def s3_env(endpoint: str, home: Path, **extra: str) -> dict[str, str]:
    """The CLI's environment: the ledger under ``home``, the object store at ``endpoint``."""
    return cli_environment(
        ENTITLE_HOME=str(home), ENTITLE_PARTITIONS=str(PARTITIONS), AWS_ENDPOINT_URL=endpoint, **ACCESS, **extra
    )


def keys(s3: Any, bucket: str, prefix: str = "") -> set[str]:
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def put_parquet(s3: Any, bucket: str, key: str, frame: pl.DataFrame) -> None:
    buffer = io.BytesIO()
    frame.write_parquet(buffer)
    s3.put_object(Bucket=bucket, Key=key, Body=buffer.getvalue())


def user_ids(seed: int = 7) -> list[int]:
    rng = random.Random(seed)
    return sorted(rng.sample(range(10_000_000, 90_000_000), USERS))


def users_frame(ids: list[int]) -> pl.DataFrame:
    """The ids plus some duplicate rows, shuffled: validation removes the duplicates."""
    rows = ids + ids[:DUPLICATES]
    random.Random(1).shuffle(rows)
    return pl.DataFrame({"user_id": rows}, schema={"user_id": pl.Int64})


def run_cli(entitle: Entitle, args: list[str], env: dict[str, str]) -> dict[str, Any]:
    result = entitle([*args, "--json"], env)
    assert result.returncode == 0, (result.returncode, result.stderr)
    document = json.loads(result.stdout)
    assert isinstance(document, dict)
    return document


def assert_clean_error(result: subprocess.CompletedProcess[str], exit_code: int, *fragments: str) -> None:
    assert result.returncode == exit_code, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.startswith("entitle: error: "), result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr
    for fragment in fragments:
        assert fragment in result.stderr, f"{fragment!r} not in {result.stderr!r}"
    assert "Traceback" not in result.stderr + result.stdout


def failed_grants(entitle: Entitle, env: dict[str, str]) -> dict[int, str]:
    """``entitle grant``, expected to exit 7: partition id → its error."""
    result = entitle(["grant", "--no-progress", "--json"], env)
    assert result.returncode == 7, (result.returncode, result.stdout, result.stderr)
    assert "Traceback" not in result.stderr + result.stdout
    document = json.loads(result.stdout)
    return {int(f["partition_id"]): str(f["error"]) for f in document["failed_partitions"]}


def ledger_engine(home: Path) -> Any:
    return ledger.create_ledger_engine(f"sqlite:///{home / 'ledger.sqlite'}")


# --------------------------------------------------------------------------- the whole pipeline on S3


def test_run_from_s3_grants_exactly_the_plan_and_keeps_partitions_in_the_bucket(
    entitle: Entitle, s3_endpoint: str, s3: Any, bucket: str, tmp_path: Path
) -> None:
    ids = user_ids()
    put_parquet(s3, bucket, "incoming/users.parquet", users_frame(ids))
    home = tmp_path / "var"
    env = s3_env(s3_endpoint, home, ENTITLE_DATA_URI=f"s3://{bucket}/entitle", ENTITLE_RECONCILE_WORKERS="2")

    first = run_cli(entitle, ["run", "--users", f"s3://{bucket}/incoming/users.parquet", "--no-progress"], env)
    assert first["failed_partitions"] == []
    assert first["partitions"] == PARTITIONS
    assert first["planned"] == first["written"] == USERS * ITEMS_PER_USER
    snapshot = first["snapshot"]
    snapshot_prefix = f"entitle/campaigns/{CAMPAIGN}/snapshots/{snapshot['snapshot_id']}"
    assert snapshot["snapshot_dir"] == f"s3://{bucket}/{snapshot_prefix}"
    assert snapshot["partitions_dir"] == f"s3://{bucket}/{snapshot_prefix}/partitions-{PARTITIONS:04d}"
    assert snapshot["eligible_users"] == USERS

    engine = ledger_engine(home)
    try:
        assert grant_pairs(engine) == planned_pairs(ids, SKUS)
        assert grant_counts(engine) == (USERS * ITEMS_PER_USER, USERS * ITEMS_PER_USER)

        # Every file of the snapshot is an object in the bucket; nothing of it is on local disk.
        part_keys = {f"{snapshot_prefix}/partitions-{PARTITIONS:04d}/part-{p:04d}.parquet" for p in range(PARTITIONS)}
        expected = part_keys | {
            f"{snapshot_prefix}/partitions-{PARTITIONS:04d}/manifest.parquet",
            f"{snapshot_prefix}/users.parquet",
            f"{snapshot_prefix}/quarantine.parquet",
            f"{snapshot_prefix}/snapshot.json",
        }
        assert keys(s3, bucket, "entitle/") == expected
        assert not (home / "campaigns" / CAMPAIGN / "snapshots").exists()
        # The partition objects hold exactly the eligible users, each in its own partition.
        seen: list[int] = []
        for key in sorted(part_keys):
            frame = pl.read_parquet(io.BytesIO(s3.get_object(Bucket=bucket, Key=key)["Body"].read()))
            partition_id = int(key.rsplit("part-", 1)[1].split(".")[0])
            assert {partition_of(u, PARTITIONS) for u in frame["user_id"]} <= {partition_id}
            seen.extend(frame["user_id"].to_list())
        assert sorted(seen) == ids
        quarantine = pl.read_parquet(
            io.BytesIO(s3.get_object(Bucket=bucket, Key=f"{snapshot_prefix}/quarantine.parquet")["Body"].read())
        )
        assert quarantine.height == DUPLICATES and set(quarantine["reason"]) == {"duplicate"}
        assert set(quarantine["source_file"]) == {f"s3://{bucket}/incoming/users.parquet"}

        # A rerun is a no-op: same snapshot, partitions reused, nothing written.
        before = {k: s3.head_object(Bucket=bucket, Key=k)["ETag"] for k in expected}
        second = run_cli(entitle, ["run", "--users", f"s3://{bucket}/incoming/users.parquet", "--no-progress"], env)
        assert second["snapshot"]["snapshot_id"] == snapshot["snapshot_id"]
        assert second["written"] == 0 and second["already_present"] == USERS * ITEMS_PER_USER
        assert grant_pairs(engine) == planned_pairs(ids, SKUS)
        assert {k: s3.head_object(Bucket=bucket, Key=k)["ETag"] for k in expected} == before

        # --verify reads every partition back from the bucket and checks it row by row.
        verified = run_cli(entitle, ["grant", "--verify", "--no-progress"], env)
        assert verified["failed_partitions"] == [] and verified["written"] == 0

        # Reconciliation reads the partitions from the bucket too (two worker processes).
        reconciled = run_cli(entitle, ["reconcile"], env)
        assert reconciled["verdict"] == "RECONCILED", reconciled["explanation"]
        assert reconciled["bridge"]["expected"] == USERS * ITEMS_PER_USER
    finally:
        engine.dispose()


def test_csv_user_file_on_s3_and_exclusions(
    entitle: Entitle, s3_endpoint: str, s3: Any, bucket: str, tmp_path: Path
) -> None:
    ids = user_ids(seed=11)[:500]
    body = "user_id\n" + "".join(f" {u}\n" for u in ids)  # text cells, with spaces
    s3.put_object(Bucket=bucket, Key="in/users.csv", Body=body.encode())
    s3.put_object(Bucket=bucket, Key="in/blocked.csv", Body=f"user_id\n{ids[0]}\n{ids[1]}\n".encode())
    env = s3_env(s3_endpoint, tmp_path / "var", ENTITLE_DATA_URI=f"s3://{bucket}/data")
    args = ["--users", f"s3://{bucket}/in/users.csv", "--exclude", f"s3://{bucket}/in/blocked.csv"]

    plan = run_cli(entitle, ["plan", *args], env)
    assert plan["snapshot"]["eligible_users"] == 498 and plan["snapshot"]["excluded_users"] == 2
    assert plan["total_grants"] == 498 * ITEMS_PER_USER
    assert keys(s3, bucket, "data/") == set(), "plan writes nothing"

    ran = run_cli(entitle, ["run", *args, "--no-progress"], env)
    assert ran["written"] == 498 * ITEMS_PER_USER
    engine = ledger_engine(tmp_path / "var")
    try:
        assert grant_pairs(engine) == planned_pairs(ids[2:], SKUS)
    finally:
        engine.dispose()
    excluded_key = f"data/campaigns/{CAMPAIGN}/snapshots/{ran['snapshot']['snapshot_id']}/excluded.parquet"
    assert excluded_key in keys(s3, bucket, "data/")
    # Reconciliation finds the exclusions in the bucket (in-process worker this time).
    assert run_cli(entitle, ["reconcile"], env)["verdict"] == "RECONCILED"


def test_in_process_pipeline_and_partitions_identical_to_local_ones(
    s3_endpoint: str, s3: Any, bucket: str, tmp_path: Path
) -> None:
    ids = user_ids(seed=3)
    put_parquet(s3, bucket, "users.parquet", users_frame(ids))
    settings = load_settings(
        {
            "ENTITLE_HOME": str(tmp_path / "var"),
            "ENTITLE_PARTITIONS": str(PARTITIONS),
            "ENTITLE_RECONCILE_WORKERS": "1",
            "ENTITLE_DATA_URI": f"s3://{bucket}/root/",
            "ENTITLE_S3_ENDPOINT_URL": s3_endpoint,
            **ACCESS,
        }
    )
    assert settings.data_root == storage.ObjectUri(bucket, "root")
    pipeline = runs.open_pipeline(settings)
    try:
        prepared = prepare_pipeline(pipeline, f"s3://{bucket}/users.parquet")
        outcomes = runs.grant(pipeline, prepared.run, prepared.run.entries)
        assert [o.status for o in outcomes] == ["done"] * PARTITIONS
        assert grant_pairs(pipeline.engine) == planned_pairs(ids, SKUS)

        # The same snapshot partitioned on local disk gives byte-identical files.
        entries = load_manifest(prepared.snapshot.partitions_dir)
        assert all(isinstance(e.path, storage.ObjectUri) for e in entries)
        local = partition_snapshot(prepared.snapshot.report.users_file, tmp_path / "local-parts", PARTITIONS)
        for remote, here in zip(entries, local, strict=True):
            assert isinstance(remote.path, storage.ObjectUri) and isinstance(here.path, Path)
            body = s3.get_object(Bucket=bucket, Key=remote.path.key)["Body"].read()
            assert body == here.path.read_bytes()
            assert dataclasses.replace(remote, path=here.path) == here
            assert read_partition(remote).equals(read_partition(here))
    finally:
        pipeline.engine.dispose()


def test_airflow_task_bodies_read_and_write_s3(
    s3_endpoint: str, s3: Any, bucket: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = user_ids(seed=5)[:800]
    put_parquet(s3, bucket, "nightly/users.parquet", users_frame(ids))
    for name in [n for n in os.environ if n.startswith("ENTITLE_")]:
        monkeypatch.delenv(name)
    env = s3_env(s3_endpoint, tmp_path / "var", ENTITLE_DATA_URI=f"s3://{bucket}/d", ENTITLE_RECONCILE_WORKERS="1")
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    prepared = dag_tasks.freeze_snapshot({"snapshot_uri": f"s3://{bucket}/nightly/users.parquet"})
    assert prepared["partitions_dir"].startswith(f"s3://{bucket}/d/campaigns/{CAMPAIGN}/snapshots/")
    mapped = dag_tasks.plan_partitions(prepared, {})
    assert [m["partition_id"] for m in mapped] == list(range(PARTITIONS))
    assert sum(m["rows"] for m in mapped) == 800
    outcomes = [dag_tasks.grant("manual__s3", m, {}) for m in mapped]
    assert sum(o["written"] for o in outcomes) == 800 * ITEMS_PER_USER
    assert dag_tasks.reconcile(prepared)["verdict"] == "RECONCILED"

    missing = f"s3://{bucket}/nightly/absent.parquet"
    with pytest.raises(SnapshotError, match="absent.parquet: file not found") as caught:
        dag_tasks.freeze_snapshot({"snapshot_uri": missing})
    assert "snapshot_uri" in str(caught.value)


# --------------------------------------------------------------------------- changed and missing objects


def test_a_corrupted_partition_object_is_detected_and_named(
    entitle: Entitle, s3_endpoint: str, s3: Any, bucket: str, tmp_path: Path
) -> None:
    ids = user_ids(seed=9)
    put_parquet(s3, bucket, "users.parquet", users_frame(ids))
    home = tmp_path / "var"
    env = s3_env(s3_endpoint, home, ENTITLE_DATA_URI=f"s3://{bucket}/p")
    settings = load_settings({**env, "ENTITLE_RECONCILE_WORKERS": "1"})
    pipeline = runs.open_pipeline(settings)
    try:
        prepared = prepare_pipeline(pipeline, f"s3://{bucket}/users.parquet")
    finally:
        pipeline.engine.dispose()
    entries = prepared.run.entries
    changed, garbled = entries[3], entries[4]
    assert isinstance(changed.path, storage.ObjectUri) and isinstance(garbled.path, storage.ObjectUri)

    # Same schema, same row count, one user swapped for another: only the content hash can tell.
    original = pl.read_parquet(io.BytesIO(s3.get_object(Bucket=bucket, Key=changed.path.key)["Body"].read()))
    first_row = pl.int_range(pl.len()) == 0
    forged = original.with_columns(
        pl.when(first_row).then(pl.lit(1, pl.Int64)).otherwise(pl.col("user_id")).alias("user_id")
    )
    buffer = io.BytesIO()
    schemas.to_arrow(forged, "partition", "forged")  # still a valid partition file by its schema
    forged.write_parquet(buffer)
    s3.put_object(Bucket=bucket, Key=changed.path.key, Body=buffer.getvalue())
    s3.put_object(Bucket=bucket, Key=garbled.path.key, Body=b"PAR1 not parquet at all PAR1")

    with pytest.raises(PartitionError, match="content hash") as caught:
        read_partition(changed)
    assert str(changed.path) in str(caught.value)

    failed = failed_grants(entitle, env)
    assert set(failed) == {3, 4}
    assert failed[3].startswith(f"{changed.path}: content hash ") and "differs from the manifest" in failed[3]
    assert failed[4].startswith(f"{garbled.path}: not a readable Parquet file")
    engine = ledger_engine(home)
    try:
        granted = {u for u, _ in grant_pairs(engine)}
        assert granted == {u for u in ids if partition_of(u, PARTITIONS) not in (3, 4)}
    finally:
        engine.dispose()
    status = run_cli(entitle, ["status"], env)
    assert [p["status"] for p in status["partitions"]] == ["done"] * 3 + ["failed"] * 2 + ["done"]
    assert str(changed.path) in status["partitions"][3]["error"]

    # Reconciliation cannot trust them either: INCOMPLETE, naming the objects.
    reconciled = entitle(["reconcile", "--json"], env)
    assert reconciled.returncode == 9, reconciled.stderr
    assert str(changed.path) in reconciled.stdout and str(garbled.path) in reconciled.stdout


def test_a_missing_partition_object_fails_its_partition_and_a_rerun_rewrites_it(
    entitle: Entitle, s3_endpoint: str, s3: Any, bucket: str, tmp_path: Path
) -> None:
    ids = user_ids(seed=13)[:600]
    put_parquet(s3, bucket, "users.parquet", users_frame(ids))
    home = tmp_path / "var"
    env = s3_env(s3_endpoint, home, ENTITLE_DATA_URI=f"s3://{bucket}/p")
    pipeline = runs.open_pipeline(load_settings(env))
    try:
        prepared = prepare_pipeline(pipeline, f"s3://{bucket}/users.parquet")
    finally:
        pipeline.engine.dispose()
    lost = prepared.run.entries[2]
    assert isinstance(lost.path, storage.ObjectUri)
    s3.delete_object(Bucket=bucket, Key=lost.path.key)

    failed = failed_grants(entitle, env)
    assert list(failed) == [2]
    assert failed[2].startswith(f"{lost.path}: file not found (no object with this key in bucket '{bucket}'")

    # `entitle run` finds the partition set incomplete, writes it again and grants what was left.
    rerun = run_cli(entitle, ["run", "--users", f"s3://{bucket}/users.parquet", "--no-progress"], env)
    assert rerun["failed_partitions"] == []
    assert lost.path.key in keys(s3, bucket, "p/")
    engine = ledger_engine(home)
    try:
        assert grant_pairs(engine) == planned_pairs(ids, SKUS)
    finally:
        engine.dispose()


def test_missing_user_object_and_bucket_exit_3(entitle: Entitle, s3_endpoint: str, bucket: str, tmp_path: Path) -> None:
    env = s3_env(s3_endpoint, tmp_path / "var", ENTITLE_DATA_URI=f"s3://{bucket}/d")
    assert_clean_error(
        entitle(["run", "--users", f"s3://{bucket}/absent.parquet"], env),
        3,
        f"s3://{bucket}/absent.parquet: file not found (no object with this key in bucket '{bucket}'",
    )
    assert_clean_error(
        entitle(["plan", "--users", "s3://no-such-bucket-here/users.parquet"], env),
        3,
        "s3://no-such-bucket-here/users.parquet: file not found (bucket 'no-such-bucket-here' does not exist",
    )


# --------------------------------------------------------------------------- the store itself fails


def test_unreachable_endpoint_exits_2_naming_the_uri(
    entitle: Entitle, bucket: str, tmp_path: Path, write_users: Callable[..., Path]
) -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    env = s3_env(closed, tmp_path / "var")
    assert_clean_error(
        entitle(["run", "--users", f"s3://{bucket}/users.parquet"], env),
        2,
        f"s3://{bucket}/users.parquet: cannot reach the object store at {closed}",
        "ENTITLE_S3_ENDPOINT_URL",
    )
    # A local user file, but the data location is unreachable: the first write says so.
    users = write_users(tmp_path / "users.parquet", [1, 2, 3])
    env = s3_env(closed, tmp_path / "var", ENTITLE_DATA_URI=f"s3://{bucket}/d")
    assert_clean_error(
        entitle(["run", "--users", str(users)], env), 2, f"s3://{bucket}/d/campaigns/", "cannot reach the object store"
    )


def test_data_location_in_a_missing_bucket_exits_2(
    entitle: Entitle, s3_endpoint: str, tmp_path: Path, write_users: Callable[..., Path]
) -> None:
    users = write_users(tmp_path / "users.parquet", [1, 2, 3])
    env = s3_env(s3_endpoint, tmp_path / "var", ENTITLE_DATA_URI="s3://no-such-bucket-here/data")
    assert_clean_error(
        entitle(["run", "--users", str(users)], env),
        2,
        "s3://no-such-bucket-here/data/campaigns/",
        "bucket 'no-such-bucket-here' does not exist",
        "ENTITLE_DATA_URI",
    )


def test_access_denied_exits_2(entitle: Entitle, s3_endpoint: str, s3: Any, bucket: str, tmp_path: Path) -> None:
    put_parquet(s3, bucket, "users.parquet", users_frame([1, 2, 3]))
    env = s3_env(s3_endpoint, tmp_path / "var", ENTITLE_DATA_URI=f"s3://{bucket}/d")

    def require_auth(count: str) -> None:
        # moto checks credentials against its IAM once this count of unauthenticated requests is used up.
        request = urllib.request.Request(
            f"{s3_endpoint}/moto-api/reset-auth",
            data=count.encode(),
            headers={"Content-Type": "text/plain"},  # a form body would be parsed away
            method="POST",
        )
        with urllib.request.urlopen(request, timeout=10) as response:
            assert response.status == 200

    require_auth("0")
    try:
        result = entitle(["plan", "--users", f"s3://{bucket}/users.parquet"], env)
    finally:
        require_auth("inf")
    assert_clean_error(result, 2, f"s3://{bucket}/users.parquet: the object store at {s3_endpoint} denied access")
    assert "AWS_ACCESS_KEY_ID" in result.stderr


# --------------------------------------------------------------------------- settings and locations


def test_object_store_settings_and_uris(tmp_path: Path) -> None:
    base = {"ENTITLE_HOME": str(tmp_path / "var")}
    plain = load_settings(base)
    assert plain.data_uri is None and plain.data_root == plain.home
    assert plain.location("s3://b/k/users.parquet") == storage.ObjectUri("b", "k/users.parquet")
    assert plain.location("file:///tmp/x.csv") == Path("/tmp/x.csv")
    assert plain.location("rel/x.csv") == Path("rel/x.csv")

    secrets = {"AWS_ACCESS_KEY_ID": "AKID-DO-NOT-LOG", "AWS_SECRET_ACCESS_KEY": "SECRET-DO-NOT-LOG"}
    settings = load_settings(
        {**base, "ENTITLE_DATA_URI": "s3://bkt/a/b", "AWS_ENDPOINT_URL": "http://127.0.0.1:9000", **secrets}
    )
    root = settings.data_root
    assert isinstance(root, storage.ObjectUri)
    assert str(root / "campaigns" / "c") == "s3://bkt/a/b/campaigns/c"
    assert (root / "x.parquet").options.endpoint_url == "http://127.0.0.1:9000"
    assert (root / "x.csv.gz").suffixes == [".csv", ".gz"] and (root / "x.csv.gz").name == "x.csv.gz"
    assert settings.object_store.secret_key == "SECRET-DO-NOT-LOG"
    assert "DO-NOT-LOG" not in repr(settings) + repr(root), "credentials stay out of reprs and logs"
    preferred = load_settings(
        {**base, "ENTITLE_S3_ENDPOINT_URL": "https://minio.internal", "AWS_ENDPOINT_URL": "http://ignored:1"}
    )
    assert preferred.object_store.endpoint_url == "https://minio.internal"
    local = load_settings({**base, "ENTITLE_DATA_URI": str(tmp_path / "shared")})
    assert local.data_root == tmp_path / "shared"

    for environ, message in (
        ({"ENTITLE_DATA_URI": "gs://bkt/x"}, "unsupported URI scheme 'gs'"),
        ({"ENTITLE_DATA_URI": "s3:///x"}, "no bucket name"),
        ({"AWS_ENDPOINT_URL": "127.0.0.1:9000"}, "AWS_ENDPOINT_URL='127.0.0.1:9000' must look like http://host:port"),
        ({"AWS_ACCESS_KEY_ID": "only-the-id"}, "must be set together"),
    ):
        with pytest.raises(ConfigError, match=message):
            load_settings({**base, **environ})


def test_storage_errors_are_storage_errors_with_exit_code_2() -> None:
    assert issubclass(StorageError, ConfigError) and StorageError.exit_code == 2
    closed = storage.ObjectStoreOptions(endpoint_url=f"http://127.0.0.1:{free_port()}", **_keys())
    where = storage.ObjectUri("bkt", "k.parquet", closed)
    with pytest.raises(StorageError, match=r"s3://bkt/k\.parquet: cannot reach the object store"):
        storage.exists(where)
    with pytest.raises(StorageError, match="cannot reach the object store"):
        storage.write_bytes(where, b"x")


def _keys() -> dict[str, str]:
    return {
        "access_key": ACCESS["AWS_ACCESS_KEY_ID"],
        "secret_key": ACCESS["AWS_SECRET_ACCESS_KEY"],
        "region": "us-east-1",
    }
