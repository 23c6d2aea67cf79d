"""The HTTP issuer's credentials: declared in the campaign, taken from the deployment, sent, never shown."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest
from support.cli import cli_environment, run_dag, run_entitle
from support.delivery import Service, write_campaign

from pipeline import delivery
from pipeline.campaigns import IssuerSpec, load_campaign
from pipeline.config import load_settings
from pipeline.credentials import Secret
from pipeline.delivery.issuers import GrantPayload, HttpIssuer, IssuerUnavailable
from pipeline.errors import CampaignError, ConfigError, IssuerAuthError
from pipeline.grants.demo_users import write_demo_users

TOKEN = "tok-3f9a1c7e5b2d4e6f8a0b"
BATCH = [GrantPayload("c:1:s:0", "c", 1, "s", 0, 2000, "2023-01-05T00:00:00+09:00", None)]


def settings_with(tmp_path: Path, lookup: dict[str, str] | None = None, **environ: str) -> object:
    tmp_path.mkdir(parents=True, exist_ok=True)
    campaign = write_campaign(tmp_path / "campaign.toml", auth="bearer")
    env = {"ENTITLE_HOME": str(tmp_path / "var"), "ENTITLE_CAMPAIGN": str(campaign), **environ}
    return load_settings(env, connection_secret_lookup=None if lookup is None else lookup.get)


def test_the_campaign_declares_how_and_the_deployment_gives_the_token(tmp_path: Path) -> None:
    settings = settings_with(tmp_path, ENTITLE_ISSUER_SHOP_TOKEN=TOKEN)
    (shop,) = settings.campaign().issuers  # type: ignore[attr-defined]
    assert shop.auth == "bearer" and shop.token is not None and shop.token.reveal() == TOKEN
    for shown in (repr(settings), str(settings), repr(shop), repr(settings.campaign()), str(shop.token)):  # type: ignore[attr-defined]
        assert TOKEN not in shown


def test_the_variable_wins_over_the_airflow_connection_which_is_used_without_it(tmp_path: Path) -> None:
    connections = {"entitle_issuer_shop": "from-the-connection-0123456789"}
    (shop,) = settings_with(tmp_path / "a", connections, ENTITLE_ISSUER_SHOP_TOKEN=TOKEN).campaign().issuers  # type: ignore[attr-defined]
    assert shop.token.reveal() == TOKEN
    (shop,) = settings_with(tmp_path / "b", connections).campaign().issuers  # type: ignore[attr-defined]
    assert shop.token.reveal() == "from-the-connection-0123456789"
    (shop,) = settings_with(tmp_path / "c", {}).campaign().issuers  # type: ignore[attr-defined]
    assert shop.token is None


@pytest.mark.parametrize(
    ("addition", "message"),
    [
        ('auth = "basic"', "auth 'basic' is unknown; use one of none, bearer"),
        ('token = "x"', "unknown"),
        ('ca_bundle = "/etc/ssl/ca.pem"', "ca_bundle is only for an https:// url"),
    ],
)
def test_a_wrong_declaration_is_refused_naming_the_field(tmp_path: Path, addition: str, message: str) -> None:
    path = write_campaign(tmp_path / "campaign.toml")
    text = path.read_text(encoding="utf-8").replace('auth = "none"\n', addition + "\n")
    path.write_text(text, encoding="utf-8")
    with pytest.raises(CampaignError, match=message):
        load_campaign(path)


def spec(**fields: object) -> IssuerSpec:
    values: dict[str, object] = {"url": "https://shop.example", "auth": "bearer", "token": Secret(TOKEN)}
    values.update(fields)
    return IssuerSpec("shop", "http", **values)  # type: ignore[arg-type]


def test_every_request_carries_the_bearer_token() -> None:
    seen: list[str | None] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request.headers.get("authorization"))
        return httpx.Response(200, json={"results": [{"grant_id": "c:1:s:0", "status": "created"}]})

    issuer = HttpIssuer(spec(), transport=httpx.MockTransport(answer))
    issuer.deliver(BATCH)
    assert seen == [f"Bearer {TOKEN}"]


def test_a_missing_token_stops_before_anything_is_sent_naming_where_it_comes_from() -> None:
    with pytest.raises(IssuerAuthError) as raised:
        HttpIssuer(spec(token=None), transport=httpx.MockTransport(lambda r: httpx.Response(500)))
    message = str(raised.value)
    assert "ENTITLE_ISSUER_SHOP_TOKEN" in message and "entitle_issuer_shop" in message
    assert raised.value.exit_code == 2 and not raised.value.retryable


@pytest.mark.parametrize(("status", "said"), [(401, "401 unauthorized"), (403, "403 forbidden")])
def test_401_and_403_are_not_retried_and_name_the_issuer_and_the_variable(status: int, said: str) -> None:
    calls = []

    def refuse(request: httpx.Request) -> httpx.Response:
        calls.append(request)
        return httpx.Response(status, json={"error": "unauthorized" if status == 401 else "forbidden"})

    issuer_spec = spec(max_attempts=5)
    runtime = delivery.IssuerRuntime(
        issuer_spec,
        HttpIssuer(issuer_spec, transport=httpx.MockTransport(refuse)),
        delivery.RateBudget(1000, 4),
        delivery.CircuitBreaker(5, 60),
        ThreadPoolExecutor(max_workers=1),
        sleep=lambda s: None,
    )
    with pytest.raises(IssuerAuthError) as raised:
        delivery.send_batch(runtime, BATCH)
    runtime.close()
    assert len(calls) == 1, "a refused credential does not pass by retrying"
    message = str(raised.value)
    assert said in message and "'shop'" in message and "ENTITLE_ISSUER_SHOP_TOKEN" in message
    assert TOKEN not in message


def test_the_export_refused_is_a_configuration_error_too() -> None:
    issuer = HttpIssuer(spec(), transport=httpx.MockTransport(lambda r: httpx.Response(401, json={})))
    with pytest.raises(IssuerAuthError, match="401"):
        list(issuer.export("c"))


def test_a_ca_bundle_that_is_not_a_file_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(Exception, match="ca_bundle .* is not a readable file"):
        HttpIssuer(spec(ca_bundle=str(tmp_path / "missing.pem")))


# --------------------------------------------------------------------------- against the reference service

USERS = 300
WRITER = "tok-writer-9c1d2e3f4a5b6c7d"  # grant, revoke and export: what the pipeline needs
READER = "tok-reader-0a1b2c3d4e5f6a7b"  # export only
ADMIN = "tok-admin-55aa66bb77cc88dd"


@pytest.fixture
def service(tmp_path: Path) -> Iterator[Service]:
    tokens = tmp_path / "issuer" / "tokens"
    tokens.parent.mkdir(parents=True)
    tokens.write_text(f"{WRITER} grant,revoke,export\n{READER} export\n{ADMIN} *\n", encoding="utf-8")
    tokens.chmod(0o600)
    running = Service(tmp_path / "issuer" / "store.sqlite", tokens_file=tokens, token=ADMIN)
    running.start()
    try:
        yield running
    finally:
        running.stop()


def granted_home(tmp_path: Path, service: Service, **environ: str) -> dict[str, str]:
    campaign = write_campaign(tmp_path / "campaign.toml", auth="bearer")
    users = tmp_path / "users.parquet"
    write_demo_users(USERS, users)
    env = cli_environment(
        ENTITLE_HOME=str(tmp_path / "var"),
        ENTITLE_CAMPAIGN=str(campaign),
        ENTITLE_PARTITIONS="2",
        ENTITLE_RECONCILE_WORKERS="1",
        ENTITLE_ISSUER_SHOP_URL=service.url,
        **environ,
    )
    done = run_entitle(["run", "--users", str(users), "--no-progress"], env)
    assert done.returncode == 0, done.stderr
    return env


def coupon_grants(env: dict[str, str]) -> set[str]:
    with sqlite3.connect(Path(env["ENTITLE_HOME"]) / "ledger.sqlite") as connection:
        rows = connection.execute("SELECT grant_id FROM grant_ledger WHERE item_sku LIKE 'coupon-%'").fetchall()
    return {r[0] for r in rows}


def test_with_the_right_token_every_grant_arrives_once_under_faults_and_reconciles(
    tmp_path: Path, service: Service
) -> None:
    env = granted_home(tmp_path, service, ENTITLE_ISSUER_SHOP_TOKEN=WRITER)
    service.faults(error_rate=0.2, seed=3)
    delivered = run_entitle(["deliver", "--no-progress"], env)
    for _ in range(3):  # a batch that met its max attempts is left for the next run
        if delivered.returncode == 0:
            break
        delivered = run_entitle(["deliver", "--no-progress", "--only-failed"], env)
    assert delivered.returncode == 0, delivered.stderr
    service.faults(error_rate=0)
    exported = service.export_ids()
    assert len(exported) == len(set(exported)) == USERS * 2
    assert set(exported) == coupon_grants(env)
    reconciled = run_entitle(["reconcile", "--no-progress", "--json"], env)
    assert reconciled.returncode == 0, reconciled.stdout + reconciled.stderr
    assert json.loads(reconciled.stdout)["verdict"] == "RECONCILED"
    assert service.stats()["unauthorized"] == service.stats()["forbidden"] == 0


@pytest.mark.parametrize(
    ("token", "refusal", "status_counter"),
    [
        ("tok-wrong-0000000000000000", "401 unauthorized", "unauthorized"),
        (READER, "403 forbidden", "forbidden"),
        (None, "needs a token", None),
    ],
    ids=["wrong", "without-the-right", "missing"],
)
def test_a_wrong_or_missing_token_stops_with_exit_2_delivers_nothing_then_the_right_one_finishes(
    tmp_path: Path, service: Service, token: str | None, refusal: str, status_counter: str | None
) -> None:
    extra = {} if token is None else {"ENTITLE_ISSUER_SHOP_TOKEN": token}
    env = granted_home(tmp_path, service, **extra)
    refused = run_entitle(["deliver", "--no-progress"], env)
    assert refused.returncode == 2, refused.stdout + refused.stderr
    error = refused.stderr.strip().splitlines()[-1]
    assert error.startswith("entitle: error: ") and refusal in error and "'shop'" in error
    assert "ENTITLE_ISSUER_SHOP_TOKEN" in error and "Traceback" not in refused.stderr
    stats = service.stats()
    if status_counter is None:
        assert stats["unauthorized"] == stats["forbidden"] == 0, "nothing is sent without a token"
    else:
        assert 1 <= stats[status_counter] <= 4, "a refusal is not retried (at most the batches in flight)"
    assert service.export_ids() == []
    with sqlite3.connect(Path(env["ENTITLE_HOME"]) / "ledger.sqlite") as connection:
        answered = connection.execute("SELECT count(*) FROM delivery_answers").fetchone()[0]
    assert answered == 0, "nothing is marked delivered"
    env["ENTITLE_ISSUER_SHOP_TOKEN"] = WRITER
    fixed = run_entitle(["deliver", "--no-progress"], env)
    assert fixed.returncode == 0, fixed.stderr
    exported = service.export_ids()
    assert len(exported) == len(set(exported)) and set(exported) == coupon_grants(env)


def test_the_token_is_in_no_output_and_no_file_the_pipeline_writes(tmp_path: Path, service: Service) -> None:
    env = granted_home(tmp_path, service, ENTITLE_ISSUER_SHOP_TOKEN=WRITER)
    outputs = []
    for command in (
        ["deliver", "--no-progress"],
        ["deliver", "--json", "--no-progress"],
        ["void", "--user", "10000001", "--reason", "test", "--actor", "qa"],
        ["deliver", "--json", "--no-progress"],  # revokes the voided grants at the issuer
        ["reconcile", "--no-progress", "--json"],
        ["reconcile", "--no-progress"],
        ["status", "--json"],
        ["summary"],
        ["notices", "granted", "--no-progress", "--json"],
        ["report", "--out", str(tmp_path / "var" / "report")],
        ["plan", "--users", str(tmp_path / "users.parquet"), "--json"],
    ):
        done = run_entitle(command, env)
        assert done.returncode in (0, 8), (command, done.stderr)
        outputs.append(done.stdout + done.stderr)
    env["ENTITLE_ISSUER_SHOP_TOKEN"] = "tok-wrong-0000000000000000"
    refused = run_entitle(["reconcile", "--no-progress"], env)  # the export is refused: its error names no token
    assert refused.returncode == 2, refused.stderr
    outputs.append(refused.stdout + refused.stderr)
    for text in outputs:
        assert WRITER not in text and "tok-wrong" not in text
    written = [p for p in (tmp_path / "var").rglob("*") if p.is_file()]
    assert any(p.name == "ledger.sqlite" for p in written) and any(p.suffix == ".html" for p in written)
    for path in written:
        assert WRITER.encode() not in path.read_bytes(), path


def test_under_airflow_the_token_comes_from_the_connection_and_stays_out_of_logs_xcom_and_metadata(
    tmp_path: Path, service: Service, airflow_env: dict[str, str]
) -> None:
    campaign = write_campaign(tmp_path / "campaign.toml", auth="bearer")
    users = tmp_path / "var" / "incoming" / "users.parquet"
    write_demo_users(USERS, users)
    env = dict(airflow_env)
    env.update(
        {
            "ENTITLE_HOME": str(tmp_path / "var"),
            "ENTITLE_CAMPAIGN": str(campaign),
            "ENTITLE_PARTITIONS": "2",
            "ENTITLE_RECONCILE_WORKERS": "1",
            "ENTITLE_ISSUER_SHOP_URL": service.url,
            "AIRFLOW_CONN_ENTITLE_ISSUER_SHOP": json.dumps({"conn_type": "generic", "password": WRITER}),
        }
    )
    code, result, output = run_dag(env, {"snapshot_uri": str(users)})
    assert code == 0, output
    assert result.get("state") == "success", result
    exported = service.export_ids()
    assert len(exported) == len(set(exported)) == USERS * 2
    assert WRITER not in output
    airflow_home = Path(env["AIRFLOW_HOME"])
    for root in (airflow_home, tmp_path / "var"):
        for path in (p for p in root.rglob("*") if p.is_file()):
            assert WRITER.encode() not in path.read_bytes(), path


# --------------------------------------------------------------------------- https


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key, the certificate being its own CA."""
    import datetime as dt
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "test issuer")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "issuer.pem", folder / "issuer.key"
    cert_file.write_bytes(certificate.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return cert_file, key_file


@pytest.fixture
def https_issuer(tmp_path: Path) -> Iterator[tuple[str, Path, list[str | None]]]:
    """An https endpoint answering batches as created; its URL, its CA file and the Authorization headers seen."""
    import ssl
    import threading
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    cert_file, key_file = self_signed(tmp_path)
    seen: list[str | None] = []

    class Handler(BaseHTTPRequestHandler):
        def do_POST(self) -> None:  # noqa: N802 - http.server's name
            seen.append(self.headers.get("authorization"))
            body = json.loads(self.rfile.read(int(self.headers["content-length"])))
            answer = json.dumps({"results": [{"grant_id": g["grant_id"], "status": "created"} for g in body["grants"]]})
            self.send_response(200)
            self.send_header("content-type", "application/json")
            self.send_header("content-length", str(len(answer)))
            self.end_headers()
            self.wfile.write(answer.encode())

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(cert_file, key_file)
    server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"https://127.0.0.1:{server.server_address[1]}", cert_file, seen
    finally:
        server.shutdown()
        server.server_close()


def test_https_verifies_the_certificate_against_the_named_ca_bundle(
    https_issuer: tuple[str, Path, list[str | None]],
) -> None:
    url, ca_file, seen = https_issuer
    issuer = HttpIssuer(spec(url=url, ca_bundle=str(ca_file)))
    assert [a.status for a in issuer.deliver(BATCH)] == ["created"]
    assert seen == [f"Bearer {TOKEN}"]
    untrusting = HttpIssuer(spec(url=url))  # the system's CAs do not know this one
    with pytest.raises(ConfigError, match="certificate is not trusted .*ca_bundle") as raised:
        untrusting.deliver(BATCH)
    assert not isinstance(raised.value, IssuerUnavailable), "a certificate is not a network failure: no retry"
    assert len(seen) == 1, "nothing reached the issuer over an untrusted connection"


def test_an_issuer_declared_without_auth_that_requires_it_says_how_to_declare_it() -> None:
    issuer = HttpIssuer(
        spec(auth="none", token=None), transport=httpx.MockTransport(lambda r: httpx.Response(401, json={}))
    )
    with pytest.raises(IssuerAuthError, match='requires credentials .*auth = "bearer" under \\[issuers.shop\\]'):
        issuer.deliver(BATCH)
