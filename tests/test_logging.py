"""Logs: JSON lines when not a TTY, with run context, and never a secret."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import orjson
from aiohttp import web

from tests.helpers import config_text
from tests.processes import run_ingest as ingest
from tests.servers import json_response, make_records, serve

SECRET = "sk_live_Zx81qYw0PmL4"


def flaky_app(records: list[dict[str, Any]]) -> web.Application:
    """Fails each page's first request with a 503 that echoes the Authorization header."""
    seen: set[str] = set()

    async def handler(request: web.Request) -> web.Response:
        page = request.query.get("page", "1")
        if page not in seen:
            seen.add(page)
            return web.Response(
                status=503, text=f"overloaded, your auth was {request.headers['Authorization']}"
            )
        index = int(page)
        return json_response(records[(index - 1) * 10 : index * 10])

    app = web.Application()
    app.router.add_get("/items", handler)
    return app


async def test_json_logs_carry_run_context_and_no_secret(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    async with serve(flaky_app(make_records(25))) as base:
        config = tmp_path / "flaky.toml"
        config.write_text(
            config_text(
                base,
                source={"headers": {"Authorization": "Bearer ${TOKEN}"}},
                # One page at a time: each page fails once, and no page past the end is asked.
                http={"backoff_initial": 0.01, "backoff_max": 0.05, "pages_ahead": 1},
                pagination={"style": "page_number"},
            )
        )
        code, out, err = await ingest(
            "run", str(config), "--log-format", "json", env={**cli_env, "TOKEN": SECRET}
        )
    assert code == 0, err
    assert SECRET not in out + err
    events = [orjson.loads(line) for line in err.splitlines() if line.strip()]
    retries = [event for event in events if event["event"] == "retrying"]
    assert len(retries) == 4  # pages 1-3 and the empty page 4 each failed once
    assert all(event["reason"] == "http_503" and event["run_id"] for event in retries)
    assert any("***" in event["error"] for event in retries)
    assert "retries: http_503=4" in out
