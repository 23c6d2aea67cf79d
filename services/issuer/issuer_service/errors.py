"""The service's exceptions: operating errors carry the exit code of ``python -m issuer_service``."""

from __future__ import annotations


class ServiceError(Exception):
    """Base class of every expected error the service raises (bad settings, a rejected request)."""

    exit_code = 1


class ConfigError(ServiceError):
    """An option has a value the service cannot use (a store it cannot open, a port it cannot bind)."""

    exit_code = 2


class InvariantViolation(AssertionError):
    """A condition the code relies on does not hold: a bug, not bad input."""


def invariant(condition: bool, message: str) -> None:
    """Raise :class:`InvariantViolation` when ``condition`` is false (survives ``-O``)."""
    if not condition:
        raise InvariantViolation(message)
