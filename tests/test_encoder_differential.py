"""Differential property test: the C record encoder, the typed decoder and the Python path agree.

Hypothesis draws a table (column types and paths, keys escaped or not, long and non-ASCII) and
records spelled the awkward ways servers spell them; each record goes through the C record
encoder (:class:`ingest.copyenc.RecordEncoder`), the typed decoder (:class:`ingest.typed.
TypedPages`) and the Python path (orjson + :class:`ingest.rows.RowBuilder`). Wherever the C
encoder or the typed decoder takes a record, its row must equal the Python path's exactly
(negative zero included); otherwise it must have declined. The page validator must refuse
exactly the pages orjson refuses. Bounded time: a few seconds in the normal suite; the longer,
coverage-guided version is bench/fuzz/fuzz_encoder.py (docs/development.md).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import struct
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ingest import copyenc
from ingest.config import Endpoint
from ingest.copyenc import RecordEncoder, decode_rows, json_problem
from ingest.rows import RowBuilder
from ingest.typed import BuiltRows, TypedPages

pytestmark = pytest.mark.skipif(not copyenc.available(), reason="C extension not built")

#: Examples per property: a few seconds by default; set INGEST_FUZZ_EXAMPLES for a longer hunt.
EXAMPLES = int(os.environ.get("INGEST_FUZZ_EXAMPLES", "300"))

SCALARS = ["text", "bigint", "integer", "double", "boolean", "timestamptz", "date", "jsonb"]
#: Array columns: the C encoder takes them as row lists (the record encoder declines them).
ARRAYS = ["text[]", "bigint[]", "integer[]", "double[]", "boolean[]", "timestamptz[]"]
TYPES = SCALARS + ARRAYS
KEYS = ["id", "a", "b", "ключ", "наименование_товара_на_складе_в_магазине_номер_один" * 2, "x y"]
#: Spellings servers send, per kind of value (the strategy also draws arbitrary JSON).
SPELLINGS = [
    "0",
    "-0",
    "-0.0",
    "1",
    "-1",
    "1.0",
    "1e2",
    "1E+2",
    "-2.5e-3",
    "5e-324",
    "1e-16384",
    "9223372036854775807",
    "9223372036854775808",
    "-9223372036854775808",
    "18446744073709551616",
    "2147483648",
    "1e20",
    "1e30",
    '"1.5"',
    '"42"',
    '" 7 "',
    '"true"',
    "true",
    "false",
    "null",
    '"plain"',
    '"Zo\\u00eb \\ud834\\udd1e"',
    '"nul\\u0000"',
    '"tab\\there"',
    '"2026-01-01T00:00:07Z"',
    '"2026-01-01 00:00:07.5+01:00"',
    '"2026-01-01T00:00:07.1234567Z"',
    '"2026-01-01t00:00:07z"',
    '"9999-12-31T23:59:59.999999Z"',
    '"0001-01-01T00:00:00Z"',
    '"2026-02-29"',
    '"2024-02-29"',
    '"9999-12-31"',
    '"0001-01-01"',
    "1767225607",
    "[]",
    '{"n": 1e2}',
    '{"big": 123456789012345678901}',
    '{"dup": 1, "dup": 2}',
    "[" * 300 + "]" * 300,
]

json_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=12),
    lambda children: (
        st.lists(children, max_size=3)
        | st.dictionaries(st.sampled_from(KEYS), children, max_size=3)
    ),
    max_leaves=8,
)


@st.composite
def spelled(draw: st.DrawFn) -> str:
    """One JSON value as text: a known awkward spelling, or drawn JSON (escaped or not)."""
    if draw(st.booleans()):
        return draw(st.sampled_from(SPELLINGS))
    return json.dumps(draw(json_values), ensure_ascii=draw(st.booleans()))


#: Values a column of each type usually gets, spelled as servers spell them.
NATURAL: dict[str, st.SearchStrategy[str]] = {
    "text": st.builds(json.dumps, st.text(max_size=20), ensure_ascii=st.booleans()),
    "bigint": st.builds(str, st.integers(min_value=-(2**64), max_value=2**64)),
    "integer": st.builds(str, st.integers(min_value=-(2**32), max_value=2**32)),
    "double": st.one_of(
        st.builds(repr, st.floats(allow_nan=False, allow_infinity=False)),
        st.builds(str, st.integers(min_value=-(10**20), max_value=10**20)),
        st.sampled_from(["-0", "-0.0", "0e0", "-0e5", "1e308", "2.2250738585072014e-308"]),
    ),
    "boolean": st.sampled_from(["true", "false"]),
    "timestamptz": st.builds(
        lambda moment, sep, zone, spec: json.dumps(moment.isoformat(sep=sep, timespec=spec) + zone),
        st.datetimes(min_value=dt.datetime(1, 1, 2), max_value=dt.datetime(9999, 12, 30)),
        st.sampled_from(["T", " "]),
        st.sampled_from(["", "Z", "+00:00", "-11:30", "+14:00"]),
        st.sampled_from(["seconds", "milliseconds", "microseconds"]),
    ),
    "date": st.builds(lambda day: json.dumps(day.isoformat()), st.dates()),
    "jsonb": st.builds(json.dumps, json_values, ensure_ascii=st.booleans()),
}
NATURAL.update(
    {
        kind: st.builds(
            lambda items: "[" + ", ".join(items) + "]",
            st.lists(NATURAL[kind.removesuffix("[]")] | st.just("null"), max_size=4),
        )
        for kind in ARRAYS
    }
)


@st.composite
def tables(draw: st.DrawFn) -> tuple[Endpoint, dict[tuple[str, ...], str]]:
    """An endpoint whose columns read drawn paths, and each path's column type."""
    count = draw(st.integers(min_value=1, max_value=4))
    columns: dict[str, Any] = {}
    paths: dict[tuple[str, ...], str] = {}
    for index in range(count):
        path = tuple(draw(st.lists(st.sampled_from(KEYS), min_size=1, max_size=2)))
        if any(path[: len(other)] == other or other[: len(path)] == path for other in paths):
            continue  # a value and an object at once: neither decoder takes such tables
        kind = draw(st.sampled_from(TYPES))
        paths[path] = kind
        columns[f"c{index}"] = {
            "path": ".".join(path),
            "type": kind,
            "nullable": draw(st.booleans()),
        }
    endpoint = Endpoint.model_validate(
        {
            "name": "items",
            "path": "/items",
            "records_path": "data",
            "table": {
                "name": "items",
                "mode": "append",
                "store_raw": draw(st.booleans()),
                "columns": columns,
            },
        }
    )
    return endpoint, paths


@st.composite
def records(draw: st.DrawFn, paths: dict[tuple[str, ...], str]) -> bytes:
    """A record that mostly holds the table's paths with values of the column's type (else
    awkward spellings), keys escaped or not, sometimes extra keys."""

    def value_for(path: tuple[str, ...]) -> str:
        kind = paths.get(path)
        if kind is not None and draw(st.integers(0, 9)) < 7:
            return draw(NATURAL[kind])
        return draw(spelled())

    def obj(prefix: tuple[str, ...]) -> str:
        depth = len(prefix)
        wanted = {path[depth] for path in paths if path[:depth] == prefix and len(path) > depth}
        keys = sorted(key for key in wanted if draw(st.integers(0, 9)) < 9)
        keys += draw(st.lists(st.sampled_from(KEYS), max_size=2))
        parts = []
        for key in keys:
            path = (*prefix, key)
            deeper = any(len(other) > len(path) and other[: len(path)] == path for other in paths)
            value = obj(path) if deeper and draw(st.integers(0, 9)) < 8 else value_for(path)
            name = json.dumps(key, ensure_ascii=draw(st.booleans()))
            parts.append(f"{name}: {value}")
        return "{" + ", ".join(parts) + "}"

    return obj(()).encode()


def _aware(moment: dt.datetime) -> dt.datetime:
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=dt.UTC)


def _same(a: Any, b: Any, kind: str) -> bool:
    if a is None or b is None:
        return a is b
    if kind.endswith("[]"):  # item for item, by the element type's rules
        element = kind.removesuffix("[]")
        return (
            type(a) is list
            and type(b) is list
            and len(a) == len(b)
            and all(_same(x, y, element) for x, y in zip(a, b, strict=True))
        )
    if kind == "double":  # bit for bit: 0.0 and -0.0 differ
        return struct.pack("!d", a) == struct.pack("!d", b)
    if kind in ("jsonb", "raw"):  # the server's text vs orjson's: equal as JSON
        return bool(orjson.loads(a) == orjson.loads(b))
    if kind == "timestamptz":  # PostgreSQL's infinity decodes as asyncpg's naive sentinels
        return bool(_aware(a) == _aware(b))
    return bool(type(a) is type(b) and a == b)


def _assert_rows_equal(got: tuple[Any, ...], want: tuple[Any, ...], kinds: list[str]) -> None:
    assert len(got) == len(want)
    for value, expected, kind in zip(got, want, kinds, strict=True):
        assert _same(value, expected, kind), (kind, value, expected)


@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(data=st.data())
def test_c_typed_and_python_agree_or_decline(data: st.DataObject) -> None:
    endpoint, paths = data.draw(tables())
    table = endpoint.table
    body = data.draw(records(paths))
    page = b'{"data": [' + body + b"]}"
    kinds = [column.type for column in table.columns.values()] + (
        ["raw"] if table.store_raw else []
    )
    decode_kinds = [kind if kind != "raw" else "jsonb" for kind in kinds]

    # The Python path: orjson, then the row builder (a dead letter or a row).
    problem = json_problem(page)
    try:
        record = orjson.loads(body)
    except orjson.JSONDecodeError:
        assert problem is not None  # every parser refuses the page
        return
    assert problem is None, problem
    rows, rejected = RowBuilder(table).build_many([record])

    encoder = RecordEncoder.for_endpoint(endpoint)
    if encoder is not None:
        encoded = encoder.encode([body])
        if encoded is not None:
            assert not rejected, (body, rejected)
            _assert_rows_equal(decode_rows(encoded, decode_kinds)[0], rows[0], kinds)

    typed = TypedPages(endpoint)
    document = typed(page)
    built = document["data"]
    if isinstance(built, BuiltRows):
        assert not rejected, (body, rejected)
        _assert_rows_equal(built[0], rows[0], kinds)

    # The C row encoder (arrays included) writes the Python path's row, or declines it.
    if rows and not any(kind in ("date", "jsonb", "raw") for kind in kinds):
        encode = copyenc.binary_encoder(kinds)
        assert encode is not None
        stream = encode(rows)
        assert stream is not None, rows
        _assert_rows_equal(_decode_copy(stream, kinds)[0], rows[0], kinds)


def _decode_copy(data: bytes, kinds: list[str]) -> list[tuple[Any, ...]]:
    """A binary COPY stream's rows, arrays included (a reference reader for the test)."""
    at = 19
    rows: list[tuple[Any, ...]] = []
    while True:
        (fields,) = struct.unpack_from("!h", data, at)
        at += 2
        if fields == -1:
            return rows
        values: list[Any] = []
        for kind in kinds:
            (length,) = struct.unpack_from("!i", data, at)
            at += 4
            if length < 0:
                values.append(None)
                continue
            values.append(_decode_field(kind, data[at : at + length]))
            at += length
        rows.append(tuple(values))


def _decode_field(kind: str, field: bytes) -> Any:
    if not kind.endswith("[]"):
        return copyenc._decode_value(kind, field)
    ndims, flags, _oid = struct.unpack_from("!iiI", field, 0)
    assert ndims == 1 and flags == 0
    (count, lower) = struct.unpack_from("!ii", field, 12)
    assert lower == 1
    at = 20
    items: list[Any] = []
    for _ in range(count):
        (length,) = struct.unpack_from("!i", field, at)
        at += 4
        if length < 0:
            items.append(None)
            continue
        items.append(_decode_field(kind.removesuffix("[]"), field[at : at + length]))
        at += length
    assert at == len(field)
    return items


@settings(max_examples=EXAMPLES, deadline=None)
@given(
    body=st.one_of(
        st.binary(max_size=40),
        st.builds(lambda value: value.encode(), st.sampled_from(SPELLINGS)),
        st.builds(
            b"".join,
            st.lists(
                st.sampled_from(
                    [
                        b"[",
                        b"]",
                        b"{",
                        b"}",
                        b'"a"',
                        b":",
                        b",",
                        b"1e400",
                        b"1",
                        b"\xff",
                        b" ",
                        b'"\\ud800"',
                    ]
                ),
                max_size=12,
            ),
        ),
    )
)
def test_the_page_validator_refuses_exactly_what_orjson_refuses(body: bytes) -> None:
    try:
        orjson.loads(body)
        accepted = True
    except orjson.JSONDecodeError:
        accepted = False
    assert (json_problem(body) is None) == accepted, body
