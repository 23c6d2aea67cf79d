"""The reference issuer service's credentials: bearer tokens with rights, from a tokens file re-read without restart.

Request tests run the service in a background thread (the app, store and uvicorn protocol the
command line runs) with a tokens file; the start-up, rotation and logging tests run the command
line itself, ``python -m issuer_service --tokens-file …``, as a subprocess.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import jsonschema
import pytest
from issuer_service import auth
from issuer_service.__main__ import NO_TOKENS_WARNING
from issuer_service.app import SPEC_PATH, create_app
from issuer_service.auth import Credentials, Right, TokensFileError, parse_tokens
from issuer_service.faults import FaultInjector
from issuer_service.store import IssuerStore
from support import REPO_ROOT
from support.delivery import Service, grant, serving_in_thread

CAMPAIGN = "kakao-outage-2022"
STOP_TIMEOUT_S = 20
CLIENT_TIMEOUT_S = 10
RELOAD_WAIT_S = 10  # a change is seen within about a second; generous on a loaded machine

# Tokens of the request tests (each at least 16 characters).
ALL = "all-7d1f0c9a2b4e6f8a0c2e4b6d"
GRANTER = "grant-3c5e7a9b1d3f5a7c9e1b3d5f"
READER = "read-9e8d7c6b5a4f3e2d1c0b9a8f"
REVOKER = "revoke-0a1b2c3d4e5f6a7b8c9d0e1f"
UNKNOWN = "nope-1111222233334444555566667777"
TOKENS = {ALL: "*", GRANTER: "grant", READER: "export, stats", REVOKER: "revoke"}
ALL_TOKENS = (ALL, GRANTER, READER, REVOKER, UNKNOWN)


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


def write_tokens(path: Path, tokens: dict[str, str], *, comment: str = "tokens of the test") -> Path:
    lines = [f"# {comment}", ""] + [
        f"{token}   {rights}   # client {n}" for n, (token, rights) in enumerate(tokens.items())
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def assert_no_token_in(text: str, tokens: tuple[str, ...] = ALL_TOKENS) -> None:
    for token in tokens:
        # The whole token, and any 12-character piece of it.
        pieces = {token[i : i + 12] for i in range(0, len(token) - 11)}
        leaked = [piece for piece in pieces if piece in text]
        assert not leaked, f"a token (or a piece of it: {leaked[:1]}) is in the output"


# --------------------------------------------------------------------------- the service in a thread


@dataclasses.dataclass
class GuardedIssuer:
    """A running service with a tokens file; ``client`` sends no token unless told."""

    client: httpx.Client
    store: IssuerStore
    tokens_file: Path

    def stats(self) -> dict[str, Any]:
        response = self.client.get("/v1/stats", headers=bearer(ALL))
        assert response.status_code == 200, response.text
        return dict(response.json())

    def state(self) -> dict[str, Any]:
        """Everything a request could change: the store, the fault settings, the request and fault counters."""
        stats = self.stats()
        return {
            "grants": self.store.count_grants(),
            "revoked": self.store.count_revoked(),
            "export": list(self.store.export(CAMPAIGN)),
            "faults": self.client.get("/admin/faults", headers=bearer(ALL)).json(),
            "counters": {k: stats[k] for k in ("requests", "grants_received", "outcomes", "faults", "arrivals")},
        }


@contextlib.contextmanager
def running_guarded_issuer(tmp_path: Path, tokens: dict[str, str]) -> Iterator[GuardedIssuer]:
    tokens_file = write_tokens(tmp_path / "tokens", tokens)
    store = IssuerStore.open(str(tmp_path / "issuer.sqlite"))
    app = create_app(store, FaultInjector(), credentials=Credentials(tokens_file))
    try:
        with (
            serving_in_thread(app, access_log=True) as base_url,
            httpx.Client(base_url=base_url, timeout=CLIENT_TIMEOUT_S) as client,
        ):
            yield GuardedIssuer(client, store, tokens_file)
    finally:
        store.close()


@pytest.fixture
def guarded(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> Iterator[GuardedIssuer]:
    caplog.set_level(logging.DEBUG)
    with running_guarded_issuer(tmp_path, TOKENS) as service:
        # Something to revoke and export.
        seeded = service.client.post("/v1/grants:batch", json={"grants": [grant(1), grant(2)]}, headers=bearer(ALL))
        assert seeded.status_code == 200, seeded.text
        yield service
    logged = [r.getMessage() for when in ("setup", "call") for r in caplog.get_records(when)]
    assert logged, "nothing was logged (the access log is on)"
    assert_no_token_in("\n".join(logged))


@dataclasses.dataclass(frozen=True)
class Call:
    method: str
    path: str
    body: dict[str, Any] | None
    right: str

    def send(self, client: httpx.Client, headers: dict[str, str] | None = None) -> httpx.Response:
        return client.request(self.method, self.path, json=self.body, headers=headers)


# Every endpoint but /healthz and /openapi.json, with a body that would change something.
PROTECTED = [
    Call("PUT", f"/v1/grants/{grant(3)['grant_id']}", grant(3), "grant"),
    Call("POST", "/v1/grants:batch", {"grants": [grant(4), grant(5)]}, "grant"),
    Call("POST", "/v1/grants:revoke", {"grant_ids": [grant(1)["grant_id"]], "reason": "voided"}, "revoke"),
    Call("GET", f"/v1/grants/export?campaign_id={CAMPAIGN}", None, "export"),
    Call("GET", "/v1/stats", None, "stats"),
    Call("GET", "/admin/faults", None, "admin"),
    Call("POST", "/admin/faults", {"error_rate": 1.0}, "admin"),
]
UNAUTHORIZED_HEADERS: list[dict[str, str] | None] = [
    None,
    {"authorization": ""},
    bearer(UNKNOWN),
    bearer(ALL[:-1]),  # one character short
    bearer(ALL + "x"),
    {"authorization": f"Basic {ALL}"},
    {"authorization": "Bearer"},
    {"authorization": ALL},
]


def check_refusal(response: httpx.Response, status: int, error: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.headers["www-authenticate"].startswith("Bearer")
    body = response.json()
    assert set(body) == {"error", "detail"} and body["error"] == error and body["detail"], body
    return dict(body)


def spec() -> dict[str, Any]:
    return dict(json.loads(SPEC_PATH.read_bytes()))


def check_schema(document: Any, schema_name: str) -> None:
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": spec()["components"]}
    jsonschema.Draft202012Validator(schema).validate(document)


# --------------------------------------------------------------------------- requests


def test_the_spec_lists_every_protected_endpoint_with_its_right() -> None:
    operations = {
        (method.upper(), path): operation
        for path, methods in spec()["paths"].items()
        for method, operation in methods.items()
    }
    required = {key: op["security"] for key, op in operations.items() if op.get("security", spec()["security"])}
    expected = {(c.method, c.path.split("?")[0]): [{"bearer": [c.right]}] for c in PROTECTED}
    expected[("PUT", "/v1/grants/{grant_id}")] = expected.pop(("PUT", f"/v1/grants/{grant(3)['grant_id']}"))
    assert required == expected
    assert operations[("GET", "/healthz")]["security"] == operations[("GET", "/openapi.json")]["security"] == []
    for key in expected:
        assert {"401", "403"} <= set(operations[key]["responses"]), key
    assert set(auth.RIGHTS) == {c.right for c in PROTECTED}


def test_every_protected_endpoint_answers_401_without_a_valid_token_and_changes_nothing(guarded: GuardedIssuer) -> None:
    # Faults on: a refused request must not even draw one.
    assert guarded.client.post("/admin/faults", json={"error_rate": 1.0}, headers=bearer(ALL)).status_code == 200
    before = guarded.state()
    refused = 0
    for call in PROTECTED:
        for headers in UNAUTHORIZED_HEADERS:
            body = check_refusal(call.send(guarded.client, headers), 401, "unauthorized")
            check_schema(body, "AuthError")
            refused += 1
    missing = PROTECTED[1].send(guarded.client)
    assert missing.headers["www-authenticate"] == "Bearer"
    assert missing.json()["detail"] == "send Authorization: Bearer <token>"
    unknown = PROTECTED[1].send(guarded.client, bearer(UNKNOWN))
    assert unknown.headers["www-authenticate"] == 'Bearer error="invalid_token"'
    # Refused before the body is read: an 9 MiB body gets 401, not 413.
    huge = guarded.client.post("/v1/grants:batch", content=b" " * (9 * 1024 * 1024), headers=bearer(UNKNOWN))
    check_refusal(huge, 401, "unauthorized")
    refused += 3
    assert guarded.state() == before, "a refused request changed something"
    stats = guarded.stats()
    assert (stats["unauthorized"], stats["forbidden"]) == (refused, 0)
    assert stats["tokens_file"] == {"tokens": 4, "reloads": 0, "reload_errors": 0}
    # The same call with a token goes through (and meets the fault).
    assert PROTECTED[0].send(guarded.client, bearer(GRANTER)).status_code in (500, 503)


def test_a_token_without_the_right_answers_403_naming_it_and_changes_nothing(guarded: GuardedIssuer) -> None:
    before = guarded.state()
    forbidden = 0
    for call in PROTECTED:
        for token, rights in TOKENS.items():
            if rights == "*" or call.right in rights:
                continue
            response = call.send(guarded.client, bearer(token))
            body = check_refusal(response, 403, "forbidden")
            assert body["detail"] == f"this token lacks the '{call.right}' right"
            assert response.headers["www-authenticate"] == f'Bearer error="insufficient_scope", scope="{call.right}"'
            check_schema(body, "AuthError")
            forbidden += 1
    assert forbidden == 16  # 7 calls by 3 tokens, less the 5 calls a token has the right to
    assert guarded.state() == before
    stats = guarded.stats()
    assert (stats["unauthorized"], stats["forbidden"]) == (0, forbidden)


def test_each_right_opens_its_endpoints_and_lowercase_bearer_is_accepted(guarded: GuardedIssuer) -> None:
    put = PROTECTED[0].send(guarded.client, bearer(GRANTER))
    assert put.status_code == 201, put.text
    batch = PROTECTED[1].send(guarded.client, {"authorization": f"bearer  {GRANTER}"})
    assert [r["status"] for r in batch.json()["results"]] == ["created", "created"]
    revoked = PROTECTED[2].send(guarded.client, bearer(REVOKER))
    assert revoked.json()["results"] == [{"grant_id": grant(1)["grant_id"], "status": "revoked"}]
    export = PROTECTED[3].send(guarded.client, bearer(READER))
    assert len(export.text.splitlines()) == 4  # 2, 3, 4, 5 (1 is revoked)
    stats = PROTECTED[4].send(guarded.client, bearer(READER))
    assert stats.status_code == 200
    check_schema(stats.json(), "Stats")
    assert PROTECTED[5].send(guarded.client, bearer(ALL)).status_code == 200
    assert guarded.client.post("/admin/faults", json={"latency_ms": 1}, headers=bearer(ALL)).status_code == 200


def test_health_and_the_spec_need_no_token(guarded: GuardedIssuer) -> None:
    assert guarded.client.get("/healthz").json() == {"status": "ok"}
    served = guarded.client.get("/openapi.json")
    assert served.status_code == 200 and served.content == SPEC_PATH.read_bytes()
    assert guarded.client.get("/healthz", headers=bearer(UNKNOWN)).status_code == 200
    assert guarded.stats()["unauthorized"] == 0


def test_without_a_tokens_file_every_client_is_trusted(tmp_path: Path) -> None:
    store = IssuerStore.open(str(tmp_path / "issuer.sqlite"))
    try:
        with (
            serving_in_thread(create_app(store, FaultInjector())) as base_url,
            httpx.Client(base_url=base_url, timeout=CLIENT_TIMEOUT_S) as client,
        ):
            assert PROTECTED[0].send(client).status_code == 201
            assert PROTECTED[0].send(client, bearer(UNKNOWN)).status_code == 200
            stats = client.get("/v1/stats").json()
            assert (stats["unauthorized"], stats["forbidden"], stats["tokens_file"]) == (0, 0, None)
            check_schema(stats, "Stats")
    finally:
        store.close()


# --------------------------------------------------------------------------- the tokens file (no server)


def test_the_tokens_file_format() -> None:
    text = f"""
# comment line
   {ALL} *            # all of them
{GRANTER}	grant , revoke
{READER} export,stats,export#comment right after
"""
    entries = parse_tokens(text, "tokens")
    assert [(e.line, e.rights) for e in entries] == [
        (3, frozenset(Right)),
        (4, frozenset({Right.GRANT, Right.REVOKE})),
        (5, frozenset({Right.EXPORT, Right.STATS})),
    ]
    assert all(len(e.digest) == 32 for e in entries)
    assert_no_token_in(repr(entries))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"# ok\n{ALL} *\nshort-token grant\n", "line 3: the token has 11 characters; a token has at least 16"),
        (f"{ALL} *\n{GRANTER}\n", "line 2: no rights after the token"),
        (
            f"{ALL} grant,refund\n",
            "line 1: an empty or unknown right; the rights are grant, revoke, export, stats, admin",
        ),
        (f"{ALL} grant,\n", "line 1: an empty or unknown right"),
        (f"{ALL} grant revoke\n", "line 1: an empty or unknown right"),
        (f"{ALL} {GRANTER}\n", "line 1: an empty or unknown right"),  # a token where the rights belong: not echoed
        (f"{ALL} *\n\n{ALL} grant\n", "line 3: the same token as line 1"),
        ("Bearer-ÄÖÜ-0123456789abcdef *\n", "line 1: the token holds a character a bearer token cannot carry"),
        ("# nothing but comments\n\n", "holds no token"),
    ],
)
def test_a_malformed_tokens_file_is_refused_naming_the_line_never_the_token(text: str, message: str) -> None:
    with pytest.raises(TokensFileError) as refused:
        parse_tokens(text, "var/issuer/tokens")
    assert str(refused.value).startswith("tokens file var/issuer/tokens")
    assert message in str(refused.value)
    assert_no_token_in(str(refused.value))


def test_reload_sees_changes_at_most_once_a_second_and_keeps_the_tokens_when_the_new_file_is_bad(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="issuer_service")
    path = write_tokens(tmp_path / "tokens", {ALL: "*"})
    now = [100.0]
    credentials = Credentials(path, clock=lambda: now[0])
    assert credentials.check(f"Bearer {ALL}", Right.ADMIN) is None

    write_tokens(path, {ALL: "*", GRANTER: "grant"})
    now[0] += 0.5
    credentials.refresh()
    assert credentials.rights_of(GRANTER) is None, "checked at most once a second"
    now[0] += 0.5
    credentials.refresh()
    assert credentials.rights_of(GRANTER) == {Right.GRANT}
    assert credentials.reloads == 1

    # Rewritten in place with the same size and modification time: seen while the change is recent.
    state = path.stat()
    path.write_text(path.read_text().replace(GRANTER, GRANTER.upper()), encoding="utf-8")
    os.utime(path, ns=(state.st_atime_ns, state.st_mtime_ns))
    assert (path.stat().st_ino, path.stat().st_size, path.stat().st_mtime_ns) == (
        state.st_ino,
        state.st_size,
        state.st_mtime_ns,
    )
    assert credentials.reload()
    assert credentials.rights_of(GRANTER) is None and credentials.rights_of(GRANTER.upper()) == {Right.GRANT}

    # A bad file (here: a write caught halfway) keeps the tokens in force, and is logged once.
    good = path.read_text()
    path.write_text(good + REVOKER[:9], encoding="utf-8")
    for _ in range(3):
        now[0] += 1.0
        credentials.refresh()
    assert credentials.rights_of(ALL) == frozenset(Right)
    assert credentials.reload_errors == 1
    errors = [r.getMessage() for r in caplog.records if r.levelno == logging.ERROR]
    assert errors == [
        f"tokens file {path}, line 5: the token has 9 characters; a token has at least 16; "
        "the 2 tokens loaded before stay in force"
    ]
    # Removed (an editor's delete-then-write): still the tokens before.
    path.unlink()
    now[0] += 1.0
    credentials.refresh()
    assert credentials.rights_of(ALL) == frozenset(Right) and credentials.reload_errors == 2
    # Complete again, now without ALL: in force.
    path.write_text(good.replace(ALL, UNKNOWN), encoding="utf-8")
    now[0] += 1.0
    credentials.refresh()
    assert credentials.rights_of(ALL) is None and credentials.rights_of(UNKNOWN) == frozenset(Right)
    assert credentials.check(f"Bearer {ALL}", Right.GRANT) is not None
    assert_no_token_in(caplog.text)


# --------------------------------------------------------------------------- the command line


def issuer_command(*arguments: str) -> list[str]:
    return [sys.executable, "-m", "issuer_service", *arguments]


def test_a_malformed_or_missing_tokens_file_stops_the_start_with_exit_2(tmp_path: Path) -> None:
    store = str(tmp_path / "issuer.sqlite")
    bad = tmp_path / "bad-tokens"
    bad.write_text(f"{ALL} *\n{GRANTER} grant,refund\n", encoding="utf-8")
    short = tmp_path / "short-tokens"
    short.write_text(f"# rotation\n{ALL[:12]} *\n", encoding="utf-8")
    environ = {k: v for k, v in os.environ.items() if k != "ISSUER_TOKENS_FILE"}
    for arguments, extra_env, message in [
        (["--tokens-file", str(bad)], {}, f"error: tokens file {bad}, line 2: an empty or unknown right"),
        ([], {"ISSUER_TOKENS_FILE": str(short)}, f"error: tokens file {short}, line 2: the token has 12 characters"),
        (["--tokens-file", str(tmp_path / "absent")], {}, "error: cannot read the tokens file"),
        ([], {"ISSUER_TOKENS_FILE": ""}, "ISSUER_TOKENS_FILE) is set but empty"),
    ]:
        refused = subprocess.run(
            issuer_command("--store", store, "--port", "0", *arguments),
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
            env={**environ, **extra_env},
        )
        assert refused.returncode == 2, refused.stderr
        assert message in refused.stderr, refused.stderr
        assert "Traceback" not in refused.stderr and refused.stdout == ""
        assert_no_token_in(refused.stderr)
    assert not Path(store).exists(), "the store is not opened before the tokens file is read"


@contextlib.contextmanager
def service_process(arguments: list[str], log_path: Path) -> Iterator[tuple[str, subprocess.Popen[str]]]:
    """``python -m issuer_service`` with stderr (its log, access log included) in ``log_path``."""
    with log_path.open("w", encoding="utf-8") as log:
        process = subprocess.Popen(
            issuer_command(*arguments, "--port", "0", "--log-level", "debug"),
            cwd=REPO_ROOT,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={k: v for k, v in os.environ.items() if k != "ISSUER_TOKENS_FILE"},
        )
        try:
            assert process.stdout is not None
            match = re.search(r"listening on (http://127\.0\.0\.1:\d+)", process.stdout.readline())
            assert match, f"no 'listening on' line; log: {log_path.read_text()}"
            yield match.group(1), process
            process.send_signal(signal.SIGTERM)
            assert process.wait(timeout=STOP_TIMEOUT_S) == 0
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()


def wait_for(check: Any, what: str) -> None:
    deadline = time.monotonic() + RELOAD_WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"not within {RELOAD_WAIT_S} s: {what}"
        time.sleep(0.1)


def test_tokens_rotate_without_restart_and_no_grant_is_lost(tmp_path: Path) -> None:
    token_a = "rotation-A-5f2b9c0e1d7a4b3c8e6f"
    token_b = "rotation-B-a04c6e8b2d1f3a5c7e9b"
    tokens = (token_a, token_b, UNKNOWN)
    tokens_file = write_tokens(tmp_path / "tokens", {token_a: "*"}, comment="client A")
    store = str(tmp_path / "issuer.sqlite")
    log_path = tmp_path / "service.log"
    answered: dict[str, int] = {}  # grant_id -> status of its answer
    with service_process(["--store", store, "--tokens-file", str(tokens_file)], log_path) as (url, _process):
        with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S) as client:

            def put(n: int, token: str) -> int:
                payload = grant(n)
                response = client.put(f"/v1/grants/{payload['grant_id']}", json=payload, headers=bearer(token))
                if response.status_code in (200, 201):
                    answered[payload["grant_id"]] = response.status_code
                return response.status_code

            # 1. Only A.
            assert [put(n, token_a) for n in range(1, 6)] == [201] * 5
            assert put(6, token_b) == 401
            assert put(6, UNKNOWN) == 401

            # 2. A+B, written in place and slowly: a reload may catch the file halfway (B cut short).
            #    Meanwhile a client keeps granting with A and is never refused.
            stop = threading.Event()
            writer_codes: list[int] = []

            def keep_granting() -> None:
                n = 100
                with httpx.Client(base_url=url, timeout=CLIENT_TIMEOUT_S) as other:
                    while not stop.is_set():
                        payload = grant(n)
                        response = other.put(f"/v1/grants/{payload['grant_id']}", json=payload, headers=bearer(token_a))
                        writer_codes.append(response.status_code)
                        if response.status_code == 201:
                            answered[payload["grant_id"]] = 201
                        n += 1
                        time.sleep(0.02)

            granting = threading.Thread(target=keep_granting)
            granting.start()
            try:
                with tokens_file.open("w", encoding="utf-8") as handle:
                    handle.write(f"# client A, then B\n{token_a} *\n{token_b[:10]}")
                    handle.flush()
                    time.sleep(2.5)  # long enough for a reload to read this
                    handle.write(f"{token_b[10:]} grant,export,stats   # client B\n")
                wait_for(lambda: client.get("/v1/stats", headers=bearer(token_b)).status_code == 200, "B accepted")
                assert put(7, token_b) == 201
                assert put(8, token_a) == 201, "A still valid while both are listed"
                assert put(9, token_b) == 201
            finally:
                stop.set()
                granting.join(STOP_TIMEOUT_S)
            assert writer_codes and set(writer_codes) == {201}, "a client with A was refused during the rewrite"

            # 3. Only B, replacing the file (write a new one, then rename it over the old).
            replacement = write_tokens(tmp_path / "tokens.new", {token_b: "grant,export,stats"}, comment="client B")
            os.replace(replacement, tokens_file)
            wait_for(lambda: client.get("/v1/stats", headers=bearer(token_a)).status_code == 401, "A refused")
            assert put(10, token_a) == 401
            assert put(11, token_b) == 201
            refused = client.get("/admin/faults", headers=bearer(token_b))
            assert refused.status_code == 403 and refused.json()["detail"] == "this token lacks the 'admin' right"

            # Every grant answered 201/200 is there; the refused ones are not.
            export = client.get("/v1/grants/export", params={"campaign_id": CAMPAIGN}, headers=bearer(token_b))
            assert export.status_code == 200
            exported = {json.loads(line)["grant_id"] for line in export.text.splitlines()}
            assert exported == set(answered)
            assert {grant(n)["grant_id"] for n in (6, 10)}.isdisjoint(exported)
            stats = client.get("/v1/stats", headers=bearer(token_b)).json()
            assert stats["grants_stored"] == len(answered)
            assert stats["unauthorized"] >= 3 and stats["forbidden"] == 1
            assert stats["tokens_file"]["tokens"] == 1 and stats["tokens_file"]["reloads"] >= 2
    log_text = log_path.read_text(encoding="utf-8")
    assert '"PUT /v1/grants/' in log_text and " 401" in log_text, "the access log was on"
    assert f"tokens file {tokens_file} read: 1 token in force" in log_text
    assert f"tokens file {tokens_file} reloaded: 2 tokens in force" in log_text
    assert f"tokens file {tokens_file} reloaded: 1 token in force" in log_text
    assert (
        f"tokens file {tokens_file}, line 3: the token has 10 characters; a token has at least 16; "
        "the 1 token loaded before stays in force"
    ) in log_text, "the reload caught the file halfway"
    assert "authorization" not in log_text.lower() and "bearer" not in log_text.lower()
    assert NO_TOKENS_WARNING not in log_text
    assert "Traceback" not in log_text
    assert_no_token_in(log_text, tokens)


def test_without_a_tokens_file_the_service_refuses_to_start_unless_told_to_trust_everyone(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "ISSUER_TOKENS_FILE"}
    store = tmp_path / "issuer.sqlite"
    refused = subprocess.run(
        issuer_command("--store", str(store), "--port", "0"), capture_output=True, text=True, timeout=60, env=env
    )
    assert refused.returncode == 2 and "give --tokens-file PATH" in refused.stderr and "--no-auth" in refused.stderr
    assert "Traceback" not in refused.stderr and not store.exists()


def test_with_no_auth_the_service_warns_once_at_start(tmp_path: Path) -> None:
    log_path = tmp_path / "service.log"
    with service_process(["--store", str(tmp_path / "issuer.sqlite"), "--no-auth"], log_path) as (url, _process):
        assert httpx.post(f"{url}/admin/faults", json={"seed": 1}, timeout=CLIENT_TIMEOUT_S).status_code == 200
    warnings = [line for line in log_path.read_text(encoding="utf-8").splitlines() if NO_TOKENS_WARNING in line]
    assert len(warnings) == 1 and " WARNING issuer_service: " in warnings[0], warnings


def test_the_test_helper_service_runs_with_a_tokens_file(tmp_path: Path) -> None:
    tokens_file = write_tokens(tmp_path / "tokens", {ALL: "*"})
    service = Service(tmp_path / "issuer.sqlite", tokens_file=tokens_file, token=ALL)
    service.start()
    try:
        service.faults(seed=3)
        assert service.export() == []
        assert service.stats()["tokens_file"]["tokens"] == 1
        assert httpx.get(service.url + "/v1/stats").status_code == 401
    finally:
        service.stop()


def test_the_how_to_page_shows_a_tokens_file_the_service_reads_and_its_real_error_message(tmp_path: Path) -> None:
    page = (REPO_ROOT / "docs" / "how-to" / "run-the-reference-issuer.md").read_text(encoding="utf-8")
    example = re.search(r"```text\n(# TOKEN .*?)```", page, re.DOTALL)
    assert example, "no example tokens file on the page"
    entries = parse_tokens(example.group(1), "example")
    assert [e.rights for e in entries] == [
        frozenset({Right.GRANT, Right.REVOKE, Right.EXPORT}),
        frozenset({Right.STATS}),
        frozenset(Right),
    ]
    shown = re.search(r"error: tokens file var/issuer/tokens, line 4: (.*)", page)
    assert shown, "no example error message on the page"
    bad = "\n".join([*example.group(1).splitlines()[:3], f"{UNKNOWN} grant,refund"])  # line 4
    with pytest.raises(TokensFileError) as refused:
        parse_tokens(bad, "var/issuer/tokens")
    assert f"error: {refused.value}" == shown.group(0)
