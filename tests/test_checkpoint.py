"""Checkpoints commit with their batch; a failed run resumes exactly where it stopped."""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import pytest
from aiohttp import web

from ingest.errors import SourceError
from tests.helpers import ids, make_config, run
from tests.servers import REQUESTS, json_response, make_records, serve

HEALED: web.AppKey[dict[str, bool]] = web.AppKey("healed", dict)


def breaking_app(records: list[dict[str, Any]], *, fail_page: int) -> web.Application:
    """Page-number API (10 per page) that answers 400 on ``fail_page`` until healed."""
    app = web.Application()
    app[HEALED] = {"yes": False}
    app[REQUESTS] = []

    async def handler(request: web.Request) -> web.Response:
        page = int(request.query["page"])
        app[REQUESTS].append({"page": page})
        if page == fail_page and not app[HEALED]["yes"]:
            return web.Response(status=400, text="bad request: page parameter rejected")
        return json_response(records[(page - 1) * 10 : page * 10])

    app.router.add_get("/items", handler)
    return app


async def test_failed_run_keeps_committed_prefix_and_next_run_resumes_there(
    database: str, db: asyncpg.Connection
) -> None:
    records = make_records(95)
    app = breaking_app(records, fail_page=6)
    async with serve(app) as base:
        loaded = make_config(
            base,
            pagination={"style": "page_number"},
            pipeline={"batch_size": 10, "consumers": 2, "queue_size": 2},
        )
        with pytest.raises(SourceError, match=r"endpoint items: .*page=6.*HTTP 400: bad request"):
            await run(loaded, database)
        assert not [
            t for t in asyncio.all_tasks() if t.get_name().startswith(("produce:", "consume:"))
        ]
        committed = await ids(db)
        checkpoint = await db.fetchrow("SELECT state, done, records FROM ingest.checkpoints")
        assert checkpoint is not None and checkpoint["done"] is False
        # The checkpoint covers exactly the committed rows: whole pages, a contiguous prefix.
        assert committed == list(range(1, len(committed) + 1))
        assert checkpoint["records"] == len(committed)
        assert len(committed) % 10 == 0 and len(committed) <= 50

        app[HEALED]["yes"] = True
        app[REQUESTS].clear()
        result = await run(loaded, database)
        assert result.endpoints["items"].resumed is True
        assert app[REQUESTS][0]["page"] == len(committed) // 10 + 1
    assert await ids(db) == list(range(1, 96))
    assert await db.fetchval("SELECT count(*) FROM items") == 95
    final = await db.fetchrow("SELECT done, records FROM ingest.checkpoints")
    assert final is not None and final["done"] is True and final["records"] == 95


def slow_app(records: list[dict[str, Any]], delay: float) -> web.Application:
    async def handler(request: web.Request) -> web.Response:
        await asyncio.sleep(delay)
        page = int(request.query["page"])
        return json_response(records[(page - 1) * 5 : page * 5])

    app = web.Application()
    app.router.add_get("/items", handler)
    return app


async def test_slow_source_is_committed_by_time_not_only_by_count(
    database: str, db: asyncpg.Connection
) -> None:
    async with serve(slow_app(make_records(30), delay=0.15)) as base:
        loaded = make_config(
            base,
            pagination={"style": "page_number"},
            pipeline={"batch_size": 100_000, "batch_seconds": 0.3, "consumers": 1},
            http={"pages_ahead": 1},  # one slow page at a time: the walk takes ~1 s
        )
        result = await run(loaded, database)
    stats = result.endpoints["items"]
    assert stats.records == 30
    assert stats.batches >= 3  # 7 pages over ~1 s with a 0.3 s window
    assert await ids(db) == list(range(1, 31))
