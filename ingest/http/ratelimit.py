"""Request pacing for one source: a token bucket plus a shared pause the server can ask for.

Why a shared pause: a 429 with ``Retry-After: 5`` (or ``X-RateLimit-Remaining: 0`` with a reset
time) is the server telling the *client* to back off, not one request. Every request of the
source waits until then, not only the one that was refused; otherwise the others keep spending
the quota and the server keeps answering 429.

Why aiolimiter: it is a small, maintained, asyncio-native leaky bucket (a token bucket in
effect: ``burst`` requests at once, then ``rate`` per second), fair to waiters in FIFO order.
"""

from __future__ import annotations

import asyncio
import math

import structlog
from aiolimiter import AsyncLimiter

log = structlog.get_logger("ingest.http")

#: A server asking for a pause longer than this is treated as this (a misparsed header must not
#: park the run for a day); the retry budget (``http.max_retry_seconds``) still applies.
MAX_PAUSE_SECONDS = 3600.0


class RateLimiter:
    """``async with limiter.slot():`` waits for any server-requested pause, then for a token."""

    def __init__(self, requests_per_second: float | None, burst: int | None = None) -> None:
        self._bucket: AsyncLimiter | None = None
        if requests_per_second is not None:
            capacity = float(burst or max(1, math.floor(requests_per_second)))
            self._bucket = AsyncLimiter(capacity, capacity / requests_per_second)
        self._resume_at = 0.0

    def pause(self, seconds: float, *, reason: str) -> None:
        """Hold every request until ``seconds`` from now (extends, never shortens, a pause)."""
        if not math.isfinite(seconds) or seconds <= 0:
            return
        loop = asyncio.get_running_loop()
        until = loop.time() + min(seconds, MAX_PAUSE_SECONDS)
        if until > self._resume_at + 0.001:
            self._resume_at = until
            log.info(
                "rate_limit_pause", seconds=round(min(seconds, MAX_PAUSE_SECONDS), 3), reason=reason
            )

    async def acquire(self) -> None:
        loop = asyncio.get_running_loop()
        # A loop, not one sleep: the pause may be extended while this request waits.
        while (remaining := self._resume_at - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(remaining)
        if self._bucket is not None:
            await self._bucket.acquire()
