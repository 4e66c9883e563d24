"""A page-number API whose pages can be held back, failed or made flaky, for operator tests.

Holding a page (``hold_at``) keeps a run in progress for as long as a test needs to look at it
(status, metrics, progress); the test releases it with ``app[RELEASE].set()``.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

from tests.servers import REQUESTS, _app, json_response, make_records

RELEASE: web.AppKey[asyncio.Event] = web.AppKey("release", asyncio.Event)
HOLDING: web.AppKey[asyncio.Event] = web.AppKey("holding", asyncio.Event)


def gated_app(
    total: int,
    *,
    hold_at: int | None = None,
    fail_at: int | None = None,
    unavailable_once_at: int | None = None,
    page_size: int = 10,
) -> web.Application:
    """``/items?page=N``: ``{"data": [...], "total": total}``, ``page_size`` records a page.

    A held page is answered (or failed, if it is also ``fail_at``) once released.
    """
    records = make_records(total)
    seen_unavailable: set[int] = set()

    async def handler(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        if page == unavailable_once_at and page not in seen_unavailable:
            seen_unavailable.add(page)
            return web.Response(status=503, text="try again")
        if page == hold_at:
            app[HOLDING].set()
            await app[RELEASE].wait()
        if page == fail_at:
            return web.Response(status=400, text="bad page")
        items = records[(page - 1) * page_size : page * page_size]
        return json_response({"data": items, "total": total})

    app = _app({"/items": handler})
    app[RELEASE] = asyncio.Event()
    app[HOLDING] = asyncio.Event()
    return app


async def wait_committed(db: Any, records: int) -> None:
    """Wait (30 s at most) until the endpoint's checkpoint covers ``records`` records."""
    async with asyncio.timeout(30):
        # Polling is the only way to see another connection's commits.
        while await db.fetchval("SELECT records FROM ingest.checkpoints") != records:  # noqa: ASYNC110
            await asyncio.sleep(0.05)


def gated_config(**overrides: Any) -> dict[str, Any]:
    """``make_config`` options matching :func:`gated_app`."""
    options: dict[str, Any] = {
        "records_path": "data",
        "pagination": {"style": "page_number", "total_path": "total"},
        # One page at a time: the gate holds the walk at one page, and counts are exact.
        "http": {"backoff_initial": 0.01, "backoff_max": 0.05, "pages_ahead": 1},
        "pipeline": {"batch_size": 10, "batch_seconds": 0.2, "consumers": 1},
    }
    options.update(overrides)
    return options


__all__ = ["HOLDING", "RELEASE", "REQUESTS", "gated_app", "gated_config", "wait_committed"]
