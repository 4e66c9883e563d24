"""Credentials stay on the source's origin: foreign next links and redirects, allowed or not."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from ingest.config import parse_config
from ingest.errors import SourceError
from ingest.secrets import Redactor
from tests.helpers import config_text, ids, run
from tests.http_support import captured_logs
from tests.servers import json_response, make_records

TOKEN = "tok-4Hs9Lm2QxZ7v"
API_KEY = "key-Pw8Rt3Yu6Io1"
CREDENTIAL_HEADERS = ("Authorization", "X-Api-Key")


@asynccontextmanager
async def serve_on(app: web.Application, host: str) -> AsyncIterator[str]:
    server = TestServer(app, host=host)
    await server.start_server()
    try:
        yield str(server.make_url("")).rstrip("/")
    finally:
        await server.close()


def foreign_app(seen: list[dict[str, str]], records: list[dict[str, Any]]) -> web.Application:
    """The other host: refuses (400, not retried) any request that carries a credential."""

    async def handler(request: web.Request) -> web.Response:
        seen.append(dict(request.headers))
        leaked = [name for name in CREDENTIAL_HEADERS if name in request.headers]
        if leaked:
            return json_response({"error": f"credential leaked: {leaked}"}, status=400)
        return json_response({"data": records, "next": None})

    app = web.Application()
    app.router.add_get("/more", handler)
    return app


def home_app(
    seen: list[dict[str, str]], records: list[dict[str, Any]], foreign: str, redirect: bool
) -> web.Application:
    """The source's origin: page 1 here, then a next link (or a redirect) to the other host."""

    async def handler(request: web.Request) -> web.StreamResponse:
        seen.append(dict(request.headers))
        assert request.headers["Authorization"] == f"Bearer {TOKEN}"
        assert request.headers["X-Api-Key"] == API_KEY
        if redirect:
            raise web.HTTPFound(f"{foreign}/more")
        return json_response({"data": records, "next": f"{foreign}/more"})

    app = web.Application()
    app.router.add_get("/items", handler)
    return app


def _config(base: str, allow: list[str] | None) -> Any:
    text = config_text(
        base,
        records_path="data",
        pagination={"style": "next_url", "next_url_path": "next"},
        source={"headers": {"X-Api-Key": "${TEST_API_KEY}", "X-Client": "ingest-tests"}},
        http={"allow_hosts": allow or [], "max_attempts": 2, "backoff_initial": 0.01},
    )
    text += '[auth]\nstyle = "bearer"\ntoken = "${TEST_TOKEN}"\n'
    return parse_config(text, Path("hosts.toml"), {"TEST_TOKEN": TOKEN, "TEST_API_KEY": API_KEY})


@pytest.mark.parametrize("redirect", [False, True], ids=["next_link", "redirect"])
async def test_foreign_host_is_refused_by_default_with_a_clear_error(
    database: str, db: asyncpg.Connection, redirect: bool
) -> None:
    home_seen: list[dict[str, str]] = []
    foreign_seen: list[dict[str, str]] = []
    redactor = Redactor()
    async with serve_on(foreign_app(foreign_seen, make_records(5, start=11)), "127.0.0.2") as far:
        app = home_app(home_seen, make_records(10), far, redirect)
        async with serve_on(app, "127.0.0.1") as base:
            with captured_logs(redactor) as logs, pytest.raises(SourceError) as caught:
                await run(_config(base, None), database, redactor=redactor)
    message = str(caught.value)
    port = far.rsplit(":", 1)[1]
    assert message == (
        f"endpoint items: refusing to request {far}/more: host 127.0.0.2:{port} is not the "
        f"source's origin {base}; add it to http.allow_hosts to follow it (without credentials)"
    )
    assert foreign_seen == []
    assert len(home_seen) == 1
    assert TOKEN not in logs.getvalue() and API_KEY not in logs.getvalue()


@pytest.mark.parametrize("redirect", [False, True], ids=["next_link", "redirect"])
async def test_allowed_foreign_host_is_followed_without_credentials(
    database: str, db: asyncpg.Connection, redirect: bool
) -> None:
    home_seen: list[dict[str, str]] = []
    foreign_seen: list[dict[str, str]] = []
    async with serve_on(foreign_app(foreign_seen, make_records(5, start=11)), "127.0.0.2") as far:
        app = home_app(home_seen, make_records(10), far, redirect)
        async with serve_on(app, "127.0.0.1") as base:
            await run(_config(base, ["127.0.0.2"]), database)
    expected = list(range(11, 16)) if redirect else [*range(1, 11), *range(11, 16)]
    assert await ids(db) == expected
    assert len(foreign_seen) == 1
    for name in CREDENTIAL_HEADERS:
        assert name not in foreign_seen[0]
    assert foreign_seen[0]["X-Client"] == "ingest-tests"  # non-secret headers still go
    assert home_seen[0]["Authorization"] == f"Bearer {TOKEN}"


async def test_allow_hosts_entry_with_a_port_only_allows_that_port(
    database: str, db: asyncpg.Connection
) -> None:
    foreign = foreign_app([], make_records(2, start=11))
    async with serve_on(foreign, "127.0.0.2") as far:
        home = home_app([], make_records(1), far, False)
        async with serve_on(home, "127.0.0.1") as base:
            with pytest.raises(SourceError, match="refusing to request"):
                await run(_config(base, ["127.0.0.2:1"]), database)
            port = far.rsplit(":", 1)[1]
            await run(_config(base, [f"127.0.0.2:{port}"]), database)
    assert await ids(db) == [1, 11, 12]
