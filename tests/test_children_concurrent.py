"""Child endpoints walk several parents at once, and stay exactly once under SIGKILL.

The server counts the child requests in flight (overlap is asserted from that count, never from
timings) and can hold any parent's second page until the test lets it go: the kill tests stop a
run while one parent's walk is held and later parents have finished and committed, or while a
batch waits on a lock the test holds, then SIGKILL it and resume.
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
from ingest.errors import ExitCode
from ingest.status import cursor_of
from tests.helpers import run
from tests.processes import Cli, run_cli, spawn, wait_until
from tests.resume_servers import customer_orders
from tests.servers import REQUESTS, _app, json_response, serve

Connection = asyncpg.Connection
HELD: web.AppKey[dict[int, asyncio.Event]] = web.AppKey("held", dict)
FLIGHT: web.AppKey[dict[str, int]] = web.AppKey("flight", dict)


def shop_app(customers: int, per_customer: int, *, page_size: int = 3) -> web.Application:
    """``/customers`` and ``/customers/{id}/orders``; a customer in ``app[HELD]`` has its
    second and later order pages held until its event is set."""

    def paged(items: list[dict[str, Any]], request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        chunk = items[(page - 1) * page_size : page * page_size]
        return json_response({"items": chunk, "has_more": page * page_size < len(items)})

    async def list_customers(request: web.Request) -> web.Response:
        people = [{"id": index, "name": f"customer {index}"} for index in range(1, customers + 1)]
        return paged(people, request)

    async def list_orders(request: web.Request) -> web.Response:
        flight = app[FLIGHT]
        flight["now"] += 1
        flight["most"] = max(flight["most"], flight["now"])
        try:
            customer = int(request.match_info["id"])
            held = app[HELD].get(customer)
            if held is not None and request.query.get("page", "1") != "1":
                await held.wait()
            # Yield once, so requests sent together are all in flight together.
            await asyncio.sleep(0.005)
            return paged(customer_orders(customer, per_customer), request)
        finally:
            flight["now"] -= 1

    app = _app({"/customers": list_customers, "/customers/{id}/orders": list_orders})
    app[HELD] = {}
    app[FLIGHT] = {"now": 0, "most": 0}
    return app


def shop_config(base_url: str, *, mode: str, batch_size: int = 4, extra: str = "") -> str:
    key = 'primary_key = ["order_id"]' if mode == "merge" else ""
    return f"""
[source]
name = "shop"
base_url = "{base_url}"
[http]
max_concurrency = 4
[pipeline]
batch_size = {batch_size}
batch_seconds = 0.05
consumers = 2
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
{extra}
[endpoints.table]
name = "orders"
mode = "{mode}"
{key}
store_raw = false
[endpoints.table.columns]
order_id = {{ path = "order_id", type = "bigint" }}
total = {{ path = "total", type = "double" }}
customer_id = {{ path = "$parent.id", type = "bigint" }}
"""


def wanted(customers: int, per_customer: int) -> list[tuple[Any, ...]]:
    return sorted(
        (order["order_id"], order["total"], customer)
        for customer in range(1, customers + 1)
        for order in customer_orders(customer, per_customer)
    )


async def orders(db: Connection) -> list[tuple[Any, ...]]:
    """Every child row, duplicates included."""
    rows = await db.fetch("SELECT order_id, total, customer_id FROM orders ORDER BY order_id")
    return [tuple(row) for row in rows]


async def child_state(db: Connection) -> dict[str, Any]:
    state = await db.fetchval("SELECT state FROM ingest.checkpoints WHERE endpoint = 'orders'")
    return orjson.loads(state) if state is not None else {}


async def test_one_page_parents_overlap_and_count_one_page_each(
    database: str, db: Connection
) -> None:
    """100 one-page parents: several in flight at once (never more than the source's limit),
    exact rows, and 100 pages counted (not 101: the end of the walk is not a page)."""
    app = shop_app(100, 0, page_size=5)
    async with serve(app) as base:
        loaded = parse_config(shop_config(base, mode="merge"), Path("shop.toml"))
        result = await run(loaded, database)
    assert await orders(db) == wanted(100, 0)
    assert 1 < app[FLIGHT]["most"] <= 4
    assert result.endpoints["orders"].pages == 100
    assert result.endpoints["orders"].records == len(wanted(100, 0))


async def test_parallel_parents_1_walks_one_parent_at_a_time(database: str, db: Connection) -> None:
    app = shop_app(12, 4)
    async with serve(app) as base:
        # pages_ahead = 1: the default fetches a parent's own pages ahead (several requests of
        # one parent); this test counts parents, one request each at a time.
        text = shop_config(base, mode="append", extra="parallel_parents = 1\npages_ahead = 1")
        await run(parse_config(text, Path("shop.toml")), database)
    assert await orders(db) == wanted(12, 4)
    assert app[FLIGHT]["most"] == 1


async def blocked_on(db: Connection, table: str) -> bool:
    waiting = await db.fetchval(
        "SELECT count(*) FROM pg_locks WHERE relation = $1::regclass AND NOT granted", table
    )
    return bool(waiting)


@pytest.mark.parametrize("mode", ["append", "merge"])
async def test_sigkill_with_parents_in_flight_then_resume_is_exact(
    cli_env: dict[str, str], db: Connection, tmp_path: Path, mode: str
) -> None:
    """Kill 1: one parent's walk held at its second page while later parents finished and
    committed (the checkpoint names it open and them done). Kill 2: another parent held, and a
    batch's transaction stuck on a lock on ``ingest.checkpoints`` just before its commit.
    The final run finishes; every child row is there once, and no finished parent is fetched
    again."""
    customers, per_customer = 40, 4
    app = shop_app(customers, per_customer)
    # Parents go in key-text order: 1, 10, 11, ..., 19, 2, 20, ...
    first_held, second_held, third_held = 10, 2, 25
    app[HELD][first_held] = asyncio.Event()
    async with serve(app) as base:
        config = tmp_path / "shop.toml"
        config.write_text(shop_config(base, mode=mode))

        async def open_and_done(held: int) -> bool:
            state = await child_state(db)
            walks = [int(key[0]) for key, _ in state.get("open", ())]
            return held in walks and len(state.get("done", ())) >= 3

        cli = await spawn(["run", str(config)], cli_env, tmp_path, "run1")
        await wait_until(
            lambda: _alive_and(cli, open_and_done(first_held)), 60, "parents done past a held one"
        )
        await cli.kill()
        state = await child_state(db)
        done_before = {int(key[0]) for key in state["done"]}

        # Second run: the first parent resumes and is held again, another is held too; then a
        # commit is held by a lock.
        app[HELD][first_held] = asyncio.Event()
        app[HELD][second_held] = asyncio.Event()
        app[HELD][third_held] = asyncio.Event()
        app[REQUESTS].clear()
        cli = await spawn(["run", str(config)], cli_env, tmp_path, "run2")
        await wait_until(
            lambda: _alive_and(cli, open_and_done(second_held)), 60, "the second held parent"
        )
        # The resumed walk, not yet past its held page, is still named open (else the next run
        # would start it over and write its first page twice).
        state = await child_state(db)
        assert first_held in [int(key[0]) for key, _ in state.get("open", ())], state
        fetched_again = {
            int(r["path"].split("/")[2]) for r in app[REQUESTS] if r["path"].endswith("/orders")
        }
        assert not fetched_again & done_before
        async with db.transaction():
            await db.execute("LOCK TABLE ingest.checkpoints IN EXCLUSIVE MODE")
            # Its second page is the next batch to come: it waits on the lock to commit.
            app[HELD][third_held].set()
            await wait_until(
                lambda: _alive_and(cli, blocked_on(db, "ingest.checkpoints")),
                60,
                "a batch waiting to write its checkpoint",
            )
            await cli.kill()

        app[HELD][first_held].set()
        app[HELD][second_held].set()
        code, output = await run_cli(["run", str(config)], cli_env, tmp_path, "final")
        assert code == ExitCode.OK, output
    assert await orders(db) == wanted(customers, per_customer)
    assert (await child_state(db)) == {}
    assert await db.fetchval("SELECT done FROM ingest.checkpoints WHERE endpoint = 'orders'")


async def _alive_and(cli: Cli, check: Any) -> bool:
    if cli.process.returncode is not None:
        check.close()
        raise AssertionError(f"the run ended before the kill:\n{cli.output()}")
    return bool(await check)


async def test_many_page_parents_resume_each_open_walk_where_it_stopped(
    database: str, db: Connection
) -> None:
    """An in-process stop with several multi-page parents open: each resumes at its page."""
    app = shop_app(9, 7)
    held = {customer: asyncio.Event() for customer in (1, 3, 5)}
    app[HELD] = held
    stop = asyncio.Event()
    async with serve(app) as base:
        loaded = parse_config(shop_config(base, mode="append"), Path("shop.toml"))
        task = asyncio.create_task(run(loaded, database, stop=stop))

        async def three_open() -> bool:
            return len((await child_state(db)).get("open", ())) >= 3

        await wait_until(three_open, 60, "three open walks committed")
        stop.set()
        for event in held.values():
            event.set()
        await asyncio.gather(task, return_exceptions=True)
        app[REQUESTS].clear()
        await run(loaded, database)
    assert await orders(db) == wanted(9, 7)


async def test_a_checkpoint_of_the_serial_child_walk_resumes_inside_its_parent(
    database: str, db: Connection
) -> None:
    """A run killed by an earlier version left "inside parent 3, at page 2": this version
    resumes there (parent 3 from page 2, then 4 and 5; never 1 or 2)."""
    app = shop_app(5, 4)
    async with serve(app) as base:
        loaded = parse_config(shop_config(base, mode="append"), Path("shop.toml"))
        await run(loaded, database, endpoints=("customers",))
        state = {
            "parent": ["3"],
            "request": {"url": f"{base}/customers/3/orders", "params": [["page", "2"]]},
            "paginator": {},
        }
        await db.execute(
            "INSERT INTO ingest.checkpoints (source, endpoint, state) "
            "VALUES ('shop', 'orders', $1::jsonb)",
            orjson.dumps(state).decode(),
        )
        app[REQUESTS].clear()
        await run(loaded, database, endpoints=("orders",))
    asked = [(r["path"], r["query"].get("page")) for r in app[REQUESTS]]
    assert ("/customers/3/orders", "1") not in asked
    assert ("/customers/3/orders", "2") in asked
    assert {path for path, _ in asked} == {f"/customers/{c}/orders" for c in (3, 4, 5)}
    expected = [row for row in wanted(5, 4) if row[2] >= 3 and not (row[2] == 3 and row[0] <= 3003)]
    assert await orders(db) == expected


def test_status_shows_where_a_child_walk_stands() -> None:
    state = {"after": ["17"], "done": [["19"]], "open": [[["18"], {"request": {"url": "x"}}]]}
    assert cursor_of({"state": state, "done": False}) == (
        "parents done through 17; 1 open",
        None,
    )
    assert cursor_of({"state": {"after": None}, "done": False})[0] == "no parent done; 0 open"


async def test_parents_walked_at_once_do_not_fetch_ahead_past_each_parents_end(
    database: str, db: Connection
) -> None:
    """``http.pages_ahead`` does not apply inside each parent's walk when several parents are
    walked at once: they fill the budget, and one-page parents cost one request each."""
    app = shop_app(20, 0)
    async with serve(app) as base:
        text = shop_config(base, mode="append").replace(
            "max_concurrency = 4", "max_concurrency = 4\npages_ahead = 8"
        )
        await run(parse_config(text, Path("shop.toml")), database)
    assert await orders(db) == wanted(20, 0)
    pages = [r["query"].get("page") for r in app[REQUESTS] if r["path"].endswith("/orders")]
    assert pages == ["1"] * 20
