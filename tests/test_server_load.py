"""``load = "server"``: PostgreSQL unpacks the pages, and the result equals ``load = "python"``.

Every test loads the same data twice, once per load path (two sources, two tables, one
database), and compares the tables row by row, raw JSON included, and the dead letters.
"""

from __future__ import annotations

import datetime as dt
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from ingest.config import parse_config
from ingest.errors import ConfigError, IngestError
from tests.helpers import DEFAULT_COLUMNS, make_config, run
from tests.processes import wait_until
from tests.servers import (
    TRICKY_TEXT,
    _app,
    cursor_app,
    json_response,
    link_header_app,
    next_url_app,
    offset_app,
    page_number_app,
    serve,
)

Connection = asyncpg.Connection

#: One column of every type, nested and indexed paths included.
COLUMNS: dict[str, dict[str, str]] = {
    **DEFAULT_COLUMNS,
    "amount": {"path": "amount", "type": "numeric"},
    "seen": {"path": "seen", "type": "timestamptz"},
    "day": {"path": "day", "type": "date"},
    "tags": {"path": "tags", "type": "jsonb"},
    "first_tag": {"path": "tags.0", "type": "text"},
}


def rich_records(count: int, *, start: int = 1) -> list[dict[str, Any]]:
    """Records with awkward text and a value of every column type (some null or missing)."""
    records: list[dict[str, Any]] = []
    for index in range(start, start + count):
        record: dict[str, Any] = {
            "id": index,
            "name": f"{TRICKY_TEXT[index % len(TRICKY_TEXT)]} #{index}",
            "score": index * 0.25,
            "active": index % 2 == 0,
            "nested": {"level": index % 3, "label": f"L{index % 3}"},
            "amount": f"{index}.{index % 100:02d}" if index % 4 else index * 1.5,
            "seen": [
                f"2024-03-{index % 28 + 1:02d}T10:{index % 60:02d}:00Z",
                f"2024-03-{index % 28 + 1:02d}T10:00:00.123456+02:00",
                f"2024-03-{index % 28 + 1:02d} 10:00:00",  # no zone: UTC
            ][index % 3],
            "day": f"2024-02-{index % 28 + 1:02d}",
            "tags": [f"t{index}", 'ü "q" \\ \t'] if index % 5 else None,
        }
        if index % 7 == 0:
            del record["score"]
        records.append(record)
    return records


def config(base: str, load: str, **options: Any) -> Any:
    options.setdefault("columns", COLUMNS)
    return make_config(
        base, source={"name": f"src_{load}"}, table=f"items_{load}", load=load, **options
    )


async def rows_of(db: Connection, table: str) -> list[dict[str, Any]]:
    rows = await db.fetch(f'SELECT * FROM "{table}" ORDER BY id')
    return [
        {key: value for key, value in dict(row).items() if key != "_ingest_loaded_at"}
        for row in rows
    ]


async def dead_letters(db: Connection, source: str) -> list[tuple[Any, str]]:
    rows = await db.fetch(
        "SELECT record, error FROM ingest.dead_letters WHERE source = $1 ORDER BY id", source
    )
    return [(orjson.loads(row["record"]), row["error"]) for row in rows]


async def load_both(
    app_factory: Any,
    database: str,
    db: Connection,
    *,
    fallbacks: int | None = 0,
    **options: Any,
) -> list[dict[str, Any]]:
    """Load with both paths from fresh servers; assert equal tables and dead letters.

    ``fallbacks``: how many server batches must have taken the Python path (0: the server
    path really did the work, the equality is not the Python path compared with itself;
    ``None``: at least one, where batching depends on timing).
    """
    results = {}
    for load in ("python", "server"):
        async with serve(app_factory()) as base:
            with capture_logs() as events:
                results[load] = await run(config(base, load, **options), database)
        fell_back = [event for event in events if event["event"] == "server_load_fallback"]
        if load == "python" or fallbacks is not None:
            assert len(fell_back) == (fallbacks if load == "server" else 0)
        else:
            assert fell_back
    python_rows = await rows_of(db, "items_python")
    assert await rows_of(db, "items_server") == python_rows
    assert await dead_letters(db, "src_server") == await dead_letters(db, "src_python")
    for key in ("records", "pages", "dead_letters", "batches"):
        python_count = getattr(results["python"].endpoints["items"], key)
        assert getattr(results["server"].endpoints["items"], key) == python_count, key
    return python_rows


STYLES: dict[str, tuple[Any, dict[str, Any]]] = {
    "page_number": (
        page_number_app,
        {
            "records_path": "data.items",
            "params": {"per_page": 20},
            "pagination": {"style": "page_number", "total_path": "meta.total"},
        },
    ),
    "offset": (
        offset_app,
        {
            "records_path": "results",
            "pagination": {"style": "offset", "limit": 15, "total_path": "count"},
        },
    ),
    "cursor": (
        lambda records: cursor_app(records, page_size=12),
        {
            "records_path": "items",
            "pagination": {
                "style": "cursor",
                "cursor_path": "next_cursor",
                "cursor_param": "cursor",
            },
        },
    ),
    "next_url": (
        lambda records: next_url_app(records, page_size=11),
        {
            "records_path": "data",
            "pagination": {"style": "next_url", "next_url_path": "links.next"},
        },
    ),
    "link_header": (
        lambda records: link_header_app(records, page_size=13),
        {"pagination": {"style": "link_header"}},
    ),
}


@pytest.mark.parametrize("mode", ["merge", "append"])
@pytest.mark.parametrize("style", sorted(STYLES))
async def test_every_style_gives_the_same_table_as_python_load(
    database: str, db: Connection, style: str, mode: str
) -> None:
    records = rich_records(83)
    factory, options = STYLES[style]
    rows = await load_both(lambda: factory(records), database, db, mode=mode, **options)
    assert [row["id"] for row in rows] == list(range(1, 84))
    assert [orjson.loads(row["_ingest_raw"]) for row in rows] == records
    assert {row["name"] for row in rows} >= {f"{TRICKY_TEXT[i % 10]} #{i}" for i in (1, 5, 8)}


async def test_merge_keeps_the_last_occurrence_within_a_batch(
    database: str, db: Connection
) -> None:
    first = rich_records(30)
    again = [{**record, "name": f"second {record['id']}"} for record in rich_records(10, start=5)]
    third = [{**record, "name": f"third {record['id']}"} for record in rich_records(3, start=7)]
    # Duplicates across pages and within one page (ids 7-9 appear in the last page twice).
    records = first + again + third
    rows = await load_both(
        lambda: page_number_app(records),
        database,
        db,
        records_path="data.items",
        params={"per_page": 10},
        pagination={"style": "page_number", "total_path": "meta.total"},
        pipeline={"batch_size": 1000},
    )
    names = {row["id"]: row["name"] for row in rows}
    assert len(names) == 30
    assert names[4] == first[3]["name"]
    assert names[5] == "second 5"
    assert names[8] == "third 8"
    assert names[14] == "second 14"


def _bad_records() -> list[dict[str, Any]]:
    records = rich_records(40)
    records[6]["score"] = "not a number"  # id 7
    records[21]["name"] = "nul \x00 inside"  # id 22
    records[30]["level"] = None
    records[30]["nested"] = {"level": 2**40}  # id 31: out of range for integer
    records[33]["id"] = None  # a required key
    return records


@pytest.mark.parametrize("mode", ["merge", "append"])
async def test_a_bad_record_falls_back_and_is_dead_lettered_like_python(
    database: str, db: Connection, mode: str
) -> None:
    records = _bad_records()
    rows = await load_both(
        lambda: page_number_app(records),
        database,
        db,
        mode=mode,
        fallbacks=None,  # every batch holding a bad record
        records_path="data.items",
        params={"per_page": 10},
        pagination={"style": "page_number", "total_path": "meta.total"},
        pipeline={"batch_size": 20},
    )
    # The key is required only where it is a primary key (merge); append keeps the row.
    expected: list[int | None] = [i for i in range(1, 41) if i not in (7, 22, 31, 34)]
    expected += [] if mode == "merge" else [None]
    assert [row["id"] for row in rows] == expected
    reasons = [error for _, error in await dead_letters(db, "src_server")]
    assert reasons == [
        "column score: 'not a number' is not a number",
        "column name: contains a NUL character, which PostgreSQL text cannot store",
        "column level: 1099511627776 is out of range",
        *(["column id: required value is missing"] if mode == "merge" else []),
    ]


async def test_values_python_reads_differently_take_the_python_path(
    database: str, db: Connection
) -> None:
    """An epoch number in a timestamptz column, a whole float for an integer, a dict page."""
    records = rich_records(6)
    records[0]["seen"] = 1_700_000_000
    records[1]["seen"] = 1_700_000_000_123
    records[2]["nested"]["level"] = 2.0
    records[3]["day"] = 20240105  # PostgreSQL would read a date, Python rejects it
    rows = await load_both(
        lambda: page_number_app(records),
        database,
        db,
        fallbacks=None,
        records_path="data.items",
        params={"per_page": 3},
        pagination={"style": "page_number", "total_path": "meta.total"},
    )
    assert rows[0]["seen"] == dt.datetime.fromtimestamp(1_700_000_000, dt.UTC)
    assert rows[2]["level"] == 2
    assert [row["id"] for row in rows] == [1, 2, 3, 5, 6]


#: One array column of every element type.
ARRAY_COLUMNS: dict[str, dict[str, str]] = {
    "id": {"path": "id", "type": "bigint"},
    **{
        f"a_{kind}": {"path": f"a_{kind}", "type": f"{kind}[]"}
        for kind in ("text", "bigint", "integer", "double", "numeric", "boolean", "timestamptz")
    },
}


def array_records(count: int) -> list[dict[str, Any]]:
    """Lists of each type (NULL items, empty lists, missing and null values among them)."""
    records: list[dict[str, Any]] = []
    for index in range(1, count + 1):
        record: dict[str, Any] = {
            "id": index,
            "a_text": [f"t{index}", None, TRICKY_TEXT[index % len(TRICKY_TEXT)]],
            "a_bigint": [index, 2**62, -index] if index % 3 else [],
            "a_integer": [index, None],
            "a_double": [index * 0.5, -1.25],
            "a_numeric": [f"{index}.10", index, None],
            "a_boolean": [True, False, None] if index % 2 else None,
            "a_timestamptz": [f"2024-03-{index % 28 + 1:02d}T10:00:00+02:00", None],
        }
        if index % 5 == 0:
            del record["a_integer"]
        records.append(record)
    return records


@pytest.mark.parametrize("mode", ["merge", "append"])
async def test_array_columns_give_the_same_table_as_python_load(
    database: str, db: Connection, mode: str
) -> None:
    records = array_records(40)
    rows = await load_both(
        lambda: page_number_app(records),
        database,
        db,
        mode=mode,
        columns=ARRAY_COLUMNS,
        records_path="data.items",
        params={"per_page": 9},
        pagination={"style": "page_number", "total_path": "meta.total"},
    )
    assert [row["id"] for row in rows] == list(range(1, 41))
    first = rows[0]
    assert first["a_text"] == ["t1", None, TRICKY_TEXT[1]]
    assert first["a_bigint"] == [1, 2**62, -1]
    assert rows[2]["a_bigint"] == []
    assert first["a_double"] == [0.5, -1.25]
    assert [str(value) for value in first["a_numeric"][:2]] == ["1.10", "1"]
    assert first["a_boolean"] == [True, False, None] and rows[1]["a_boolean"] is None
    assert first["a_timestamptz"] == [dt.datetime(2024, 3, 2, 8, tzinfo=dt.UTC), None]
    assert rows[4]["a_integer"] is None


async def test_array_values_that_do_not_fit_are_dead_letters_in_both_paths(
    database: str, db: Connection
) -> None:
    """Not a list, an item that does not convert, a nested list in text[] (Python's text)."""
    records = array_records(6)
    records[0]["a_bigint"] = "1,2"
    records[1]["a_integer"] = [1, "x"]
    records[2]["a_timestamptz"] = [1_700_000_000]  # epoch: Python reads it, server defers
    records[3]["a_text"] = [["a", "b"], {"k": 1}]
    records[4]["a_boolean"] = [True, 2]
    await load_both(
        lambda: page_number_app(records),
        database,
        db,
        fallbacks=None,
        columns=ARRAY_COLUMNS,
        records_path="data.items",
        params={"per_page": 6},
        pagination={"style": "page_number", "total_path": "meta.total"},
    )
    rows = await rows_of(db, "items_python")
    assert [row["id"] for row in rows] == [3, 4, 6]
    assert rows[0]["a_timestamptz"] == [dt.datetime.fromtimestamp(1_700_000_000, dt.UTC)]
    assert rows[1]["a_text"] == ['["a","b"]', '{"k":1}']
    assert [error for _, error in await dead_letters(db, "src_python")] == [
        "column a_bigint: str is not a list",
        "column a_integer: item 1: 'x' is not an integer",
        "column a_boolean: item 1: 2 is not a boolean",
    ]


async def test_a_single_object_page_is_one_record(database: str, db: Connection) -> None:
    def factory() -> web.Application:
        async def handler(request: web.Request) -> web.Response:
            return json_response({"item": rich_records(1, start=42)[0]})

        return _app({"/items": handler})

    rows = await load_both(
        factory, database, db, records_path="item", pagination={"style": "single"}
    )
    assert [row["id"] for row in rows] == [42]


async def test_zone_less_timestamps_are_utc_whatever_the_server_zone(
    database: str, db: Connection
) -> None:
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f"ALTER DATABASE \"{name}\" SET timezone = 'Asia/Tokyo'")
    records = rich_records(3)
    records[0]["seen"] = "2024-03-04 10:00:00"
    records[1]["seen"] = "2024-03-04T10:00:00.5"
    rows = await load_both(
        lambda: page_number_app(records),
        database,
        db,
        records_path="data.items",
        pagination={"style": "page_number", "total_path": "meta.total"},
    )
    assert rows[0]["seen"] == dt.datetime(2024, 3, 4, 10, 0, tzinfo=dt.UTC)
    assert rows[1]["seen"] == dt.datetime(2024, 3, 4, 10, 0, 0, 500_000, tzinfo=dt.UTC)


async def test_failed_server_load_run_resumes_exactly(database: str, db: Connection) -> None:
    records = rich_records(120)
    broken: dict[str, int | None] = {"page": 9}

    async def handler(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        if broken["page"] is not None and page == broken["page"]:
            # Fail only once earlier batches are committed, so the rerun has something to resume.
            async def committed() -> bool:
                return bool(await db.fetchval("SELECT count(*) FROM items_server"))

            await wait_until(committed, what="a committed batch")
            raise web.HTTPBadRequest(text="broken page")
        items = records[(page - 1) * 10 : page * 10]
        return json_response({"data": {"items": items}, "meta": {"total": len(records)}})

    options = {
        "mode": "append",
        "records_path": "data.items",
        "params": {"per_page": 10},
        "pagination": {"style": "page_number", "total_path": "meta.total"},
        "pipeline": {"batch_size": 20, "consumers": 2},
        "http": {"pages_ahead": 1},
    }
    async with serve(_app({"/items": handler})) as base:
        loaded = config(base, "server", **options)
        with pytest.raises(IngestError):
            await run(loaded, database)
        committed = await db.fetchval("SELECT count(*) FROM items_server")
        assert 0 < committed <= 80
        broken["page"] = None
        result = await run(loaded, database)
    assert result.endpoints["items"].resumed
    rows = await rows_of(db, "items_server")
    assert [row["id"] for row in rows] == list(range(1, 121))  # append: no duplicates
    assert [orjson.loads(row["_ingest_raw"]) for row in rows] == records


def test_server_load_is_refused_for_parent_columns() -> None:
    text = """
[source]
name = "shop"
base_url = "http://127.0.0.1:1"
[[endpoints]]
name = "customers"
path = "/customers"
[endpoints.table]
name = "customers"
primary_key = ["id"]
[endpoints.table.columns]
id = { path = "id", type = "bigint" }
[[endpoints]]
name = "orders"
parent = "customers"
path = "/customers/{id}/orders"
[endpoints.table]
name = "orders"
primary_key = ["order_id"]
load = "server"
[endpoints.table.columns]
order_id = { path = "order_id", type = "bigint" }
customer_id = { path = "$parent.id", type = "bigint" }
"""
    with pytest.raises(ConfigError) as caught:
        parse_config(text, Path("shop.toml"), {})
    message = str(caught.value)
    assert "\n" not in message
    assert "shop.toml" in message
    assert "customer_id" in message
    assert 'load = "server"' in message


#: Ends the SQL literal a hand-quoted path would make when backslashes escape quotes
#: (``standard_conforming_strings = off``), then commits a DROP of the canary table (in append
#: mode's statement; the merge statement just breaks).
INJECTED_PATH = (
    "x\\']::text[]), NULL::jsonb FROM (SELECT jsonb_build_object() AS e) AS r WHERE false; "
    "DROP TABLE canary; COMMIT; --"
)


@pytest.mark.parametrize("mode", ["merge", "append"])
async def test_a_column_path_is_never_sql_even_without_standard_conforming_strings(
    database: str, db: Connection, mode: str
) -> None:
    """Paths travel as parameters: a quote or backslash in one is data, whatever the server."""
    name = await db.fetchval("SELECT current_database()")
    await db.execute(f'ALTER DATABASE "{name}" SET standard_conforming_strings = off')
    await db.execute("CREATE TABLE canary (alive boolean)")
    records = rich_records(25)
    for record in records:
        record[INJECTED_PATH] = f"odd key {record['id']} \\' ''"
    rows = await load_both(
        lambda: page_number_app(records),
        database,
        db,
        mode=mode,
        columns={**COLUMNS, "odd": {"path": INJECTED_PATH, "type": "text"}},
        records_path="data.items",
        params={"per_page": 10},
        pagination={"style": "page_number", "total_path": "meta.total"},
    )
    assert await db.fetchval("SELECT to_regclass('canary') IS NOT NULL")
    assert [row["odd"] for row in rows] == [f"odd key {i} \\' ''" for i in range(1, 26)]
    fresh = await asyncpg.connect(database)
    try:
        assert await fresh.fetchval("SHOW standard_conforming_strings") == "off"
    finally:
        await fresh.close()
