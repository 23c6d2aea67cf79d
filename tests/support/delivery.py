"""Delivery test helpers: a campaign file with an HTTP issuer and settings that deliver to a service."""

from __future__ import annotations

import contextlib
import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from pipeline.config import Settings, load_settings
from pipeline.delivery import rate_budget

CAMPAIGN = "kakao-outage-2022"

# The bundled campaign with its coupons delivered by an http issuer "shop".
CAMPAIGN_TOML = """
[campaign]
id = "kakao-outage-2022"
name = "Kakao outage compensation"
time_zone = "Asia/Seoul"
start = 2023-01-05T00:00:00

[issuers.shop]
kind = "http"
url = "http://127.0.0.1:9"   # replaced per test through ENTITLE_ISSUER_SHOP_URL
requests_per_s = {requests_per_s}
concurrency = {concurrency}
batch_size = {batch_size}
timeout_s = {timeout_s}
max_attempts = {max_attempts}
breaker_failures = {breaker_failures}
breaker_cooldown_s = 30
backoff_base_s = 0.02
backoff_cap_s = 0.2
auth = "{auth}"

[[items]]
sku = "emoticon-permanent"
kind = "emoticon"
validity = "permanent"

[[items]]
sku = "emoticon-90d-a"
kind = "emoticon"
validity = "90d"

[[items]]
sku = "coupon-2000"
kind = "coupon"
amount_krw = 2000
validity = "90d"
issuer = "shop"

[[items]]
sku = "coupon-3000"
kind = "coupon"
amount_krw = 3000
validity = "90d"
issuer = "shop"
"""


def grant(n: int, **changes: Any) -> dict[str, Any]:
    """A valid grant payload of the issuer API for user ``n``; ``changes`` override fields."""
    payload: dict[str, Any] = {
        "grant_id": f"{CAMPAIGN}:{n}:coupon-2000:0",
        "campaign_id": CAMPAIGN,
        "user_id": n,
        "item_sku": "coupon-2000",
        "issue_no": 0,
        "amount_krw": 2000,
        "valid_from": "2023-01-05T00:00:00+09:00",
        "valid_until": "2023-04-05T00:00:00+09:00",
    }
    payload.update(changes)
    return payload


def write_campaign(path: Path, **overrides: Any) -> Path:
    values = {
        "requests_per_s": 500,
        "concurrency": 4,
        "batch_size": 25,
        "timeout_s": 0.5,
        "max_attempts": 8,
        "breaker_failures": 5,
        "auth": "none",
    }
    values.update(overrides)
    path.write_text(CAMPAIGN_TOML.format(**values), encoding="utf-8")
    return path


def delivery_settings(tmp_path: Path, ledger_url: str | None, campaign_file: Path, service_url: str) -> Settings:
    """Settings through the composition root, with the issuer's URL from ENTITLE_ISSUER_SHOP_URL."""
    environ = {
        "ENTITLE_HOME": str(tmp_path / "var"),
        "ENTITLE_PARTITIONS": "4",
        "ENTITLE_RECONCILE_WORKERS": "1",
        "ENTITLE_CAMPAIGN": str(campaign_file),
        "ENTITLE_ISSUER_SHOP_URL": service_url,
    }
    if ledger_url is not None:
        environ["ENTITLE_LEDGER_URL"] = ledger_url
    return load_settings(environ)


SERVICE_START_TIMEOUT_S = 20


class Service:
    """``python -m issuer_service`` on a loopback port with its own SQLite store.

    With ``tokens_file`` the service requires bearer tokens (``--tokens-file``); ``token`` is then
    the one this helper's own calls (faults, export, stats) send.
    """

    def __init__(self, store: Path, *, tokens_file: Path | None = None, token: str | None = None) -> None:
        self.store = store
        self.port = 0
        self.process: subprocess.Popen[str] | None = None
        self.tokens_file = tokens_file
        self.headers = {} if token is None else {"authorization": f"Bearer {token}"}

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "issuer_service", "--store", str(self.store), "--port", str(self.port)]
            + ["--no-access-log", "--log-level", "warning"]
            + (["--no-auth"] if self.tokens_file is None else ["--tokens-file", str(self.tokens_file)]),
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        assert self.process.stdout is not None
        line = self.process.stdout.readline()
        assert "listening on http://" in line, f"the service did not start: {line!r}"
        self.port = int(line.strip().rsplit(":", 1)[1])
        deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
        while httpx.get(self.url + "/healthz").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.process = None

    def faults(self, **settings: Any) -> None:
        response = httpx.post(self.url + "/admin/faults", json=settings, headers=self.headers)
        assert response.status_code == 200, response.text

    def export(self) -> list[dict[str, Any]]:
        response = httpx.get(
            self.url + "/v1/grants/export", params={"campaign_id": CAMPAIGN}, timeout=30, headers=self.headers
        )
        assert response.status_code == 200
        return [json.loads(line) for line in response.text.splitlines() if line]

    def export_ids(self) -> list[str]:
        return [row["grant_id"] for row in self.export()]

    def stats(self) -> dict[str, Any]:
        document: dict[str, Any] = httpx.get(self.url + "/v1/stats", headers=self.headers).json()
        return document


SERVER_START_TIMEOUT_S = 20
SERVER_STOP_TIMEOUT_S = 20


@contextlib.contextmanager
def serving_in_thread(app: Any, *, access_log: bool = False) -> Iterator[str]:
    """The issuer service's ASGI ``app`` on a free loopback port in a background thread; yields its base URL."""
    from issuer_service.server import bind, build_server

    server = build_server(app, access_log=access_log)
    sock = bind("127.0.0.1", 0)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the issuer service did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join(SERVER_STOP_TIMEOUT_S)
        assert not thread.is_alive(), "the issuer service did not stop"


CPU_BURNER = "while True: pass"
BURNER_STOP_TIMEOUT_S = 10


@contextlib.contextmanager
def busy_cpu(processes: int) -> Iterator[None]:
    """``processes`` busy-loop processes running for the duration, always stopped at the end."""
    burners: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(processes):
            burners.append(subprocess.Popen([sys.executable, "-c", CPU_BURNER]))
        yield
    finally:
        for burner in burners:
            burner.kill()
        for burner in burners:
            burner.wait(BURNER_STOP_TIMEOUT_S)


def most_in_one_second(arrivals: list[float]) -> int:
    """The largest number of ``arrivals`` (seconds) inside any half-open one-second window."""
    return rate_budget.busiest_window(arrivals)
