"""Retries for HTTP engines: exponential backoff with jitter, ``Retry-After`` honoured.

The SDKs' own retries are switched off (``max_retries=0``) so that every attempt goes through here: one policy
for every provider, and tests can count and time the attempts (``RetryLog``).
"""

from __future__ import annotations

import email.utils
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

T = TypeVar("T")

RETRYABLE_STATUS = frozenset({408, 409, 425, 429, 500, 502, 503, 504, 520, 522, 524, 529})
"""Statuses worth another try: timeouts, conflicts, rate limits, server errors (529: Anthropic overloaded)."""


class TransientError(Exception):
    """A failure that another attempt may fix (429, 5xx, dropped connection, timeout)."""

    def __init__(self, message: str, *, status: int | None = None, retry_after: float | None = None):
        super().__init__(message)
        self.status = status
        self.retry_after = retry_after


class RetriesExhausted(Exception):
    """Every attempt failed with a transient error; ``last`` is the final one."""

    def __init__(self, attempts: int, last: TransientError):
        super().__init__(f"gave up after {attempts} attempts; last error: {last}")
        self.attempts = attempts
        self.last = last


@dataclass(frozen=True)
class RetryPolicy:
    max_retries: int = 6
    """Retries after the first attempt (so at most ``max_retries + 1`` attempts)."""
    base_delay: float = 1.0
    """Backoff before retry ``k`` (0-based) is ``base_delay * 2**k``, capped at ``max_delay``, then jittered."""
    max_delay: float = 60.0
    max_retry_after: float = 600.0
    """A server asking for a longer wait than this is waited this long (a bound on one sleep)."""

    def delay(self, retry: int, retry_after: float | None, rng: random.Random) -> float:
        """Seconds to wait before retry number ``retry`` (0-based)."""
        backoff = min(self.max_delay, self.base_delay * (2**retry))
        # "Equal jitter": half fixed, half random, so clients that failed together spread out but never retry
        # immediately.
        jittered = backoff / 2 + rng.uniform(0, backoff / 2)
        if retry_after is not None and retry_after > 0:
            # The server knows when capacity returns: wait that long (bounded), not our guess.
            return min(retry_after, self.max_retry_after)
        return jittered


@dataclass
class RetryLog:
    """What the retries of one call did (kept in ``Response.meta``)."""

    waits: list[float] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    @property
    def retries(self) -> int:
        return len(self.waits)


def parse_retry_after(headers: Mapping[str, str] | None, now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` (OpenAI), ``Retry-After`` as seconds or as an HTTP date."""
    if not headers:
        return None
    lower = {k.lower(): v for k, v in headers.items()}
    ms = lower.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = lower.get("retry-after")
    if value is None:
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


_rng_lock = threading.Lock()
_rng = random.Random()


def _locked_rng() -> random.Random:
    with _rng_lock:
        return random.Random(_rng.getrandbits(64))


def call_with_retries(
    fn: Callable[[], T],
    policy: RetryPolicy,
    *,
    log: RetryLog | None = None,
    sleep: Callable[[float], None] = time.sleep,
    redact: Callable[[str], str] = lambda s: s,
) -> T:
    """Call ``fn`` until it returns or raises something other than TransientError; after
    ``policy.max_retries`` retries raise RetriesExhausted."""
    rng = _locked_rng()
    for retry in range(policy.max_retries + 1):
        try:
            return fn()
        except TransientError as e:
            if log is not None:
                log.errors.append(redact(str(e)))
            if retry == policy.max_retries:
                raise RetriesExhausted(retry + 1, e) from e
            wait = policy.delay(retry, e.retry_after, rng)
            if log is not None:
                log.waits.append(wait)
            sleep(wait)
    raise AssertionError("unreachable")  # pragma: no cover
