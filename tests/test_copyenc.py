"""The C COPY encoder writes exactly the rows asyncpg writes, and declines what it does not know.

Both encoders COPY the same values (edge cases of every type the C encoder takes) into twin
tables of a real PostgreSQL; the tables must read back identical as text. Anything the encoder
would not encode exactly as asyncpg does must make it decline (None), and the sink must then
load the batch through asyncpg, as it must for a target whose column types differ from the
config's.
"""

from __future__ import annotations

import datetime as dt
import decimal
import math
import subprocess
import sys
from typing import Any
from zoneinfo import ZoneInfo

import asyncpg
import pytest

from ingest import copyenc
from ingest.config import Endpoint, Table
from ingest.pgcodecs import install_codecs
from ingest.rows import POSTGRES_TYPES
from ingest.sink import TableSink

UTC = dt.UTC
BERLIN = ZoneInfo("Europe/Berlin")
KINDS = ["text", "bigint", "integer", "double", "boolean", "timestamptz", "date", "jsonb"]
SQL = {
    "text": "text",
    "bigint": "bigint",
    "integer": "integer",
    "double": "double precision",
    "boolean": "boolean",
    "timestamptz": "timestamptz",
    "date": "date",
    "jsonb": "jsonb",
}
VALUES: dict[str, list[Any]] = {
    "text": ["", "plain", "Zoë ✓ 𝄞", "tab\tnew\nline\r", "quote'\"\\", "x" * 100_000],
    "bigint": [0, 1, -1, 2**63 - 1, -(2**63), 2**31, -(2**31) - 1],
    "integer": [0, 7, 2**31 - 1, -(2**31)],
    "double": [0.0, -0.0, 0.1, 1.5, 1e308, 5e-324, -2.5e-10, math.inf, -math.inf, math.nan],
    "boolean": [True, False],
    "timestamptz": [
        dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
        dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
        dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(-dt.timedelta(hours=11))),
        dt.datetime(2026, 7, 1, 12, tzinfo=BERLIN),
        dt.datetime(2026, 10, 25, 2, 30, tzinfo=BERLIN),
        dt.datetime(2026, 10, 25, 2, 30, fold=1, tzinfo=BERLIN),
        dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
        dt.datetime(2000, 1, 1, tzinfo=UTC),
        dt.datetime(1970, 1, 1, tzinfo=UTC),
        dt.datetime(1600, 2, 29, 12, tzinfo=UTC),
        dt.datetime(1, 1, 1, 0, 0, 1, tzinfo=UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999998, tzinfo=UTC),
        dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # asyncpg: infinity
        dt.datetime(1, 1, 1, tzinfo=UTC),  # asyncpg: -infinity
    ],
    "date": [
        dt.date(2000, 1, 1),
        dt.date(1999, 12, 31),
        dt.date(2024, 2, 29),
        dt.date(1600, 3, 1),
        dt.date(1, 1, 2),
        dt.date(9999, 12, 30),
        dt.date.max,  # asyncpg: infinity
        dt.date.min,  # asyncpg: -infinity
    ],
    "jsonb": ["{}", '[1, "a", null]', '{"k": "Zoë", "n": 1.5e3}', "null", '"s"'],
}

pytestmark = pytest.mark.skipif(not copyenc.available(), reason="C extension not built")


def _rows() -> list[tuple[Any, ...]]:
    """One row per index, every kind's values in turn (None where a kind ran out)."""
    columns = [VALUES[kind] for kind in KINDS]
    width = max(map(len, columns)) + 1  # the last row is all None
    return [
        (index, *(column[index] if index < len(column) else None for column in columns))
        for index in range(width)
    ]


async def _table_text(connection: asyncpg.Connection[Any], table: str) -> list[str]:
    rows = await connection.fetch(f"SELECT t::text AS row FROM {table} t ORDER BY n")
    return [row["row"] for row in rows]


async def test_same_table_as_asyncpg(database: str) -> None:
    connection = await asyncpg.connect(database)
    try:
        await install_codecs(connection)  # as on ingest's pooled connections
        definition = ", ".join(["n integer", *(f"c_{kind} {SQL[kind]}" for kind in KINDS)])
        for table in ("by_asyncpg", "by_c"):
            await connection.execute(f"CREATE TABLE {table} ({definition})")
        rows = _rows()
        await connection.copy_records_to_table("by_asyncpg", records=rows)
        encode = copyenc.binary_encoder(["integer", *KINDS])
        assert encode is not None
        data = encode(rows)
        assert data is not None

        async def source() -> Any:
            yield data

        await connection.copy_to_table("by_c", source=source(), format="binary")
        stock = await _table_text(connection, "by_asyncpg")
        assert await _table_text(connection, "by_c") == stock
        assert len(stock) == len(rows)
        assert "infinity" in stock[6] and "-infinity" in stock[7]  # date.max / date.min
    finally:
        await connection.close()


#: Array columns (``text[]`` ...): lists of each element kind's values, with NULL items, empty.
ARRAY_KINDS = ["text", "bigint", "integer", "double", "boolean", "timestamptz"]


def _array_rows() -> list[tuple[Any, ...]]:
    rows: list[tuple[Any, ...]] = [
        (0, *([] for _ in ARRAY_KINDS)),
        (1, *([None] for _ in ARRAY_KINDS)),
        (2, *(None for _ in ARRAY_KINDS)),
        (3, *(list(VALUES[kind]) for kind in ARRAY_KINDS)),
        (4, *([None, *VALUES[kind][:2], None] for kind in ARRAY_KINDS)),
    ]
    return rows


async def test_same_array_table_as_asyncpg(database: str) -> None:
    connection = await asyncpg.connect(database)
    try:
        await install_codecs(connection)
        definition = ", ".join(["n integer", *(f"c_{kind} {SQL[kind]}[]" for kind in ARRAY_KINDS)])
        for table in ("by_asyncpg", "by_c"):
            await connection.execute(f"CREATE TABLE {table} ({definition})")
        rows = _array_rows()
        await connection.copy_records_to_table("by_asyncpg", records=rows)
        encode = copyenc.binary_encoder(["integer", *(f"{kind}[]" for kind in ARRAY_KINDS)])
        assert encode is not None
        data = encode(rows)
        assert data is not None

        async def source() -> Any:
            yield data

        await connection.copy_to_table("by_c", source=source(), format="binary")
        stock = await _table_text(connection, "by_asyncpg")
        assert await _table_text(connection, "by_c") == stock
        assert stock[0] == "(0,{},{},{},{},{},{})"
        assert stock[1] == "(1,{NULL},{NULL},{NULL},{NULL},{NULL},{NULL})"
    finally:
        await connection.close()


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("bigint[]", (1, 2)),  # a tuple: asyncpg's rules
        ("bigint[]", [1, "2"]),
        ("bigint[]", [2**63]),
        ("integer[]", [2**31]),
        ("text[]", [b"x"]),
        ("text[]", "abc"),
        ("text[]", [["nested"]]),  # asyncpg would make it two-dimensional
        ("timestamptz[]", [dt.datetime(2026, 1, 1, 12)]),  # naive
        ("boolean[]", [1]),
        ("double[]", [1]),
    ],
)
def test_declines_arrays_asyncpg_should_decide(kind: str, value: Any) -> None:
    encode = copyenc.binary_encoder(["bigint", kind])
    assert encode is not None
    assert encode([(1, None), (2, value)]) is None
    assert encode([(1, [None])]) is not None


def test_no_array_kinds_for_the_record_encoder() -> None:
    """JSON records with array columns are converted in Python, then encoded by encode()."""
    endpoint = Endpoint.model_validate(
        {
            "name": "items",
            "path": "/items",
            "table": {
                "name": "items",
                "mode": "append",
                "columns": {"tags": {"path": "tags", "type": "text[]"}},
            },
        }
    )
    assert copyenc.RecordEncoder.for_endpoint(endpoint) is None


NAIVE = dt.datetime(2026, 1, 1, 12)


class _Str(str):
    pass


class _Moment(dt.datetime):
    pass


@pytest.mark.parametrize(
    ("kind", "value"),
    [
        ("bigint", True),
        ("bigint", 2**63),
        ("bigint", 1.0),
        ("bigint", "1"),
        ("integer", 2**31),
        ("integer", -(2**31) - 1),
        ("double", 1),
        ("double", decimal.Decimal("1.5")),
        ("boolean", 1),
        ("text", _Str("x")),
        ("text", b"bytes"),
        ("text", "\ud800"),  # a lone surrogate: no UTF-8
        ("jsonb", {"a": 1}),
        ("timestamptz", NAIVE),
        ("timestamptz", dt.date(2026, 1, 1)),
        ("timestamptz", _Moment(2026, 1, 1, tzinfo=UTC)),
        ("date", dt.datetime(2026, 1, 1, tzinfo=UTC)),
    ],
)
def test_declines_what_asyncpg_should_decide(kind: str, value: Any) -> None:
    encode = copyenc.binary_encoder(["bigint", kind])
    assert encode is not None
    assert encode([(1, None), (2, value)]) is None
    assert encode([(1, None)]) is not None


def test_declines_rows_that_are_not_tuples_of_the_right_width() -> None:
    encode = copyenc.binary_encoder(["bigint", "text"])
    assert encode is not None
    assert encode([(1,)]) is None
    assert encode([(1, "a", "b")]) is None
    assert encode([[1, "a"]]) is None  # type: ignore[list-item]
    assert encode([]) == b"PGCOPY\n\xff\r\n\x00" + bytes(8) + b"\xff\xff"


def test_no_encoder_for_numeric_columns() -> None:
    assert copyenc.binary_encoder(["bigint", "numeric"]) is None
    assert copyenc.binary_encoder(["bigint", "numeric[]"]) is None


def _table(**overrides: Any) -> Table:
    return Table.model_validate(
        {
            "name": "people",
            "mode": "append",
            "store_raw": False,
            "columns": {
                "id": {"path": "id", "type": "bigint"},
                "score": {"path": "score", "type": "double"},
                "seen": {"path": "seen", "type": "timestamptz"},
            },
            **overrides,
        }
    )


SEEN = dt.datetime(2026, 3, 1, 8, tzinfo=UTC)


@pytest.mark.parametrize("mode", ["append", "merge"])
async def test_sink_loads_declined_batches_through_asyncpg(database: str, mode: str) -> None:
    """A naive timestamp in the batch: asyncpg encodes it (local time), the rest as usual."""
    sink = TableSink(_table(mode=mode, primary_key=["id"] if mode == "merge" else []))
    connection = await asyncpg.connect(database)
    try:
        await install_codecs(connection)
        await sink.ensure(connection)
        await connection.execute("SET timezone = 'UTC'")
        async with connection.transaction():
            await sink.write(connection, [(1, 0.5, SEEN), (2, 1.5, NAIVE)])
        async with connection.transaction():
            await sink.write(connection, [(3, 2.5, SEEN)])
        assert await sink.target_matches(connection)
        rows = await connection.fetch('SELECT id, score, seen FROM "public"."people" ORDER BY id')
        assert [tuple(row) for row in rows] == [
            (1, 0.5, SEEN),
            (2, 1.5, NAIVE.replace(tzinfo=UTC)),
            (3, 2.5, SEEN),
        ]
    finally:
        await connection.close()


async def test_sink_lets_asyncpg_encode_for_a_target_of_other_types(database: str) -> None:
    """A user's table with ``numeric`` for the configured double and ``integer`` for bigint:
    the C encoder's float8/int8 bytes would not fit, asyncpg encodes for the actual types."""
    sink = TableSink(_table())
    connection = await asyncpg.connect(database)
    try:
        await install_codecs(connection)
        await connection.execute(
            'CREATE TABLE "public"."people" (id integer, score numeric, seen timestamptz, '
            "_ingest_loaded_at timestamptz NOT NULL DEFAULT now())"
        )
        await sink.ensure(connection)
        async with connection.transaction():
            await sink.write(connection, [(1, 0.25, SEEN), (2, None, None)])
        assert not await sink.target_matches(connection)
        rows = await connection.fetch('SELECT id, score, seen FROM "public"."people" ORDER BY id')
        assert [tuple(row) for row in rows] == [(1, decimal.Decimal("0.25"), SEEN), (2, None, None)]
    finally:
        await connection.close()


async def test_sink_creates_array_columns_and_encodes_them_in_c(database: str) -> None:
    """The table ingest creates has the array types, so the C encoder's bytes are used."""
    columns = {"id": {"path": "id", "type": "bigint"}}
    columns |= {f"a_{kind}": {"path": kind, "type": f"{kind}[]"} for kind in ARRAY_KINDS}
    sink = TableSink(_table(columns=columns))
    connection = await asyncpg.connect(database)
    try:
        await install_codecs(connection)
        await sink.ensure(connection)
        rows = _array_rows()
        async with connection.transaction():
            await sink.write(connection, rows)
        assert await sink.target_matches(connection)
        types = await connection.fetch(
            "SELECT atttypid::regtype::text AS type FROM pg_attribute "
            "WHERE attrelid = 'public.people'::regclass AND attnum > 0 ORDER BY attnum"
        )
        assert [row["type"] for row in types][: len(columns)] == [
            "bigint",
            *(
                f"{SQL[kind]}[]".replace("timestamptz", "timestamp with time zone")
                for kind in ARRAY_KINDS
            ),
        ]
        stored = await connection.fetch(
            f"SELECT {', '.join(columns)} FROM public.people ORDER BY id"
        )
        assert [tuple(row) for row in stored][:3] == rows[:3]
    finally:
        await connection.close()


def test_every_config_type_but_numeric_has_a_c_encoding() -> None:
    arrays = {f"{kind}[]" for kind in ARRAY_KINDS}
    assert set(POSTGRES_TYPES) - set(KINDS) - arrays == {"numeric", "numeric[]"}
    assert list(VALUES) == KINDS


#: Run in a child process: before the fix this was a use-after-free, which may crash.
EMPTYING_TZINFO = """
import datetime as dt
from ingest import copyenc

rows = []

class Emptying(dt.tzinfo):
    '''An offset of +1 h that, once asked, empties the list of rows being encoded.'''

    def utcoffset(self, when):
        rows.clear()
        [bytearray(64) for _ in range(200)]  # reuse what the cleared rows freed
        return dt.timedelta(hours=1)

    def dst(self, when):
        return None

encode = copyenc.binary_encoder(["bigint", "timestamptz", "text"])
plus_one = dt.timezone(dt.timedelta(hours=1))
expected = encode(
    [(i, dt.datetime(2026, 1, 2, 3, i % 60, tzinfo=plus_one), "x" * i) for i in range(200)]
)
for _ in range(5):
    rows.extend(
        (i, dt.datetime(2026, 1, 2, 3, i % 60, tzinfo=Emptying()), "x" * i) for i in range(200)
    )
    assert encode(rows) == expected
    assert rows == []
print("ok")
"""


def test_a_tzinfo_that_empties_the_row_list_cannot_pull_rows_from_under_the_encoder() -> None:
    """encode() keeps its own references: the rows it was given are encoded, whatever
    ``utcoffset()`` does to the caller's list meanwhile."""
    done = subprocess.run(
        [sys.executable, "-c", EMPTYING_TZINFO],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert (done.returncode, done.stdout.strip()) == (0, "ok"), done.stderr
