"""The C record encoder under memory pressure (issue 16, item 3): a large first record must not
make it reserve the batch at count times that record's size, and a stream it cannot allocate
is declined (the batch takes the Python path), never a MemoryError that fails every rerun.

The limits are real: the encoder runs in a child process under an address-space limit
(RLIMIT_AS), and the end-to-end case runs ``ingest run`` itself under one.
"""

from __future__ import annotations

import asyncio
import resource
import subprocess
import sys
import textwrap
from pathlib import Path

import asyncpg
import orjson
import pytest
from aiohttp import web

from ingest import copyenc
from tests.helpers import config_text
from tests.servers import serve

pytestmark = pytest.mark.skipif(not copyenc.available(), reason="C extension not built")

#: Address space for the children: far below what the old up-front reservation asked for
#: (12-16 GB for the batch below), well above what the batch needs.
LIMIT = 3 * 1024**3

ENCODE_UNDER_LIMIT = textwrap.dedent(
    """
    import resource, sys
    from ingest.config import Endpoint
    from ingest.copyenc import RecordEncoder
    endpoint = Endpoint.model_validate({
        "name": "items", "path": "/items", "records_path": "data",
        "table": {"name": "items", "mode": "append", "store_raw": True,
                  "columns": {"id": {"path": "id", "type": "bigint"},
                              "note": {"path": "note", "type": "text"}}},
    })
    encoder = RecordEncoder.for_endpoint(endpoint)
    size, count, headroom = int(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    first = b'{"id": 0, "note": "' + b"x" * size + b'"}'
    records = [first] + [b'{"id": %d, "note": "n"}' % index for index in range(1, count)]
    used = int(open("/proc/self/statm").read().split()[0]) * resource.getpagesize()
    resource.setrlimit(resource.RLIMIT_AS, (used + headroom, used + headroom))
    encoded = encoder.encode(records)
    print("declined" if encoded is None else f"encoded {len(encoded)} {len(encoded.data)}")
    """
)


def _encode_in_child(size: int, count: int, headroom: int) -> str:
    done = subprocess.run(
        [sys.executable, "-c", ENCODE_UNDER_LIMIT, str(size), str(count), str(headroom)],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip().splitlines()[-1]


def test_a_large_first_record_does_not_reserve_the_batch_at_its_size() -> None:
    """10,000 records, the first 1 MB: the stream is ~1.3 MB; 512 MB of room is plenty."""
    out = _encode_in_child(1024 * 1024, 10_000, 512 * 1024**2)
    assert out.startswith("encoded 10000 "), out
    assert int(out.split()[2]) < 4 * 1024 * 1024


def test_a_stream_it_cannot_allocate_is_declined() -> None:
    """A 200 MB batch with 64 MB of room: None (the Python path decides), not MemoryError."""
    assert _encode_in_child(200 * 1024 * 1024, 3, 64 * 1024**2) == "declined"


def _limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (LIMIT, LIMIT))


async def test_ingest_run_lands_a_batch_behind_a_large_first_record(
    tmp_path: Path, cli_env: dict[str, str], database: str
) -> None:
    """End to end: ``ingest run`` under a 3 GB address-space limit loads 10,000 records whose
    first holds a 1 MB string, raw records stored; a rerun has nothing to do."""
    records = [{"id": 0, "note": "x" * (1024 * 1024)}]
    records += [{"id": index, "note": f"n{index}"} for index in range(1, 10_000)]
    body = orjson.dumps({"data": records})

    async def handler(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        data = body if page == 1 else b'{"data": []}'
        return web.Response(body=data, content_type="application/json")

    app = web.Application()
    app.router.add_get("/items", handler)
    async with serve(app) as base:
        config = tmp_path / "big.toml"
        config.write_text(
            config_text(
                base,
                records_path="data",
                pagination={"style": "page_number"},
                columns={
                    "id": {"path": "id", "type": "bigint"},
                    "note": {"path": "note", "type": "text"},
                },
                pipeline={"batch_size": 10_000},
            )
        )
        for _ in range(2):
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "ingest",
                "run",
                str(config),
                env=cli_env,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
                preexec_fn=_limit_address_space,  # only setrlimit, then exec
            )
            out, err = await asyncio.wait_for(process.communicate(), timeout=180)
            output = (out + err).decode()
            assert process.returncode == 0, output
            assert "MemoryError" not in output
    connection = await asyncpg.connect(database)
    try:
        row = await connection.fetchrow("SELECT count(*), max(length(note)) FROM items")
    finally:
        await connection.close()
    assert row is not None and tuple(row) == (10_000, 1024 * 1024)
