"""Fetching ahead by default, within one budget per source, against real local servers.

Counts, never timings: which pages were requested, how many at once, how many were refused.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from ingest.config import HttpSettings, PageNumberPagination, parse_config
from ingest.http.messages import HttpResponse, PageRequest
from ingest.paginate import Page, PageNumberPaginator
from tests.helpers import ids, make_config, run
from tests.servers import REQUESTS, json_response, make_records, page_number_app, serve

Connection = asyncpg.Connection
COUNTS: web.AppKey[dict[str, int]] = web.AppKey("counts", dict)


def test_defaults_fetch_ahead_within_the_concurrency_limit() -> None:
    settings = HttpSettings()
    assert settings.max_concurrency == 8
    assert settings.default_pages_ahead() == 16
    assert HttpSettings(max_concurrency=2).default_pages_ahead() == 4
    assert HttpSettings(max_concurrency=2, pages_ahead=1).default_pages_ahead() == 1


def _page(paginator: PageNumberPaginator, number: int, records: int) -> PageRequest | None:
    request = PageRequest("http://127.0.0.1:1/items").with_params(page=number)
    response = HttpResponse(request.full_url(), 200, {}, b"", {})
    return paginator.next_request(Page(request, response, [{"id": n} for n in range(records)]))


def test_without_a_total_guesses_grow_with_full_pages_and_stop_at_a_short_one() -> None:
    paginator = PageNumberPaginator(PageNumberPagination(style="page_number"))
    first = PageRequest("http://127.0.0.1:1/items").with_params(page=1)

    def ahead(request: PageRequest) -> int:
        return sum(paginator.predict(request, steps) is not None for steps in range(1, 65))

    assert ahead(first) == 1  # nothing seen yet: page 2, which the walk needs anyway
    for number, depth in ((1, 2), (2, 3), (3, 4), (4, 5)):
        following = _page(paginator, number, 100)
        assert following is not None
        assert ahead(following) == depth
    following = _page(paginator, 5, 37)  # short: the end is near
    assert following is not None
    assert ahead(following) == 0


async def test_with_a_total_expected_nothing_is_guessed_before_the_first_page() -> None:
    config = PageNumberPagination(style="page_number", total_path="meta.total")
    paginator = PageNumberPaginator(config)
    first = PageRequest("http://127.0.0.1:1/items").with_params(page=1)
    assert paginator.predict(first, 1) is None  # a one-page endpoint costs one request


async def test_page_size_guess_comes_from_pages_received_not_the_configured_size(
    database: str, db: Connection
) -> None:
    """page_size 50 against a server that caps pages at 10: 20 pages, each requested once."""
    app = page_number_app(make_records(200), cap=10)
    async with serve(app) as base:
        loaded = make_config(
            base,
            records_path="data.items",
            pagination={
                "style": "page_number",
                "page_size_param": "per_page",
                "page_size": 50,
                "total_path": "meta.total",
            },
            mode="append",
        )
        result = await run(loaded, database)
    assert await ids(db) == list(range(1, 201))
    assert result.endpoints["items"].pages == 20
    # Old guess: 50 a page, so pages past 4 were "beyond the total", thrown away and refetched.
    pages = sorted(int(request["query"]["page"]) for request in app[REQUESTS])
    assert pages == list(range(1, 21))


def counting_app(records: int, *, latency: float, refuse_concurrency: bool = False) -> Any:
    """``/a?page=N`` and ``/b?offset=N`` (with totals) and ``/p`` -> ``/p/{id}/c`` children.

    Counts requests, 429s and the most requests in flight at once over all routes together.
    ``refuse_concurrency``: 429 (``Retry-After: 0.2``) to any request while another is in flight.
    """
    data = make_records(records)
    counts = {"requests": 0, "refused": 0, "in_flight": 0, "max_in_flight": 0}

    def counted(answer: Any) -> Any:
        async def handler(request: web.Request) -> web.Response:
            counts["requests"] += 1
            if refuse_concurrency and counts["in_flight"] > 0:
                counts["refused"] += 1
                return web.Response(status=429, headers={"Retry-After": "0.2"})
            counts["in_flight"] += 1
            counts["max_in_flight"] = max(counts["max_in_flight"], counts["in_flight"])
            try:
                await asyncio.sleep(latency)
                return json_response(answer(request))
            finally:
                counts["in_flight"] -= 1

        return handler

    def pages(request: web.Request) -> dict[str, Any]:
        page = int(request.query.get("page", "1"))
        return {"data": data[(page - 1) * 5 : page * 5], "total": len(data)}

    def offsets(request: web.Request) -> dict[str, Any]:
        offset = int(request.query.get("offset", "0"))
        return {"data": data[offset : offset + 5], "total": len(data)}

    def parents(request: web.Request) -> dict[str, Any]:
        return {"data": data[:6]}

    def children(request: web.Request) -> dict[str, Any]:
        parent = int(request.match_info["id"])
        return {"data": [{"id": parent * 100 + n, "name": f"c{n}"} for n in range(3)]}

    app = web.Application()
    app[COUNTS] = counts
    app.router.add_get("/a", counted(pages))
    app.router.add_get("/b", counted(offsets))
    app.router.add_get("/p", counted(parents))
    app.router.add_get("/p/{id}/c", counted(children))
    return app


def _endpoint(name: str, path: str, pagination: str, extra: tuple[str, ...] = ()) -> list[str]:
    return [
        "[[endpoints]]",
        f'name = "{name}"',
        f'path = "{path}"',
        'records_path = "data"',
        *extra,
        f"pagination = {pagination}",
        "[endpoints.table]",
        f'name = "t_{name}"',
        'mode = "append"',
        "[endpoints.table.columns]",
        'id = { path = "id", type = "bigint" }',
    ]


def _source(base: str, http: str) -> Any:
    lines = [
        "[source]",
        'name = "budget"',
        f'base_url = "{base}"',
        "[http]",
        http,
        *_endpoint("a", "/a", '{ style = "page_number", total_path = "total" }'),
        *_endpoint("b", "/b", '{ style = "offset", limit = 5, total_path = "total" }'),
        *_endpoint("p", "/p", '{ style = "single" }'),
        *_endpoint("c", "/p/{id}/c", '{ style = "single" }', ('parent = "p"',)),
    ]
    return parse_config("\n".join(lines) + "\n", Path("budget.toml"), {})


async def _count(db: Connection, table: str) -> int:
    return int(await db.fetchval(f"SELECT count(DISTINCT id) FROM {table}"))


async def test_every_endpoint_of_a_source_shares_one_concurrency_budget(
    database: str, db: Connection
) -> None:
    """Two prefetching endpoints and a parent -> child pair: never more than 3 in flight."""
    app = counting_app(200, latency=0.02)
    async with serve(app) as base:
        loaded = _source(
            base,
            "max_concurrency = 3\npages_ahead = 16\nbackoff_initial = 0.01\nbackoff_max = 0.05",
        )
        await run(loaded, database)
    counts = app[COUNTS]
    assert [await _count(db, table) for table in ("t_a", "t_b", "t_p", "t_c")] == [200, 200, 6, 18]
    assert await db.fetchval("SELECT count(*) FROM t_a") == 200  # and no duplicates
    assert await db.fetchval("SELECT count(*) FROM t_b") == 200
    assert 2 <= counts["max_in_flight"] <= 3
    assert counts["refused"] == 0


async def test_a_server_that_refuses_concurrency_gets_a_serial_walk_after_one_refusal(
    database: str, db: Connection
) -> None:
    """Default settings (8 at once, 16 pages ahead) against a server that wants one at a time."""
    app = counting_app(200, latency=0.005, refuse_concurrency=True)
    async with serve(app) as base:
        loaded = _source(base, "backoff_initial = 0.01\nbackoff_max = 0.05\nmax_attempts = 10")
        result = await run(loaded, database)
    counts = app[COUNTS]
    assert await db.fetchval("SELECT count(*) FROM t_a") == 200
    assert await db.fetchval("SELECT count(*) FROM t_b") == 200
    assert await db.fetchval("SELECT count(*) FROM t_c") == 18
    # 40 + 40 pages, 1 parent page, 6 children: 87 requests a serial walk needs. Plain AIMD
    # grew back after every window and was refused again each time; now the limit stays at
    # the one request the server accepts, after the first refusals of the slow start.
    assert counts["refused"] <= 3
    assert counts["requests"] == 87 + counts["refused"]
    assert result.retries["http_429"] == counts["refused"]
