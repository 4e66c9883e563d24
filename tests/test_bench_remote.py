"""``python -m bench --remote`` keeps working: a tiny run (few pages, 5 ms latency), no timings.

The benchmark itself is not a test; this only checks that every part of the remote mode runs
end to end (its server, every pagination style's ingest config, the parent -> child pair, the
server that refuses concurrency) and that every run loads exactly its rows.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from bench.remote_server import Settings, build_app
from bench.remote_styles import PAGINATION, STYLES, expected_rows, serial_requests

ROOT = Path(__file__).resolve().parent.parent


def test_every_style_has_an_ingest_pagination_and_serial_counts_are_right() -> None:
    assert set(STYLES) - set(PAGINATION) == {"children"}
    settings = Settings(records=20_000, page_size=100, parents=100)
    assert serial_requests("page_total", settings) == 200
    assert serial_requests("page", settings) == 201  # the empty page that ends the walk
    assert serial_requests("children", settings) == 101
    assert expected_rows("children", settings) == 10_000


def test_a_tiny_remote_bench_runs_every_style_and_loads_exact_rows(
    postgres_server: str, tmp_path: Path
) -> None:
    command = [
        sys.executable,
        "-m",
        "bench",
        "--remote",
        *("--records", "120", "--page-size", "20", "--parents", "3", "--latency", "0.005"),
        *("--contenders", "default", "--profiles", "fixed,solo", "--dsn", postgres_server),
        *("--results-dir", str(tmp_path)),
    ]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "remote-latest.json").read_text())
    runs = {(r["profile"], r["style"]): r for r in report["results"]}
    assert set(runs) == {("fixed", style) for style in STYLES} | {("solo", "page_total")}
    assert all(r["exact"] for r in runs.values()), runs
    assert runs[("fixed", "children")]["rows"] == 60
    # ingest's configs of the serial styles declare the server's range filter (slices).
    assert {style for (_, style), r in runs.items() if r["ranged"]} == {
        "cursor",
        "next_url",
        "link",
    }
    assert "x serial" in done.stdout


async def test_the_serial_styles_filter_by_since_and_until_and_keep_the_range() -> None:
    """A range filter as ingest's slices use it: ``since <= updated_at < until``, in order, and
    every next cursor/URL/Link stays inside the range; without a range, every record."""
    settings = Settings(records=95, page_size=10, latency=0.0, jitter=0.0)
    runner = web.AppRunner(build_app(settings))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    base = f"http://127.0.0.1:{port}/fixed"

    def moment(text: str) -> dt.datetime:
        return dt.datetime.fromisoformat(text)

    async def walk(session: aiohttp.ClientSession, style: str, query: dict[str, str]) -> list[Any]:
        records: list[Any] = []
        url: str | None = f"{base}/{style}"
        params: dict[str, str] | None = dict(query)
        while url is not None:
            async with session.get(url, params=params) as answer:
                body = await answer.json()
                link = answer.links.get("next")
            records += body["data"]
            if style == "cursor":
                params = {**query, "cursor": body["next_cursor"]} if body["next_cursor"] else None
                url = url if params is not None else None
            elif style == "next_url":
                url, params = body["next"], None
            else:
                url, params = (str(link["url"]) if link else None), None
        return records

    try:
        async with aiohttp.ClientSession() as session:
            everything = await walk(session, "cursor", {})
            assert [r["id"] for r in everything] == list(range(1, 96))
            times = [moment(r["updated_at"]) for r in everything]
            assert times == sorted(times) and times[-1] < dt.datetime.now(dt.UTC)
            since, until = everything[22]["updated_at"], everything[61]["updated_at"]
            for style in ("cursor", "next_url", "link"):
                got = await walk(session, style, {"since": since, "until": until})
                assert [r["id"] for r in got] == list(range(23, 62)), style
                assert await walk(session, style, {}) == everything, style
    finally:
        await runner.cleanup()
