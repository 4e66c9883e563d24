"""Fetching K pages ahead: faster, same rows, same stop conditions, checkpoints still in order."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from ingest.errors import InterruptedRun
from ingest.events import NullObserver
from tests.helpers import ids, make_config, run
from tests.servers import REQUESTS, json_response, make_records, offset_app, page_number_app, serve

Connection = asyncpg.Connection


STATE: web.AppKey[dict[str, int]] = web.AppKey("state", dict)


def slow_app(records: list[dict[str, Any]], latency: float) -> web.Application:
    """``/items?page=N&per_page=M`` answering after ``latency`` seconds; tracks concurrency."""
    state = {"in_flight": 0, "max_in_flight": 0}

    async def handler(request: web.Request) -> web.Response:
        state["in_flight"] += 1
        state["max_in_flight"] = max(state["max_in_flight"], state["in_flight"])
        try:
            await asyncio.sleep(latency)
            page = int(request.query["page"])
            size = int(request.query["per_page"])
            items = records[(page - 1) * size : page * size]
            return json_response({"data": items, "total": len(records)})
        finally:
            state["in_flight"] -= 1

    app = web.Application()
    app[STATE] = state
    app.router.add_get("/items", handler)
    return app


async def test_eight_pages_ahead_is_at_least_five_times_faster_with_identical_rows(
    database: str, db: Connection
) -> None:
    records = make_records(400)
    app = slow_app(records, latency=0.05)
    seconds: dict[int, float] = {}
    async with serve(app) as base:
        for pages_ahead in (1, 8):
            loaded = make_config(
                base,
                records_path="data",
                params={"per_page": 2},  # 200 tiny pages
                pagination={"style": "page_number", "total_path": "total"},
                http={"pages_ahead": pages_ahead, "max_concurrency": 8},
                pipeline={"batch_size": 100},
                table=f"k{pages_ahead}",
                endpoint=f"k{pages_ahead}",
            )
            started = time.monotonic()
            result = await run(loaded, database)
            seconds[pages_ahead] = time.monotonic() - started
            assert result.endpoints[f"k{pages_ahead}"].pages == 200
    assert seconds[1] >= 5 * seconds[8], seconds
    assert app[STATE]["max_in_flight"] == 8
    columns = "id, name, score, active, level, _ingest_raw"
    serial = await db.fetch(f"SELECT {columns} FROM k1 ORDER BY id")
    ahead = await db.fetch(f"SELECT {columns} FROM k8 ORDER BY id")
    assert len(serial) == 400
    assert [dict(row) for row in serial] == [dict(row) for row in ahead]


@pytest.mark.parametrize("past_end", ["empty", "404", "repeat"])
async def test_stop_conditions_hold_and_speculative_pages_past_the_end_are_discarded(
    database: str, db: Connection, past_end: str
) -> None:
    app = page_number_app(make_records(30), total=False, past_end=past_end, wrap=False)
    async with serve(app) as base:
        loaded = make_config(
            base,
            params={"per_page": 10},
            pagination={"style": "page_number"},
            http={"pages_ahead": 4},
            mode="append",
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 30
    assert await ids(db) == list(range(1, 31))
    # Pages 1-3 hold data, page 4 ends the walk; anything further was speculative (<= 3 more).
    assert 4 <= len(app[REQUESTS]) <= 7


async def test_known_total_caps_prefetch_so_no_request_goes_past_the_end(
    database: str, db: Connection
) -> None:
    app = page_number_app(make_records(247))
    async with serve(app) as base:
        loaded = make_config(
            base,
            records_path="data.items",
            params={"per_page": 20},
            pagination={"style": "page_number", "total_path": "meta.total"},
            http={"pages_ahead": 4},
        )
        await run(loaded, database)
    assert await ids(db) == list(range(1, 248))
    assert sorted(int(request["query"]["page"]) for request in app[REQUESTS]) == list(range(1, 14))


async def test_offset_prefetch_recovers_from_a_server_that_caps_the_page_size(
    database: str, db: Connection
) -> None:
    app = offset_app(make_records(95), cap=10)
    async with serve(app) as base:
        loaded = make_config(
            base,
            records_path="results",
            pagination={"style": "offset", "limit": 50, "total_path": "count"},
            http={"pages_ahead": 4},
            mode="append",
        )
        result = await run(loaded, database)
    assert await ids(db) == list(range(1, 96))
    assert result.endpoints["items"].pages == 10
    offsets = [int(request["query"]["offset"]) for request in app[REQUESTS]]
    assert set(range(0, 95, 10)) <= set(offsets)
    assert len(offsets) <= 10 + 3  # only the first guesses (steps of 50) were wasted


class StopAfter(NullObserver):
    """Sets the run's stop event once ``pages`` pages have been fetched (a graceful SIGTERM)."""

    def __init__(self, stop: asyncio.Event, pages: int) -> None:
        self.stop = stop
        self.pages = pages

    def page_fetched(self, endpoint: str, *, records: int, queue_depth: int) -> None:
        self.pages -= 1
        if self.pages <= 0:
            self.stop.set()


async def test_interrupted_prefetching_run_resumes_without_loss_or_duplicates(
    database: str, db: Connection
) -> None:
    app = slow_app(make_records(120), latency=0.01)
    async with serve(app) as base:
        loaded = make_config(
            base,
            records_path="data",
            params={"per_page": 4},
            pagination={"style": "page_number", "total_path": "total"},
            http={"pages_ahead": 8, "max_concurrency": 8},
            mode="append",  # a page written twice would show as duplicate ids
        )
        stop = asyncio.Event()
        with pytest.raises(InterruptedRun):
            await run(loaded, database, stop=stop, observer=StopAfter(stop, 7))
        first = await ids(db)
        assert 0 < len(first) < 120
        assert first == list(range(1, len(first) + 1))  # a contiguous prefix
        result = await run(loaded, database)
    assert result.endpoints["items"].resumed
    assert await ids(db) == list(range(1, 121))
