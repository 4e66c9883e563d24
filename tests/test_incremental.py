"""Incremental runs (cursor state, lookback, start) and parent -> child endpoints."""

from __future__ import annotations

import asyncio
import datetime as dt
from pathlib import Path

import asyncpg
import orjson
import pytest

from ingest.config import load_config, parse_config
from ingest.cursor import CursorKind, parse_duration
from ingest.errors import ConfigError, InterruptedRun, SourceError
from tests.helpers import run
from tests.processes import wait_until
from tests.resume_servers import (
    EPOCH,
    changes_app,
    customer_orders,
    customers_app,
    events_config,
    iso,
)
from tests.resume_servers import timed_records as make_timed
from tests.servers import REQUESTS, serve

Connection = asyncpg.Connection


INCREMENTAL = """
[endpoints.incremental]
cursor_path = "updated_at"
param = "since"
end_param = "until"
format = "iso8601"
lookback = "2h"
start = "2025-01-01T05:00:00Z"
"""


async def rows(db: Connection) -> list[tuple[int, str, int, str]]:
    return [
        (row["id"], row["name"], row["amount"], iso(row["updated_at"].astimezone(dt.UTC)))
        for row in await db.fetch("SELECT id, name, amount, updated_at FROM events ORDER BY id")
    ]


def expected(records: list[dict[str, object]], since: str) -> list[tuple[object, ...]]:
    return sorted(
        (record["id"], record["name"], record["amount"], record["updated_at"])
        for record in records
        if str(record["updated_at"]) >= since
    )


async def test_incremental_run_starts_from_high_water_minus_lookback(
    database: str, db: Connection
) -> None:
    records = make_timed(30, every=dt.timedelta(hours=1))
    app = changes_app(records)
    async with serve(app) as base:
        loaded = parse_config(events_config(base, incremental=INCREMENTAL), Path("shop.toml"))
        first = await run(loaded, database)
        assert first.endpoints["events"].records == 25  # ids 6..30: updated at or after 05:00
        assert app[REQUESTS][0]["query"]["since"] == "2025-01-01T05:00:00Z"
        assert await rows(db) == expected(records, "2025-01-01T05:00:00Z")
        high_water = await db.fetchval("SELECT value FROM ingest.cursors")
        assert high_water == "2025-01-02T05:00:00+00:00"  # id 30, the highest updated_at

        # Changes at the source: record 10 edited, five new records.
        records[9] = {**records[9], "name": "edited", "updated_at": iso(EPOCH + dt.timedelta(40))}
        records.extend(make_timed(5, every=dt.timedelta(hours=1), start=31))
        app[REQUESTS].clear()
        second = await run(loaded, database)

    # Lower bound: previous max (2025-01-02T05:00) minus the 2h lookback.
    assert app[REQUESTS][0]["query"]["since"] == "2025-01-02T03:00:00Z"
    assert second.endpoints["events"].records == 3 + 5 + 1  # overlap 28..30, new 31..35, id 10
    assert await rows(db) == expected(records, "2025-01-01T05:00:00Z")
    assert await db.fetchval("SELECT value FROM ingest.cursors") == "2025-02-10T00:00:00+00:00"


async def test_first_incremental_run_without_start_fetches_everything(
    database: str, db: Connection
) -> None:
    records = make_timed(12, every=dt.timedelta(minutes=5))
    incremental = '[endpoints.incremental]\ncursor_path = "updated_at"\nparam = "since"\n'
    app = changes_app(records)
    async with serve(app) as base:
        loaded = parse_config(events_config(base, incremental=incremental), Path("shop.toml"))
        await run(loaded, database)
        await run(loaded, database)
    assert "since" not in app[REQUESTS][0]["query"]
    assert app[REQUESTS][-1]["query"]["since"] == records[-1]["updated_at"]  # lookback 0
    assert len(await rows(db)) == 12


def test_cursor_formats_render_round_down_and_parse_what_apis_send() -> None:
    moment = dt.datetime(2025, 3, 4, 5, 6, 7, 890000, tzinfo=dt.UTC)
    assert CursorKind("iso8601").render(moment) == "2025-03-04T05:06:07.890000Z"
    assert CursorKind("epoch").render(moment) == str(int(moment.timestamp()))
    assert CursorKind("epoch_ms").render(moment) == str(int(moment.timestamp() * 1000))
    assert CursorKind("date").render(moment) == "2025-03-04"
    kind = CursorKind("iso8601")
    assert kind.highest(None, ["2025-01-01T00:00:00Z", 1735776000, "junk", None]) == dt.datetime(
        2025, 1, 2, tzinfo=dt.UTC
    )
    numbers = CursorKind("integer")
    assert numbers.highest(None, [3, "17", 9.0, "x", True]) == 17
    assert numbers.minus(17, numbers.parse_step(5)) == 12
    assert parse_duration("7d") == dt.timedelta(days=7)
    with pytest.raises(ValueError, match="not like"):
        parse_duration("7 days")


def test_bad_incremental_config_names_the_field() -> None:
    bad = events_config(
        "http://127.0.0.1:1",
        incremental='[endpoints.incremental]\ncursor_path = "u"\nparam = "since"\nlookback = "x"\n',
    )
    with pytest.raises(ConfigError, match=r"endpoint events: incremental: lookback: duration 'x'"):
        parse_config(bad, Path("shop.toml"))


def shop_config(base_url: str, *, child_extra: str = "") -> str:
    return f"""
[source]
name = "shop"
base_url = "{base_url}"
[pipeline]
batch_size = 10
batch_seconds = 0.2
[[endpoints]]
name = "customers"
path = "/customers"
records_path = "items"
pagination = {{ style = "page_number", has_more_path = "has_more" }}
[endpoints.table]
name = "customers"
primary_key = ["id"]
[endpoints.table.columns]
id = {{ path = "id", type = "bigint" }}
name = {{ path = "name" }}
[[endpoints]]
name = "orders"
parent = "customers"
path = "/customers/{{id}}/orders"
records_path = "items"
pagination = {{ style = "page_number", has_more_path = "has_more" }}
[endpoints.table]
name = "orders"
primary_key = ["order_id"]
store_raw = false
[endpoints.table.columns]
order_id = {{ path = "order_id", type = "bigint" }}
total = {{ path = "total", type = "double" }}
customer_id = {{ path = "$parent.id", type = "bigint" }}
{child_extra}
"""


@pytest.mark.parametrize("writers", [0, 2])
async def test_child_endpoint_walks_every_parent_and_stores_the_parent_key(
    database: str, db: Connection, writers: int
) -> None:
    """Also with writer processes converting the child's pages ($parent values travel along)."""
    app = customers_app(11, 4, page_size=3)
    async with serve(app) as base:
        text = shop_config(base).replace(
            "batch_size = 10", f"batch_size = 10\nwriter_processes = {writers}"
        )
        loaded = parse_config(text, Path("shop.toml"))
        result = await run(loaded, database)
    wanted = sorted(
        (order["order_id"], order["total"], customer)
        for customer in range(1, 12)
        for order in customer_orders(customer, 4)
    )
    got = await db.fetch("SELECT order_id, total, customer_id FROM orders ORDER BY order_id")
    assert [tuple(row) for row in got] == wanted
    assert result.endpoints["orders"].records == len(wanted)
    # The child's pages were decoded straight to rows, $parent.id filled in per page; the
    # count is of pages fetched (no extra page for the end of the walk).
    assert result.endpoints["orders"].typed_pages == result.endpoints["orders"].pages
    assert await db.fetchval("SELECT count(*) FROM customers") == 11
    order_paths = {r["path"] for r in app[REQUESTS] if r["path"].endswith("/orders")}
    assert order_paths == {f"/customers/{index}/orders" for index in range(1, 12)}
    done = await db.fetchval("SELECT done FROM ingest.checkpoints WHERE endpoint = 'orders'")
    assert done is True


async def test_interrupted_child_walk_resumes_inside_the_parent_it_stopped_in(
    database: str, db: Connection
) -> None:
    app = customers_app(8, 7, page_size=3, latency=0.03)
    stop = asyncio.Event()
    async with serve(app) as base:
        text = shop_config(base).replace("batch_size = 10", "batch_size = 3\nconsumers = 1")
        loaded = parse_config(text, Path("shop.toml"))

        async def inside_a_parent() -> bool:
            state = await db.fetchval(
                "SELECT state FROM ingest.checkpoints WHERE endpoint = 'orders' AND NOT done"
            )
            return state is not None and "open" in orjson.loads(state)

        task = asyncio.create_task(run(loaded, database, stop=stop))
        await wait_until(inside_a_parent, what="a checkpoint inside a parent's walk")
        stop.set()
        with pytest.raises(InterruptedRun):
            await task
        state = orjson.loads(
            await db.fetchval("SELECT state FROM ingest.checkpoints WHERE endpoint = 'orders'")
        )
        app[REQUESTS].clear()
        result = await run(loaded, database)
    assert result.endpoints["orders"].resumed
    wanted = sorted(
        (order["order_id"], order["total"], customer)
        for customer in range(1, 9)
        for order in customer_orders(customer, 7)
    )
    got = await db.fetch("SELECT order_id, total, customer_id FROM orders ORDER BY order_id")
    assert [tuple(row) for row in got] == wanted
    # The rerun resumed each parent it stopped in at the page it had reached, and never asked
    # again for a parent that was done.
    orders = [r for r in app[REQUESTS] if r["path"].endswith("/orders")]
    for key, walk in state.get("open", ()):
        first = next(r for r in orders if r["path"] == f"/customers/{key[0]}/orders")
        page = dict(walk["request"]["params"])["page"]
        assert first["query"]["page"] == page != "1"
    finished = {int(key[0]) for key in state.get("done", ())}
    after = int(state["after"][0]) if state.get("after") else 0
    asked = {int(r["path"].split("/")[2]) for r in orders}
    assert min(asked) > after
    assert not asked & finished


async def test_child_run_alone_before_its_parent_ever_ran_says_what_to_do(database: str) -> None:
    async with serve(customers_app(2, 1)) as base:
        loaded = parse_config(shop_config(base), Path("shop.toml"))
        with pytest.raises(SourceError, match="run endpoint customers first"):
            await run(loaded, database, endpoints=("orders",))


def test_child_reading_an_unknown_parent_column_is_a_config_error() -> None:
    text = shop_config("http://127.0.0.1:1").replace("$parent.id", "$parent.region")
    with pytest.raises(ConfigError, match="parent column 'region' is not a column of customers"):
        parse_config(text, Path("shop.toml"))


def test_the_example_config_is_valid() -> None:
    example = Path(__file__).resolve().parent.parent / "config" / "shop.example.toml"
    environ = {"SHOP_API_URL": "https://api.example.com/v1", "SHOP_API_TOKEN": "t0ken-value"}
    loaded = load_config(example, environ)
    orders = loaded.source.endpoint("orders")
    assert orders.parent == "customers" and orders.parent_columns() == {"customer_id": "id"}
    incremental = loaded.source.endpoint("customers").incremental
    assert incremental is not None and incremental.end_param == "updated_before"


async def test_status_shows_the_high_water_mark_and_its_lag(database: str, db: Connection) -> None:
    from ingest.status import collect_status  # noqa: PLC0415

    records = make_timed(10, every=dt.timedelta(hours=1))
    async with serve(changes_app(records)) as base:
        loaded = parse_config(events_config(base, incremental=INCREMENTAL), Path("shop.toml"))
        await run(loaded, database)
    report = await collect_status(db, loaded)
    [endpoint] = [e for e in report.sources[0].endpoints if e.endpoint == "events"]
    assert endpoint.checkpoint is not None
    high_water = await db.fetchval("SELECT value FROM ingest.cursors")
    assert endpoint.checkpoint.position == high_water
    lag = endpoint.checkpoint.lag_seconds
    expected_lag = (dt.datetime.now(dt.UTC) - dt.datetime.fromisoformat(high_water)).total_seconds()
    assert lag is not None and abs(lag - expected_lag) < 60
