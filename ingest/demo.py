"""The bundled demo API: a small paginated JSON server on 127.0.0.1 for ``ingest demo``.

It behaves like real APIs do: it caps the page size (asking for 250 gets 100), sends the total as
a string, and paginates one endpoint by page number and another by RFC 8288 ``Link`` headers.
Record text includes quotes, tabs, newlines, backslashes and emoji to exercise the COPY path.
"""

from __future__ import annotations

import datetime as dt
import unicodedata
from collections.abc import AsyncIterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import orjson
from aiohttp import web

from ingest.assets import example_config

DEMO_CONFIG = example_config("demo.toml")
PAGE_SIZE_CAP = 100
NAMES = ['Ada "the first" Lovelace', "Grace\tHopper", "Alan\nTuring", "C:\\Users\\edsger", "Zoë 🚀"]
STATUSES = ("active", "paused", "closed")


def demo_user(index: int) -> dict[str, Any]:
    """One deterministic demo record (1-based ``index``)."""
    moment = dt.datetime(2026, 1, 1, tzinfo=dt.UTC) + dt.timedelta(minutes=index)
    return {
        "id": index,
        "name": f"{NAMES[index % len(NAMES)]} #{index}",
        "email": f"user{index}@example.com",
        "status": STATUSES[index % len(STATUSES)],
        "score": str(round(index * 1.5, 1)) if index % 2 else index * 1.5,
        "tags": [f"t{index % 7}", f"t{index % 11}"],
        "updated_at": moment.isoformat().replace("+00:00", "Z"),
        "profile": {"plan": "pro" if index % 4 == 0 else "free", "seats": index % 9},
    }


def demo_event(index: int) -> dict[str, Any]:
    return {"event_id": f"evt_{index:06d}", "user_id": (index % 50) + 1, "kind": "login"}


def build_app(users: int = 2500, events: int = 730) -> web.Application:
    """The demo API: ``/api/users`` (page number) and ``/api/events`` (Link header)."""

    async def list_users(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        size = min(int(request.query.get("per_page", "25")), PAGE_SIZE_CAP)
        start = (page - 1) * size
        items = [demo_user(i) for i in range(start + 1, min(start + size, users) + 1)]
        body = {"data": {"items": items}, "meta": {"total": str(users), "page": page}}
        return web.Response(body=orjson.dumps(body), content_type="application/json")

    async def list_events(request: web.Request) -> web.Response:
        after = int(request.query.get("after", "0"))
        size = min(int(request.query.get("limit", "50")), PAGE_SIZE_CAP)
        items = [demo_event(i) for i in range(after + 1, min(after + size, events) + 1)]
        headers = {}
        if after + size < events:
            headers["Link"] = (
                f'</api/events?after={after + size}&limit={size}>; rel="next", '
                f'</api/events?after=0&limit={size}>; rel="first"'
            )
        return web.Response(
            body=orjson.dumps(items), content_type="application/json", headers=headers
        )

    app = web.Application()
    app.router.add_get("/api/users", list_users)
    app.router.add_get("/api/events", list_events)
    return app


@asynccontextmanager
async def serve_demo(users: int = 2500, events: int = 730) -> AsyncIterator[str]:
    """Serve the demo API on an ephemeral 127.0.0.1 port; yield its base URL."""
    runner = web.AppRunner(build_app(users, events), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        yield f"http://127.0.0.1:{port}/api"
    finally:
        await runner.cleanup()


#: The columns of ``demo_users`` the demo shows, in order.
SAMPLE_COLUMNS = ("id", "name", "email", "score", "updated_at", "plan")


def cell(value: Any) -> str:
    """A value as a person reads it: no Python reprs; tabs, newlines and other control
    characters shown as escapes so one record stays on one line."""
    if value is None:
        return ""
    if isinstance(value, dt.datetime):
        return value.astimezone(dt.UTC).strftime("%Y-%m-%d %H:%M:%SZ")
    text = str(value)
    return "".join(
        {"\t": "\\t", "\n": "\\n", "\r": "\\r"}.get(char, f"\\x{ord(char):02x}")
        if unicodedata.category(char) == "Cc"
        else char
        for char in text
    )


def _width(text: str) -> int:
    """Terminal columns: wide characters (CJK, most emoji) take two."""
    return sum(2 if unicodedata.east_asian_width(char) in "WF" else 1 for char in text)


def text_table(header: Sequence[str], rows: Sequence[Sequence[str]], indent: str = "  ") -> str:
    """A plain aligned table with a header and a rule; numbers-looking columns right-aligned."""
    widths = [max(_width(row[i]) for row in [header, *rows]) for i in range(len(header))]
    numeric = [
        all(row[i].replace(".", "", 1).lstrip("-").isdigit() for row in rows if row[i])
        for i in range(len(header))
    ]

    def line(row: Sequence[str]) -> str:
        cells = []
        for i, text in enumerate(row):
            pad = " " * (widths[i] - _width(text))
            cells.append(pad + text if numeric[i] else text + pad)
        return (indent + "  ".join(cells)).rstrip()

    rule = ["-" * width for width in widths]
    return "\n".join([line(header), line(rule), *(line(row) for row in rows)])


def sample_report(rows: Sequence[Mapping[str, Any]], users: int, events: int) -> str:
    """What the demo loaded: row counts and the first rows of ``demo_users`` with headers."""
    table = text_table(
        SAMPLE_COLUMNS, [[cell(row[column]) for column in SAMPLE_COLUMNS] for row in rows]
    )
    return (
        f"demo_users holds {users} rows (merge on id: a rerun updates them, never doubles "
        f"them); demo_events holds {events} rows. The first {len(rows)} users:\n{table}"
    )


def next_steps(config: str) -> str:
    """How to go from the demo to one's own API."""
    return "\n".join(
        [
            "next: copy the demo config and point it at your API:",
            f"  cp {config} my_api.toml    # set base_url, auth, endpoints and tables",
            "  ingest validate my_api.toml    # checks config, one request per endpoint, database",
            "  ingest migrate && ingest run my_api.toml",
        ]
    )
