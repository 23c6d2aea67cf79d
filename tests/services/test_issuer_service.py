"""The reference entitlement service (services/issuer): real uvicorn, real SQLite and PostgreSQL, real HTTP.

Each test starts the service in a background thread on a free loopback port
(the same app, store and uvicorn protocol the command line runs) and talks to
it with httpx. Contract tests run against both stores; fault tests against
SQLite (faults are decided above the store). One test runs the command line
itself as a subprocess.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import datetime as dt
import io
import json
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from issuer_service import app as issuer_app
from issuer_service import grants as issuer_grants
from issuer_service.app import SPEC_PATH, create_app
from issuer_service.faults import FaultInjector
from issuer_service.server import bind
from issuer_service.store import IssuerStore
from support import REPO_ROOT
from support.delivery import grant, serving_in_thread

ROOT = REPO_ROOT
CAMPAIGN = "kakao-outage-2022"
STOP_TIMEOUT_S = 20
CLIENT_TIMEOUT_S = 10
SPEC_PATHS = {
    "/v1/grants/{grant_id}",
    "/v1/grants:batch",
    "/v1/grants:revoke",
    "/v1/grants/export",
    "/v1/stats",
    "/healthz",
    "/openapi.json",
    "/admin/faults",
}


# --------------------------------------------------------------------------- the running service


@dataclasses.dataclass
class Issuer:
    """A running service: its base URL, a client, and its store (to look behind the API)."""

    base_url: str
    client: httpx.Client
    store: IssuerStore

    def faults(self, **settings: Any) -> dict[str, Any]:
        """Change the fault settings through the admin endpoint."""
        response = self.client.post("/admin/faults", json=settings)
        assert response.status_code == 200, response.text
        return dict(response.json())

    def stats(self) -> dict[str, Any]:
        return dict(self.client.get("/v1/stats").json())

    def exported(self, campaign_id: str = CAMPAIGN) -> dict[str, dict[str, Any]]:
        """The campaign's grants by grant_id, through the jsonl export."""
        response = self.client.get("/v1/grants/export", params={"campaign_id": campaign_id})
        assert response.status_code == 200, response.text
        rows = [json.loads(line) for line in response.text.splitlines()]
        return {row["grant_id"]: row for row in rows}


@contextlib.contextmanager
def running_issuer(store_url: str) -> Iterator[Issuer]:
    """The service on a free loopback port, in a background thread, until the block ends."""
    store = IssuerStore.open(store_url)
    try:
        with (
            serving_in_thread(create_app(store, FaultInjector())) as base_url,
            httpx.Client(base_url=base_url, timeout=CLIENT_TIMEOUT_S) as client,
        ):
            yield Issuer(base_url, client, store)
    finally:
        store.close()


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def issuer(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Issuer]:
    """The service over an SQLite file, and over a fresh PostgreSQL database."""
    url = request.getfixturevalue("pg_url") if request.param == "postgres" else str(tmp_path / "issuer.sqlite")
    with running_issuer(url) as service:
        yield service


@pytest.fixture
def sqlite_issuer(tmp_path: Path) -> Iterator[Issuer]:
    """The service over an SQLite file (fault tests: faults are decided above the store)."""
    with running_issuer(str(tmp_path / "issuer.sqlite")) as service:
        yield service


def put(issuer: Issuer, payload: dict[str, Any], **kwargs: Any) -> httpx.Response:
    return issuer.client.put(f"/v1/grants/{payload['grant_id']}", json=payload, **kwargs)


def batch(issuer: Issuer, payloads: list[dict[str, Any]]) -> httpx.Response:
    return issuer.client.post("/v1/grants:batch", json={"grants": payloads})


def revoke(issuer: Issuer, grant_ids: list[str], reason: str = "voided in the ledger") -> httpx.Response:
    return issuer.client.post("/v1/grants:revoke", json={"grant_ids": grant_ids, "reason": reason})


def statuses(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [r["status"] for r in response.json()["results"]]


def fault_total(stats: dict[str, Any], *kinds: str) -> int:
    return sum(int(stats["faults"][kind]) for kind in kinds)


# --------------------------------------------------------------------------- the contract, on both stores


def test_put_answers_created_then_exists_then_conflict_and_never_overwrites(issuer: Issuer) -> None:
    original = grant(1)
    first = put(issuer, original)
    assert (first.status_code, first.json()) == (
        201,
        {"grant_id": original["grant_id"], "status": "created", "detail": None},
    )
    again = put(issuer, original)
    assert (again.status_code, again.json()["status"]) == (200, "exists")
    # The same instants written in UTC are the same payload.
    same_in_utc = grant(1, valid_from="2023-01-04T15:00:00Z", valid_until="2023-04-04T15:00:00.000000+00:00")
    in_utc = put(issuer, same_in_utc)
    assert (in_utc.status_code, in_utc.json()["status"]) == (200, "exists")
    different = put(issuer, grant(1, amount_krw=3000))
    assert (different.status_code, different.json()["status"]) == (409, "conflict")
    assert "amount_krw: stored 2000, sent 3000" in different.json()["detail"]
    stored = issuer.exported()[original["grant_id"]]
    assert stored["payload_sha256"] == issuer_grants.payload_sha256(original)
    assert (stored["user_id"], stored["item_sku"], stored["issue_no"]) == (1, "coupon-2000", 0)


def test_revoke_is_idempotent_leaves_the_export_and_a_revoked_id_is_never_granted_again(issuer: Issuer) -> None:
    assert statuses(batch(issuer, [grant(1), grant(2), grant(3)])) == ["created"] * 3
    ids = [grant(n)["grant_id"] for n in (1, 2, 3)]
    first = revoke(issuer, [ids[0], ids[1], ids[0], f"{CAMPAIGN}:9:coupon-2000:0"])
    assert statuses(first) == ["revoked", "revoked", "already_revoked", "not_found"]
    assert statuses(revoke(issuer, [ids[1]])) == ["already_revoked"], "revoking again changes nothing"
    assert set(issuer.exported()) == {ids[2]}, "a revoked grant is not held"
    again = batch(issuer, [grant(1), grant(3)])
    assert statuses(again) == ["conflict", "exists"]
    assert "was revoked (voided in the ledger)" in again.json()["results"][0]["detail"]
    assert set(issuer.exported()) == {ids[2]}, "sending it again does not grant it again"
    for body in ({"grant_ids": [], "reason": "x"}, {"grant_ids": ids}, {"grant_ids": [1], "reason": "x"}):
        refused = issuer.client.post("/v1/grants:revoke", json=body)
        assert refused.status_code == 422, body


def test_batch_outcomes_come_in_request_order_including_duplicates_inside_the_batch(issuer: Issuer) -> None:
    assert put(issuer, grant(1)).status_code == 201
    request = [
        grant(2),  # new
        grant(1),  # stored before, same payload
        grant(3),  # new ...
        grant(3),  # ... and repeated with the same payload
        grant(4),  # new ...
        grant(4, issue_no=1),  # ... and repeated with a different payload
        grant(1, valid_until=None),  # stored before, different payload
    ]
    response = batch(issuer, request)
    assert statuses(response) == ["created", "exists", "created", "exists", "created", "conflict", "conflict"]
    results = response.json()["results"]
    assert [r["grant_id"] for r in results] == [g["grant_id"] for g in request]
    assert [r["detail"] is None for r in results] == [True] * 5 + [False] * 2
    assert "issue_no: stored 0, sent 1" in results[5]["detail"]
    assert "valid_until" in results[6]["detail"]
    exported = issuer.exported()
    assert sorted(exported) == sorted(grant(n)["grant_id"] for n in (1, 2, 3, 4))
    assert all(
        row["payload_sha256"] == issuer_grants.payload_sha256(grant(row["user_id"])) for row in exported.values()
    )
    # A replay of the whole batch: every first occurrence exists now.
    assert statuses(batch(issuer, request)) == [
        "exists",
        "exists",
        "exists",
        "exists",
        "exists",
        "conflict",
        "conflict",
    ]


def test_concurrent_batches_with_the_same_keys_create_each_grant_exactly_once(issuer: Issuer) -> None:
    payloads = [grant(n) for n in range(1, 301)]
    # Half of them in reverse order: the store must not deadlock on keys locked in opposite orders.
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        responses = list(pool.map(lambda i: batch(issuer, payloads[:: 1 if i % 2 else -1]), range(4)))
    outcomes = [status for response in responses for status in statuses(response)]
    assert outcomes.count("created") == 300
    assert outcomes.count("exists") == 900
    assert issuer.stats()["grants_stored"] == 300


@pytest.mark.parametrize(
    ("bad_grant", "field"),
    [
        (grant(4, user_id="4"), "user_id"),
        (grant(4, user_id=True), "user_id"),
        (grant(4, user_id=0), "user_id"),
        (grant(4, amount_krw=-1), "amount_krw"),
        (grant(4, issue_no=1.0), "issue_no"),
        (grant(4, valid_from="2023-01-05T00:00:00"), "valid_from"),
        (grant(4, valid_until="next spring"), "valid_until"),
        (grant(4, grant_id="g" * 129), "grant_id"),
        (grant(4, campaign_id=""), "campaign_id"),
        ({k: v for k, v in grant(4).items() if k != "item_sku"}, "item_sku"),
        (grant(4, coupon_code="X"), "coupon_code"),
    ],
)
def test_an_invalid_grant_is_named_by_index_and_field_and_nothing_of_the_batch_is_committed(
    sqlite_issuer: Issuer, bad_grant: dict[str, Any], field: str
) -> None:
    payloads = [grant(1), grant(2), grant(3), bad_grant, grant(5)]
    response = batch(sqlite_issuer, payloads)
    assert response.status_code == 422, response.text
    body = response.json()
    assert (body["index"], body["field"]) == (3, field)
    assert "grants[3]" in body["error"] and field in body["error"]
    assert sqlite_issuer.exported() == {}


def test_request_level_errors_422_and_413_commit_nothing(issuer: Issuer) -> None:
    mismatch = issuer.client.put("/v1/grants/other-id", json=grant(1))
    assert (mismatch.status_code, mismatch.json()["index"], mismatch.json()["field"]) == (422, 0, "grant_id")
    naive = put(issuer, grant(1, valid_from="2023-01-05 00:00"))
    assert (naive.status_code, naive.json()["field"]) == (422, "valid_from")
    assert issuer.client.post("/v1/grants:batch", content=b"{not json").status_code == 422
    empty = batch(issuer, [])
    assert (empty.status_code, empty.json()["field"]) == (422, "grants")
    unknown = issuer.client.post("/v1/grants:batch", json={"grants": [grant(1)], "dry_run": True})
    assert (unknown.status_code, unknown.json()["field"]) == (422, "dry_run")
    too_many = batch(issuer, [grant(n) for n in range(1, 1002)])
    assert (too_many.status_code, too_many.json()["field"]) == (413, "grants")
    assert issuer.exported() == {}
    assert issuer.stats()["validation_errors"] == 6


def test_export_streams_jsonl_and_parquet_with_the_same_rows(issuer: Issuer, monkeypatch: pytest.MonkeyPatch) -> None:
    # Small chunks, so the keyset paging runs over several pages.
    monkeypatch.setattr(issuer_app, "EXPORT_CHUNK_ROWS", 7)
    monkeypatch.setattr(issuer_app, "PARQUET_EXPORT_CHUNK_ROWS", 7)
    before = dt.datetime.now(dt.UTC) - dt.timedelta(seconds=1)
    payloads = [grant(n, issue_no=n % 3) for n in range(1, 31)]
    assert statuses(batch(issuer, payloads)) == ["created"] * 30
    other = grant(99, campaign_id="other-campaign", grant_id="other-campaign:99")
    assert put(issuer, other).status_code == 201
    after = dt.datetime.now(dt.UTC) + dt.timedelta(seconds=1)

    jsonl = issuer.client.get("/v1/grants/export", params={"campaign_id": CAMPAIGN})
    assert jsonl.headers["content-type"].startswith("application/x-ndjson")
    rows = [json.loads(line) for line in jsonl.text.splitlines()]
    assert [r["grant_id"] for r in rows] == sorted(p["grant_id"] for p in payloads)
    by_id = {p["grant_id"]: p for p in payloads}
    for row in rows:
        sent = by_id[row["grant_id"]]
        assert set(row) == {
            "grant_id",
            "campaign_id",
            "user_id",
            "item_sku",
            "issue_no",
            "payload_sha256",
            "created_at",
        }
        assert (row["campaign_id"], row["user_id"], row["item_sku"], row["issue_no"]) == (
            CAMPAIGN,
            sent["user_id"],
            sent["item_sku"],
            sent["issue_no"],
        )
        assert row["payload_sha256"] == issuer_grants.payload_sha256(sent)
        assert before <= dt.datetime.fromisoformat(row["created_at"]) <= after

    parquet = issuer.client.get("/v1/grants/export", params={"campaign_id": CAMPAIGN, "format": "parquet"})
    assert parquet.status_code == 200
    table = pq.read_table(io.BytesIO(parquet.content))
    assert str(table.schema.field("created_at").type) == "timestamp[us, tz=UTC]"
    parquet_rows = table.to_pylist()
    for row in parquet_rows:
        row["created_at"] = row["created_at"].isoformat(timespec="microseconds").replace("+00:00", "Z")
    assert parquet_rows == rows

    assert list(issuer.exported("other-campaign")) == ["other-campaign:99"]
    assert issuer.exported("no-such-campaign") == {}
    empty = issuer.client.get("/v1/grants/export", params={"campaign_id": "no-such-campaign", "format": "parquet"})
    assert pq.read_table(io.BytesIO(empty.content)).num_rows == 0
    assert issuer.client.get("/v1/grants/export").status_code == 422
    assert issuer.client.get("/v1/grants/export", params={"campaign_id": CAMPAIGN, "format": "csv"}).status_code == 422


def test_stats_count_requests_outcomes_and_stored_grants(sqlite_issuer: Issuer) -> None:
    put(sqlite_issuer, grant(1))
    put(sqlite_issuer, grant(1))
    put(sqlite_issuer, grant(1, amount_krw=1))
    batch(sqlite_issuer, [grant(2), grant(3), grant(2)])
    batch(sqlite_issuer, [grant(4, user_id=-4)])
    sqlite_issuer.exported()
    assert sqlite_issuer.client.get("/healthz").json() == {"status": "ok"}
    stats = sqlite_issuer.stats()
    assert stats["grants_stored"] == 3
    assert stats["requests"] == {"put": 3, "batch": 2, "export": 1, "revoke": 0}
    assert stats["grants_revoked"] == 0
    assert stats["grants_received"] == 6
    assert stats["outcomes"] == {"created": 3, "exists": 2, "conflict": 1}
    assert stats["validation_errors"] == 1
    assert set(stats["faults"].values()) == {0}


def test_a_failing_store_answers_503_and_counts_a_store_error(sqlite_issuer: Issuer) -> None:
    with sqlite_issuer.store.engine.begin() as connection:
        connection.exec_driver_sql("DROP TABLE issued_grants")  # behind the service's back
    response = batch(sqlite_issuer, [grant(1)])
    assert response.status_code == 503 and "store failed" in response.json()["error"]
    assert sqlite_issuer.client.get("/healthz").status_code == 200
    with sqlite_issuer.store.engine.begin() as connection:
        connection.exec_driver_sql("CREATE TABLE issued_grants (grant_id TEXT)")  # so /v1/stats can count again
    assert sqlite_issuer.stats()["store_errors"] == 1


def test_the_served_spec_is_the_committed_file_and_answers_match_its_schemas(sqlite_issuer: Issuer) -> None:
    served = sqlite_issuer.client.get("/openapi.json")
    assert served.status_code == 200
    assert served.content == SPEC_PATH.read_bytes()
    spec = json.loads(served.content)
    assert spec["openapi"].startswith("3.1")
    assert set(spec["paths"]) == SPEC_PATHS

    def check(document: Any, schema_name: str) -> None:
        schema = {"$ref": f"#/components/schemas/{schema_name}", "components": spec["components"]}
        jsonschema.Draft202012Validator(schema).validate(document)

    for payload in (grant(1), grant(2, amount_krw=None, valid_until=None)):
        check(payload, "GrantPayload")
    check({"grants": [grant(1)]}, "BatchRequest")
    check(put(sqlite_issuer, grant(1)).json(), "GrantResult")
    check(put(sqlite_issuer, grant(1, issue_no=5)).json(), "GrantResult")
    check(batch(sqlite_issuer, [grant(1), grant(2)]).json(), "BatchResponse")
    check(batch(sqlite_issuer, [grant(3, user_id="x")]).json(), "ValidationError")
    check({"grant_ids": [grant(1)["grant_id"]], "reason": "voided"}, "RevokeRequest")
    check(revoke(sqlite_issuer, [grant(1)["grant_id"], "nope"]).json(), "RevokeResponse")
    for row in sqlite_issuer.exported().values():
        check(row, "ExportedGrant")
    check(sqlite_issuer.stats(), "Stats")
    check(sqlite_issuer.client.get("/admin/faults").json(), "FaultSettings")
    check({"error_rate": 0.1, "seed": 3}, "FaultSettingsChange")
    with pytest.raises(jsonschema.ValidationError):
        check(grant(1, user_id=0), "GrantPayload")


# --------------------------------------------------------------------------- faults (SQLite)


def test_error_rate_answers_5xx_that_commit_nothing_and_a_seed_repeats_the_sequence(sqlite_issuer: Issuer) -> None:
    requests = 200
    sqlite_issuer.faults(error_rate=0.3, seed=11)
    codes = [put(sqlite_issuer, grant(n)).status_code for n in range(1, requests + 1)]
    failed = [n for n, code in zip(range(1, requests + 1), codes, strict=True) if code >= 500]
    assert set(codes) == {201, 500, 503}
    assert 0.2 * requests <= len(failed) <= 0.4 * requests
    stored = sqlite_issuer.exported()
    assert {int(row["user_id"]) for row in stored.values()} == set(range(1, requests + 1)) - set(failed)
    assert fault_total(sqlite_issuer.stats(), "error_500", "error_503") == len(failed)
    # The same seed gives the same answers again (on fresh grant ids).
    sqlite_issuer.faults(seed=11)
    replay = [put(sqlite_issuer, grant(n)).status_code for n in range(1001, 1001 + requests)]
    assert replay == codes


def test_throttle_rate_answers_429_with_retry_after_and_commits_nothing(sqlite_issuer: Issuer) -> None:
    requests = 120
    sqlite_issuer.faults(throttle_rate=0.25, retry_after_s=2, seed=5)
    responses = [batch(sqlite_issuer, [grant(n)]) for n in range(1, requests + 1)]
    throttled = [n for n, r in zip(range(1, requests + 1), responses, strict=True) if r.status_code == 429]
    assert all(r.headers["retry-after"] == "2" for r in responses if r.status_code == 429)
    assert {r.status_code for r in responses} == {200, 429}
    assert 0.15 * requests <= len(throttled) <= 0.35 * requests
    stored_users = {int(row["user_id"]) for row in sqlite_issuer.exported().values()}
    assert stored_users == set(range(1, requests + 1)) - set(throttled)
    assert fault_total(sqlite_issuer.stats(), "throttled") == len(throttled)


def test_rate_limit_rps_is_a_token_bucket_answering_429_with_retry_after(sqlite_issuer: Issuer) -> None:
    sqlite_issuer.faults(rate_limit_rps=5)
    started = time.monotonic()
    responses = [put(sqlite_issuer, grant(n)) for n in range(1, 21)]
    elapsed = time.monotonic() - started
    codes = [r.status_code for r in responses]
    # A full bucket (5 tokens) plus what refilled meanwhile.
    assert codes[:5] == [201] * 5
    assert 5 <= codes.count(201) <= 5 + int(elapsed * 5) + 1
    assert set(codes) == {201, 429}
    assert all(int(r.headers["retry-after"]) >= 1 for r in responses if r.status_code == 429)
    time.sleep(0.25)  # one token at 5 per second
    assert put(sqlite_issuer, grant(21)).status_code == 201
    assert fault_total(sqlite_issuer.stats(), "rate_limited") == codes.count(429)


def test_drop_rate_closes_connections_without_an_answer_and_commits_nothing(sqlite_issuer: Issuer) -> None:
    requests = 100
    sqlite_issuer.faults(drop_rate=0.3, seed=3)
    dropped = []
    for n in range(1, requests + 1):
        try:
            assert put(sqlite_issuer, grant(n)).status_code == 201
        except httpx.TransportError:
            dropped.append(n)
    assert 0.2 * requests <= len(dropped) <= 0.4 * requests
    stored_users = {int(row["user_id"]) for row in sqlite_issuer.exported().values()}
    assert stored_users == set(range(1, requests + 1)) - set(dropped)
    assert fault_total(sqlite_issuer.stats(), "dropped_connection") == len(dropped)


def test_timeout_after_commit_commits_then_the_client_times_out_and_a_retry_finds_it(sqlite_issuer: Issuer) -> None:
    requests = 20
    sqlite_issuer.faults(timeout_after_commit_rate=0.25, hang_s=2.0, seed=2)
    timed_out = []
    for n in range(1, requests + 1):
        try:
            assert put(sqlite_issuer, grant(n), timeout=0.6).status_code == 201
        except httpx.TimeoutException:
            timed_out.append(n)
    assert 2 <= len(timed_out) <= 10
    stored_users = {int(row["user_id"]) for row in sqlite_issuer.exported().values()}
    assert stored_users == set(range(1, requests + 1))  # every one committed, answered or not
    assert fault_total(sqlite_issuer.stats(), "timeout_after_commit") == len(timed_out)
    sqlite_issuer.faults(timeout_after_commit_rate=0)
    assert {put(sqlite_issuer, grant(n)).json()["status"] for n in timed_out} == {"exists"}


def test_after_commit_drop_commits_the_batch_and_closes_the_connection(sqlite_issuer: Issuer) -> None:
    sqlite_issuer.faults(timeout_after_commit_rate=1.0, after_commit_action="drop")
    payloads = [grant(n) for n in range(1, 11)]
    with pytest.raises(httpx.TransportError):
        batch(sqlite_issuer, payloads)
    assert len(sqlite_issuer.exported()) == 10
    assert fault_total(sqlite_issuer.stats(), "dropped_after_commit") == 1
    sqlite_issuer.faults(timeout_after_commit_rate=0.0)
    assert statuses(batch(sqlite_issuer, payloads)) == ["exists"] * 10


def test_latency_delays_every_granting_answer(sqlite_issuer: Issuer) -> None:
    sqlite_issuer.faults(latency_ms=250)
    started = time.monotonic()
    assert put(sqlite_issuer, grant(1)).status_code == 201
    assert batch(sqlite_issuer, [grant(2)]).status_code == 200
    assert time.monotonic() - started >= 0.5
    sqlite_issuer.client.get("/v1/stats")  # not a granting endpoint: no delay
    assert fault_total(sqlite_issuer.stats(), "latency") == 2, "the stats requests were not delayed"


def test_fault_settings_are_checked_and_unchanged_by_a_refused_update(sqlite_issuer: Issuer) -> None:
    before = sqlite_issuer.client.get("/admin/faults").json()
    for changes, field in [
        ({"error_rate": 1.5}, "error_rate"),
        ({"error_rate": 0.6, "drop_rate": 0.6}, "error_rate"),
        ({"retry_after_s": 1.5}, "retry_after_s"),
        ({"after_commit_action": "explode"}, "after_commit_action"),
        ({"chaos": 1}, "chaos"),
    ]:
        response = sqlite_issuer.client.post("/admin/faults", json=changes)
        assert (response.status_code, response.json()["field"]) == (422, field)
    assert sqlite_issuer.client.get("/admin/faults").json() == before


# --------------------------------------------------------------------------- the command line


def test_the_command_line_serves_until_sigterm_and_refuses_bad_settings_with_exit_2(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "issuer_service", "--no-auth"]
    help_text = subprocess.run([*command, "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert help_text.returncode == 0 and "--fault-timeout-after-commit-rate" in help_text.stdout
    store = str(tmp_path / "issuer.sqlite")
    taken = bind("127.0.0.1", 0)
    try:
        for arguments, message in [
            (["--store", store, "--fault-error-rate", "2"], "error_rate"),
            (["--store", "mysql://db/issuer"], "--store"),
            (["--store", store, "--port", "70000"], "--port"),
            (["--store", store, "--port", str(taken.getsockname()[1])], "cannot listen"),
        ]:
            refused = subprocess.run([*command, *arguments], capture_output=True, text=True, timeout=60, check=False)
            assert refused.returncode == 2 and message in refused.stderr, refused.stderr
    finally:
        taken.close()
    service = subprocess.Popen(
        [*command, "--store", store, "--port", "0", "--json-log", "--fault-seed", "1"],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert service.stdout is not None and service.stderr is not None
        match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", service.stdout.readline())
        assert match, "no 'listening on' line"
        assert httpx.get(f"{match.group(1)}/healthz", timeout=CLIENT_TIMEOUT_S).status_code == 200
        assert httpx.get(f"{match.group(1)}/admin/faults", timeout=CLIENT_TIMEOUT_S).json()["seed"] == 1
        service.send_signal(signal.SIGTERM)
        assert service.wait(timeout=STOP_TIMEOUT_S) == 0
        log_lines = [json.loads(line) for line in service.stderr.read().splitlines()]
        assert any("store sqlite" in line["message"] for line in log_lines)
    finally:
        if service.poll() is None:
            service.kill()
            service.wait()


# --------------------------------------------------------------------------- payloads and hashes (no server)

_text = st.text(min_size=1, max_size=20)
_instants = st.datetimes(
    min_value=dt.datetime(1970, 1, 2), max_value=dt.datetime(2200, 1, 1), timezones=st.timezones()
).map(lambda d: d.isoformat())


@settings(max_examples=200, deadline=None)
@given(
    grant_id=_text,
    campaign_id=_text,
    user_id=st.one_of(st.integers(min_value=-5, max_value=2**64), st.booleans(), st.floats(allow_nan=False), _text),
    item_sku=_text,
    issue_no=st.integers(min_value=-2, max_value=2**63),
    amount_krw=st.one_of(st.none(), st.integers(min_value=-2, max_value=10**6)),
    valid_from=st.one_of(_instants, _text),
    valid_until=st.one_of(st.none(), _instants),
)
def test_the_fast_parser_agrees_with_the_checked_one_and_the_hash_is_pythons_canonical_json(**payload: Any) -> None:
    body = json.dumps({"grants": [payload]}).encode()
    try:
        expected: list[issuer_grants.Grant] | str = issuer_grants._parse_batch_checked(body)
    except issuer_grants.GrantValidationError as exc:
        expected = f"{exc.index}:{exc.field}"
    try:
        actual: list[issuer_grants.Grant] | str = issuer_grants.parse_batch(body)
    except issuer_grants.GrantValidationError as exc:
        actual = f"{exc.index}:{exc.field}"
    assert actual == expected
    if isinstance(actual, list):
        hashed = {k: v for k, v in payload.items() if k != "grant_id"}
        hashed["valid_from"] = issuer_grants.normalize_instant(payload["valid_from"])
        if payload["valid_until"] is not None:
            hashed["valid_until"] = issuer_grants.normalize_instant(payload["valid_until"])
        canonical = json.dumps(hashed, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
        assert actual[0].payload == canonical


def test_equal_instants_in_different_offsets_normalise_alike() -> None:
    normalize: Callable[[str], str] = issuer_grants.normalize_instant
    assert normalize("2023-01-05T00:00:00+09:00") == normalize("2023-01-04T15:00:00Z") == "2023-01-04T15:00:00.000000Z"
    assert normalize("2023-01-05T00:00:00.5-01:30") == "2023-01-05T01:30:00.500000Z"
    with pytest.raises(ValueError, match="offset"):
        normalize("2023-01-05T00:00:00")
