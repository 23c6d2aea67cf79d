"""Secrets the pipeline holds for others (issuers' tokens): kept out of every repr, log line and document.

A :class:`Secret` prints as ``***``; only :meth:`Secret.reveal` gives the value, at the one
place that sends it (the HTTP issuer's ``Authorization`` header). An issuer's token comes from
``ENTITLE_ISSUER_<NAME>_TOKEN`` or, under Airflow, from the password of the Connection
``entitle_issuer_<name>``; never from the campaign file.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

TOKEN_PREFIX, TOKEN_SUFFIX = "ENTITLE_ISSUER_", "_TOKEN"
CONNECTION_PREFIX = "entitle_issuer_"

# Under Airflow: the password of a Connection by id, or None when there is no such Connection.
ConnectionSecretLookup = Callable[[str], "str | None"]


@dataclass(frozen=True)
class Secret:
    """A value that is never shown: ``repr`` and ``str`` give ``***``."""

    _value: str = field(repr=False)

    def reveal(self) -> str:
        """The value itself, for the one place that sends it."""
        return self._value

    def __str__(self) -> str:
        return "***"

    def __repr__(self) -> str:
        return "Secret(***)"


def token_variable(issuer: str) -> str:
    """``ENTITLE_ISSUER_<NAME>_TOKEN`` for an issuer (upper case, '_' for '-')."""
    return f"{TOKEN_PREFIX}{issuer.upper().replace('-', '_')}{TOKEN_SUFFIX}"


def connection_id(issuer: str) -> str:
    """The Airflow Connection whose password is the issuer's token."""
    return f"{CONNECTION_PREFIX}{issuer}"


def where_tokens_come_from(issuer: str) -> str:
    """The sentence an error names: the variable, then the Airflow Connection."""
    return f"{token_variable(issuer)} (or, under Airflow, the password of the Connection {connection_id(issuer)})"


def issuer_tokens(env: Mapping[str, str]) -> dict[str, Secret]:
    """Every non-empty ``ENTITLE_ISSUER_<NAME>_TOKEN``, keyed by the variable's name."""
    return {
        variable: Secret(value.strip())
        for variable, value in env.items()
        if variable.startswith(TOKEN_PREFIX) and variable.endswith(TOKEN_SUFFIX) and value.strip()
    }


def resolve_token(
    issuer: str, tokens: Mapping[str, Secret], lookup: ConnectionSecretLookup | None = None
) -> Secret | None:
    """The issuer's token: its variable first, then its Airflow Connection; None when neither has one."""
    found = tokens.get(token_variable(issuer))
    if found is not None:
        return found
    if lookup is not None:
        value = lookup(connection_id(issuer))
        if value:
            return Secret(value)
    return None
