"""Adaptive concurrency driven deterministically: a fake clock and explicit answer sequences.

No server and no sleeping: each test plays a server's behaviour round by round against
:class:`AdaptiveConcurrency` and checks the decisions it makes (limits, cuts, probes).
"""

from __future__ import annotations

import itertools
import math
import random
from contextlib import AsyncExitStack

from ingest.http.concurrency import (
    PROBE_INITIAL_SECONDS,
    AdaptiveConcurrency,
    Ticket,
)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def _round(limiter: AdaptiveConcurrency) -> list[Ticket]:
    """Admit as many requests as the limit allows right now (all sent at the same moment)."""
    tickets: list[Ticket] = []
    async with AsyncExitStack() as stack:
        for _ in range(limiter.limit):
            tickets.append(await stack.enter_async_context(limiter.slot()))
    return tickets


async def _walk_refusing_server(
    pages: int, latency: float, retry_after: float
) -> tuple[float, int]:
    """A server that answers 429 (Retry-After) to any second request in flight.

    Returns (seconds taken, requests refused) for fetching ``pages`` pages.
    """
    clock = FakeClock()
    limiter = AdaptiveConcurrency(minimum=1, maximum=8, clock=clock)
    started = clock.now
    done = refused = 0
    while done < pages:
        tickets = await _round(limiter)
        clock.now += latency
        first, *others = tickets
        limiter.success(first)
        done += 1
        for ticket in others:
            limiter.overloaded(ticket, "HTTP 429")
            refused += 1
        if others:
            clock.now += retry_after  # the whole source pauses as the server asked
    return clock.now - started, refused


async def test_a_server_refusing_concurrency_costs_at_most_a_fifth_over_the_serial_walk() -> None:
    seconds, refused = await _walk_refusing_server(200, latency=0.1, retry_after=1.0)
    serial = 200 * 0.1
    assert seconds <= 1.2 * serial
    assert refused <= 3  # the first refusal and a probe; not one per window of successes


async def test_probes_above_the_ceiling_are_exponentially_spaced() -> None:
    clock = FakeClock()
    limiter = AdaptiveConcurrency(minimum=1, maximum=8, clock=clock)
    refusals: list[float] = []
    for _ in range(3000):  # 3000 rounds of 0.1 s: five minutes against the refusing server
        tickets = await _round(limiter)
        clock.now += 0.1
        limiter.success(tickets[0])
        for ticket in tickets[1:]:
            limiter.overloaded(ticket, "HTTP 429")
        if len(tickets) > 1:
            refusals.append(clock.now)
            clock.now += 1.0
    gaps = [later - earlier for earlier, later in itertools.pairwise(refusals)]
    assert len(refusals) <= 6
    assert gaps[0] >= PROBE_INITIAL_SECONDS
    assert all(later >= 1.9 * earlier for earlier, later in itertools.pairwise(gaps))
    assert limiter.ceiling == 2
    assert limiter.limit == 1


async def test_a_probe_that_holds_forgets_the_ceiling_and_growth_resumes() -> None:
    clock = FakeClock()
    limiter = AdaptiveConcurrency(minimum=1, maximum=8, clock=clock, initial=4)
    tickets = await _round(limiter)
    limiter.overloaded(tickets[-1], "HTTP 429")  # a passing overload at 4
    assert (limiter.limit, limiter.ceiling) == (2, 4)
    for _ in range(50):  # the server is fine now, but the limit stays below 4 until the probe
        for ticket in await _round(limiter):
            limiter.success(ticket)
        clock.now += 0.1
    assert limiter.limit == 3
    clock.now += PROBE_INITIAL_SECONDS
    for _ in range(20):
        for ticket in await _round(limiter):
            limiter.success(ticket)
        clock.now += 0.1
    assert limiter.ceiling is None
    assert limiter.limit == 8


async def test_slow_start_doubles_per_round_trip_up_to_the_maximum() -> None:
    clock = FakeClock()
    limiter = AdaptiveConcurrency(minimum=1, maximum=16, clock=clock)
    seen = []
    for _ in range(5):
        tickets = await _round(limiter)
        seen.append(len(tickets))
        clock.now += 0.1
        for ticket in tickets:
            limiter.success(ticket)
    assert seen == [2, 4, 8, 16, 16]


def _lognormal(rng: random.Random, median: float, sigma: float) -> float:
    return median * math.exp(rng.gauss(0.0, sigma))


async def _feed(limiter: AdaptiveConcurrency, clock: FakeClock, latencies: list[float]) -> None:
    """Answers of the given latencies, one after another, each sent under the current limit."""
    for latency in latencies:
        async with limiter.slot() as ticket:
            clock.now += latency
        limiter.success(ticket)


async def test_heavy_tailed_latency_alone_is_not_congestion() -> None:
    """Lognormal, median 0.09 s, sigma 1 (p99 ~0.9 s): the old rule halved 7 times in 200."""
    rng = random.Random(14)
    latencies = [_lognormal(rng, 0.09, 1.0) for _ in range(2000)]
    assert sorted(latencies)[int(0.99 * len(latencies))] > 0.8  # the tail really is there
    clock = FakeClock()
    limiter = AdaptiveConcurrency(minimum=1, maximum=8, clock=clock, initial=8)
    await _feed(limiter, clock, latencies)
    assert [change for change in limiter.changes if "latency" in change[2]] == []
    assert limiter.limit == 8


async def test_a_real_latency_rise_cuts_once_per_event() -> None:
    """Every answer 0.1 s, then every answer 2 s (a queue in front of the server)."""
    clock = FakeClock()
    limiter = AdaptiveConcurrency(minimum=1, maximum=8, clock=clock, initial=8)
    await _feed(limiter, clock, [0.1] * 50)
    await _feed(limiter, clock, [2.0] * 12)
    cuts = [change for change in limiter.changes if "latency" in change[2]]
    assert cuts == [(8, 4, cuts[0][2])]
    assert limiter.ceiling == 5  # one above the cut: answers one at a time say no more


async def test_answers_sent_before_a_cut_do_not_cut_again() -> None:
    clock = FakeClock()
    limiter = AdaptiveConcurrency(minimum=1, maximum=8, clock=clock, initial=8)
    await _feed(limiter, clock, [0.1] * 20)
    tickets = await _round(limiter)
    clock.now += 2.0
    for ticket in tickets[:8]:  # eight slow answers in flight together: the limit rises once
        limiter.success(ticket)
    limiter.overloaded(tickets[0], "timeout")  # sent under the old limit: same event
    assert [change[:2] for change in limiter.changes if change[1] < change[0]] == [(8, 4)]
