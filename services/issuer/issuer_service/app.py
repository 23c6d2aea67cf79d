"""The reference entitlement service as an ASGI app (Starlette): grant singly or in batches, export, stats, faults.

The API is specified in ``services/issuer/issuer_service/openapi.json``, served
verbatim at ``GET /openapi.json``. Request bodies are decoded with msgspec and
checked by hand (:mod:`issuer_service.grants`), which keeps a batch of
1,000 grants at a few milliseconds of CPU; store calls run in worker threads so
the event loop never waits on the database.

With a tokens file (:class:`~issuer_service.auth.Credentials`), every endpoint but
``GET /healthz`` and ``GET /openapi.json`` first checks the request's bearer token and its
right: a refusal (401 or 403) comes before the body is read, before any fault is drawn and
before anything is written.

Dropping a connection without an answer needs the server's help: the
:mod:`issuer_service.server` protocol offers the ASGI extension
:data:`DROP_EXTENSION`, which :class:`_ConnectionDropMiddleware` calls.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import json
import logging
import os
import tempfile
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import anyio.to_thread
import msgspec
from sqlalchemy.exc import SQLAlchemyError
from starlette.applications import Starlette
from starlette.background import BackgroundTask
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response, StreamingResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from issuer_service.auth import Credentials, Right
from issuer_service.faults import FaultDecision, FaultInjector, FaultKind, FaultSettingsError
from issuer_service.grants import (
    BATCH_BODY_BYTES_MAX,
    BATCH_GRANTS_MAX,
    ID_CHARS_MAX,
    BatchTooLargeError,
    Grant,
    GrantValidationError,
    parse_batch,
    parse_single,
)
from issuer_service.store import EXPORT_CHUNK_ROWS, IssuerStore, Outcome

SPEC_PATH = Path(__file__).resolve().parent / "openapi.json"
DROP_EXTENSION = "entitle.drop_connection"
SINGLE_BODY_BYTES_MAX = 64 * 1024
ADMIN_BODY_BYTES_MAX = 64 * 1024
PARQUET_EXPORT_CHUNK_ROWS = 100_000  # one Parquet row group per chunk
_STATUS_CODE = {"created": 201, "exists": 200, "conflict": 409}
Endpoint = Callable[[Request], Awaitable[Response]]

log = logging.getLogger("issuer_service")
_encoder = msgspec.json.Encoder()


class _DropConnection(Exception):
    """Raised by an endpoint to close the client's connection without any answer."""


class _BodyTooLarge(Exception):
    def __init__(self, limit_bytes: int) -> None:
        super().__init__(f"the request body exceeds {limit_bytes:,} bytes")


def _json(document: object, status_code: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(_encoder.encode(document), status_code=status_code, headers=headers, media_type="application/json")


async def _read_body(request: Request, limit_bytes: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit_bytes:
        raise _BodyTooLarge(limit_bytes)
    parts: list[bytes] = []
    size = 0
    async for part in request.stream():
        size += len(part)
        if size > limit_bytes:
            raise _BodyTooLarge(limit_bytes)
        parts.append(part)
    return b"".join(parts)


ARRIVALS_KEPT = 100_000


class Stats:
    """Counters since the service started (the store's grant count is read on demand)."""

    def __init__(self) -> None:
        self.requests = {"put": 0, "batch": 0, "export": 0, "revoke": 0}
        self.grants_received = 0
        self.outcomes = {"created": 0, "exists": 0, "conflict": 0}
        self.validation_errors = 0
        self.store_errors = 0
        self.unauthorized = 0  # 401: no token, or one not in force
        self.forbidden = 0  # 403: a token without the endpoint's right
        # When each of the last batch and revoke requests arrived (Unix seconds): the rate the callers
        # really sent at, whatever they believe their budget to be.
        self.arrivals: deque[float] = deque(maxlen=ARRIVALS_KEPT)

    def record(self, outcomes: list[Outcome]) -> None:
        """Count the outcomes of one committed request."""
        for outcome in outcomes:
            self.outcomes[outcome.status] += 1


class _ConnectionDropMiddleware:
    """Turns :class:`_DropConnection` into a closed connection through the server's drop extension."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await self.app(scope, receive, send)
        except _DropConnection:
            drop = (scope.get("extensions") or {}).get(DROP_EXTENSION)
            if drop is None:
                raise RuntimeError(
                    "a connection-drop fault needs the server started by issuer_service "
                    f"(its HTTP protocol offers the ASGI extension {DROP_EXTENSION!r})"
                ) from None
            await drop["drop"]()


class IssuerService:
    """The endpoints, over one store and one fault injector."""

    def __init__(
        self, store: IssuerStore, faults: FaultInjector, spec: bytes, credentials: Credentials | None = None
    ) -> None:
        self.store = store
        self.faults = faults
        self.spec = spec
        self.credentials = credentials
        self.stats = Stats()

    # ------------------------------------------------------------------ credentials

    def guarded(self, right: Right, endpoint: Endpoint) -> Endpoint:
        """``endpoint`` behind the token check for ``right`` (the endpoint itself when there is no tokens file)."""
        credentials = self.credentials
        if credentials is None:
            return endpoint

        async def guarded_endpoint(request: Request) -> Response:
            credentials.refresh()
            refusal = credentials.check(request.headers.get("authorization"), right)
            if refusal is None:
                return await endpoint(request)
            if refusal.status_code == 401:
                self.stats.unauthorized += 1
            else:
                self.stats.forbidden += 1
            return _json(
                {"error": refusal.error, "detail": refusal.detail},
                refusal.status_code,
                {"www-authenticate": refusal.challenge},
            )

        guarded_endpoint.__name__ = getattr(endpoint, "__name__", "endpoint")
        return guarded_endpoint

    # ------------------------------------------------------------------ granting

    async def put_grant(self, request: Request) -> Response:
        """PUT /v1/grants/{grant_id}: grant one; 201 created, 200 exists, 409 conflict."""
        self.stats.requests["put"] += 1
        return await self._grant(request, SINGLE_BODY_BYTES_MAX, single=True)

    async def post_batch(self, request: Request) -> Response:
        """POST /v1/grants:batch: grant 1..1000 in one transaction; per-grant outcomes in request order."""
        self.stats.requests["batch"] += 1
        self.stats.arrivals.append(time.time())
        return await self._grant(request, BATCH_BODY_BYTES_MAX, single=False)

    async def _grant(self, request: Request, body_bytes_max: int, *, single: bool) -> Response:
        try:
            body = await _read_body(request, body_bytes_max)
        except _BodyTooLarge as exc:
            return _json({"error": f"{exc}; send at most 1,000 grants per batch", "index": None, "field": None}, 413)
        decision = self.faults.decide(time.monotonic())
        refusal = await self._before_commit(request, decision)
        if refusal is not None:
            return refusal
        try:
            grants: list[Grant] = [parse_single(body, request.path_params["grant_id"])] if single else parse_batch(body)
        except GrantValidationError as exc:
            self.stats.validation_errors += 1
            return _json({"error": str(exc), "index": exc.index, "field": exc.field}, 422)
        except BatchTooLargeError as exc:
            self.stats.validation_errors += 1
            return _json({"error": str(exc), "index": None, "field": "grants"}, 413)
        self.stats.grants_received += len(grants)
        try:
            outcomes = await anyio.to_thread.run_sync(self.store.grant, grants, dt.datetime.now(dt.UTC))
        except SQLAlchemyError as exc:
            self.stats.store_errors += 1
            log.exception("the store failed on %s %s", request.method, request.url.path)
            return _json(
                {
                    "error": f"the store failed ({type(exc).__name__}); the transaction was rolled back "
                    "(unless the commit itself failed): retry, and a committed grant answers exists"
                },
                503,
            )
        self.stats.record(outcomes)
        await self._after_commit(request, decision)
        if single:
            outcome = outcomes[0]
            return _json(
                {"grant_id": outcome.grant_id, "status": outcome.status, "detail": outcome.detail},
                _STATUS_CODE[outcome.status],
            )
        return _json({"results": [{"grant_id": o.grant_id, "status": o.status, "detail": o.detail} for o in outcomes]})

    async def post_revoke(self, request: Request) -> Response:
        """POST /v1/grants:revoke: revoke 1..1000 grants in one transaction; per-id status in request order."""
        self.stats.requests["revoke"] += 1
        self.stats.arrivals.append(time.time())
        try:
            body = await _read_body(request, BATCH_BODY_BYTES_MAX)
        except _BodyTooLarge as exc:
            return _json({"error": f"{exc}; send at most 1,000 grant ids", "index": None, "field": None}, 413)
        decision = self.faults.decide(time.monotonic())
        refusal = await self._before_commit(request, decision)
        if refusal is not None:
            return refusal
        try:
            grant_ids, reason = _parse_revoke(body)
        except ValueError as exc:
            self.stats.validation_errors += 1
            return _json({"error": str(exc), "index": None, "field": "grant_ids"}, 422)
        try:
            results = await anyio.to_thread.run_sync(self.store.revoke, grant_ids, reason, dt.datetime.now(dt.UTC))
        except SQLAlchemyError as exc:
            self.stats.store_errors += 1
            log.exception("the store failed on %s %s", request.method, request.url.path)
            return _json({"error": f"the store failed ({type(exc).__name__}); retry: revoking is idempotent"}, 503)
        await self._after_commit(request, decision)
        return _json({"results": [{"grant_id": gid, "status": status} for gid, status in results]})

    async def _before_commit(self, request: Request, decision: FaultDecision) -> Response | None:
        kind = decision.before_commit
        if kind is FaultKind.DROPPED_CONNECTION:
            self._injected(kind, request)
            raise _DropConnection
        if decision.latency_s:
            self.faults.count(FaultKind.LATENCY)
            await asyncio.sleep(decision.latency_s)
        if kind is None:
            return None
        self._injected(kind, request)
        if kind in (FaultKind.THROTTLED, FaultKind.RATE_LIMITED):
            return _json(
                {"error": f"injected fault {kind.value}: retry after {decision.retry_after_s} s"},
                429,
                {"retry-after": str(decision.retry_after_s)},
            )
        status = 500 if kind is FaultKind.ERROR_500 else 503
        return _json({"error": f"injected fault {kind.value}: nothing was committed"}, status)

    async def _after_commit(self, request: Request, decision: FaultDecision) -> None:
        kind = decision.after_commit
        if kind is None:
            return
        self._injected(kind, request)
        if kind is FaultKind.DROPPED_AFTER_COMMIT:
            raise _DropConnection
        await asyncio.sleep(decision.hang_s)

    def _injected(self, kind: FaultKind, request: Request) -> None:
        self.faults.count(kind)
        log.info("injected fault %s on %s %s", kind.value, request.method, request.url.path)

    # ------------------------------------------------------------------ reading

    async def export(self, request: Request) -> Response:
        """GET /v1/grants/export?campaign_id=X[&format=jsonl|parquet]: every grant of the campaign."""
        self.stats.requests["export"] += 1
        campaign_id = request.query_params.get("campaign_id")
        if campaign_id is None or not 0 < len(campaign_id) <= ID_CHARS_MAX:
            return _json(
                {
                    "error": f"campaign_id (1..{ID_CHARS_MAX} characters) is required",
                    "index": None,
                    "field": "campaign_id",
                },
                422,
            )
        export_format = request.query_params.get("format", "jsonl")
        if export_format == "jsonl":
            return StreamingResponse(self._jsonl(campaign_id), media_type="application/x-ndjson")
        if export_format == "parquet":
            path = await anyio.to_thread.run_sync(self._write_parquet, campaign_id)
            return FileResponse(
                path,
                media_type="application/vnd.apache.parquet",
                filename=f"issued-grants-{campaign_id}.parquet",
                background=BackgroundTask(path.unlink, missing_ok=True),
            )
        return _json(
            {"error": f"format must be 'jsonl' or 'parquet', got {export_format!r}", "index": None, "field": "format"},
            422,
        )

    async def _jsonl(self, campaign_id: str) -> AsyncIterator[bytes]:
        after: str | None = None
        while True:
            page = await anyio.to_thread.run_sync(self.store.export_lines, campaign_id, after, EXPORT_CHUNK_ROWS)
            if page.rows:
                yield page.text
            if page.rows < EXPORT_CHUNK_ROWS:
                return
            after = page.last_grant_id

    def _write_parquet(self, campaign_id: str) -> Path:
        import pyarrow as pa
        import pyarrow.parquet as pq

        schema = pa.schema(
            [
                pa.field("grant_id", pa.string(), nullable=False),
                pa.field("campaign_id", pa.string(), nullable=False),
                pa.field("user_id", pa.int64(), nullable=False),
                pa.field("item_sku", pa.string(), nullable=False),
                pa.field("issue_no", pa.int64(), nullable=False),
                pa.field("payload_sha256", pa.string(), nullable=False),
                pa.field("created_at", pa.timestamp("us", tz="UTC"), nullable=False),
            ]
        )
        descriptor, name = tempfile.mkstemp(prefix="issuer-export-", suffix=".parquet")
        os.close(descriptor)
        path = Path(name)
        try:
            with pq.ParquetWriter(path, schema, compression="zstd") as writer:
                for chunk in self.store.export(campaign_id, PARQUET_EXPORT_CHUNK_ROWS):
                    columns = {field.name: [getattr(row, field.name) for row in chunk] for field in schema}
                    writer.write_table(pa.Table.from_pydict(columns, schema=schema))
        except BaseException:
            path.unlink(missing_ok=True)
            raise
        return path

    async def stats_endpoint(self, _request: Request) -> Response:
        """GET /v1/stats: counters and the number of stored grants."""
        stored = await anyio.to_thread.run_sync(self.store.count_grants)
        s = self.stats
        return _json(
            {
                "grants_stored": stored,
                "grants_revoked": await anyio.to_thread.run_sync(self.store.count_revoked),
                "requests": dict(s.requests),
                "grants_received": s.grants_received,
                "outcomes": dict(s.outcomes),
                "validation_errors": s.validation_errors,
                "store_errors": s.store_errors,
                "faults": dict(self.faults.counts),
                "arrivals": list(s.arrivals),
                "unauthorized": s.unauthorized,
                "forbidden": s.forbidden,
                "tokens_file": None
                if self.credentials is None
                else {
                    "tokens": self.credentials.token_count,
                    "reloads": self.credentials.reloads,
                    "reload_errors": self.credentials.reload_errors,
                },
            }
        )

    async def healthz(self, _request: Request) -> Response:
        """GET /healthz: the service answers."""
        return _json({"status": "ok"})

    async def openapi(self, _request: Request) -> Response:
        """GET /openapi.json: the committed spec, byte for byte."""
        return Response(self.spec, media_type="application/json")

    # ------------------------------------------------------------------ admin

    async def get_faults(self, _request: Request) -> Response:
        """GET /admin/faults: the fault settings in force."""
        return _json(self.faults.settings.as_dict())

    async def post_faults(self, request: Request) -> Response:
        """POST /admin/faults: change some fault settings; the answer holds all of them."""
        try:
            changes = msgspec.json.decode(await _read_body(request, ADMIN_BODY_BYTES_MAX))
        except (msgspec.DecodeError, _BodyTooLarge) as exc:
            return _json({"error": f"the body must be a JSON object of fault settings ({exc})", "field": None}, 422)
        if type(changes) is not dict:
            return _json({"error": "the body must be a JSON object of fault settings", "field": None}, 422)
        try:
            settings = self.faults.update(changes)
        except FaultSettingsError as exc:
            return _json({"error": str(exc), "field": exc.field}, 422)
        log.info("fault settings now %s", json.dumps(settings.as_dict()))
        return _json(settings.as_dict())


REVOKE_REASON_CHARS_MAX = 1_000


def _parse_revoke(body: bytes) -> tuple[list[str], str]:
    """``{"grant_ids": [...], "reason": "..."}``; ValueError saying what is wrong."""
    try:
        document = json.loads(body)
    except ValueError as exc:
        raise ValueError(f"the body is not JSON ({exc})") from None
    if not isinstance(document, dict):
        raise ValueError('the body must be an object {"grant_ids": [...], "reason": "..."}')
    ids, reason = document.get("grant_ids"), document.get("reason")
    if not isinstance(ids, list) or not 0 < len(ids) <= BATCH_GRANTS_MAX:
        raise ValueError(f"grant_ids must be a list of 1..{BATCH_GRANTS_MAX} grant ids")
    if not all(isinstance(i, str) and 0 < len(i) <= ID_CHARS_MAX for i in ids):
        raise ValueError(f"every grant id must be a string of 1..{ID_CHARS_MAX} characters")
    if not isinstance(reason, str) or not 0 < len(reason) <= REVOKE_REASON_CHARS_MAX:
        raise ValueError(f"reason must be a string of 1..{REVOKE_REASON_CHARS_MAX} characters (it is recorded)")
    return ids, reason


def create_app(
    store: IssuerStore,
    faults: FaultInjector | None = None,
    spec_path: Path = SPEC_PATH,
    credentials: Credentials | None = None,
) -> Starlette:
    """The ASGI app over ``store``; ``faults`` defaults to none injected, ``credentials`` to every client trusted."""
    service = IssuerService(store, faults or FaultInjector(), spec_path.read_bytes(), credentials)
    # The right each endpoint needs; None: open to anyone.
    routes: list[tuple[str, Endpoint, list[str], Right | None]] = [
        ("/healthz", service.healthz, ["GET"], None),
        ("/openapi.json", service.openapi, ["GET"], None),
        ("/v1/grants:batch", service.post_batch, ["POST"], Right.GRANT),
        ("/v1/grants:revoke", service.post_revoke, ["POST"], Right.REVOKE),
        ("/v1/grants/export", service.export, ["GET"], Right.EXPORT),
        ("/v1/grants/{grant_id:path}", service.put_grant, ["PUT"], Right.GRANT),
        ("/v1/stats", service.stats_endpoint, ["GET"], Right.STATS),
        ("/admin/faults", service.get_faults, ["GET"], Right.ADMIN),
        ("/admin/faults", service.post_faults, ["POST"], Right.ADMIN),
    ]
    app = Starlette(
        routes=[
            Route(path, handler if right is None else service.guarded(right, handler), methods=methods)
            for path, handler, methods, right in routes
        ],
        middleware=[Middleware(_ConnectionDropMiddleware)],
    )
    app.state.service = service
    return app
