"""Poison records and hostile pages end to end (issue 16, items 1-7): every record either lands
exactly as the Python rules say or goes to ``ingest.dead_letters`` with its reason, the run goes
on, and a page that is not JSON by orjson's rules is a malformed response for every parser.

Each case runs the pipeline three ways against a real local server and a real database: typed
decoding on (msgspec, then the C record encoder), off (orjson and the Python converters), and
with writer processes (the envelope parser here, conversion in another process). The three
must agree.
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest
from aiohttp import web

from ingest.errors import IngestError
from tests.helpers import make_config, run
from tests.servers import serve

#: (typed_decode, writer_processes) per way of running; the table is named after the way.
WAYS = {"typed_on": (True, 0), "typed_off": (False, 0), "writers": (True, 2)}
PAGE = 10


def raw_pages_app(bodies: list[bytes]) -> web.Application:
    """``/items?page=N`` answers ``bodies[N - 1]`` as it is (bytes, so anything goes), then []."""

    async def handler(request: web.Request) -> web.Response:
        page = int(request.query.get("page", "1"))
        body = bodies[page - 1] if page <= len(bodies) else b'{"data": []}'
        return web.Response(body=body, content_type="application/json")

    app = web.Application()
    app.router.add_get("/items", handler)
    return app


def pages_of(records: list[Any]) -> list[bytes]:
    """The records as pages of :data:`PAGE`, by ``json.dumps`` (every non-ASCII letter escaped)."""
    return [
        json.dumps({"data": records[at : at + PAGE]}).encode()
        for at in range(0, len(records), PAGE)
    ]


async def run_ways(
    database: str,
    bodies: list[bytes],
    columns: dict[str, dict[str, str]],
    *,
    store_raw: bool = False,
    mode: str = "merge",
) -> dict[str, Any]:
    """Run the pages each way; the result per way, or the IngestError it ended with."""
    outcomes: dict[str, Any] = {}
    async with serve(raw_pages_app(bodies)) as base_url:
        for table, (typed, writers) in WAYS.items():
            loaded = make_config(
                base_url,
                pagination={"style": "page_number", "page_size_param": "per_page"},
                records_path="data",
                columns=columns,
                table=table,
                endpoint=table,
                store_raw=store_raw,
                mode=mode,
                http={"max_attempts": 2, "backoff_initial": 0, "backoff_max": 0},
                pipeline={"typed_decode": typed, "writer_processes": writers, "batch_size": 20},
            )
            try:
                outcomes[table] = await run(loaded, database)
            except IngestError as exc:
                outcomes[table] = exc
    return outcomes


async def landed(db: Any, table: str, column: str) -> dict[int, Any]:
    return {row["id"]: row[column] for row in await db.fetch(f"SELECT * FROM {table}")}


async def dead_letters(db: Any, endpoint: str) -> dict[int, str]:
    rows = await db.fetch(
        "SELECT record, error FROM ingest.dead_letters WHERE endpoint = $1", endpoint
    )
    return {json.loads(row["record"])["id"]: row["error"] for row in rows}


def filler(count: int, start: int = 100) -> list[dict[str, Any]]:
    return [{"id": index, "x": index} for index in range(start, start + count)]


LONG_KEY = "наименование_товара_на_складе_в_магазине_номер_один"


async def test_a_long_escaped_key_is_read_by_every_path(database: str, db: Any) -> None:
    """Item 1: a key whose \\u-escaped token is longer than the C encoder's key buffer."""
    records = [{"id": 1, LONG_KEY: 42}, {"id": 2, LONG_KEY: "not a number"}, *filler(28)]
    columns = {"id": {"path": "id", "type": "bigint"}, "n": {"path": LONG_KEY, "type": "bigint"}}
    outcomes = await run_ways(database, pages_of(records), columns)
    for table, outcome in outcomes.items():
        assert not isinstance(outcome, Exception), outcome
        values = await landed(db, table, "n")
        assert values[1] == 42, table
        assert 2 not in values
        assert "not an integer" in (await dead_letters(db, table))[2]


async def test_minus_zero_in_a_double_column_is_zero_everywhere(database: str, db: Any) -> None:
    """Item 2: JSON ``-0`` is an integer, so 0.0 as Python's float(0); ``-0.0`` stays -0.0."""
    body = b'{"data": [{"id": 1, "x": -0}, {"id": 2, "x": -0.0}, {"id": 3, "x": -0e0}]}'
    columns = {"id": {"path": "id", "type": "bigint"}, "x": {"path": "x", "type": "double"}}
    outcomes = await run_ways(database, [body], columns)
    for table, outcome in outcomes.items():
        assert not isinstance(outcome, Exception), outcome
        values = await landed(db, table, "x")
        signs = {key: math.copysign(1.0, value) for key, value in values.items()}
        assert signs == {1: 1.0, 2: -1.0, 3: -1.0}, table


async def test_a_number_numeric_cannot_hold_lands_as_python_reads_it(
    database: str, db: Any
) -> None:
    """Item 4: 1e-16384 is 0.0 to orjson, so the Python path lands 0 (raw record included);
    the typed paths keep the server's text, which PostgreSQL's jsonb refuses, and land the
    Python path's row instead. A string "1e-16384" is a dead letter (numeric cannot hold it)."""
    bodies = [
        b'{"data": [{"id": 1, "x": 1}, {"id": 2, "x": 1e-16384}, {"id": 3, "x": 3}]}',
        b'{"data": [{"id": 4, "x": 4, "y": 1e-16384}, {"id": 5, "x": "1e-16384"}]}',
    ]
    columns = {"id": {"path": "id", "type": "bigint"}, "x": {"path": "x", "type": "numeric"}}
    outcomes = await run_ways(database, bodies, columns, store_raw=True)
    for table, outcome in outcomes.items():
        assert not isinstance(outcome, Exception), outcome
        assert (outcome.endpoints[table].records, outcome.endpoints[table].dead_letters) == (4, 1)
        assert await landed(db, table, "x") == {1: 1, 2: 0, 3: 3, 4: 4}, table
        raws = await landed(db, table, "_ingest_raw")
        assert json.loads(raws[4]) == {"id": 4, "x": 4, "y": 0.0}
        assert "out of range for numeric" in (await dead_letters(db, table))[5]


@pytest.mark.parametrize("mode", ["append", "merge"])
async def test_rows_postgresql_refuses_are_dead_letters(database: str, db: Any, mode: str) -> None:
    """The general rule: a user's table refuses some rows (a CHECK, a varchar too short);
    those rows are dead letters with PostgreSQL's reason and SQLSTATE, the rest land, in the
    same transaction as the checkpoint, and a rerun goes through as well. Merge tables too:
    there the COPY (straight into the target) or the merge is what PostgreSQL refuses."""
    records = [{"id": index, "x": index, "code": "ok"} for index in range(1, 61)]
    records[6]["x"] = -7  # the CHECK refuses it
    records[33]["code"] = "far too long"  # varchar(5) refuses it
    records[34]["x"] = -35
    columns = {
        "id": {"path": "id", "type": "bigint"},
        "x": {"path": "x", "type": "bigint"},
        "code": {"path": "code", "type": "text"},
    }
    for table in WAYS:
        await db.execute(
            f"CREATE TABLE {table} (id bigint PRIMARY KEY, x bigint CHECK (x > 0), code text, "
            "_ingest_loaded_at timestamptz NOT NULL DEFAULT now())"
        )
    # typed_on and writers: the C encoders' bytes; typed_off: asyncpg's, for a varchar column.
    await db.execute("ALTER TABLE typed_off ALTER COLUMN code TYPE varchar(5)")
    outcomes = await run_ways(database, pages_of(records), columns, mode=mode)
    for table, outcome in outcomes.items():
        assert not isinstance(outcome, Exception), outcome
        refused = {7, 35} | ({34} if table == "typed_off" else set())
        assert sorted(await landed(db, table, "x")) == sorted(set(range(1, 61)) - refused)
        reasons = await dead_letters(db, table)
        assert set(reasons) == refused, table
        assert "[23514]" in reasons[7] and "check constraint" in reasons[7]
        if table == "typed_off":
            assert "[22001]" in reasons[34]
        assert outcome.endpoints[table].dead_letters == len(refused)
        assert outcome.endpoints[table].records == 60 - len(refused)
    again = await run_ways(database, pages_of(records), columns, mode=mode)
    assert all(not isinstance(outcome, Exception) for outcome in again.values())


async def test_an_integer_past_64_bits_in_jsonb_lands_alike(database: str, db: Any) -> None:
    """Item 5: orjson reads an integer past 64 bits as a double, so every path lands that."""
    body = b'{"data": [{"id": 1, "doc": {"amount_wei": 18446744073709551616}}, {"id": 2}]}'
    columns = {"id": {"path": "id", "type": "bigint"}, "doc": {"path": "doc", "type": "jsonb"}}
    outcomes = await run_ways(database, [body], columns, store_raw=True)
    for table, outcome in outcomes.items():
        assert not isinstance(outcome, Exception), outcome
        values = await landed(db, table, "doc")
        # jsonb spells orjson's double 1.8446744073709552e19 as a number of 20 digits.
        assert values[1] == '{"amount_wei": 18446744073709552000}', table


async def test_an_epoch_out_of_range_is_a_dead_letter(database: str, db: Any) -> None:
    """Item 6: 1e20 (OSError) and 1e30 (OverflowError) in a timestamptz column."""
    body = b'{"data": [{"id": 1, "t": 1e20}, {"id": 2, "t": 1e30}, {"id": 3, "t": 1700000000}]}'
    columns = {"id": {"path": "id", "type": "bigint"}, "t": {"path": "t", "type": "timestamptz"}}
    outcomes = await run_ways(database, [body], columns)
    for table, outcome in outcomes.items():
        assert not isinstance(outcome, Exception), outcome
        assert sorted(await landed(db, table, "t")) == [3]
        reasons = await dead_letters(db, table)
        assert sorted(reasons) == [1, 2]
        assert all("out of range for an epoch timestamp" in reason for reason in reasons.values())


@pytest.mark.parametrize(
    ("extra", "store_raw", "why"),
    [
        (b"1e400", False, "infinity"),
        (b'"\xff"', False, "UTF-8"),
        (b'"\xff"', True, "UTF-8"),
        (b"[" * 100_000 + b"]" * 100_000, False, "depth"),
    ],
    ids=["1e400", "utf8", "utf8-raw", "nested"],
)
async def test_a_page_orjson_refuses_is_malformed_for_every_parser(
    database: str, db: Any, extra: bytes, store_raw: bool, why: str
) -> None:
    """Item 7: a field no column reads holds what orjson refuses. Every parser refuses the
    page alike: a malformed response, retried, then one clear line; nothing of it lands."""
    good = b'{"data": [{"id": 1, "x": 1}]}'
    bad = b'{"data": [{"id": 2, "x": 2, "unread": ' + extra + b"}]}"
    columns = {"id": {"path": "id", "type": "bigint"}, "x": {"path": "x", "type": "bigint"}}
    outcomes = await run_ways(database, [good, bad], columns, store_raw=store_raw)
    for table, outcome in outcomes.items():
        assert isinstance(outcome, IngestError), (table, outcome)
        message = str(outcome)
        assert "malformed JSON" in message and why in message, message
        assert "\n" not in message and "unexpected" not in message
        assert 2 not in await landed(db, table, "x")
