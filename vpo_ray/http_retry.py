"""The one retry policy of vpo_ray's HTTP clients (judge and teacher endpoints, serve client).

Built on tenacity. A call is retried when it raises `Retryable`: a 408/429/5xx answer
(`retryable_status`), a timeout, a connection error, or a reply the caller finds
malformed. Anything else (a 4xx, a bug) goes straight up. The wait before retry k is
the server's Retry-After when it sent one, else exponential backoff with jitter
(backoff_s x 2^k, plus up to one backoff_s at random), both capped at max_wait_s; after
max_retries retries the last `Retryable` is raised.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import tenacity

T = TypeVar("T")
RETRY_STATUSES = frozenset({408, 429, 500, 502, 503, 504})


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 4  # retries after the first attempt
    backoff_s: float = 0.5  # first wait; doubles each retry
    max_wait_s: float = 30.0  # cap on any single wait, a server's Retry-After included


class Retryable(Exception):
    """One attempt failed in a way another attempt may not; `retry_after` from the server."""

    def __init__(self, message: str, retry_after: Optional[float] = None, status: Optional[int] = None):
        super().__init__(message)
        self.retry_after = retry_after
        self.status = status


def retryable_status(status: int) -> bool:
    return status in RETRY_STATUSES


def retry_after_s(headers) -> Optional[float]:
    """Seconds from a Retry-After header (numeric form), or None."""
    value = headers.get("Retry-After") if headers is not None else None
    try:
        return max(float(value), 0.0) if value is not None else None
    except ValueError:
        return None


class _Wait(tenacity.wait.wait_base):
    def __init__(self, policy: RetryPolicy):
        self.policy = policy
        # backoff_s * 2**(n-1) plus up to backoff_s of jitter (wait_exponential_jitter's rule,
        # spelled with waits whose arguments are the same on every tenacity 8.2-9.x)
        self.backoff = (tenacity.wait_exponential(multiplier=policy.backoff_s, max=policy.max_wait_s)
                        + tenacity.wait_random(0, policy.backoff_s))

    def __call__(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        server = getattr(exc, "retry_after", None)
        if server is not None:
            return min(server, self.policy.max_wait_s)
        return min(self.backoff(retry_state), self.policy.max_wait_s)


def call_with_retries(fn: Callable[[], T], policy: RetryPolicy,
                      on_retry: Optional[Callable[[Retryable], None]] = None,
                      sleep: Callable[[float], None] = tenacity.nap.sleep) -> T:
    """fn() under `policy`; raises the last Retryable when retries run out."""
    def before_sleep(state: tenacity.RetryCallState) -> None:
        if on_retry is not None:
            on_retry(state.outcome.exception())

    retrying = tenacity.Retrying(stop=tenacity.stop_after_attempt(policy.max_retries + 1), wait=_Wait(policy),
                                 retry=tenacity.retry_if_exception_type(Retryable), reraise=True,
                                 before_sleep=before_sleep, sleep=sleep)
    return retrying(fn)
