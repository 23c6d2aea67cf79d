"""The package's exception hierarchy and its invariant helper.

Operating errors (bad input, a refused edit, a database that says no) are
subclasses of :class:`EntitleError`; each carries the exit code the CLI uses and
a message that names the file, row or field and says what to do.  Programmer
errors are caught by :func:`invariant`, which raises even under ``python -O``.
"""

from __future__ import annotations


class EntitleError(Exception):
    """Base class of every expected error this package raises.

    ``retryable`` says whether running the same step again, unchanged, may succeed (an issuer
    that was down, a database that was locked): schedulers retry those and fail the others at
    once, since bad input, edited terms or a changed partition file fail the same way every time.
    """

    exit_code = 1
    retryable = False

    def __init__(self, message: str = "", *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class ConfigError(EntitleError):
    """A setting or environment variable has a value we cannot use."""

    exit_code = 2


class LedgerUnreachableError(ConfigError):
    """The ledger's database server cannot be reached or refuses the connection.

    A configuration error for the command line (exit 2: check the URL), yet retryable for a
    scheduler: a server that is restarting answers again a minute later.
    """

    exit_code = 2
    retryable = True


class IssuerAuthError(ConfigError):
    """An issuer has no token for us, or refused ours (401/403): exit 2, never retried, nothing marked delivered."""


class StorageError(ConfigError):
    """The object store cannot be reached, refuses our credentials, or has no such bucket."""

    exit_code = 2


class CampaignError(EntitleError):
    """The campaign file is invalid; the message names the field."""

    exit_code = 3


class SnapshotError(EntitleError):
    """The user file cannot be read or has too many bad rows."""

    exit_code = 3


class PartitionError(EntitleError):
    """A partition file is missing, unreadable or disagrees with its manifest."""

    exit_code = 4


class SchemaMismatchError(EntitleError):
    """A file read or written does not match its schema in ``schemas/``."""

    exit_code = 4


class LedgerError(EntitleError):
    """The ledger refused an operation or is in a state we do not accept."""

    exit_code = 5


class TermsChangedError(LedgerError):
    """An item's terms changed after grants exist for it."""

    exit_code = 5


class CampaignNotStartedError(EntitleError):
    """Granting was asked for before the campaign's start instant."""

    exit_code = 6


class GrantFailedError(EntitleError):
    """One or more partitions failed; the message lists them."""

    exit_code = 7


class DeliveryFailedError(GrantFailedError):
    """Some partitions' grants were not delivered to their issuer (failed or not attempted); rerun delivers them."""

    exit_code = 7
    retryable = True


class DeliveryConflictError(EntitleError):
    """An issuer holds a different payload under some grant ids (answer ``conflict``): a person decides."""

    exit_code = 10


class CorrectionError(LedgerError):
    """A void or repair was refused (nothing to void, already voided, no reconciliation); nothing was written."""

    exit_code = 5


class ReconciliationBreaksError(EntitleError):
    """Reconciliation found open breaks (verdict BREAKS)."""

    exit_code = 8


class ReconciliationIncompleteError(EntitleError):
    """Reconciliation could not compare everything (verdict INCOMPLETE)."""

    exit_code = 9


class UsageError(EntitleError):
    """Options that do not go together, or one that is missing (argparse cannot say it): exit 2, nothing read."""

    exit_code = 2


class QueryError(EntitleError):
    """A named query does not exist or its parameters are wrong."""

    exit_code = 2


class InvariantViolation(AssertionError):
    """A condition the code relies on did not hold: a bug, not bad input."""


def invariant(condition: bool, message: str) -> None:
    """Raise :class:`InvariantViolation` when ``condition`` is false (survives ``-O``)."""
    if not condition:
        raise InvariantViolation(message)
