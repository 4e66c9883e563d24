"""Every pagination style, end to end: real local server -> pipeline -> real PostgreSQL."""

from __future__ import annotations

import asyncpg
import orjson
import pytest

from ingest.errors import PaginationError, SourceError
from tests.helpers import ids, make_config, run, table_rows
from tests.servers import (
    REQUESTS,
    cursor_app,
    json_response,
    link_header_app,
    make_records,
    next_url_app,
    offset_app,
    page_number_app,
    serve,
)

Connection = asyncpg.Connection


async def test_page_number_lands_every_record_once_with_tricky_text(
    database: str, db: Connection
) -> None:
    records = make_records(247)  # not a multiple of the page size
    async with serve(page_number_app(records)) as base:
        loaded = make_config(
            base,
            records_path="data.items",
            params={"per_page": 20},
            pagination={"style": "page_number", "total_path": "meta.total"},
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 247
    assert result.endpoints["items"].pages == 13
    rows = await table_rows(db)
    assert [row["id"] for row in rows] == list(range(1, 248))
    for row, record in zip(rows, records, strict=True):
        assert row["name"] == record["name"]
        assert row["score"] == record["score"]
        assert row["active"] is record["active"]
        assert row["level"] == record["nested"]["level"]
        assert orjson.loads(row["_ingest_raw"]) == record


async def test_page_size_cap_and_string_total_do_not_stop_early(
    database: str, db: Connection
) -> None:
    records = make_records(95)
    async with serve(page_number_app(records, cap=10, total_as_string=True)) as base:
        loaded = make_config(
            base,
            records_path="data.items",
            params={"per_page": 50},  # server silently caps at 10: short pages mean nothing
            pagination={"style": "page_number", "total_path": "meta.total"},
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 95
    assert await ids(db) == list(range(1, 96))


@pytest.mark.parametrize("past_end", ["empty", "404", "repeat", "first"])
async def test_page_number_without_total_ends_on_empty_404_or_repeated_page(
    database: str, db: Connection, past_end: str
) -> None:
    records = make_records(30)
    app = page_number_app(records, total=False, past_end=past_end, wrap=False)
    async with serve(app) as base:
        loaded = make_config(base, params={"per_page": 10}, pagination={"style": "page_number"})
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 30
    assert await ids(db) == list(range(1, 31))
    # Pages 1-3 and the page that ends the walk; fetched ahead by default, one guess deeper per
    # full page, so up to pages 5-8 were guessed too (and discarded).
    assert 4 <= len(app[REQUESTS]) <= 8


async def test_first_page_404_is_an_error_not_an_empty_source(database: str) -> None:
    app = page_number_app([], past_end="404")

    async with serve(app) as base:
        loaded = make_config(base, path="/missing", pagination={"style": "page_number"})
        with pytest.raises(SourceError, match=r"endpoint items: .*/missing.*HTTP 404"):
            await run(loaded, database)


async def test_offset_advances_by_records_received(database: str, db: Connection) -> None:
    records = make_records(73)
    async with serve(offset_app(records, cap=7)) as base:
        loaded = make_config(
            base,
            records_path="results",
            pagination={"style": "offset", "limit": 20, "total_path": "count"},
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 73
    assert await ids(db) == list(range(1, 74))


async def test_cursor_from_body_with_has_more(database: str, db: Connection) -> None:
    records = make_records(55)
    async with serve(cursor_app(records, page_size=10)) as base:
        loaded = make_config(
            base,
            records_path="items",
            pagination={
                "style": "cursor",
                "cursor_path": "next_cursor",
                "cursor_param": "cursor",
                "has_more_path": "has_more",
            },
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 55
    assert await ids(db) == list(range(1, 56))


async def test_repeating_cursor_stops_with_an_error_instead_of_looping(
    database: str, db: Connection
) -> None:
    records = make_records(100)
    app = cursor_app(records, page_size=10, repeat_cursor_after=30)
    async with serve(app) as base:
        loaded = make_config(
            base,
            records_path="items",
            pagination={"style": "cursor", "cursor_path": "next_cursor"},
        )
        with pytest.raises(PaginationError, match="next page reference repeats"):
            await run(loaded, database)
    assert len(app[REQUESTS]) <= 5


@pytest.mark.parametrize("absolute", [True, False])
async def test_next_url_from_body(database: str, db: Connection, absolute: bool) -> None:
    records = make_records(42)
    async with serve(next_url_app(records, page_size=10, absolute=absolute)) as base:
        loaded = make_config(
            base,
            records_path="data",
            pagination={"style": "next_url", "next_url_path": "links.next"},
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 42
    assert await ids(db) == list(range(1, 43))


@pytest.mark.parametrize("absolute", [True, False])
async def test_link_header_with_several_rels_and_empty_last_header(
    database: str, db: Connection, absolute: bool
) -> None:
    records = make_records(31)
    async with serve(link_header_app(records, page_size=10, absolute=absolute)) as base:
        loaded = make_config(base, pagination={"style": "link_header"})
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 31
    assert result.endpoints["items"].pages == 4
    assert await ids(db) == list(range(1, 32))


async def test_empty_endpoint_lands_nothing_and_completes(database: str, db: Connection) -> None:
    async with serve(page_number_app([])) as base:
        loaded = make_config(
            base,
            records_path="data.items",
            pagination={"style": "page_number", "total_path": "meta.total"},
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 0
    assert await db.fetchval("SELECT count(*) FROM items") == 0
    checkpoint = await db.fetchrow("SELECT done, state FROM ingest.checkpoints")
    assert checkpoint is not None and checkpoint["done"] is True and checkpoint["state"] is None


async def test_merge_twice_leaves_the_table_identical(database: str, db: Connection) -> None:
    records = make_records(120)
    async with serve(page_number_app(records)) as base:
        loaded = make_config(
            base,
            records_path="data.items",
            params={"per_page": 25},
            pagination={"style": "page_number", "total_path": "meta.total"},
        )
        await run(loaded, database)
        first = await db.fetch("SELECT id, name, score, _ingest_raw FROM items ORDER BY id")
        await run(loaded, database)
        second = await db.fetch("SELECT id, name, score, _ingest_raw FROM items ORDER BY id")
    assert len(first) == 120
    assert [tuple(row) for row in first] == [tuple(row) for row in second]


async def test_merge_keeps_the_last_occurrence_of_a_key_within_a_batch(
    database: str, db: Connection
) -> None:
    records = make_records(10) + [
        {**record, "name": f"v2 {record['id']}"} for record in make_records(10)
    ]
    async with serve(page_number_app(records, total=False)) as base:
        loaded = make_config(
            base,
            records_path="data.items",
            params={"per_page": 5},
            pagination={"style": "page_number"},
            pipeline={"batch_size": 1000, "consumers": 1},
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 20
    rows = await table_rows(db)
    assert [row["name"] for row in rows] == [f"v2 {index}" for index in range(1, 11)]


async def test_append_mode_writes_every_record(database: str, db: Connection) -> None:
    records = make_records(64)
    async with serve(page_number_app(records)) as base:
        loaded = make_config(
            base,
            records_path="data.items",
            params={"per_page": 8},
            mode="append",
            store_raw=False,
            pagination={"style": "page_number", "total_path": "meta.total"},
            pipeline={"consumers": 3, "batch_size": 10},
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 64
    assert await ids(db) == list(range(1, 65))
    columns = {
        row["column_name"]
        for row in await db.fetch(
            "SELECT column_name FROM information_schema.columns WHERE table_name = 'items'"
        )
    }
    assert "_ingest_raw" not in columns


async def test_cursor_the_server_ignores_is_caught_before_writing_a_repeat(
    database: str, db: Connection
) -> None:
    records = make_records(40)
    app = cursor_app(records, page_size=10)  # reads ?cursor=, we send ?after=
    async with serve(app) as base:
        loaded = make_config(
            base,
            records_path="items",
            mode="append",
            pagination={"style": "cursor", "cursor_path": "next_cursor", "cursor_param": "after"},
        )
        with pytest.raises(PaginationError, match=r"page 2 .* repeats the records of page 1"):
            await run(loaded, database)
    assert len(app[REQUESTS]) == 2
    assert await ids(db) in ([], list(range(1, 11)))


async def test_204_no_content_past_the_end_is_an_empty_page(database: str, db: Connection) -> None:
    from aiohttp import web  # noqa: PLC0415

    records = make_records(25)

    async def handler(request: web.Request) -> web.StreamResponse:
        page = int(request.query["page"])
        items = records[(page - 1) * 10 : page * 10]
        if not items:
            return web.Response(status=204)
        return json_response({"data": items})

    app = web.Application()
    app.router.add_get("/items", handler)
    async with serve(app) as base:
        loaded = make_config(base, records_path="data", pagination={"style": "page_number"})
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 25
    assert result.retries == {}
    assert await ids(db) == list(range(1, 26))
