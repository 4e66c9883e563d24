"""The one retry policy: what is worth retrying, and how long to wait before the next attempt.

Waits are exponential with full jitter (AWS architecture blog's "full jitter": a uniform draw
between 0 and the capped exponential), and never shorter than what the server asked for with
``Retry-After`` (seconds or an HTTP-date) or a rate-limit reset header.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from email.utils import parsedate_to_datetime

from ingest.errors import ExitCode, SourceError

#: Statuses that mean the credentials are missing, wrong or lack a grant: a person must act.
REFUSED_STATUSES = frozenset({401, 403})

RETRYABLE_STATUSES = frozenset({408, 425, 429, 500, 502, 503, 504})
#: Statuses meaning "too much load from you": they shrink the adaptive concurrency limit, and
#: their rate-limit reset header pauses every request of the source.
OVERLOAD_STATUSES = frozenset({429, 503})
#: Epoch timestamps above this are milliseconds (year 33658 in seconds).
EPOCH_MILLISECONDS = 1_000_000_000_000


class RetryableError(SourceError):
    """A failure worth another attempt; ``reason`` feeds the per-reason retry counters."""

    def __init__(self, message: str, reason: str, wait_at_least: float = 0.0) -> None:
        super().__init__(message)
        self.reason = reason
        self.wait_at_least = wait_at_least


class HttpStatusError(SourceError):
    """A non-retryable HTTP status (4xx other than the retryable ones).

    401 and 403 exit with the config code: no retry fixes a revoked token or a missing grant.
    """

    def __init__(self, message: str, status: int) -> None:
        super().__init__(message)
        self.status = status
        if status in REFUSED_STATUSES:
            self.exit_code = ExitCode.CONFIG


def parse_retry_after(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds to wait from a ``Retry-After`` value: delta-seconds or an HTTP-date."""
    if value is None or not value.strip():
        return None
    text = value.strip()
    try:
        seconds = float(text)
    except ValueError:
        pass
    else:
        # "inf" or "nan" would sleep forever or compare false everywhere: ignore them.
        return max(0.0, seconds) if math.isfinite(seconds) else None
    try:
        moment = parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError):
        return None
    if moment is None:
        return None
    return max(0.0, moment.timestamp() - now())


def parse_reset(value: str | None, now: Callable[[], float] = time.time) -> float | None:
    """Seconds until a rate-limit reset header: epoch seconds, or delta seconds if small."""
    if value is None or not value.strip():
        return None
    try:
        number = float(value.strip())
    except ValueError:
        return None
    if not math.isfinite(number):
        return None
    if number > EPOCH_MILLISECONDS:
        number /= 1000.0
    if number > 1_000_000_000:  # an epoch timestamp
        return max(0.0, number - now())
    return max(0.0, number)


def full_jitter(attempt: int, initial: float, cap: float, rng: random.Random) -> float:
    """Backoff before retry number ``attempt`` (1-based)."""
    return rng.uniform(0.0, min(cap, initial * (2 ** (attempt - 1))))
