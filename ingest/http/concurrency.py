"""Adaptive concurrency (AIMD): how many requests of a source may be in flight at once.

Additive increase, multiplicative decrease, as TCP does for its congestion window:

* **Slow start.** A source starts at two requests in flight and the limit doubles every round
  trip up to ``max_concurrency``, until the first congestion event. Only successes of requests
  sent while the limit was in use (more than half of it in flight) grow it, as TCP grows its
  window only when the window is what limits it. Starting
  at the maximum would send a burst of ``max_concurrency`` requests to a server that may refuse
  all but one of them, and every refusal costs the whole source its ``Retry-After`` pause.
* **Congestion avoidance.** After that event, every success adds ``1 / limit`` (one whole slot
  per window of ``limit`` successes).
* **Decrease.** A 429/503, a timeout or a latency rise multiplies the limit by
  ``decrease_factor``. One congestion event counts once: requests that were already in flight
  when the limit was cut were sent under the old limit, so their 429s or slow answers do not cut
  it again. Without that, a burst of eight 429s from one overload would collapse the limit to the
  minimum at once.
* **Remembered ceiling, rare probes.** The limit at which the server pushed back is remembered;
  growth stops one below it. Only every ``probe_interval`` seconds may the limit grow back to the
  ceiling (a probe); a probe that is refused again doubles the interval (up to
  ``PROBE_MAX_SECONDS``), a probe that holds for two windows forgets the ceiling. Growing back
  after every window of successes, as plain AIMD does, cost a server that refuses any second
  concurrent request a ``Retry-After`` pause per window: 9.5x the serial walk. With probes spaced
  at least 20 s and 30x the server's ``Retry-After`` apart, then twice, four times as far, a
  refused probe (typically a one-second pause) costs at most ~3 % of the time, less and less as
  the run goes on; a limit cut by a passing overload still grows back freely to one below the
  ceiling.
* **Latency rise, not latency tail.** A success counts as congestion when the *fastest* of the
  last ``RECENT_SAMPLES`` answers (sent under the current limit) is ``latency_spike_factor``
  times slower than the fastest answer of the last ``BASELINE_SAMPLES`` and at least
  ``SPIKE_MIN_SECONDS`` slower. A queue in front of a server slows every answer, so the minimum
  rises; a heavy tail (lognormal latencies, the p99 ten times the median) has slow answers among
  fast ones, and the minimum stays put. Judging each answer against an average read such tails
  as congestion and halved the limit seven times in one 200-page run.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass

import structlog

log = structlog.get_logger("ingest.http")

#: Successes needed before latency rises are judged (the baseline needs some history).
WARMUP_SAMPLES = 8
#: Answers whose minimum is compared with the baseline: one slow answer is never enough.
RECENT_SAMPLES = 8
#: Answers the baseline (the fastest recent answer) is taken over; it follows a server that
#: becomes slower for good after this many answers.
BASELINE_SAMPLES = 200
#: A rise must also be this many seconds. Against a fast server, a response handled while the
#: event loop was busy building a batch (tens of milliseconds) is many times the sub-millisecond
#: baseline without the server being any slower.
SPIKE_MIN_SECONDS = 0.25
#: The limit a source starts at (slow start), unless ``max_concurrency`` is lower.
INITIAL_LIMIT = 2
#: Seconds after a congestion event before the first probe above the remembered ceiling.
PROBE_INITIAL_SECONDS = 20.0
#: Probes are at least this many times the server's last ``Retry-After`` apart: a refused
#: probe then costs at most about 1/30 of the time.
PROBE_PAUSE_MULTIPLE = 30.0
#: The longest spacing between probes (a probe refused again doubles the spacing).
PROBE_MAX_SECONDS = 600.0


@dataclass(slots=True)
class Ticket:
    """One admitted request: when it started, under which limit generation, with how many."""

    started: float
    generation: int
    #: Requests in flight when it was admitted, itself included: where a refusal of it says
    #: the server's limit is (the limit may be higher than what was actually in flight).
    in_flight: int = 0
    #: The limit then: a success grows the limit only if the limit was in use (see ``success``).
    limit: int = 0


class AdaptiveConcurrency:
    """A semaphore whose size moves between bounds; ``async with ac.slot() as ticket``.

    ``clock`` is injectable so tests can drive probes and latencies deterministically.
    """

    def __init__(
        self,
        *,
        minimum: int,
        maximum: int,
        adaptive: bool = True,
        decrease_factor: float = 0.5,
        latency_spike_factor: float = 4.0,
        initial: int | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.minimum = minimum
        self.maximum = maximum
        self.adaptive = adaptive
        self.decrease_factor = decrease_factor
        self.latency_spike_factor = latency_spike_factor
        self.clock = clock
        start = maximum if not adaptive else (INITIAL_LIMIT if initial is None else initial)
        self._window = float(max(minimum, min(maximum, start)))
        self._slow_start = True
        self._in_flight = 0
        self._generation = 0
        self._recent: deque[float] = deque(maxlen=RECENT_SAMPLES)
        self._history: deque[float] = deque(maxlen=BASELINE_SAMPLES)
        #: The limit at which the server last pushed back; growth stops below it between probes.
        self.ceiling: int | None = None
        self._probe_at = 0.0
        self._probe_interval = PROBE_INITIAL_SECONDS
        self._probe_successes = 0
        self._waiters: deque[asyncio.Future[None]] = deque()
        #: Every limit change as (old, new, reason); tests and summaries read it.
        self.changes: list[tuple[int, int, str]] = []
        #: The most requests ever in flight at once (never above ``maximum``).
        self.peak_in_flight = 0

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
        self.peak_in_flight = max(self.peak_in_flight, self._in_flight)
        try:
            yield Ticket(self.clock(), self._generation, self._in_flight, self.limit)
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
        """A request finished well: grow, or shrink if answers as a whole got slower."""
        if not self.adaptive:
            return
        latency = self.clock() - ticket.started
        self._history.append(latency)
        if ticket.generation == self._generation:
            self._recent.append(latency)
        if len(self._history) > WARMUP_SAMPLES and len(self._recent) == RECENT_SAMPLES:
            floor = min(self._recent)
            baseline = min(self._history)
            if (
                floor > self.latency_spike_factor * baseline
                and floor - baseline > SPIKE_MIN_SECONDS
            ):
                self._decrease(
                    ticket,
                    f"latency: fastest of last {RECENT_SAMPLES} {floor:.3f}s > "
                    f"{self.latency_spike_factor}x baseline {baseline:.3f}s",
                )
                return
        if 2 * ticket.in_flight > ticket.limit:
            # Grown only while the limit is in use (more than half of it in flight), as TCP
            # grows its window only when the window limits it: a walk that asked for one page
            # (waiting for a total) must not leave with a limit its successes never tested.
            # About half of a full window's answers count, so each counts twice.
            self._grow(2)

    def _grow(self, weight: int) -> None:
        step = 1.0 if self._slow_start else 1.0 / max(1, self.limit)
        window = self._window + weight * step
        if self.ceiling is not None and math.floor(window) >= self.ceiling:
            if self.clock() < self._probe_at:
                # Stay below where the server pushed back until the next probe is due.
                window = min(window, max(self._window, self.ceiling - 1e-6))
            elif self.limit >= self.ceiling:
                self._probe_successes += 1
                if self._probe_successes >= 2 * self.ceiling:
                    # The probe held for two windows: the ceiling was a passing state.
                    log.debug("concurrency_probe_held", ceiling=self.ceiling)
                    self.ceiling = None
                    self._probe_interval = max(PROBE_INITIAL_SECONDS, self._probe_interval / 2)
                else:
                    window = min(window, float(self.ceiling))
            else:
                window = min(window, float(self.ceiling))  # the probe: back up to the ceiling
        if self._slow_start and math.floor(window) >= self.maximum:
            self._slow_start = False
        self._set(window, "success")

    def overloaded(self, ticket: Ticket, reason: str, pause: float = 0.0) -> None:
        """The server pushed back (429, 503, a timeout): shrink once per congestion event.

        ``pause``: the seconds the server asked everyone to wait (``Retry-After``). A refused
        probe costs about that much, so probes are spaced at least ``PROBE_PAUSE_MULTIPLE``
        times that far apart.
        """
        if self.adaptive:
            if pause > 0 and ticket.generation == self._generation:
                floor = min(PROBE_MAX_SECONDS, PROBE_PAUSE_MULTIPLE * pause)
                self._probe_interval = max(self._probe_interval, floor)
            self._decrease(ticket, reason)

    def _decrease(self, ticket: Ticket, reason: str) -> None:
        if ticket.generation != self._generation:
            # Sent under a limit that has been cut already: the same congestion event, which
            # cuts once; but it may show the server's limit lower than the first refusal did.
            if ticket.generation == self._generation - 1 and self.ceiling and ticket.in_flight:
                self.ceiling = max(min(self.ceiling, ticket.in_flight), self.limit + 1)
            return
        self._generation += 1
        refused_at = ticket.in_flight or self.limit
        if self.ceiling is not None and refused_at >= self.ceiling:
            # A probe at (or above) the remembered ceiling was refused: probe half as often.
            self._probe_interval = min(PROBE_MAX_SECONDS, self._probe_interval * 2)
        self._probe_at = self.clock() + self._probe_interval
        self._probe_successes = 0
        self._slow_start = False
        self._recent.clear()
        self._set(max(float(self.minimum), self._window * self.decrease_factor), reason)
        # Where it was refused, but never at or below the cut limit: the cut itself says that
        # much is fine (a request admitted alone can be refused by a rate limit, not concurrency).
        self.ceiling = max(refused_at, self.limit + 1)

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
