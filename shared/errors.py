"""The app's one error family: every error it raises on purpose derives from ``LedgerError``.

The subfamilies say what the caller should do, not where the error came from:

- ``ConfigError``: a setting is missing or out of range; fix the configuration (never retried).
- ``BadInput``: a message or request is malformed; reject or park it with the reason.
- ``TermEnded``: this leadership term must stop now (lease lost, fenced out, a write refused);
  nothing more may be written under its epoch.
- ``Retryable``: a race or a transient condition; the same call may succeed when tried again.
- ``StorageError``: storage failed or refused a call. Raised only by ``shared.storage``, which
  translates Azure's exceptions at its boundary, so no SDK exception type reaches the layers above.
  ``StorageUnavailable`` (transient: timeouts, throttling, 5xx, connection errors; also
  ``Retryable``) and ``StorageRefused`` (a definite answer: not found, exists, condition failed,
  forbidden, bad request) carry the HTTP status and storage's error code when there is one.
  When storage never answered, ``failure`` says why (``UNREACHABLE``, ``NO_ANSWER``,
  ``NO_CREDENTIAL``), so that a message for people can say it without naming an endpoint.

This module imports nothing of the app: it is the bottom of every layer.
"""

from __future__ import annotations


class LedgerError(Exception):
    """The root of every error the app raises on purpose."""


class ConfigError(LedgerError, ValueError):
    """A setting is missing or invalid. The message names the setting and what it accepts."""


class BadInput(LedgerError, ValueError):
    """Input (a queue message, an HTTP parameter, an operator's argument) that cannot be used."""


class TermEnded(LedgerError):
    """The current leadership term is over: stop writing under its epoch."""


class Retryable(LedgerError):
    """A race or transient condition: trying the same thing again may succeed."""


# Why storage never answered a call (``StorageError.failure``).
UNREACHABLE = "unreachable"  # no connection could be made
NO_ANSWER = "no-answer"  # the connection was dropped, or the answer timed out or was cut short
NO_CREDENTIAL = "no-credential"  # no token for storage could be had (identity-based access)


class StorageError(LedgerError):
    """Storage failed or refused a call (translated from the SDK in ``shared.storage``)."""

    def __init__(self, message: str, *, status: int | None = None, code: str | None = None,
                 failure: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.failure = failure  # UNREACHABLE, NO_ANSWER, NO_CREDENTIAL; None when it answered


class StorageUnavailable(StorageError, Retryable):
    """A transient failure: timeout, throttling, a 5xx, a connection that broke."""


class StorageRefused(StorageError):
    """A definite refusal from storage (a 4xx other than throttling)."""


class NotFound(StorageRefused):
    """The entity, blob, table or queue does not exist (404)."""


class AlreadyExists(StorageRefused):
    """A create-once write found the entity already there (409)."""


class ConditionFailed(StorageRefused):
    """An ETag or lease condition did not hold (412, or a lease conflict)."""


class BatchRefused(StorageRefused):
    """An entity-group transaction was refused as a whole; ``index`` is the failing operation."""

    def __init__(self, message: str, *, index: int | None, status: int | None = None,
                 code: str | None = None) -> None:
        super().__init__(message, status=status, code=code)
        self.index = index
