"""API shapes: POST with a JSON body the paginator writes into, a body ``next`` page number, and
query parameters carried onto next URLs for servers that drop them.

Every test walks a real local aiohttp server into a real PostgreSQL and compares exact rows.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from ingest.config import parse_config
from ingest.errors import ConfigError, ExitCode, PaginationError, SourceError
from ingest.http.messages import PageRequest
from tests.helpers import config_text, make_config, run, table_rows
from tests.processes import run_cli, spawn, wait_until
from tests.servers import REQUESTS, json_response, make_records, serve

Connection = asyncpg.Connection

COLUMNS = {"id": {"path": "id", "type": "bigint"}, "name": {"path": "name", "type": "text"}}
#: What the servers below hold: (id, name) rows.
RECORDS = make_records(47)
EXPECTED = [{"id": r["id"], "name": r["name"]} for r in RECORDS]
BODIES: web.AppKey[list[Any]] = web.AppKey("bodies", list)


def _post_app(handler: Any, path: str = "/search") -> web.Application:
    """An app that answers POSTs at ``path`` and records every request's JSON body."""
    app = web.Application()
    app[BODIES] = []
    app[REQUESTS] = []

    async def recorded(request: web.Request) -> web.StreamResponse:
        if request.content_type != "application/json":
            return web.Response(status=415, text=f"not JSON: {request.content_type}")
        body = await request.json()
        app[BODIES].append(body)
        app[REQUESTS].append({"query": dict(request.query), "headers": dict(request.headers)})
        response: web.StreamResponse = await handler(request, body)
        return response

    app.router.add_post(path, recorded)
    return app


def search_app(records: list[dict[str, Any]]) -> web.Application:
    """A search API: ``{"query": {...}, "from": N, "size": M}`` -> ``{"hits": [...], "total"}``;
    refuses a request that lost the query template."""

    async def handler(request: web.Request, body: dict[str, Any]) -> web.Response:
        if body.get("query") != {"match": {"kind": "fruit"}} or body.get("sort") != ["id"]:
            return web.Response(status=400, text="the query template is missing")
        start = int(body.get("from", 0))
        size = int(body.get("size", 10))
        return json_response({"hits": records[start : start + size], "total": len(records)})

    return _post_app(handler)


def graphql_app(
    records: list[dict[str, Any]], *, hold_after: str | None = None, release: Any = None
) -> web.Application:
    """GraphQL style: the cursor goes in ``variables.after``; ``hold_after``: the request for
    the page after that cursor waits for ``release``."""

    async def handler(request: web.Request, body: dict[str, Any]) -> web.Response:
        if "items(" not in str(body.get("query")):
            return web.Response(status=400, text="no query")
        variables = body.get("variables", {})
        after = variables.get("after")
        if hold_after is not None and after == hold_after:
            await release.wait()
        start = int(after.removeprefix("c")) if after else 0
        first = int(variables["first"])
        page = records[start : start + first]
        end = start + len(page)
        more = end < len(records)
        return json_response(
            {
                "data": {
                    "items": {
                        "nodes": page,
                        "pageInfo": {"endCursor": f"c{end}", "hasNextPage": more},
                    }
                }
            }
        )

    return _post_app(handler, "/graphql")


GRAPHQL_QUERY = "query($first: Int!, $after: String) { items(first: $first, after: $after) { id } }"


def graphql_options(**overrides: Any) -> dict[str, Any]:
    options: dict[str, Any] = {
        "path": "/graphql",
        "records_path": "data.items.nodes",
        "columns": COLUMNS,
        "pagination": {
            "style": "cursor",
            "cursor_path": "data.items.pageInfo.endCursor",
            "has_more_path": "data.items.pageInfo.hasNextPage",
            "cursor_param": "variables.after",
            "location": "body",
        },
        "endpoint_options": {
            "method": "POST",
            "body": {"query": GRAPHQL_QUERY, "variables": {"first": 5}},
        },
    }
    options.update(overrides)
    return options


async def _rows(db: Connection) -> list[dict[str, Any]]:
    return [{"id": row["id"], "name": row["name"]} for row in await table_rows(db)]


@pytest.mark.parametrize("typed_decode", [True, False])
async def test_post_offset_in_the_body_keeps_the_template(
    database: str, db: Connection, typed_decode: bool
) -> None:
    app = search_app(RECORDS)
    async with serve(app) as base:
        loaded = make_config(
            base,
            path="/search",
            records_path="hits",
            columns=COLUMNS,
            params={"pretty": "false"},
            pipeline={"typed_decode": typed_decode},
            source={"headers": {"Authorization": "Bearer s3cret"}},
            pagination={
                "style": "offset",
                "offset_param": "from",
                "limit_param": "size",
                "limit": 10,
                "total_path": "total",
                "location": "body",
            },
            endpoint_options={
                "method": "POST",
                "body": {"query": {"match": {"kind": "fruit"}}, "sort": ["id"]},
            },
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 47
    assert await _rows(db) == EXPECTED
    assert [body["from"] for body in app[BODIES]] == [0, 10, 20, 30, 40]
    assert all(body["size"] == 10 for body in app[BODIES])
    assert all(request["query"] == {"pretty": "false"} for request in app[REQUESTS])
    assert all(request["headers"]["Authorization"] == "Bearer s3cret" for request in app[REQUESTS])


async def test_post_page_number_in_a_nested_body_path(database: str, db: Connection) -> None:
    async def handler(request: web.Request, body: dict[str, Any]) -> web.Response:
        page = int(body["paging"]["page"])
        size = int(body["paging"]["per_page"])
        assert body["filter"] == {"kind": "fruit"}
        return json_response({"data": RECORDS[(page - 1) * size : page * size]})

    app = _post_app(handler)
    async with serve(app) as base:
        loaded = make_config(
            base,
            path="/search",
            records_path="data",
            columns=COLUMNS,
            http={"pages_ahead": 1},  # exact requests below; ahead, see the next test
            pagination={
                "style": "page_number",
                "page_param": "paging.page",
                "page_size_param": "paging.per_page",
                "page_size": 20,
                "location": "body",
            },
            endpoint_options={"method": "POST", "body": {"filter": {"kind": "fruit"}}},
        )
        await run(loaded, database)
    assert await _rows(db) == EXPECTED
    # Pages 1-3 hold records, page 4 is empty: the walk ends there.
    assert [body["paging"] for body in app[BODIES]] == [
        {"page": page, "per_page": 20} for page in (1, 2, 3, 4)
    ]


async def test_post_bodies_are_fetched_ahead_like_query_pages(
    database: str, db: Connection
) -> None:
    """With pages fetched ahead (the default), the guessed requests carry the page in the body
    too; the rows are exact and every body keeps the template."""

    async def handler(request: web.Request, body: dict[str, Any]) -> web.Response:
        page = int(body["page"])
        assert body["filter"] == {"kind": "fruit"}
        return json_response({"data": RECORDS[(page - 1) * 5 : page * 5], "total": 47})

    app = _post_app(handler)
    async with serve(app) as base:
        loaded = make_config(
            base,
            path="/search",
            records_path="data",
            columns=COLUMNS,
            http={"pages_ahead": 4},
            pagination={"style": "page_number", "total_path": "total", "location": "body"},
            endpoint_options={"method": "POST", "body": {"filter": {"kind": "fruit"}}},
        )
        await run(loaded, database)
    assert await _rows(db) == EXPECTED
    pages = sorted(body["page"] for body in app[BODIES])
    assert pages[:10] == list(range(1, 11))


async def test_graphql_cursor_in_the_body(database: str, db: Connection) -> None:
    app = graphql_app(RECORDS)
    async with serve(app) as base:
        await run(make_config(base, **graphql_options()), database)
    assert await _rows(db) == EXPECTED
    afters = [body["variables"].get("after") for body in app[BODIES]]
    assert afters == [None, *(f"c{n}" for n in range(5, 47, 5))]
    assert all(body["query"] == GRAPHQL_QUERY for body in app[BODIES])


async def test_a_post_body_paginator_resumes_from_the_checkpointed_body(
    cli_env: dict[str, str], db: Connection, tmp_path: Path
) -> None:
    """SIGKILL while a page is held: the checkpoint holds the body with the cursor, and the next
    run's first request is that body, not the first page; the table is exact."""
    release = asyncio.Event()
    app = graphql_app(RECORDS, hold_after="c25", release=release)
    async with serve(app) as base:
        config = tmp_path / "graphql.toml"
        options = graphql_options(pipeline={"batch_size": 5, "batch_seconds": 0.1})
        config.write_text(config_text(base, **options))
        cli = await spawn(["run", str(config)], cli_env, tmp_path, "killed")

        async def at_c25() -> bool:
            state = await db.fetchval("SELECT state FROM ingest.checkpoints")
            return state is not None and "c25" in state

        async def held() -> bool:
            return any(body["variables"].get("after") == "c25" for body in app[BODIES])

        await wait_until(held, 60, "the held request")
        await wait_until(at_c25, 60, "a checkpoint at cursor c25")
        await cli.kill()
        state = orjson.loads(await db.fetchval("SELECT state FROM ingest.checkpoints"))
        request = state["request"]
        assert request["method"] == "POST"
        assert orjson.loads(request["body"]) == {
            "query": GRAPHQL_QUERY,
            "variables": {"first": 5, "after": "c25"},
        }
        assert await db.fetchval("SELECT count(*) FROM items") == 25
        release.set()
        before = len(app[BODIES])
        code, output = await run_cli(["run", str(config)], cli_env, tmp_path, "resumed")
        assert code == ExitCode.OK, output
    assert app[BODIES][before]["variables"]["after"] == "c25"
    assert await _rows(db) == EXPECTED


def next_number_app(records: list[dict[str, Any]], *, as_string: bool = False) -> web.Application:
    """``GET /items?page=N`` -> ``{"data": [...], "next": M}``; page numbers go 1, 3, 5, ...
    (the server names them; ``next`` is absent on the last page)."""
    size = 10

    async def handler(request: web.Request) -> web.Response:
        number = int(request.query.get("page", "1"))
        index = (number - 1) // 2
        body: dict[str, Any] = {"data": records[index * size : (index + 1) * size]}
        if (index + 1) * size < len(records):
            following = number + 2
            body["next"] = str(following) if as_string else following
        return json_response(body)

    app = web.Application()
    app[REQUESTS] = []

    async def recorded(request: web.Request) -> web.Response:
        app[REQUESTS].append({"query": dict(request.query)})
        return await handler(request)

    app.router.add_get("/items", recorded)
    return app


@pytest.mark.parametrize("as_string", [False, True])
async def test_a_body_next_page_number(database: str, db: Connection, as_string: bool) -> None:
    app = next_number_app(RECORDS, as_string=as_string)
    async with serve(app) as base:
        loaded = make_config(
            base,
            records_path="data",
            columns=COLUMNS,
            http={"pages_ahead": 4},  # no guessing: the server names the next page
            pagination={"style": "page_number", "next_page_path": "next"},
        )
        await run(loaded, database)
    assert await _rows(db) == EXPECTED
    assert [request["query"]["page"] for request in app[REQUESTS]] == ["1", "3", "5", "7", "9"]


async def test_a_next_page_that_is_not_a_number_stops_with_a_clear_error(
    database: str,
) -> None:
    async def handler(request: web.Request) -> web.Response:
        return json_response({"data": RECORDS[:3], "next": "/items?page=2"})

    app = web.Application()
    app.router.add_get("/items", handler)
    async with serve(app) as base:
        loaded = make_config(
            base,
            records_path="data",
            columns=COLUMNS,
            pagination={"style": "page_number", "next_page_path": "next"},
        )
        with pytest.raises(PaginationError, match=r"next is not a page number: '/items\?page=2'"):
            await run(loaded, database)


def dropping_app(records: list[dict[str, Any]], style: str) -> web.Application:
    """Needs ``kind=fruit`` on every request (else 400); its next URLs drop it."""
    size = 10
    app = web.Application()
    app[REQUESTS] = []

    async def handler(request: web.Request) -> web.Response:
        app[REQUESTS].append({"query": dict(request.query)})
        if request.query.get("kind") != "fruit":
            return web.Response(status=400, text="kind is required")
        start = int(request.query.get("from", "0"))
        page = records[start : start + size]
        following = f"/items?from={start + size}" if start + size < len(records) else None
        if style == "link_header":
            headers = {"Link": f'<{following}>; rel="next"'} if following else {}
            return json_response(page, headers=headers)
        return json_response({"data": page, "next": following})

    app.router.add_get("/items", handler)
    return app


STYLES = {
    "next_url": ("data", {"style": "next_url", "next_url_path": "next"}),
    "link_header": ("", {"style": "link_header"}),
}


@pytest.mark.parametrize("style", sorted(STYLES))
async def test_carry_params_onto_next_urls(database: str, db: Connection, style: str) -> None:
    records_path, pagination = STYLES[style]
    app = dropping_app(RECORDS, style)
    async with serve(app) as base:
        loaded = make_config(
            base,
            records_path=records_path,
            columns=COLUMNS,
            params={"kind": "fruit", "from": 0},
            pagination={**pagination, "carry_params": True},
        )
        await run(loaded, database)
    assert await _rows(db) == EXPECTED
    # The URL's own ``from`` wins over the configured one; ``kind`` rides along.
    assert [request["query"] for request in app[REQUESTS]] == [
        {"kind": "fruit", "from": str(start)} for start in range(0, 47, 10)
    ]


@pytest.mark.parametrize("style", sorted(STYLES))
async def test_without_carry_params_next_urls_are_requested_as_given(
    database: str, style: str
) -> None:
    records_path, pagination = STYLES[style]
    app = dropping_app(RECORDS, style)
    async with serve(app) as base:
        loaded = make_config(
            base,
            records_path=records_path,
            columns=COLUMNS,
            params={"kind": "fruit"},
            pagination=pagination,
            http={"max_attempts": 1},
        )
        with pytest.raises(SourceError, match="HTTP 400: kind is required"):
            await run(loaded, database)
    assert [request["query"] for request in app[REQUESTS]] == [{"kind": "fruit"}, {"from": "10"}]


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"body": {"q": 1}}, 'body needs method = "POST"'),
        (
            {"pagination": {"style": "cursor", "cursor_path": "n", "location": "body"}},
            'pagination.location = "body" needs method = "POST"',
        ),
    ],
)
def test_body_settings_need_post(options: dict[str, Any], message: str) -> None:
    pagination = options.pop("pagination", {"style": "single"})
    text = config_text(
        "http://127.0.0.1:1", pagination=pagination, columns=COLUMNS, endpoint_options=options
    )
    with pytest.raises(ConfigError, match=message):
        parse_config(text, Path("test.toml"), {})


def test_a_post_request_round_trips_through_checkpoint_state() -> None:
    request = PageRequest("http://h/search", (("a", "1"),), "POST", '{"q":{"x":1}}')
    moved = request.with_body_value("page.number", 3)
    assert moved.body_value("page.number") == 3
    assert orjson.loads(moved.body or "") == {"q": {"x": 1}, "page": {"number": 3}}
    assert PageRequest.from_state(moved.to_state()) == moved
    assert request.key() != moved.key()  # the loop guard tells bodies apart
    assert moved.with_body_value("page.number", None).body_value("page.number") is None
    # A GET's state is what it always was, so older checkpoints resume unchanged.
    plain = PageRequest("http://h/items", (("page", "2"),))
    assert plain.to_state() == {"url": "http://h/items", "params": [["page", "2"]]}
    assert PageRequest.from_state(plain.to_state()) == plain
    with pytest.raises(ValueError, match="not an object"):
        request.with_body_value("q.x.y", 1)


async def test_validate_probes_a_post_endpoint_with_its_body(
    cli_env: dict[str, str], tmp_path: Path
) -> None:
    app = graphql_app(RECORDS)
    async with serve(app) as base:
        config = tmp_path / "graphql.toml"
        config.write_text(config_text(base, **graphql_options()))
        code, output = await run_cli(["validate", str(config)], cli_env, tmp_path, "validate")
    assert code == ExitCode.OK, output
    assert "1 endpoint(s) answered" in output
    assert app[BODIES] == [{"query": GRAPHQL_QUERY, "variables": {"first": 5}}]
