"""Azure's exceptions, translated into the app's ``StorageError`` family at the storage boundary.

``translate(exc)`` maps one azure-core exception to its ``shared.errors`` class:

- a transaction refused (``TableTransactionError``): ``BatchRefused`` with the failing
  operation's index (``RequestTooLargeError``, the whole batch too large: index ``None``);
- 404 (``ResourceNotFoundError``): ``NotFound``; 409 (``ResourceExistsError``):
  ``AlreadyExists`` (a lease conflict: ``ConditionFailed``); 412 (``ResourceModifiedError``) and
  a queue message's stale pop receipt (400 ``PopReceiptMismatch``): ``ConditionFailed``;
- 408, 429, any 5xx, no status, a connection that failed or broke (``ServiceRequestError``,
  ``ServiceResponseError``, an answer cut short): ``StorageUnavailable`` (transient), with
  ``failure`` saying why when storage never answered (``UNREACHABLE``: no connection;
  ``NO_ANSWER``: dropped, timed out or cut short; ``NO_CREDENTIAL``: no token);
- any other 4xx (a bad request, a forbidden call, a key storage refuses): ``StorageRefused``;
- any other ``AzureError``: ``StorageError`` (neither transient nor a refusal).

Each keeps the HTTP status and storage's error code, and its message is ``describe(exc)``: one
line with the exception's kind, status, code and storage's own first line, and never an
endpoint, a query string or a secret. ``translating()`` does it for a block or, as a decorator,
for a whole adapter method: the adapters raise nothing of Azure's.
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator

from azure.core.exceptions import (
    AzureError,
    ClientAuthenticationError,
    DecodeError,
    HttpResponseError,
    ResourceExistsError,
    ResourceModifiedError,
    ResourceNotFoundError,
    ServiceRequestError,
    ServiceResponseError,
    StreamClosedError,
)
from azure.data.tables import RequestTooLargeError, TableTransactionError

from shared.errors import (
    NO_ANSWER,
    NO_CREDENTIAL,
    UNREACHABLE,
    AlreadyExists,
    BatchRefused,
    ConditionFailed,
    NotFound,
    StorageError,
    StorageRefused,
    StorageUnavailable,
)

_TRANSIENT_STATUSES = frozenset({408, 429})
_INDEX = re.compile(r"^\s*(\d+):")
# What must not reach a log: URLs (endpoints, SAS tokens), hosts and ports of connection
# errors, and anything that looks like a key or a signature.
_REDACTIONS = (
    (re.compile(r"[a-z][a-z0-9+.-]*://\S+", re.IGNORECASE), "<url>"),
    (re.compile(r"host='[^']*'"), "host=<host>"),
    (re.compile(r"port=\d+"), "port=<port>"),
    (re.compile(r"url: \S+"), "url: <url>"),
    (re.compile(r"(AccountKey|SharedAccessSignature|sig|se|sp|sv|skoid|sktid)=[^;&\s]+",
                re.IGNORECASE), r"\1=<redacted>"),
    (re.compile(r"(Authorization|x-ms-[a-z-]*signature)[^,\n]*", re.IGNORECASE),
     r"\1: <redacted>"),
)
_MAX_DETAIL = 200


def status_of(exc: BaseException) -> int | None:
    """The HTTP status of an SDK exception, when it has one."""
    status = getattr(exc, "status_code", None)
    if status is None:
        response = getattr(exc, "response", None)
        status = getattr(response, "status_code", None)
    return status if isinstance(status, int) else None


def code_of(exc: BaseException) -> str | None:
    """Storage's error code (``EntityAlreadyExists``, ``ConditionNotMet``...), when it sent one."""
    code = getattr(exc, "error_code", None)
    code = getattr(code, "value", code)  # the SDKs' error-code enums
    if not code:
        response = getattr(exc, "response", None)
        headers = getattr(response, "headers", None)
        code = headers.get("x-ms-error-code") if headers is not None else None
    return str(code) if code else None


def _redact(text: str) -> str:
    for pattern, replacement in _REDACTIONS:
        text = pattern.sub(replacement, text)
    return text


def _detail(exc: BaseException) -> str:
    """Storage's own first line (the SDK puts it first), without the index of a transaction."""
    message = getattr(exc, "message", None) or str(exc)
    first = next((line.strip() for line in str(message).splitlines() if line.strip()), "")
    first = _INDEX.sub("", first, count=1).strip()
    first = _redact(first)
    return first if len(first) <= _MAX_DETAIL else first[:_MAX_DETAIL - 1] + "…"


def describe(exc: BaseException) -> str:
    """One line for people and logs: the kind of failure, the status, the code, what storage
    said (``ResourceExistsError: 409 EntityAlreadyExists: The specified entity already
    exists.``). No endpoint, query string or key is ever part of it."""
    parts = [type(exc).__name__]
    status, code = status_of(exc), code_of(exc)
    head = " ".join(str(part) for part in (status, code) if part)
    detail = _detail(exc)
    if head:
        parts.append(head)
    if detail and detail != code:
        parts.append(detail)
    return ": ".join(parts)


def _index_of(exc: TableTransactionError) -> int | None:
    """The failing operation's index, from the message storage starts with it (``"1:..."``)."""
    if isinstance(exc, RequestTooLargeError):
        return None
    found = _INDEX.match(str(getattr(exc, "message", "") or ""))
    if found:
        return int(found.group(1))
    return None


def translate(exc: BaseException) -> StorageError:
    """The app's ``StorageError`` for an SDK exception (see the module docstring)."""
    if isinstance(exc, StorageError):
        return exc
    status, code, text = status_of(exc), code_of(exc), describe(exc)
    if isinstance(exc, ServiceRequestError):
        return StorageUnavailable(text, status=status, code=code, failure=UNREACHABLE)
    if isinstance(exc, (ServiceResponseError, DecodeError, StreamClosedError)):
        return StorageUnavailable(text, status=status, code=code, failure=NO_ANSWER)
    if status is not None and (status in _TRANSIENT_STATUSES or status >= 500):
        return StorageUnavailable(text, status=status, code=code)
    if isinstance(exc, TableTransactionError):
        return BatchRefused(text, index=_index_of(exc), status=status, code=code)
    if isinstance(exc, ResourceNotFoundError) or status == 404:
        return NotFound(text, status=status, code=code)
    if isinstance(exc, ResourceModifiedError) or status == 412 or code == "PopReceiptMismatch":
        return ConditionFailed(text, status=status, code=code)
    if isinstance(exc, ResourceExistsError) or status == 409:
        if code and "lease" in code.lower():
            return ConditionFailed(text, status=status, code=code)
        return AlreadyExists(text, status=status, code=code)
    if isinstance(exc, HttpResponseError):
        if status is None:
            return StorageUnavailable(text, status=status, code=code,
                                      failure=NO_CREDENTIAL if isinstance(
                                          exc, ClientAuthenticationError) else None)
        return StorageRefused(text, status=status, code=code)
    if isinstance(exc, AzureError):
        return StorageError(text, status=status, code=code)
    return StorageError(text, status=status, code=code)


@contextlib.contextmanager
def translating() -> Iterator[None]:
    """Raise any ``AzureError`` of the block (or, as ``@translating()``, of the function) as
    ``translate`` maps it, chained to the original."""
    try:
        yield
    except AzureError as exc:
        raise translate(exc) from exc
