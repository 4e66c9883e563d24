"""The C record encoder (raw JSON records straight to COPY bytes) writes what the Python path
writes, and declines every record the Python path would convert differently or dead-letter.

Records are drawn (seeded) from tricky JSON spellings of every column type: escapes, surrogate
pairs, NULs, numbers as strings, fractions in integer columns, every timestamp form, nested
objects that are null, missing or replaced by a duplicate key. Each record goes through both
paths on its own: where the encoder accepts it, the row in PostgreSQL must read back exactly as
the Python path's (``RowBuilder`` + asyncpg); where the Python path dead-letters it, the
encoder must have declined. A run with ``typed_decode`` on and off then loads the same table.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import asyncpg
import msgspec
import orjson
import pytest

from ingest import copyenc
from ingest.config import Endpoint
from ingest.copyenc import RecordEncoder
from ingest.pgcodecs import install_codecs
from ingest.rows import RowBuilder
from ingest.sink import TableSink

pytestmark = pytest.mark.skipif(not copyenc.available(), reason="C extension not built")

SPELLINGS: dict[str, list[str]] = {
    "id": [
        "1",
        "2",
        "-0",
        "9223372036854775807",
        "-9223372036854775808",
        "9223372036854775808",
        "1.0",
        '"3"',
        "1e2",
        "true",
        "null",
    ],
    "name": [
        '"plain"',
        '"Zo\\u00eb \\ud834\\udd1e"',
        '"tab\\there"',
        '"quote\\"\\\\\\/"',
        '"nul\\u0000"',
        '"\\ud800"',
        '""',
        "12",
        "1.5",
        "true",
        "null",
        '{"a": 1}',
        '"Zoë ✓"',
    ],
    "seats": ["0", "2147483647", "-2147483648", "2147483648", "7.0", '"7"', "null"],
    "score": [
        "0",
        "0.1",
        "-2.5e-3",
        "1E+2",
        "12345678901234567890",
        "1e400",
        '"1.5"',
        "null",
        "5e-324",
        "-0.0",
    ],
    "flag": ["true", "false", "null", "1", '"true"'],
    "at": [
        '"2026-01-01T00:00:07Z"',
        '"2026-01-01 00:00:07.5+01:00"',
        '"2026-01-01T00:00:07"',
        '"2026-01-01T00:00:07.123456-11:30"',
        '"2026-01-01T00:00:07.1234567Z"',
        '"2026-02-29T00:00:00Z"',
        '"2024-02-29T23:59:59.999999+00:00"',
        '"2026-01-01t00:00:07z"',
        '"2026-01-01T24:00:00Z"',
        '"2026-01-01T00:00:60Z"',
        '"2026-01-01T00:00Z"',
        '"0001-01-01T00:00:00Z"',
        '"9999-12-31T23:59:59.999999Z"',
        '"2026-01-01T00:00:07+0100"',
        '" 2026-01-01T00:00:07Z"',
        "1767225607",
        "null",
        '"2026-01-01T00:00:07\\u005a"',
    ],
    "day": [
        '"2026-01-01"',
        '"2024-02-29"',
        '"2026-02-29"',
        '"9999-12-31"',
        '"0001-01-01"',
        '"2026-01-01T00:00:00Z"',
        "null",
    ],
    "doc": [
        '{"b": [1, "x", null, true]}',
        "[]",
        '"s"',
        "3",
        "-12",
        "1.5",
        '{"n": 1e2}',
        '{"big": 123456789012345678901}',
        '{"k": "\\u0000"}',
        "null",
        '{"a": {"b": {}}}',
        '{"dup": 1, "dup": 2}',
    ],
}
PROFILES = [
    '{"plan": "pro", "seats": SEATS}',
    "null",
    '"flat"',
    "{}",
    '{"plan": "pro"}, "profile": {"seats": SEATS}',
    '{"plan": "x", "seats": SEATS, "z": 1}',
]


def _record(pick: random.Random) -> bytes:
    # mostly one of the first two (plain) spellings, so that whole records get through
    fields = {
        key: pick.choice(values if pick.random() < 0.15 else values[:2])
        for key, values in SPELLINGS.items()
    }
    seats = fields.pop("seats")
    profile = pick.choice(PROFILES).replace("SEATS", seats)
    parts = [f'"{key}": {value}' for key, value in fields.items() if pick.random() > 0.08]
    parts.insert(pick.randrange(len(parts) + 1), f'"profile": {profile}')
    if pick.random() < 0.1:  # keys out of the usual order: the encoder guesses the next key
        pick.shuffle(parts)
    if pick.random() < 0.05:
        return b"[1, 2]"
    return ("{" + ", ".join(parts) + "}").encode()


def _endpoint(mode: str, store_raw: bool) -> Endpoint:
    return Endpoint.model_validate(
        {
            "name": "items",
            "path": "/items",
            "records_path": "data",
            "incremental": {"cursor_path": "at", "param": "since"},
            "table": {
                "name": f"enc_{mode}_{int(store_raw)}",
                "mode": mode,
                "primary_key": ["id"] if mode == "merge" else [],
                "store_raw": store_raw,
                "columns": {
                    "id": {"path": "id", "type": "bigint", "nullable": False},
                    "name": {"path": "name"},
                    "plan": {"path": "profile.plan"},
                    "seats": {"path": "profile.seats", "type": "integer"},
                    "score": {"path": "score", "type": "double"},
                    "flag": {"path": "flag", "type": "boolean"},
                    "at": {"path": "at", "type": "timestamptz"},
                    "day": {"path": "day", "type": "date"},
                    "doc": {"path": "doc", "type": "jsonb"},
                },
            },
        }
    )


async def _copy(connection: asyncpg.Connection[Any], sink: TableSink, rows: Any) -> None:
    async with connection.transaction():
        await sink.write(connection, rows)


@pytest.mark.parametrize(("mode", "store_raw"), [("append", True), ("merge", False)])
async def test_accepts_only_what_the_python_path_writes_the_same(
    database: str, mode: str, store_raw: bool
) -> None:
    endpoint = _endpoint(mode, store_raw)
    encoder = RecordEncoder.for_endpoint(endpoint)
    assert encoder is not None
    builder = RowBuilder(endpoint.table)
    pick = random.Random(20261201)
    connection = await asyncpg.connect(database)
    try:
        await install_codecs(connection)
        python_table = endpoint.table.model_copy(update={"name": f"{endpoint.table.name}_py"})
        by_c, by_python = TableSink(endpoint.table), TableSink(python_table)
        for sink in (by_c, by_python):
            await sink.ensure(connection)
        accepted = declined = 0
        for number in range(1500):
            body = _record(pick)
            try:  # the envelope parser: a page msgspec refuses goes to orjson, not the encoder
                raw = msgspec.json.decode(b"[" + body + b"]", type=list[msgspec.Raw])
            except msgspec.DecodeError:
                continue
            encoded = encoder.encode(raw)
            try:
                record = orjson.loads(body)
            except orjson.JSONDecodeError:
                assert encoded is None, body
                continue
            rows, rejected = builder.build_many([record])
            if rejected or encoded is None:
                assert encoded is None, (body, rejected)
                declined += 1
                continue
            accepted += 1
            # the same key twice would merge; keep each record's own row
            row = (number, *rows[0][1:])
            encoded_again = encoder.encode(
                msgspec.json.decode(
                    b"[" + body.replace(b'"id": ', b'"id": %d, "old_id": ' % number, 1) + b"]",
                    type=list[msgspec.Raw],
                )
            )
            if b'"id": ' not in body:
                continue
            assert encoded_again is not None, body
            assert encoded_again.cursors == [record.get("at")]
            if mode == "merge":
                assert encoded_again.keys == [number]
            await _copy(connection, by_c, encoded_again)
            await _copy(connection, by_python, [row])
        assert accepted > 100 and declined > 100, (accepted, declined)
        columns = ", ".join(f'"{name}"' for name in endpoint.table.columns)
        query = "SELECT {columns}{raw}::text FROM {table} ORDER BY id"
        raw_column = ', "_ingest_raw" IS NOT NULL' if store_raw else ""
        got = await connection.fetch(
            query.format(columns=columns, raw=raw_column, table=by_c.qualified)
        )
        want = await connection.fetch(
            query.format(columns=columns, raw=raw_column, table=by_python.qualified)
        )
        assert [tuple(row) for row in got] == [tuple(row) for row in want]
        assert len(got) > 50
    finally:
        await connection.close()


def test_no_encoder_where_a_column_always_needs_python() -> None:
    endpoint = _endpoint("append", False)
    table = endpoint.table
    for column in ({"path": "tags.0"}, {"path": "$parent.id"}, {"path": "x", "type": "numeric"}):
        columns = {**table.columns, "extra": column}
        changed = endpoint.model_copy(
            update={
                "table": table.model_validate(
                    {**table.model_dump(by_alias=True), "columns": columns}
                )
            }
        )
        assert RecordEncoder.for_endpoint(changed) is None, column


def test_rests_after_eight_declined_batches_in_a_row_then_tries_again() -> None:
    encoder = RecordEncoder.for_endpoint(_endpoint("append", False))
    assert encoder is not None
    good = msgspec.json.decode(b'[{"id": 1}]', type=list[msgspec.Raw])
    bad = msgspec.json.decode(b'[{"id": "1"}]', type=list[msgspec.Raw])
    assert encoder.encode(good) is not None
    for _ in range(copyenc.DECLINES_BEFORE_REST):
        assert encoder.encode(bad) is None
    for _ in range(copyenc.REST_BATCHES):
        assert encoder.encode(good) is None  # resting: not even tried
    assert encoder.encode(good) is not None
    assert encoder.encoded_batches == 2
    assert encoder.declined_batches == copyenc.DECLINES_BEFORE_REST + copyenc.REST_BATCHES


def test_threads_encoding_at_once_get_what_one_thread_gets() -> None:
    """The parse runs without the GIL (``encode_beside`` puts it in a worker thread): calls in
    several threads at once share nothing but read-only tables."""
    # the extension's own function (what copyenc calls); imported here, as the module skips
    # itself when the extension is not built
    from ingest._copyenc import encode_records  # noqa: PLC0415

    encoder = RecordEncoder.for_endpoint(_endpoint("merge", False))
    assert encoder is not None
    pick = random.Random(7)
    bodies = [_record(pick) for _ in range(400)]
    good = []
    for body in bodies:
        try:
            raw = msgspec.json.decode(b"[" + body + b"]", type=list[msgspec.Raw])
        except msgspec.DecodeError:
            continue
        if encoder.encode(raw) is not None and raw[0] not in good:
            good.extend(raw)
    batch = list({bytes(record): record for record in good}.values())[:50]
    expected = encode_records(batch, encoder._spec)
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: encode_records(batch, encoder._spec), range(64)))
    assert all(result == expected for result in results)
