"""A reference entitlement service: the downstream system the pipeline's delivery client grants through.

It grants by idempotency key (the grant's deterministic id), singly and in
batches of up to 1,000, answering per grant ``created``, ``exists`` (same key,
same payload) or ``conflict`` (same key, different payload: reported, never
written over); it exports its grants for reconciliation and injects faults on
demand. With a tokens file it requires bearer tokens with rights (``grant``,
``revoke``, ``export``, ``stats``, ``admin``), re-reading the file when it
changes. Modules: :mod:`~issuer_service.grants` (payload validation and
the canonical hash; pure, importable by a client), :mod:`~.store` (SQLite or
PostgreSQL), :mod:`~.faults`, :mod:`~.auth` (the tokens file and the token
check), :mod:`~.app` (the ASGI app), :mod:`~.server` (uvicorn), ``__main__``
(the command line). The API is ``services/issuer/issuer_service/openapi.json``.
"""

from issuer_service.grants import (
    BATCH_GRANTS_MAX,
    Grant,
    GrantValidationError,
    canonical_payload,
    normalize_instant,
    payload_sha256,
    validate_grant,
)

__all__ = [
    "BATCH_GRANTS_MAX",
    "Grant",
    "GrantValidationError",
    "canonical_payload",
    "normalize_instant",
    "payload_sha256",
    "validate_grant",
]
