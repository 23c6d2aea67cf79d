"""Issuers: the downstream services that receive a campaign's grants, behind one small interface.

An issuer takes a batch of grant payloads, each carrying its idempotency key
(``grant_id``), and answers per grant ``created``, ``exists`` (the same key with
the same payload was there already) or ``conflict`` (the same key with a
different payload: reported, never overwritten). A failed call raises
:class:`IssuerUnavailable` (transient: the same batch is sent again, with the
same keys) or :class:`IssuerRejected` (permanent: the batch fails without retry).

Built in: ``ledger`` (the ledger entry is the entitlement; nothing to deliver)
and ``http`` (the API of ``services/issuer/issuer_service/openapi.json``). A company
adds its own with ``kind = "python"`` and ``factory = "package.module:callable"``
in the campaign file: the callable receives the :class:`IssuerSpec` and returns
an object with the methods of :class:`Issuer`.
"""

from __future__ import annotations

import importlib
import json
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import httpx
import msgspec
import polars as pl

from pipeline.campaigns import LEDGER_ISSUER, IssuerSpec
from pipeline.credentials import where_tokens_come_from
from pipeline.errors import CampaignError, ConfigError, IssuerAuthError

ANSWER_STATUSES = ("created", "exists", "conflict")
REVOKE_STATUSES = ("revoked", "already_revoked", "not_found")
EXPORT_PARSE_BYTES = 32 * 1024 * 1024  # JSON lines parsed per Polars call while an export streams
EXPORT_COLUMNS: dict[str, Any] = {
    "grant_id": pl.String,
    "user_id": pl.Int64,
    "item_sku": pl.String,
    "issue_no": pl.Int32,
}
ERROR_BODY_CHARS_MAX = 300
RETRY_AFTER_S_MAX = 3_600.0


@dataclass(frozen=True)
class GrantPayload:
    """One grant as an issuer receives it; ``grant_id`` is the idempotency key."""

    grant_id: str
    campaign_id: str
    user_id: int
    item_sku: str
    issue_no: int
    amount_krw: int | None
    valid_from: str  # ISO 8601 with offset
    valid_until: str | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON object of the API."""
        return {
            "grant_id": self.grant_id,
            "campaign_id": self.campaign_id,
            "user_id": self.user_id,
            "item_sku": self.item_sku,
            "issue_no": self.issue_no,
            "amount_krw": self.amount_krw,
            "valid_from": self.valid_from,
            "valid_until": self.valid_until,
        }


class Answer(msgspec.Struct, frozen=True):
    """The issuer's answer for one grant."""

    grant_id: str
    status: str  # created | exists | conflict
    detail: str | None = None


class _BatchAnswer(msgspec.Struct):
    results: list[Answer]


_encoder = msgspec.json.Encoder()
_results_decoder = msgspec.json.Decoder(_BatchAnswer)


class IssuerUnavailable(Exception):  # noqa: N818 - the name says what happened, as the API does
    """The call failed and may succeed if repeated (network, timeout, 5xx, 429); nothing is known to be granted."""

    def __init__(self, message: str, *, retry_after_s: float | None = None, throttled: bool = False) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s
        self.throttled = throttled


class IssuerRejected(Exception):  # noqa: N818
    """The issuer refused the batch (4xx other than 429, or an answer we cannot read); repeating will not help."""


class Issuer(Protocol):
    """What delivery needs from a downstream service."""

    name: str

    def deliver(self, batch: Sequence[GrantPayload]) -> list[Answer]:
        """Grant ``batch`` (idempotent by grant_id); one answer per grant, in order."""
        ...

    def export(self, campaign_id: str) -> Iterator[dict[str, Any]]:
        """Every grant the issuer holds for the campaign (grant_id, user_id, item_sku, issue_no, payload_sha256).

        An issuer may also offer ``export_frames(campaign_id) -> Iterator[polars.DataFrame]``, chunks
        with the columns of :data:`EXPORT_COLUMNS`; reconciliation uses it when present (faster).
        """
        ...

    def revoke(self, grant_ids: Sequence[str], reason: str) -> list[Answer]:
        """Revoke grants (idempotent); one answer per id, in order: revoked, already_revoked or not_found."""
        ...

    def close(self) -> None:
        """Release connections."""
        ...


class LedgerIssuer:
    """The built-in ``ledger`` issuer: the ledger entry is the entitlement, so every grant already exists."""

    name = LEDGER_ISSUER

    def deliver(self, batch: Sequence[GrantPayload]) -> list[Answer]:
        """Nothing to send: every grant ``exists`` (delivery never calls this; it skips ledger items)."""
        return [Answer(g.grant_id, "exists", "the ledger is the issuer") for g in batch]

    def export(self, campaign_id: str) -> Iterator[dict[str, Any]]:
        """The ledger itself is the export; query it (``entitle query``)."""
        return iter(())

    def revoke(self, grant_ids: Sequence[str], reason: str) -> list[Answer]:
        """The void in the ledger is the revocation."""
        return [Answer(g, "revoked", "the ledger is the issuer") for g in grant_ids]

    def close(self) -> None:
        """Nothing to release."""


class HttpIssuer:
    """The built-in ``http`` issuer: ``POST /v1/grants:batch`` over one keep-alive connection pool."""

    def __init__(self, spec: IssuerSpec, transport: httpx.BaseTransport | None = None) -> None:
        if spec.url is None:
            raise CampaignError(f"issuer {spec.name!r} has no url")
        self.name = spec.name
        self.url = spec.url
        self.auth = spec.auth
        headers = {}
        if spec.auth == "bearer":
            if spec.token is None:
                raise IssuerAuthError(
                    f'issuer {spec.name!r} needs a token (auth = "bearer"): set {where_tokens_come_from(spec.name)}; '
                    "nothing was sent"
                )
            headers["authorization"] = f"Bearer {spec.token.reveal()}"
        verify: ssl.SSLContext | bool = True  # https: the system's CAs, or the campaign's ca_bundle
        if spec.ca_bundle is not None:
            try:
                verify = ssl.create_default_context(cafile=spec.ca_bundle)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(
                    f"issuers.{spec.name}.ca_bundle {spec.ca_bundle!r} is not a readable file of CA certificates: {exc}"
                ) from exc
        limits = httpx.Limits(max_connections=spec.concurrency, max_keepalive_connections=spec.concurrency)
        self._client = httpx.Client(
            base_url=spec.url,
            timeout=httpx.Timeout(spec.timeout_s),
            limits=limits,
            transport=transport,
            headers=headers,
            verify=verify,
        )

    def deliver(self, batch: Sequence[GrantPayload]) -> list[Answer]:
        """Send one batch; raise :class:`IssuerUnavailable` or :class:`IssuerRejected` when it has no answers."""
        response = self._post("/v1/grants:batch", _encoder.encode({"grants": batch}))  # dataclass fields in order
        return _answers(self.url, [g.grant_id for g in batch], response, ANSWER_STATUSES)

    def revoke(self, grant_ids: Sequence[str], reason: str) -> list[Answer]:
        """``POST /v1/grants:revoke``; the same failures as :meth:`deliver`."""
        response = self._post("/v1/grants:revoke", _encoder.encode({"grant_ids": list(grant_ids), "reason": reason}))
        return _answers(self.url, list(grant_ids), response, REVOKE_STATUSES)

    def _post(self, path: str, body: bytes) -> httpx.Response:
        """POST a JSON body; the 200 answer, else :class:`IssuerUnavailable` (retry) or :class:`IssuerRejected`."""
        try:
            response = self._client.post(path, content=body, headers={"content-type": "application/json"})
        except httpx.TimeoutException as exc:
            raise IssuerUnavailable(f"{self.url}: no answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        code = response.status_code
        if code in (401, 403):
            raise self._refused(code, response)
        if code == 429:
            raise IssuerUnavailable(f"{self.url}: 429 throttled", retry_after_s=_retry_after(response), throttled=True)
        if code >= 500:
            raise IssuerUnavailable(f"{self.url}: {code} {response.text[:ERROR_BODY_CHARS_MAX]}")
        if code != 200:
            raise IssuerRejected(f"{self.url}: {code} {response.text[:ERROR_BODY_CHARS_MAX]}")
        return response

    def _unreachable(self, exc: httpx.TransportError) -> IssuerUnavailable | ConfigError:
        """A network failure (retried), or a certificate this process does not trust (a configuration error)."""
        cause: BaseException | None = exc
        while cause is not None and not isinstance(cause, ssl.SSLCertVerificationError):
            cause = cause.__cause__ or cause.__context__
        if isinstance(cause, ssl.SSLCertVerificationError):
            return ConfigError(
                f"issuer {self.name!r} at {self.url}: its certificate is not trusted ({cause.verify_message}); "
                f"name the CA that signed it in issuers.{self.name}.ca_bundle of the campaign file"
            )
        return IssuerUnavailable(f"{self.url}: {type(exc).__name__}: {exc}")

    def _refused(self, code: int, response: httpx.Response) -> IssuerAuthError:
        """401: no valid token; 403: a token without the right. Neither passes by retrying."""
        what = "refused our token (401 unauthorized)"
        if code == 403:
            what = "refused this call to our token (403 forbidden)"
        detail = response.text[:ERROR_BODY_CHARS_MAX].replace("\n", " ")
        if self.auth == "none":
            return IssuerAuthError(
                f"issuer {self.name!r} at {self.url} requires credentials ({code}): {detail}. Declare "
                f'auth = "bearer" under [issuers.{self.name}] in the campaign file and set '
                f"{where_tokens_come_from(self.name)}; nothing was marked delivered"
            )
        return IssuerAuthError(
            f"issuer {self.name!r} at {self.url} {what}: {detail}. Check {where_tokens_come_from(self.name)} "
            "and the token's rights at the issuer; what was not answered stays undelivered for the next run"
        )

    def export(self, campaign_id: str) -> Iterator[dict[str, Any]]:
        """Stream the issuer's JSON-lines export of the campaign (:class:`IssuerUnavailable` if unreachable)."""
        try:
            with self._client.stream("GET", "/v1/grants/export", params={"campaign_id": campaign_id}) as response:
                if response.status_code in (401, 403):
                    response.read()
                    raise self._refused(response.status_code, response)
                if response.status_code != 200:
                    raise IssuerRejected(f"{self.url}: export answered {response.status_code}")
                for line in response.iter_lines():
                    if line:
                        yield json.loads(line)
        except httpx.TimeoutException as exc:
            raise IssuerUnavailable(f"{self.url}: the export did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc

    def export_frames(self, campaign_id: str) -> Iterator[pl.DataFrame]:
        """The JSON-lines export parsed by Polars in chunks of about 32 MiB, as frames of :data:`EXPORT_COLUMNS`.

        A caller that reduces each chunk (the three-way reconciliation keeps integer keys only) never
        holds the whole export's text or strings.
        """
        chunks: list[bytes] = []
        size = 0
        pending = b""
        try:
            with self._client.stream("GET", "/v1/grants/export", params={"campaign_id": campaign_id}) as response:
                if response.status_code in (401, 403):
                    response.read()
                    raise self._refused(response.status_code, response)
                if response.status_code != 200:
                    raise IssuerRejected(f"{self.url}: export answered {response.status_code}")
                for data in response.iter_bytes():
                    chunks.append(data)
                    size += len(data)
                    if size >= EXPORT_PARSE_BYTES:
                        pending = b"".join(chunks)
                        cut = pending.rfind(b"\n") + 1
                        yield _parse_export(self.url, pending[:cut])
                        chunks, size = [pending[cut:]], len(pending) - cut
                pending = b"".join(chunks)
        except httpx.TimeoutException as exc:
            raise IssuerUnavailable(f"{self.url}: the export did not answer in time ({type(exc).__name__})") from exc
        except httpx.TransportError as exc:
            raise self._unreachable(exc) from exc
        yield _parse_export(self.url, pending)

    def close(self) -> None:
        """Close the connection pool."""
        self._client.close()


def _parse_export(url: str, lines: bytes) -> pl.DataFrame:
    if not lines.strip():
        return pl.DataFrame(schema=EXPORT_COLUMNS)
    try:
        frame = pl.read_ndjson(lines, schema_overrides=EXPORT_COLUMNS)
        return frame.select([pl.col(name).cast(dtype, strict=True) for name, dtype in EXPORT_COLUMNS.items()])
    except (pl.exceptions.PolarsError, ValueError) as exc:
        raise IssuerRejected(f"{url}: an export we cannot read ({exc})") from exc


def _retry_after(response: httpx.Response) -> float | None:
    raw = response.headers.get("retry-after")
    try:
        return None if raw is None else min(max(float(raw), 0.0), RETRY_AFTER_S_MAX)
    except ValueError:
        return None  # an HTTP date; the backoff applies instead


def _answers(url: str, grant_ids: Sequence[str], response: httpx.Response, statuses: Sequence[str]) -> list[Answer]:
    try:
        answers = _results_decoder.decode(response.content).results
    except (msgspec.DecodeError, ValueError) as exc:
        raise IssuerRejected(f"{url}: an answer we cannot read ({exc})") from exc
    if [a.grant_id for a in answers] != list(grant_ids):
        raise IssuerRejected(f"{url}: the answer's grant ids are not those of the batch, in order")
    unknown = {a.status for a in answers} - set(statuses)
    if unknown:
        raise IssuerRejected(f"{url}: unknown answer status(es) {sorted(unknown)}")
    return answers


def build_issuer(spec: IssuerSpec) -> Issuer:
    """The issuer a campaign's ``[issuers.NAME]`` declares."""
    if spec.kind == "http":
        return HttpIssuer(spec)
    if spec.kind == "python" and spec.factory is not None:
        module_name, _, attribute = spec.factory.partition(":")
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as exc:
            raise CampaignError(f"issuers.{spec.name}.factory {spec.factory!r} cannot be imported: {exc}") from exc
        issuer: Issuer = factory(spec)
        return issuer
    raise CampaignError(f"issuers.{spec.name}: kind {spec.kind!r} has no implementation")
