"""The grant payload the reference entitlement service accepts: validation and the canonical payload hash.

A grant is identified by its ``grant_id`` (the idempotency key). Two payloads
with the same key are "the same grant" when their canonical hashes agree: the
hash covers every field except ``grant_id``, with ``valid_from`` and
``valid_until`` normalised to UTC (``2023-01-04T15:00:00.000000Z``), so equal
instants written with different offsets hash the same. The canonical JSON is
what Python's ``json.dumps(payload, sort_keys=True, separators=(",", ":"),
ensure_ascii=False)`` writes, encoded as UTF-8; :func:`canonical_payload` builds
it and the service stores it verbatim, so ``sha256(payload) == payload_sha256``.

This module is pure (no web framework, no database), so a delivery client can
import it to compute the hash it expects the service to export.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
from collections.abc import Mapping
from typing import Annotated, Any

import msgspec

from issuer_service.errors import ServiceError

GRANT_FIELDS = ("grant_id", "campaign_id", "user_id", "item_sku", "issue_no", "amount_krw", "valid_from", "valid_until")
HASHED_FIELDS = GRANT_FIELDS[1:]
ID_CHARS_MAX = 128  # grant_id, campaign_id and item_sku: 1..128 characters
INT64_MAX = 2**63 - 1
BATCH_GRANTS_MAX = 1_000
BATCH_BODY_BYTES_MAX = 8 * 1024 * 1024  # 1,000 grants of the longest legal ids fit with room to spare
_INSTANT_CACHE_ENTRIES_MAX = 65_536  # distinct valid_from/valid_until strings remembered; a campaign has a handful
_VALUE_REPR_CHARS_MAX = 60

_FIELD_SET = frozenset(GRANT_FIELDS)
_UTC = dt.UTC


class GrantValidationError(ServiceError):
    """A request body or one of its grants is invalid; ``index`` and ``field`` say where (422)."""

    exit_code = 2

    def __init__(self, message: str, *, index: int | None = None, field: str | None = None) -> None:
        super().__init__(message)
        self.index = index
        self.field = field


class BatchTooLargeError(ServiceError):
    """A batch holds more than :data:`BATCH_GRANTS_MAX` grants or its body is too large (413)."""

    exit_code = 2


class Grant(msgspec.Struct, frozen=True, gc=False):
    """One validated grant: its fields (instants normalised to UTC), canonical payload and its sha256."""

    grant_id: str
    campaign_id: str
    user_id: int
    item_sku: str
    issue_no: int
    amount_krw: int | None
    valid_from: str
    valid_until: str | None
    payload: str
    payload_sha256: str


_Identifier = Annotated[str, msgspec.Meta(min_length=1, max_length=ID_CHARS_MAX)]


class _GrantIn(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """The fast path's view of a payload object; must accept nothing :func:`validate_grant` refuses."""

    grant_id: _Identifier
    campaign_id: _Identifier
    user_id: Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]
    item_sku: _Identifier
    issue_no: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
    amount_krw: Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)] | None
    valid_from: str
    valid_until: str | None


class _BatchIn(msgspec.Struct, forbid_unknown_fields=True):
    grants: list[_GrantIn]


class _CanonicalPayload(msgspec.Struct, gc=False):
    """The hashed fields in sorted order: msgspec writes a struct's fields in declaration order."""

    amount_krw: int | None
    campaign_id: str
    issue_no: int
    item_sku: str
    user_id: int
    valid_from: str
    valid_until: str | None


_batch_decoder = msgspec.json.Decoder(_BatchIn)
_single_decoder = msgspec.json.Decoder(_GrantIn)
_payload_encoder = msgspec.json.Encoder()


def canonical_payload(
    *,
    campaign_id: str,
    user_id: int,
    item_sku: str,
    issue_no: int,
    amount_krw: int | None,
    valid_from: str,
    valid_until: str | None,
) -> bytes:
    """The canonical UTF-8 JSON of a grant's hashed fields (instants must already be normalised)."""
    return _payload_encoder.encode(
        _CanonicalPayload(amount_krw, campaign_id, issue_no, item_sku, user_id, valid_from, valid_until)
    )


def payload_sha256(grant: Mapping[str, Any]) -> str:
    """The hex sha256 the service stores for ``grant`` (a payload object as sent); raises on an invalid grant."""
    return validate_grant(grant, 0).payload_sha256


@functools.lru_cache(maxsize=_INSTANT_CACHE_ENTRIES_MAX)
def normalize_instant(text: str) -> str:
    """``text`` (ISO 8601 with an offset) as UTC with microseconds and 'Z'; ValueError when unparsable or naive."""
    instant = dt.datetime.fromisoformat(text)
    if instant.tzinfo is None or instant.utcoffset() is None:
        raise ValueError("has no UTC offset")
    return instant.astimezone(_UTC).replace(tzinfo=None).isoformat(timespec="microseconds") + "Z"


def _show(value: object) -> str:
    return _show_text(repr(value))


def _identifier(item: Mapping[str, Any], field: str, index: int) -> str:
    value = item[field]
    if type(value) is not str or not 0 < len(value) <= ID_CHARS_MAX:
        raise GrantValidationError(
            f"grants[{index}].{field} must be a string of 1..{ID_CHARS_MAX} characters, got {_show(value)}",
            index=index,
            field=field,
        )
    return value


def _integer(item: Mapping[str, Any], field: str, index: int, minimum: int) -> int:
    value = item[field]
    if type(value) is not int or not minimum <= value <= INT64_MAX:
        raise GrantValidationError(
            f"grants[{index}].{field} must be an integer in {minimum}..{INT64_MAX}, got {_show(value)}",
            index=index,
            field=field,
        )
    return value


def _optional_integer(item: Mapping[str, Any], field: str, index: int, minimum: int) -> int | None:
    value = item[field]
    if value is not None and (type(value) is not int or not minimum <= value <= INT64_MAX):
        raise GrantValidationError(
            f"grants[{index}].{field} must be an integer in {minimum}..{INT64_MAX} or null, got {_show(value)}",
            index=index,
            field=field,
        )
    return value


def _instant(item: Mapping[str, Any], field: str, index: int) -> str:
    value = item[field]
    try:
        if type(value) is not str:
            raise ValueError("not a string")
        return normalize_instant(value)
    except ValueError as exc:
        raise GrantValidationError(
            f"grants[{index}].{field} must be an ISO 8601 timestamp with a UTC offset such as "
            f"'2023-01-05T00:00:00+09:00', got {_show(value)} ({exc})",
            index=index,
            field=field,
        ) from None


def _optional_instant(item: Mapping[str, Any], field: str, index: int) -> str | None:
    return None if item[field] is None else _instant(item, field, index)


def validate_grant(item: object, index: int) -> Grant:
    """Check one decoded payload object and return it as a :class:`Grant`; the error names ``index`` and the field."""
    if type(item) is not dict:
        raise GrantValidationError(f"grants[{index}] must be a JSON object, got {_show(item)}", index=index)
    if item.keys() != _FIELD_SET:
        missing = [f for f in GRANT_FIELDS if f not in item]
        if missing:
            raise GrantValidationError(
                f"grants[{index}] lacks the field {missing[0]!r} (every grant has {', '.join(GRANT_FIELDS)})",
                index=index,
                field=missing[0],
            )
        unknown = sorted(str(k) for k in item if k not in _FIELD_SET)
        raise GrantValidationError(
            f"grants[{index}] has the unknown field {unknown[0]!r} (every grant has exactly {', '.join(GRANT_FIELDS)})",
            index=index,
            field=unknown[0],
        )
    grant_id = _identifier(item, "grant_id", index)
    campaign_id = _identifier(item, "campaign_id", index)
    user_id = _integer(item, "user_id", index, 1)
    item_sku = _identifier(item, "item_sku", index)
    issue_no = _integer(item, "issue_no", index, 0)
    amount_krw = _optional_integer(item, "amount_krw", index, 0)
    valid_from = _instant(item, "valid_from", index)
    valid_until = _optional_instant(item, "valid_until", index)
    payload = canonical_payload(
        campaign_id=campaign_id,
        user_id=user_id,
        item_sku=item_sku,
        issue_no=issue_no,
        amount_krw=amount_krw,
        valid_from=valid_from,
        valid_until=valid_until,
    )
    return Grant(
        grant_id=grant_id,
        campaign_id=campaign_id,
        user_id=user_id,
        item_sku=item_sku,
        issue_no=issue_no,
        amount_krw=amount_krw,
        valid_from=valid_from,
        valid_until=valid_until,
        payload=payload.decode("utf-8"),
        payload_sha256=hashlib.sha256(payload).hexdigest(),
    )


def _decode_object(body: bytes, what: str) -> dict[str, Any]:
    try:
        document = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:
        raise GrantValidationError(f"the request body is not valid JSON ({exc})") from None
    if type(document) is not dict:
        raise GrantValidationError(f"the request body must be a JSON object ({what}), got {_show(document)}")
    return document


def _parse_batch_checked(body: bytes) -> list[Grant]:
    """:func:`parse_batch` by hand: slower, and the authority on what is valid and on the error message."""
    document = _decode_object(body, '{"grants": [...]}')
    extra = sorted(str(k) for k in document if k != "grants")
    if extra:
        raise GrantValidationError(
            f'the request body has the unknown field {extra[0]!r}; a batch is {{"grants": [...]}}', field=extra[0]
        )
    grants = document.get("grants")
    if type(grants) is not list:
        raise GrantValidationError(
            f'"grants" must be a list of 1..{BATCH_GRANTS_MAX} grant objects, got {_show(grants)}', field="grants"
        )
    if not grants:
        raise GrantValidationError(f'"grants" must hold 1..{BATCH_GRANTS_MAX} grants, got none', field="grants")
    if len(grants) > BATCH_GRANTS_MAX:
        raise BatchTooLargeError(
            f"a batch holds at most {BATCH_GRANTS_MAX} grants, got {len(grants):,}; split it into smaller batches"
        )
    return [validate_grant(item, index) for index, item in enumerate(grants)]


def parse_single(body: bytes, path_grant_id: str) -> Grant:
    """Validate one grant object whose ``grant_id`` must equal the one in the URL path."""
    try:
        grant = _complete(_single_decoder.decode(body))
    except (msgspec.DecodeError, ValueError):  # msgspec.ValidationError is a ValueError
        grant = validate_grant(_decode_object(body, "one grant"), 0)
    if grant.grant_id != path_grant_id:
        raise GrantValidationError(
            f"grants[0].grant_id {_show(grant.grant_id)} differs from the grant id in the path {_show(path_grant_id)}",
            index=0,
            field="grant_id",
        )
    return grant


def parse_batch(body: bytes) -> list[Grant]:
    """Validate a ``{"grants": [...]}`` body of 1..1000 grants; the first invalid grant raises.

    The fast path decodes straight into typed structs, whose constraints msgspec
    checks in C; whenever it refuses anything, the body is checked again by hand
    (:func:`_parse_batch_checked`), which decides and names the index and field.
    """
    try:
        grants = _batch_decoder.decode(body).grants
        if 0 < len(grants) <= BATCH_GRANTS_MAX:
            return [_complete(grant) for grant in grants]
    except (msgspec.DecodeError, ValueError):  # msgspec.ValidationError is a ValueError
        pass
    return _parse_batch_checked(body)


def _complete(grant: _GrantIn) -> Grant:
    """The :class:`Grant` of a type-checked payload (instants normalised, payload hashed); ValueError: bad instant."""
    valid_from = normalize_instant(grant.valid_from)
    valid_until = None if grant.valid_until is None else normalize_instant(grant.valid_until)
    payload = canonical_payload(
        campaign_id=grant.campaign_id,
        user_id=grant.user_id,
        item_sku=grant.item_sku,
        issue_no=grant.issue_no,
        amount_krw=grant.amount_krw,
        valid_from=valid_from,
        valid_until=valid_until,
    )
    return Grant(
        grant.grant_id,
        grant.campaign_id,
        grant.user_id,
        grant.item_sku,
        grant.issue_no,
        grant.amount_krw,
        valid_from,
        valid_until,
        payload.decode("utf-8"),
        hashlib.sha256(payload).hexdigest(),
    )


def _json_text(value: object) -> str:
    return _show_text(msgspec.json.encode(value).decode("utf-8"))


def _show_text(shown: str) -> str:
    return shown if len(shown) <= _VALUE_REPR_CHARS_MAX else shown[: _VALUE_REPR_CHARS_MAX - 1] + "…"


def payload_differences(stored: str, sent: str) -> str:
    """Name the fields on which two canonical payloads differ, e.g. "amount_krw: stored 2000, sent 3000"."""
    stored_fields = msgspec.json.decode(stored)
    sent_fields = msgspec.json.decode(sent)
    differing = [
        f"{field}: stored {_json_text(stored_fields.get(field))}, sent {_json_text(sent_fields.get(field))}"
        for field in HASHED_FIELDS
        if stored_fields.get(field) != sent_fields.get(field)
    ]
    return "; ".join(differing) if differing else "the canonical payloads differ"
