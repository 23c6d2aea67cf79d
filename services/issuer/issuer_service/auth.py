"""Bearer tokens with rights: the tokens file, its reload without restart, and the check of one request.

The tokens file (``--tokens-file``) holds one token per line::

    # TOKEN                               RIGHTS                 comment
    3f9c1d6e0b7a4c2f8e5d9a1b6c0e7f2a      grant,revoke,export    # delivery
    b41e0c9d7f3a5e2c6b8d1f0a9e7c3b5d      *                      # ops

A token is 16 characters or more of ``A-Z a-z 0-9 - . _ ~ + /`` (then ``=`` padding), what
an ``Authorization: Bearer`` header carries. The rights are :data:`RIGHTS`, or ``*`` for all,
separated by commas. Blank lines and everything after a ``#`` are ignored. A file with an
error, a token listed twice or no token at all is refused as a whole: at start-up the service
does not start; at a reload the tokens loaded before stay in force and the error is logged.
Messages name the file and the line, never a token.

Only the SHA-256 digest of each token is kept; a presented token is hashed and compared with
every digest by :func:`hmac.compare_digest`, so the time taken says nothing about which
token, if any, matched.

Reload: each request that needs a token first calls :meth:`Credentials.refresh`, which, at
most once per :data:`RELOAD_CHECK_S`, compares the file's inode, size and modification time
with those of the last read, and reads it again when one differs (or when the file changed
within the last :data:`RACY_S` seconds, so two writes within one tick of a coarse file-system
clock are not missed). Writing the file in place or replacing it (``mv new tokens``) are both
seen within a second, without a restart. A file caught halfway through a write is refused like
a malformed one (the tokens before stay in force) unless it happens to end at a line break;
then its first lines are in force until the next check reads the whole file. Renaming a new
file over the old one avoids even that.
"""

from __future__ import annotations

import dataclasses
import enum
import hashlib
import hmac
import logging
import os
import re
import stat
import time
from collections.abc import Callable
from pathlib import Path

from issuer_service.errors import ConfigError

TOKEN_CHARS_MIN = 16
RELOAD_CHECK_S = 1.0
RACY_S = 2.0
TOKENS_FILE_BYTES_MAX = 1024 * 1024
ALL_RIGHTS = "*"

log = logging.getLogger("issuer_service")

# RFC 6750's b64token: what a Bearer credential may hold.
_TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")


class Right(enum.StrEnum):
    """What a token allows; each endpoint but ``/healthz`` and ``/openapi.json`` needs one."""

    GRANT = "grant"  # PUT /v1/grants/{grant_id}, POST /v1/grants:batch
    REVOKE = "revoke"  # POST /v1/grants:revoke
    EXPORT = "export"  # GET /v1/grants/export
    STATS = "stats"  # GET /v1/stats
    ADMIN = "admin"  # /admin/*


RIGHTS = tuple(right.value for right in Right)
_RIGHTS_HELP = f"the rights are {', '.join(RIGHTS)} and {ALL_RIGHTS} (all), separated by commas"


class TokensFileError(ConfigError):
    """The tokens file cannot be read or holds an error; the message names the file and line, never a token."""


@dataclasses.dataclass(frozen=True, slots=True)
class TokenEntry:
    """One line of the tokens file: the token's SHA-256 digest (never the token) and its rights."""

    digest: bytes
    rights: frozenset[Right]
    line: int


def _tokens(count: int) -> str:
    return f"{count} token" if count == 1 else f"{count} tokens"


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8", "surrogateescape")).digest()


def parse_tokens(text: str, source: str) -> tuple[TokenEntry, ...]:
    """The entries of a tokens file's ``text``; TokensFileError naming ``source`` and the first bad line."""
    entries: list[TokenEntry] = []
    first_line: dict[bytes, int] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        fields = raw.split("#", 1)[0].split()
        if not fields:
            continue

        def bad(problem: str, line: int = number) -> TokensFileError:
            return TokensFileError(f"tokens file {source}, line {line}: {problem}")

        token, rights_text = fields[0], " ".join(fields[1:])
        if len(token) < TOKEN_CHARS_MIN:
            raise bad(f"the token has {len(token)} characters; a token has at least {TOKEN_CHARS_MIN}")
        if not _TOKEN.fullmatch(token):
            raise bad("the token holds a character a bearer token cannot carry (A-Z a-z 0-9 - . _ ~ + /, then =)")
        if not rights_text:
            raise bad(f"no rights after the token; expected TOKEN RIGHT[,RIGHT...] ({_RIGHTS_HELP})")
        rights: set[Right] = set()
        for word in (w.strip() for w in rights_text.split(",")):
            if word == ALL_RIGHTS:
                rights.update(Right)
            elif word in RIGHTS:
                rights.add(Right(word))
            else:
                # Never echoed: a misplaced token would land here.
                raise bad(f"an empty or unknown right; {_RIGHTS_HELP}")
        digest = _digest(token)
        if digest in first_line:
            raise bad(f"the same token as line {first_line[digest]}")
        first_line[digest] = number
        entries.append(TokenEntry(digest, frozenset(rights), number))
    if not entries:
        raise TokensFileError(
            f"tokens file {source} holds no token, so every request would be refused; "
            "list at least one (TOKEN RIGHT[,RIGHT...])"
        )
    return tuple(entries)


@dataclasses.dataclass(frozen=True, slots=True)
class _FileState:
    """What identifies one version of the file without reading it."""

    inode: int
    size: int
    mtime_ns: int


def _read(path: Path) -> tuple[bytes, _FileState]:
    try:
        with path.open("rb") as handle:
            info = os.fstat(handle.fileno())
            if not stat.S_ISREG(info.st_mode):
                raise TokensFileError(f"tokens file {path} is not a regular file")
            data = handle.read(TOKENS_FILE_BYTES_MAX + 1)
    except OSError as exc:
        raise TokensFileError(f"cannot read the tokens file {path} ({exc.strerror})") from None
    if len(data) > TOKENS_FILE_BYTES_MAX:
        raise TokensFileError(f"tokens file {path} is larger than {TOKENS_FILE_BYTES_MAX:,} bytes")
    return data, _FileState(info.st_ino, info.st_size, info.st_mtime_ns)


def _decode(data: bytes, path: Path) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise TokensFileError(f"tokens file {path}, line {line}: not UTF-8 text") from None


@dataclasses.dataclass(frozen=True, slots=True)
class Refusal:
    """Why a request is refused: 401 ``unauthorized`` (no or unknown token) or 403 ``forbidden``."""

    status_code: int
    error: str
    detail: str
    challenge: str  # the WWW-Authenticate header


class Credentials:
    """The tokens in force, from a tokens file read at start-up and again whenever it changes."""

    def __init__(
        self, path: Path, *, clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time
    ) -> None:
        """Read ``path``; TokensFileError (a ConfigError, exit 2) when it cannot be read or holds an error."""
        self.path = path
        self._clock = clock
        self._wall_clock = wall_clock
        data, state = _read(path)
        self._entries = parse_tokens(_decode(data, path), str(path))
        self._state: _FileState | None = state
        self._content = hashlib.sha256(data).digest()
        self._reported: object = None  # the last error logged, so a bad file is logged once, not every second
        self._checked_at = clock()
        self.reloads = 0
        self.reload_errors = 0

    @property
    def token_count(self) -> int:
        """How many tokens are in force."""
        return len(self._entries)

    def readable_by_others(self) -> bool:
        """Whether users other than the owner may read the file (a warning at start-up)."""
        try:
            return bool(self.path.stat().st_mode & (stat.S_IRGRP | stat.S_IROTH))
        except OSError:
            return False

    def refresh(self) -> None:
        """Re-read the file if it changed since the last read; checked at most once per :data:`RELOAD_CHECK_S`."""
        now = self._clock()
        if now - self._checked_at < RELOAD_CHECK_S:
            return
        self._checked_at = now
        self.reload()

    def reload(self) -> bool:
        """Re-read the file now if it changed; whether the tokens in force changed. Errors are logged, not raised."""
        try:
            info = os.stat(self.path)
        except OSError as exc:
            self._report(("stat", exc.errno), f"cannot read the tokens file {self.path} ({exc.strerror})")
            return False
        state = _FileState(info.st_ino, info.st_size, info.st_mtime_ns)
        recent = self._wall_clock() - info.st_mtime < RACY_S
        if state == self._state and not recent:
            return False
        try:
            data, state = _read(self.path)
        except TokensFileError as exc:
            self._report(("read", str(exc)), str(exc))
            return False
        content = hashlib.sha256(data).digest()
        if content == self._content:
            self._state = state
            self._reported = None
            return False
        try:
            entries = parse_tokens(_decode(data, self.path), str(self.path))
        except TokensFileError as exc:
            self._state = state
            self._report(content, str(exc))
            return False
        self._entries, self._state, self._content, self._reported = entries, state, content, None
        self.reloads += 1
        log.info("tokens file %s reloaded: %s in force", self.path, _tokens(len(entries)))
        return True

    def _report(self, key: object, message: str) -> None:
        if key == self._reported:
            return
        self._reported = key
        self.reload_errors += 1
        count = len(self._entries)
        log.error("%s; the %s loaded before %s in force", message, _tokens(count), "stays" if count == 1 else "stay")

    def rights_of(self, token: str) -> frozenset[Right] | None:
        """The rights of ``token``, or None when it is not in force (compared in constant time over every entry)."""
        digest = _digest(token)
        found: frozenset[Right] | None = None
        for entry in self._entries:
            if hmac.compare_digest(entry.digest, digest):
                found = entry.rights
        return found

    def check(self, authorization: str | None, right: Right) -> Refusal | None:
        """None when the ``Authorization`` header carries a token with ``right``; else why the request is refused."""
        if authorization is None or not authorization.strip():
            return Refusal(401, "unauthorized", "send Authorization: Bearer <token>", "Bearer")
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return Refusal(
                401, "unauthorized", "the Authorization header must be 'Bearer <token>'", 'Bearer error="invalid_token"'
            )
        rights = self.rights_of(token)
        if rights is None:
            return Refusal(
                401, "unauthorized", "the token is not valid (unknown or removed)", 'Bearer error="invalid_token"'
            )
        if right not in rights:
            return Refusal(
                403,
                "forbidden",
                f"this token lacks the '{right.value}' right",
                f'Bearer error="insufficient_scope", scope="{right.value}"',
            )
        return None
