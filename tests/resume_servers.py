"""Local sources and configs for the resume tests: timed records, windows, latency, children.

``changes_app`` serves ``/events?since=&until=&page=&per_page=`` over a mutable list of records
(tests change it between runs), each record carrying ``updated_at``; every request sleeps
``latency`` seconds so a run takes long enough to be killed in the middle.
"""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import asyncpg
from aiohttp import web

from tests.servers import TRICKY_TEXT, _app, json_response

EPOCH = dt.datetime(2025, 1, 1, tzinfo=dt.UTC)


def iso(moment: dt.datetime) -> str:
    return moment.isoformat().replace("+00:00", "Z")


def timed_records(count: int, *, every: dt.timedelta, start: int = 1) -> list[dict[str, Any]]:
    """Records ``start..start+count-1``; record ``i`` was updated at ``EPOCH + (i - 1) * every``."""
    return [
        {
            "id": index,
            "name": f"{TRICKY_TEXT[index % len(TRICKY_TEXT)]} #{index}",
            "amount": index * 3,
            "updated_at": iso(EPOCH + (index - 1) * every),
        }
        for index in range(start, start + count)
    ]


def _moment(text: str | None) -> dt.datetime | None:
    if not text:
        return None
    moment = dt.datetime.fromisoformat(text)
    return moment if moment.tzinfo else moment.replace(tzinfo=dt.UTC)


class Valve:
    """Holds requests while closed, so a test can catch a run in the middle of a fetch.

    Closed, it lets through only as many requests as :meth:`allow` granted: a test lets a run
    reach a point (a commit), takes its lock, then lets the next pages through, so the run can
    never finish before the test is ready. :meth:`release_held` lets go the requests held so far
    (a killed run's: nobody reads their answers) without spending what was allowed.
    """

    def __init__(self) -> None:
        self._open = True
        self._allowance = 0
        self._generation = 0
        self._changed = asyncio.Condition()
        self.waiting = 0

    async def passage(self) -> None:
        async with self._changed:
            generation = self._generation

            def may_pass() -> bool:
                return self._open or self._allowance > 0 or self._generation != generation

            self.waiting += 1
            try:
                await self._changed.wait_for(may_pass)
            finally:
                self.waiting -= 1
            if not self._open and self._generation == generation:
                self._allowance -= 1

    async def close(self) -> None:
        async with self._changed:
            self._open = False
            self._allowance = 0

    async def open(self) -> None:
        async with self._changed:
            self._open = True
            self._changed.notify_all()

    async def allow(self, requests: int) -> None:
        """While closed: let ``requests`` more requests through."""
        async with self._changed:
            self._allowance += requests
            self._changed.notify_all()

    async def release_held(self) -> None:
        async with self._changed:
            self._generation += 1
            self._changed.notify_all()


def changes_app(
    records: list[dict[str, Any]], *, latency: float = 0.0, valve: Valve | None = None
) -> web.Application:
    """``/events``: records with ``since <= updated_at < until``, ordered by id, page by page."""

    async def handler(request: web.Request) -> web.Response:
        if latency:
            await asyncio.sleep(latency)
        if valve is not None:
            await valve.passage()
        since = _moment(request.query.get("since"))
        until = _moment(request.query.get("until"))
        page = int(request.query.get("page", "1"))
        size = int(request.query.get("per_page", "10"))
        selected = [
            record
            for record in sorted(records, key=lambda record: record["id"])
            if (since is None or _moment(record["updated_at"]) >= since)  # type: ignore[operator]
            and (until is None or _moment(record["updated_at"]) < until)  # type: ignore[operator]
        ]
        items = selected[(page - 1) * size : page * size]
        return json_response({"items": items, "has_more": page * size < len(selected)})

    return _app({"/events": handler})


def customer_orders(customer: int, per_customer: int) -> list[dict[str, Any]]:
    """The orders ``customers_app`` serves for one customer (uneven counts across customers)."""
    count = per_customer + customer % 3
    return [
        {"order_id": customer * 1000 + index, "total": index * 1.5} for index in range(1, count + 1)
    ]


def customers_app(
    customers: int, per_customer: int, *, page_size: int = 3, latency: float = 0.0
) -> web.Application:
    """``/customers?page=N`` and ``/customers/{id}/orders?page=N`` (each paginated)."""

    def paged(items: list[dict[str, Any]], request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        chunk = items[(page - 1) * page_size : page * page_size]
        return json_response({"items": chunk, "has_more": page * page_size < len(items)})

    async def list_customers(request: web.Request) -> web.Response:
        people = [{"id": index, "name": f"customer {index}"} for index in range(1, customers + 1)]
        return paged(people, request)

    async def list_orders(request: web.Request) -> web.Response:
        if latency:
            await asyncio.sleep(latency)
        customer = int(request.match_info["id"])
        if not 1 <= customer <= customers:
            raise web.HTTPNotFound()
        return paged(customer_orders(customer, per_customer), request)

    return _app({"/customers": list_customers, "/customers/{id}/orders": list_orders})


def events_config(
    base_url: str,
    *,
    mode: str = "merge",
    incremental: str = "",
    per_page: int = 7,
    batch_size: int = 20,
    consumers: int = 2,
    source: str = "shop",
    writer_processes: int = 0,
    pages_ahead: int | None = None,
) -> str:
    """A source with one ``/events`` endpoint (``changes_app``) into table ``events``.

    ``pages_ahead``: set ``http.pages_ahead`` (default: ingest's own default).
    """
    key = 'primary_key = ["id"]' if mode == "merge" else ""
    http = "" if pages_ahead is None else f"[http]\npages_ahead = {pages_ahead}"
    return f"""
[source]
name = "{source}"
base_url = "{base_url}"
{http}
[pipeline]
batch_size = {batch_size}
consumers = {consumers}
batch_seconds = 0.2
writer_processes = {writer_processes}
[[endpoints]]
name = "events"
path = "/events"
params = {{ per_page = {per_page} }}
records_path = "items"
pagination = {{ style = "page_number", has_more_path = "has_more" }}
{incremental}
[endpoints.table]
name = "events"
mode = "{mode}"
{key}
[endpoints.table.columns]
id = {{ path = "id", type = "bigint" }}
name = {{ path = "name" }}
amount = {{ path = "amount", type = "bigint" }}
updated_at = {{ path = "updated_at", type = "timestamptz" }}
"""


async def events_table(db: asyncpg.Connection) -> list[tuple[Any, ...]]:
    """Every row of ``events``, duplicates included, in a stable order."""
    rows = await db.fetch("SELECT id, name, amount, updated_at FROM events ORDER BY id, name")
    return [
        (row["id"], row["name"], row["amount"], iso(row["updated_at"].astimezone(dt.UTC)))
        for row in rows
    ]
