"""Real local HTTP sources for tests: aiohttp servers on 127.0.0.1, one per pagination style.

Each app records the requests it received in ``app[REQUESTS]`` (path, query, headers), so tests
can assert on what was asked and which headers were sent.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web
from aiohttp.test_utils import TestServer

REQUESTS: web.AppKey[list[dict[str, Any]]] = web.AppKey("requests", list)
Handler = Callable[[web.Request], Any]

TRICKY_TEXT = [
    'quote " double',
    "single ' quote",
    "tab\there",
    "new\nline",
    "carriage\r\nreturn",
    "back\\slash \\N \\\\",
    "unicode: Grüße, 日本語, עברית",
    "emoji 🚀🔥👩‍💻",
    "",
    "comma, semicolon; pipe |",
]


def make_records(count: int, *, start: int = 1) -> list[dict[str, Any]]:
    """Deterministic records with awkward text in ``name``."""
    return [
        {
            "id": index,
            "name": f"{TRICKY_TEXT[index % len(TRICKY_TEXT)]} #{index}",
            "score": index * 0.5,
            "active": index % 2 == 0,
            "nested": {"level": index % 3, "label": f"L{index % 3}"},
        }
        for index in range(start, start + count)
    ]


def json_response(
    body: Any, *, headers: dict[str, str] | None = None, status: int = 200
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body), content_type="application/json", headers=headers, status=status
    )


def _app(routes: dict[str, Handler]) -> web.Application:
    app = web.Application()
    app[REQUESTS] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> Any:
        app[REQUESTS].append(
            {"path": request.path, "query": dict(request.query), "headers": dict(request.headers)}
        )
        return await handler(request)

    app.middlewares.append(record)
    for path, handler in routes.items():
        app.router.add_get(path, handler)
    return app


@asynccontextmanager
async def serve(app: web.Application) -> AsyncIterator[str]:
    """Run ``app`` on an ephemeral 127.0.0.1 port; yield ``http://127.0.0.1:PORT``."""
    server = TestServer(app, host="127.0.0.1")
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def page_number_app(
    records: list[dict[str, Any]],
    *,
    cap: int | None = None,
    default_size: int = 10,
    total: bool = True,
    total_as_string: bool = False,
    past_end: str = "empty",
    wrap: bool = True,
) -> web.Application:
    """``/items?page=N&per_page=M``; past the end: empty, a 404, the last or first page again."""

    async def handler(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        size = int(request.query.get("per_page", str(default_size)))
        if cap:
            size = min(size, cap)
        last_page = max(1, -(-len(records) // size))
        if page > last_page and records:
            if past_end == "404":
                raise web.HTTPNotFound(text="no such page")
            if past_end == "repeat":
                page = last_page
            if past_end == "first":
                page = 1
        items = records[(page - 1) * size : page * size]
        if not wrap:
            return json_response(items)
        body: dict[str, Any] = {"data": {"items": items}}
        if total:
            body["meta"] = {"total": str(len(records)) if total_as_string else len(records)}
        return json_response(body)

    return _app({"/items": handler})


def offset_app(
    records: list[dict[str, Any]], *, cap: int | None = None, total: bool = True
) -> web.Application:
    """``/items?offset=N&limit=M`` returning ``{"results": [...], "count": total}``."""

    async def handler(request: web.Request) -> web.Response:
        offset = int(request.query.get("offset", "0"))
        limit = int(request.query.get("limit", "10"))
        if cap:
            limit = min(limit, cap)
        body: dict[str, Any] = {"results": records[offset : offset + limit]}
        if total:
            body["count"] = len(records)
        return json_response(body)

    return _app({"/items": handler})


def cursor_app(
    records: list[dict[str, Any]],
    *,
    page_size: int = 10,
    repeat_cursor_after: int | None = None,
    has_more: bool = True,
) -> web.Application:
    """``/items?cursor=C``; the body carries ``next_cursor`` (and ``has_more``)."""

    async def handler(request: web.Request) -> web.Response:
        position = int(request.query.get("cursor", "0") or "0")
        items = records[position : position + page_size]
        following = position + page_size
        more = following < len(records)
        cursor: Any = str(following) if more else None
        if repeat_cursor_after is not None and following >= repeat_cursor_after:
            cursor = str(repeat_cursor_after)
            more = True
        body: dict[str, Any] = {"items": items, "next_cursor": cursor}
        if has_more:
            body["has_more"] = more
        return json_response(body)

    return _app({"/items": handler})


def next_url_app(
    records: list[dict[str, Any]], *, page_size: int = 10, absolute: bool = True
) -> web.Application:
    """``/items?start=N``; the body carries ``links.next`` (absolute or relative)."""

    async def handler(request: web.Request) -> web.Response:
        start = int(request.query.get("start", "0"))
        items = records[start : start + page_size]
        following = start + page_size
        link: str | None = None
        if following < len(records):
            link = f"/items?start={following}"
            if absolute:
                link = f"{request.scheme}://{request.host}{link}"
        return json_response({"data": items, "links": {"next": link}})

    return _app({"/items": handler})


def link_header_app(
    records: list[dict[str, Any]], *, page_size: int = 10, absolute: bool = False
) -> web.Application:
    """A bare JSON list per page; ``Link`` carries next/prev/first/last, empty on the last page."""

    async def handler(request: web.Request) -> web.Response:
        page = int(request.query.get("p", "1"))
        items = records[(page - 1) * page_size : page * page_size]
        last = max(1, -(-len(records) // page_size))
        base = f"{request.scheme}://{request.host}" if absolute else ""
        links = [f'<{base}/items?p=1>; rel="first"', f'<{base}/items?p={last}>; rel="last"']
        if page > 1:
            links.append(f'<{base}/items?p={page - 1}>; rel="prev"')
        if page < last:
            links.insert(0, f'<{base}/items?p={page + 1}>; rel="next"')
        header = ", ".join(links) if page < last else ""
        return json_response(items, headers={"Link": header})

    return _app({"/items": handler})
