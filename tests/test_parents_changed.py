"""Child endpoints with ``parents = "changed"``: only parents (re)loaded since the last walk."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from ingest.config import parse_config
from ingest.errors import ConfigError, InterruptedRun
from ingest.events import NullObserver
from ingest.pipeline import Pipeline
from ingest.runner import connected
from ingest.runstate import Partition
from ingest.secrets import Redactor
from ingest.status import collect_status, render_status
from tests.helpers import run
from tests.processes import wait_until
from tests.resume_servers import customer_orders
from tests.servers import REQUESTS, _app, json_response, serve
from tests.test_incremental import shop_config

Connection = asyncpg.Connection
VERSIONS: web.AppKey[dict[int, int]] = web.AppKey("versions", dict)
#: Customers whose orders are held until the event is set (a walk the test stops mid-way).
HELD: web.AppKey[dict[int, asyncio.Event]] = web.AppKey("held", dict)
PER_CUSTOMER = 4


def versioned_customers_app(customers: int, *, latency: float = 0.0) -> web.Application:
    """``/customers?since=V``: customers with ``updated`` >= V (3 a page); and their orders."""

    def paged(items: list[dict[str, Any]], request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        chunk = items[(page - 1) * 3 : page * 3]
        return json_response({"items": chunk, "has_more": page * 3 < len(items)})

    async def list_customers(request: web.Request) -> web.Response:
        since = int(request.query.get("since", "0"))
        people = [
            {"id": index, "name": f"customer {index}", "updated": version}
            for index, version in sorted(app[VERSIONS].items())
            if version >= since
        ]
        return paged(people, request)

    async def list_orders(request: web.Request) -> web.Response:
        if latency:
            await asyncio.sleep(latency)
        held = app[HELD].get(int(request.match_info["id"]))
        if held is not None:
            await held.wait()
        return paged(customer_orders(int(request.match_info["id"]), PER_CUSTOMER), request)

    app = _app({"/customers": list_customers, "/customers/{id}/orders": list_orders})
    app[VERSIONS] = {index: index for index in range(1, customers + 1)}
    app[HELD] = {}
    return app


INCREMENTAL_CUSTOMERS = """[endpoints.incremental]
cursor_path = "updated"
param = "since"
format = "integer"
"""


def config(base_url: str, *, parents: str = "changed", batch_size: int = 10) -> str:
    """test_incremental's shop, its customers incremental on ``updated``, ``parents`` set."""
    text = shop_config(base_url)
    for old, new in (
        ("batch_size = 10", f"batch_size = {batch_size}\nconsumers = 1"),
        (
            '[endpoints.table]\nname = "customers"',
            INCREMENTAL_CUSTOMERS + '[endpoints.table]\nname = "customers"',
        ),
        (
            'name = { path = "name" }',
            'name = { path = "name" }\nupdated = { path = "updated", type = "bigint" }',
        ),
        ('parent = "customers"', f'parent = "customers"\nparents = "{parents}"'),
    ):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def _customers_asked(app: web.Application) -> set[int]:
    return {
        int(request["path"].split("/")[2])
        for request in app[REQUESTS]
        if request["path"].endswith("/orders")
    }


async def _orders(db: Connection) -> list[tuple[Any, ...]]:
    rows = await db.fetch("SELECT order_id, total, customer_id FROM orders ORDER BY order_id")
    return [tuple(row) for row in rows]


def _all_orders(customers: int) -> list[tuple[Any, ...]]:
    return sorted(
        (order["order_id"], order["total"], customer)
        for customer in range(1, customers + 1)
        for order in customer_orders(customer, PER_CUSTOMER)
    )


async def test_second_walk_visits_only_the_parents_the_parent_walk_reloaded(
    database: str, db: Connection
) -> None:
    app = versioned_customers_app(11)
    async with serve(app) as base:
        loaded = parse_config(config(base), Path("shop.toml"))
        await run(loaded, database)
        assert _customers_asked(app) == set(range(1, 12))
        first_walk = await db.fetchval("SELECT started_at FROM ingest.parent_walks")
        app[VERSIONS][3] = app[VERSIONS][7] = 100  # two customers change upstream
        app[REQUESTS].clear()
        await run(loaded, database)
        # The parent's incremental walk reloaded 3, 7 and 11 (since = high-water 11).
        assert _customers_asked(app) == {3, 7, 11}
        app[REQUESTS].clear()
        await run(loaded, database)
        assert _customers_asked(app) == {3, 7}  # since = 100 now: only those two again
    assert await _orders(db) == _all_orders(11)
    bound = await db.fetchval("SELECT started_at FROM ingest.parent_walks")
    assert bound > first_walk
    # `ingest status` shows the bound the next walk will use, for the child only.
    report = await collect_status(db, loaded)
    bounds = {e.endpoint: e.parents_changed_since for e in report.sources[0].endpoints}
    assert bounds == {"customers": None, "orders": bound}
    assert f"orders: next walk visits parents loaded since {bound:%Y-%m-%d %H:%M:%S}Z" in (
        render_status(report)
    )


async def test_parents_all_walks_every_parent_every_time(database: str, db: Connection) -> None:
    app = versioned_customers_app(5)
    async with serve(app) as base:
        loaded = parse_config(config(base, parents="all"), Path("shop.toml"))
        await run(loaded, database)
        app[REQUESTS].clear()
        await run(loaded, database)
        assert _customers_asked(app) == set(range(1, 6))
    assert await db.fetchval("SELECT count(*) FROM ingest.parent_walks") == 0


async def test_an_interrupted_changed_walk_resumes_with_the_same_window(
    database: str, db: Connection
) -> None:
    app = versioned_customers_app(9, latency=0.03)
    stop = asyncio.Event()
    async with serve(app) as base:
        loaded = parse_config(config(base, batch_size=3), Path("shop.toml"))
        await run(loaded, database)
        first_walk = await db.fetchval("SELECT started_at FROM ingest.parent_walks")
        for customer in (2, 5, 8, 9):
            app[VERSIONS][customer] = 50
        app[REQUESTS].clear()
        # The last changed parent is held: the walk cannot end before the test stops it.
        app[HELD][9] = asyncio.Event()

        async def inside_the_walk() -> bool:
            state = await db.fetchval(
                "SELECT state FROM ingest.checkpoints WHERE endpoint = 'orders' AND NOT done"
            )
            return state is not None and len(_customers_asked(app)) >= 2

        task = asyncio.create_task(run(loaded, database, stop=stop))
        await wait_until(inside_the_walk, what="the orders walk under way")
        stop.set()
        with pytest.raises(InterruptedRun):
            await task
        app[HELD][9].set()
        state = orjson.loads(
            await db.fetchval("SELECT state FROM ingest.checkpoints WHERE endpoint = 'orders'")
        )
        assert state["since"] == first_walk.isoformat()
        started = state["started"]
        asked_before = _customers_asked(app)
        app[REQUESTS].clear()
        await run(loaded, database)
        asked_after = _customers_asked(app)
    assert asked_before | asked_after <= {2, 5, 8, 9}
    assert await _orders(db) == _all_orders(9)
    saved = await db.fetchval("SELECT started_at FROM ingest.parent_walks")
    assert saved.isoformat() == started  # the walk's own start, not the resuming run's


def test_parents_changed_needs_a_parent() -> None:
    text = config("http://127.0.0.1:1").replace(
        'name = "customers"\npath = "/customers"',
        'name = "customers"\nparents = "changed"\npath = "/customers"',
    )
    with pytest.raises(ConfigError, match='parents = "changed" needs a parent endpoint'):
        parse_config(text, Path("shop.toml"))


async def test_a_backfill_window_of_the_child_walks_every_parent(
    database: str, db: Connection
) -> None:
    """History is history: a partition of a parents = "changed" child ignores the bound."""
    app = versioned_customers_app(6)
    async with serve(app) as base:
        loaded = parse_config(config(base), Path("shop.toml"))
        await run(loaded, database)
        await run(loaded, database)
        assert _customers_asked(app) == set(range(1, 7))  # first walk: all; second: 6 only
        app[REQUESTS].clear()
        async with connected(
            loaded, database, Redactor(), pool_size=4, observer=NullObserver()
        ) as (pool, http):
            pipeline = Pipeline(loaded, pool, http)
            async with pipeline.recorded():
                stats = await pipeline.run_partition(
                    loaded.source.endpoint("orders"), Partition("2026-01", {"month": "1"})
                )
    assert _customers_asked(app) == set(range(1, 7))
    assert stats.records == len(_all_orders(6))
