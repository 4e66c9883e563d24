"""Hostile HTTP sources: compression bombs and servers that echo the request's credentials.

Each test runs a real local server that answers as an attacker (or a careless API) would, and
checks what reaches the user: the run's error, its logs, stdout/stderr of the CLI and
``ingest.runs``.
"""

from __future__ import annotations

import base64
import gzip
import json
import re
import tracemalloc
import zlib
from pathlib import Path
from urllib.parse import quote, quote_plus, urlencode

import asyncpg
import orjson
import pytest
from aiohttp import web

from ingest.errors import ExitCode, SourceError
from ingest.secrets import Redactor, Secret
from tests.helpers import config_text, final_error, make_config, run
from tests.http_support import database_text
from tests.processes import run_ingest
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


SECRET = "k+y/SECRET==x"
#: Every form of SECRET a careless server might echo, each of which must stay hidden.
SECRET_FORMS = [
    SECRET,
    "SECRET",
    quote(SECRET),
    quote(SECRET, safe=""),
    quote_plus(SECRET),
    json.dumps(SECRET)[1:-1].replace("/", "\\/"),
    base64.b64encode(SECRET.encode()).decode(),
    base64.b64encode(f"reader:{SECRET}".encode()).decode(),
]


def echo_app() -> web.Application:
    """Every request fails with a 500 whose body echoes the request in several encodings.

    Padding puts the raw query or header right across the 200-character cut of the excerpt.
    """

    async def handler(request: web.Request) -> web.Response:
        authorization = request.headers.get("Authorization", "")
        decoded = base64.b64decode(authorization.removeprefix("Basic ") or b"").decode()
        body = (
            "x" * 180
            + f" echo={request.rel_url.raw_query_string}{authorization} "
            + json.dumps({"query": dict(request.query), "authorization": authorization})
            + f" form={urlencode(request.query)} basic={decoded} json={json.dumps(decoded)}"
        )
        return web.Response(status=500, text=body, content_type="text/plain")

    return _app({"/items": handler})


@pytest.mark.parametrize(
    "auth",
    [
        f'style = "api_key_query"\nparam = "sig"\nkey = "{SECRET}"\n',
        f'style = "basic"\nusername = "reader"\npassword = "{SECRET}"\n',
    ],
    ids=["api_key_query", "basic"],
)
async def test_a_server_echoing_the_credential_never_gets_it_into_output_or_the_database(
    cli_env: dict[str, str], db: Connection, tmp_path: Path, auth: str
) -> None:
    async with serve(echo_app()) as base:
        text = config_text(
            base,
            records_path="data",
            pagination={"style": "single"},
            http={"max_attempts": 3, "backoff_initial": 0.01, "backoff_max": 0.02},
        )
        config = tmp_path / "echo.toml"
        config.write_text(text + "[auth]\n" + auth)
        code, stdout, stderr = await run_ingest("run", str(config), env=cli_env)
    assert code == ExitCode.FAILED, stderr
    stored = await database_text(db)
    error = await db.fetchval("SELECT error FROM ingest.runs")
    # The echo reached every place a message goes, redacted.
    assert "retrying" in stderr and "HTTP 500" in error and "***" in error
    last = final_error(stderr)
    assert last.startswith("endpoint items: ") and "HTTP 500: xxx" in last
    for form in SECRET_FORMS:
        for where, content in (("stdout", stdout), ("stderr", stderr), ("ingest.*", stored)):
            assert form not in content, f"{form!r} in {where}"


@pytest.mark.parametrize("secret", [SECRET, "pässwört 𝄞 +/=&?#%", 'quote"back\\slash\ttab'])
def test_every_encoding_of_a_secret_is_redacted(secret: str) -> None:
    redactor = Redactor([Secret(secret)])
    quoted = quote(secret, safe="")
    forms = [
        secret,
        quote(secret),
        quoted,
        re.sub("%[0-9A-F]{2}", lambda hexes: hexes[0].lower(), quoted),
        quote_plus(secret),
        quote_plus(secret, safe="/"),
        quote(quoted, safe=""),  # percent-encoded twice
        urlencode({"k": secret}).removeprefix("k="),
        json.dumps(secret)[1:-1],
        json.dumps(secret, ensure_ascii=False)[1:-1],
        json.dumps(secret)[1:-1].replace("/", "\\/"),
        json.dumps(quote(secret))[1:-1],
        base64.b64encode(secret.encode()).decode(),
        base64.urlsafe_b64encode(secret.encode()).decode().rstrip("="),
        # Partly re-encoded, as a client normalising a URL leaves it.
        quote(secret[: len(secret) // 2], safe="") + secret[len(secret) // 2 :],
    ]
    for form in forms:
        assert redactor(f"<{form}>") == "<***>", form
    body = ("y" * 190 + quoted + " tail").encode()
    assert redactor.excerpt(body, 200) == "y" * 190 + "***..."
    assert redactor("an ordinary message") == "an ordinary message"
