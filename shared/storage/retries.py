"""Retry timings that fit inside the lease, for every storage client.

The SDKs' defaults wait about 15 s before a blob retry: one transient error on a renewal once
held a leader 42 s inside ``renew()``, far past a 15 s lease, and each lost release or acquire
stalled the pipeline 16 s. Here every client makes at most ``RETRY_TOTAL`` retries with
back-offs of 0.2 s then 0.4 s (never more than ``MAX_BACKOFF_SECONDS``, +-20 % jitter), each try
limited to ``STORAGE_TIMEOUT_SECONDS``; ``fit_retries`` shrinks the tries of one lease call so
that, retries included, it ends before the lease would expire (``shared/election/elector.py``).
"""

from __future__ import annotations

import random
from typing import Any

from azure.core.exceptions import HttpResponseError, ServiceRequestError, ServiceResponseError
from azure.storage.blob import ExponentialRetry

from shared.errors import StorageUnavailable

RETRY_TOTAL = 2  # retries after the first try: three tries in all
FIRST_BACKOFF_SECONDS = 0.2  # then doubled: 0.2 s, 0.4 s
MAX_BACKOFF_SECONDS = 0.8
_JITTER = 0.2  # +-20 %, so instances that failed together do not retry together


def backoff_seconds(retry: int) -> float:
    """The sleep before retry number ``retry`` (0-based), without jitter."""
    return min(MAX_BACKOFF_SECONDS, FIRST_BACKOFF_SECONDS * 2.0 ** retry)


def worst_case_seconds(per_try_seconds: float, retries: int = RETRY_TOTAL) -> float:
    """The longest one call can take: every try times out, with the longest back-offs."""
    sleeps = sum(backoff_seconds(n) * (1 + _JITTER) for n in range(retries))
    return (retries + 1) * per_try_seconds + sleeps


def fit_retries(seconds_left: float, per_try_seconds: float) -> dict[str, Any]:
    """Per-call options so that one call, retries included, ends within ``seconds_left``.

    Shorter tries first, fewer tries only when a try would drop below half a second: a renewal
    takes milliseconds, and what makes it fail is a transient error that a retry fixes. Pass
    the result as keyword arguments of a blob call.
    """
    for retries in range(RETRY_TOTAL, -1, -1):
        sleeps = worst_case_seconds(0, retries)
        per_try = min(per_try_seconds, (seconds_left - sleeps) / (retries + 1))
        if per_try >= 0.5 or retries == 0:
            per_try = max(per_try, 0.5)
            return {"retry_total": retries, "connection_timeout": per_try,
                    "read_timeout": per_try}
    raise AssertionError("unreachable")


class LeaseFitRetry(ExponentialRetry):
    """The blob and queue clients' retry policy: sub-second back-off (see ``backoff_seconds``).

    It retries what the SDK's ``ExponentialRetry`` retries (timeouts, resets, 408, 500, 503 ...),
    including PUTs whose response was lost (lease calls are idempotent per lease id).
    """

    def __init__(self, retry_total: int = RETRY_TOTAL) -> None:
        super().__init__(initial_backoff=0, increment_base=0, retry_total=retry_total,
                         random_jitter_range=0)

    def get_backoff_time(self, settings: dict[str, Any]) -> float:
        base = backoff_seconds(int(settings["count"]) - 1)  # count is 1 before the first retry
        return float(base * random.uniform(1 - _JITTER, 1 + _JITTER))


def is_transient(exc: BaseException) -> bool:
    """True for a storage error that a later try may not meet (timeouts, resets, 408/429/5xx).

    These are what the SDK itself retries; when its tries ran out, the caller may try again
    later, within what its lease allows. Anything else (a refusal, a missing row) is an answer.
    The app's ``StorageUnavailable`` (what the storage adapters raise for them) is transient too.
    """
    if isinstance(exc, StorageUnavailable):
        return True
    if isinstance(exc, ServiceRequestError | ServiceResponseError):
        return True
    if isinstance(exc, HttpResponseError):
        status = exc.status_code or 0
        return status in (408, 429) or status >= 500
    return False
