"""Adaptive concurrency (AIMD): how many requests of a source may be in flight at once.

Additive increase, multiplicative decrease, as TCP does for its congestion window: every
success adds ``1 / limit`` (so one whole slot per window of ``limit`` successes); a 429 or a
latency spike multiplies the limit by ``decrease_factor``. Bounds are ``min_concurrency`` and
``max_concurrency``.

One congestion event counts once: requests that were already in flight when the limit was cut
were sent under the old limit, so their 429s or slow answers do not cut it again. Without that,
a burst of eight 429s from one overload would collapse the limit to the minimum at once.

Latency spike: a success whose latency exceeds ``latency_spike_factor`` times the moving
average of recent latencies (after a few samples, so the first requests do not set a tiny
baseline by accident) and exceeds it by at least ``SPIKE_MIN_SECONDS``.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

log = structlog.get_logger("ingest.http")

#: Successes needed before latency spikes are judged (the average needs some history).
WARMUP_SAMPLES = 8
#: Weight of the newest latency in the moving average.
EWMA_WEIGHT = 0.2
#: A spike must also be this many seconds above the average. Against a fast server, a response
#: handled while the event loop was busy building a batch (tens of milliseconds) is many times
#: the sub-millisecond average without the server being any slower.
SPIKE_MIN_SECONDS = 0.25


@dataclass(slots=True)
class Ticket:
    """One admitted request: when it started and under which limit generation."""

    started: float
    generation: int


class AdaptiveConcurrency:
    """A semaphore whose size moves between bounds; ``async with ac.slot() as ticket``."""

    def __init__(
        self,
        *,
        minimum: int,
        maximum: int,
        adaptive: bool = True,
        decrease_factor: float = 0.5,
        latency_spike_factor: float = 4.0,
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.adaptive = adaptive
        self.decrease_factor = decrease_factor
        self.latency_spike_factor = latency_spike_factor
        self._window = float(maximum)
        self._in_flight = 0
        self._generation = 0
        self._latency: float | None = None
        self._samples = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: Every limit change as (old, new, reason); tests and summaries read it.
        self.changes: list[tuple[int, int, str]] = []

    @property
    def limit(self) -> int:
        return max(self.minimum, min(self.maximum, math.floor(self._window)))

    @property
    def in_flight(self) -> int:
        return self._in_flight

    @asynccontextmanager
    async def slot(self) -> AsyncIterator[Ticket]:
        while self._in_flight >= self.limit:
            waiter = asyncio.get_running_loop().create_future()
            self._waiters.append(waiter)
            try:
                await waiter
            except asyncio.CancelledError:
                if waiter in self._waiters:
                    self._waiters.remove(waiter)
                self._wake()  # pass on a wake-up this task can no longer use
                raise
        self._in_flight += 1
        try:
            yield Ticket(time.monotonic(), self._generation)
        finally:
            self._in_flight -= 1
            self._wake()

    def _wake(self) -> None:
        free = self.limit - self._in_flight
        while free > 0 and self._waiters:
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                free -= 1

    def success(self, ticket: Ticket) -> None:
        """A request finished well: grow, or shrink if it was a latency spike."""
        if not self.adaptive:
            return
        latency = time.monotonic() - ticket.started
        average = self._latency
        self._samples += 1
        self._latency = latency if average is None else average + EWMA_WEIGHT * (latency - average)
        if (
            average is not None
            and self._samples > WARMUP_SAMPLES
            and latency > self.latency_spike_factor * average
            and latency - average > SPIKE_MIN_SECONDS
        ):
            self._decrease(ticket, f"latency {latency:.3f}s > {self.latency_spike_factor}x avg")
            return
        self._set(self._window + 1.0 / max(1, self.limit), "success")

    def overloaded(self, ticket: Ticket, reason: str) -> None:
        """The server pushed back (429, 503): shrink once per congestion event."""
        if self.adaptive:
            self._decrease(ticket, reason)

    def _decrease(self, ticket: Ticket, reason: str) -> None:
        if ticket.generation != self._generation:
            return  # sent under a limit that has been cut already
        self._generation += 1
        self._set(max(float(self.minimum), self._window * self.decrease_factor), reason)

    def _set(self, window: float, reason: str) -> None:
        before = self.limit
        self._window = max(float(self.minimum), min(float(self.maximum), window))
        after = self.limit
        if after != before:
            self.changes.append((before, after, reason))
            # Cuts are news (the server pushed back); growth back to the bound is routine.
            level = log.info if after < before else log.debug
            level("concurrency_changed", before=before, after=after, reason=reason)
            self._wake()
