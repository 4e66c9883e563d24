"""Hostile HTTP sources: compression bombs and servers that echo the request's credentials.

Each test runs a real local server that answers as an attacker (or a careless API) would, and
checks what reaches the user: the run's error, its logs, stdout/stderr of the CLI and
``ingest.runs``.
"""

from __future__ import annotations

import gzip
import tracemalloc
import zlib

import asyncpg
import orjson
import pytest
from aiohttp import web

from ingest.errors import SourceError
from tests.helpers import make_config, run
from tests.servers import _app, make_records, serve

Connection = asyncpg.Connection
MIB = 1 << 20


def gzip_bomb(decoded_mib: int) -> bytes:
    """A gzip member of ``decoded_mib`` MiB of spaces (valid JSON whitespace), ~1/1000 of it."""
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    block = b" " * MIB
    parts = [compressor.compress(block) for _ in range(decoded_mib)]
    return b"".join(parts) + compressor.flush()


def bomb_app(bomb: bytes, *, chunked: bool) -> web.Application:
    """Page 1: a small gzip page; page 2: the bomb (with Content-Length, or chunked)."""
    records = make_records(3)

    async def handler(request: web.Request) -> web.StreamResponse:
        page = int(request.query.get("page", "1"))
        if page == 1:
            body = gzip.compress(orjson.dumps({"data": records, "total": 9}))
            return web.Response(
                body=body,
                headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
            )
        headers = {"Content-Type": "application/json", "Content-Encoding": "gzip"}
        if not chunked:
            return web.Response(body=bomb, headers=headers)
        response = web.StreamResponse(headers=headers)
        response.enable_chunked_encoding()
        await response.prepare(request)
        for start in range(0, len(bomb), 1 << 14):
            await response.write(bomb[start : start + (1 << 14)])
        await response.write_eof()
        return response

    return _app({"/items": handler})


@pytest.mark.parametrize("chunked", [False, True])
async def test_a_gzip_bomb_stops_at_the_decoded_size_cap_without_inflating_it(
    database: str, db: Connection, chunked: bool
) -> None:
    bomb = gzip_bomb(256)
    assert len(bomb) < MIB // 2  # small on the wire: only the decoded size can catch it
    async with serve(bomb_app(bomb, chunked=chunked)) as base:
        loaded = make_config(
            base,
            records_path="data",
            params={"per_page": 3},
            pagination={"style": "page_number", "total_path": "total"},
            http={"max_response_bytes": MIB},
        )
        tracemalloc.start()
        try:
            with pytest.raises(SourceError) as failure:
                await run(loaded, database)
            _, peak = tracemalloc.get_traced_memory()
        finally:
            tracemalloc.stop()
    message = str(failure.value)
    assert message.startswith("endpoint items: http://127.0.0.1:")
    assert "/items?" in message and "page=2" in message
    assert message.endswith("response exceeds http.max_response_bytes=1048576 once decoded (gzip)")
    # 256 MiB inflated whole would show here; streaming keeps it near the cap.
    assert peak < 32 * MIB, f"peak {peak / MIB:.1f} MiB"
    # page=2 was asked for: the gzip page 1 before it, within the cap, was decoded and read.
    status = await db.fetchval("SELECT status FROM ingest.runs")
    assert status == "failed"
