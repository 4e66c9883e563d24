"""Rate limiting, server-requested pauses, and adaptive (AIMD) concurrency."""

from __future__ import annotations

import asyncio
import json
import time
from contextlib import AsyncExitStack
from email.utils import formatdate
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from ingest.http.concurrency import AdaptiveConcurrency
from ingest.http.retry import parse_reset, parse_retry_after
from ingest.secrets import Redactor
from tests.helpers import ids, make_config, run
from tests.http_support import captured_logs
from tests.servers import json_response, make_records, serve

Connection = asyncpg.Connection
ARRIVALS: web.AppKey[list[float]] = web.AppKey("arrivals", list)


def paged_app(
    records: list[dict[str, Any]],
    *,
    max_in_flight: int | None = None,
    latency: float = 0.0,
    headers: dict[int, dict[str, str]] | None = None,
    refuse_first: dict[int, dict[str, str]] | None = None,
) -> web.Application:
    """``/items?page=N`` with one record per page.

    ``max_in_flight``: answer 429 (``Retry-After: 0.05``) above that many concurrent requests.
    ``headers``: extra response headers per page. ``refuse_first``: a 429 with these headers the
    first time a page is asked for.
    """
    in_flight = 0
    refused: set[int] = set()

    async def handler(request: web.Request) -> web.Response:
        nonlocal in_flight
        request.app[ARRIVALS].append(time.monotonic())
        page = int(request.query["page"])
        if refuse_first and page in refuse_first and page not in refused:
            refused.add(page)
            return web.Response(status=429, headers=refuse_first[page])
        if max_in_flight is not None and in_flight >= max_in_flight:
            return web.Response(status=429, headers={"Retry-After": "0.05"})
        in_flight += 1
        try:
            await asyncio.sleep(latency)
            return json_response(
                {"data": records[page - 1 : page], "total": len(records)},
                headers=(headers or {}).get(page),
            )
        finally:
            in_flight -= 1

    app = web.Application()
    app[ARRIVALS] = []
    app.router.add_get("/items", handler)
    return app


def _config(base: str, **http: Any) -> Any:
    return make_config(
        base,
        records_path="data",
        pagination={"style": "page_number", "total_path": "total"},
        http={"backoff_initial": 0.01, "backoff_max": 0.02, "max_attempts": 20, **http},
        mode="append",
    )


async def test_token_bucket_paces_requests_to_the_configured_rate(
    database: str, db: Connection
) -> None:
    app = paged_app(make_records(41))
    async with serve(app) as base:
        loaded = _config(
            base,
            max_requests_per_second=40,
            rate_limit_burst=1,
            pages_ahead=4,
            max_concurrency=4,
        )
        await run(loaded, database)
    assert await ids(db) == list(range(1, 42))
    arrivals = app[ARRIVALS]
    assert len(arrivals) == 41
    assert arrivals[-1] - arrivals[0] >= 40 / 40 * 0.9  # 40 gaps of 1/40 s, minus slack


async def test_429_shrinks_concurrency_and_every_change_is_logged(
    database: str, db: Connection
) -> None:
    app = paged_app(make_records(60), max_in_flight=2, latency=0.02)
    redactor = Redactor()
    async with serve(app) as base:
        loaded = _config(base, pages_ahead=8, max_concurrency=8, min_concurrency=1)
        with captured_logs(redactor) as logs:
            result = await run(loaded, database)
    assert await ids(db) == list(range(1, 61))
    assert result.retries["http_429"] >= 1
    changes = [
        event
        for event in map(json.loads, logs.getvalue().splitlines())
        if event["event"] == "concurrency_changed"
    ]
    cuts = [event for event in changes if event["after"] < event["before"]]
    assert cuts
    # Slow start (2, 3, 4...) ran into the server's limit of 2 and halved from there.
    assert cuts[0]["before"] > 2
    assert cuts[0] == {**cuts[0], "after": cuts[0]["before"] // 2, "reason": "HTTP 429"}
    assert all(1 <= event["after"] <= 8 for event in changes)


async def test_remaining_zero_pauses_until_the_reset_and_reset_header_name_is_configurable(
    database: str, db: Connection
) -> None:
    app = paged_app(
        make_records(3),
        headers={1: {"RateLimit-Remaining": "0", "RateLimit-Reset": "0.4"}},
        refuse_first={2: {"RateLimit-Reset": "0.3"}},  # a 429 without Retry-After
    )
    async with serve(app) as base:
        loaded = _config(
            base,
            rate_limit_reset_header="RateLimit-Reset",
            rate_limit_remaining_header="RateLimit-Remaining",
            pages_ahead=1,  # one page at a time: the arrivals below are in page order
        )
        result = await run(loaded, database)
    assert await ids(db) == [1, 2, 3]
    first, refused, retried, third = app[ARRIVALS]
    assert refused - first >= 0.4 - 0.02
    assert retried - refused >= 0.3 - 0.02
    assert third >= retried
    assert result.retries == {"http_429": 1}


async def test_aimd_halves_once_per_congestion_event_and_grows_one_per_window() -> None:
    limiter = AdaptiveConcurrency(minimum=2, maximum=8, latency_spike_factor=4.0, initial=8)
    assert limiter.limit == 8
    async with AsyncExitStack() as stack:
        tickets = [await stack.enter_async_context(limiter.slot()) for _ in range(8)]
        limiter.overloaded(tickets[-1], "HTTP 429")
        limiter.overloaded(tickets[-2], "HTTP 429")  # sent under the old limit: same event
    assert limiter.limit == 4
    async with AsyncExitStack() as stack:  # a full window of 4 requests, all answered
        window = [await stack.enter_async_context(limiter.slot()) for _ in range(4)]
    for ticket in window:
        limiter.success(ticket)
    assert limiter.limit == 5  # +1 after a window of 4 successes
    async with limiter.slot() as ticket:
        pass
    limiter.overloaded(ticket, "HTTP 503")
    assert limiter.limit == 2  # floor(5 * 0.5) = 2, the minimum
    async with limiter.slot() as ticket:
        pass
    limiter.overloaded(ticket, "timeout")
    assert limiter.limit == 2
    assert [change[:2] for change in limiter.changes] == [(8, 4), (4, 5), (5, 2)]


async def test_aimd_latency_rise_shrinks_the_limit() -> None:
    """Every answer slower, not one: the fastest of the recent answers rose (see test_aimd)."""
    limiter = AdaptiveConcurrency(minimum=1, maximum=8, latency_spike_factor=4.0, initial=8)
    for _ in range(10):
        async with limiter.slot() as ticket:
            ticket.started -= 0.01
        limiter.success(ticket)
    for _ in range(8):
        async with limiter.slot() as ticket:
            ticket.started -= 1.0
        limiter.success(ticket)
    assert limiter.limit == 4
    assert "latency" in limiter.changes[-1][2]


async def test_a_blip_of_milliseconds_on_a_fast_server_is_not_a_spike() -> None:
    limiter = AdaptiveConcurrency(minimum=1, maximum=8, latency_spike_factor=4.0, initial=8)
    for _ in range(10):
        async with limiter.slot() as ticket:
            ticket.started -= 0.001
        limiter.success(ticket)
    async with limiter.slot() as ticket:
        ticket.started -= 0.05  # 50x the average, but only 50 ms: a busy event loop, not the server
    limiter.success(ticket)
    assert limiter.limit == 8
    assert limiter.changes == []


async def test_waiters_beyond_the_limit_wait_for_a_slot() -> None:
    limiter = AdaptiveConcurrency(minimum=1, maximum=2, adaptive=False)
    running = 0
    peak = 0

    async def work() -> None:
        nonlocal running, peak
        async with limiter.slot():
            running += 1
            peak = max(peak, running)
            await asyncio.sleep(0.01)
            running -= 1

    await asyncio.gather(*(work() for _ in range(10)))
    assert peak == 2
    assert limiter.in_flight == 0


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("2", 2.0),
        ("0.25", 0.25),
        ("-3", 0.0),
        ("inf", None),
        ("nan", None),
        ("soon", None),
        ("", None),
        (None, None),
    ],
)
def test_retry_after_values(value: str | None, expected: float | None) -> None:
    assert parse_retry_after(value) == expected


def test_retry_after_http_date_and_reset_epochs() -> None:
    now = 1_700_000_000.0
    assert parse_retry_after(formatdate(now + 30, usegmt=True), now=lambda: now) == 30.0
    assert parse_reset(str(int(now + 12)), now=lambda: now) == 12.0
    assert parse_reset(str(int((now + 12) * 1000)), now=lambda: now) == 12.0  # milliseconds
    assert parse_reset("7", now=lambda: now) == 7.0
    assert parse_reset("inf", now=lambda: now) is None
