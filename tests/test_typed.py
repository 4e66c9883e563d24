"""The typed decoder gives exactly the Python path's rows, or hands the page to the Python path."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import orjson
import pytest

from ingest.config import parse_config
from ingest.paths import MISSING
from ingest.rows import RowBuilder
from ingest.typed import (
    FALLBACKS_BEFORE_REST,
    REST_PAGES,
    BuiltRows,
    TypedPages,
    typed_pages_for,
    why_not_typed,
)
from tests.helpers import config_text, make_config, run
from tests.servers import page_number_app, serve
from tests.test_incremental import shop_config
from tests.test_rows_compiled import COLUMNS as COMPILED_COLUMNS

#: The compiled-loop test's table (every type, a nested path, a required column, ``tags.0``
#: through a list index) plus a second nesting level.
COLUMNS: dict[str, dict[str, Any]] = {
    **COMPILED_COLUMNS,
    "deep": {"path": "profile.limits.max", "type": "bigint"},
}

#: Per column: values the Python path converts, and values it rejects or must decide itself.
GOOD: dict[str, list[Any]] = {
    "id": [1, 2**62, -5],
    "name": ["Zoë 🚀", "", "a\tb\n", "x" * 300],
    "small": [0, 2**31 - 1, -(2**31)],
    "score": [1.5, 2, -0.0, 1e300, 123456789012345678],
    "price": [12.3, "12.30", 7, "1e3"],
    "flag": [True, False],
    "at": [
        "2026-01-02T03:04:05Z",
        "2026-01-02T03:04:05.123456+05:30",
        "2026-01-02 03:04:05+00:00",
        "2026-01-02T03:04:05",
    ],
    "day": ["2026-01-02", "1999-12-31"],
    "tags": [["a", "b"], {"k": [1, None, 2.5]}, 3, "s", [], {}],
    "plan": ["pro", "ü"],
    "seats": [1, 49],
    "deep": [10, -1],
}
ODD: dict[str, list[Any]] = {
    "id": ["2", 3.0, 2**63, True, 1.5, None, "x"],
    "name": [12.5, True, {"a": 1}, ["x"], "nul\x00"],
    "small": [2**31, "7", 7.0, False],
    "score": ["1.5", True, "NaN?", [1]],
    "price": [True, "abc", {"a": 1}],
    "flag": ["yes", 1, 0, "maybe", 2],
    "at": [
        " 2026-01-02T03:04:05Z ",
        "2026-01-02t03:04:05z",
        "2026-01-02T03:04:05.1234567Z",
        "2026-01-02T03:04Z",
        1_700_000_000_000,
        "yesterday",
        True,
    ],
    "day": ["2026-01-02T10:00:00Z", "20260102", "2026-1-2", 5],
    "tags": [["nul\x00"]],
    "plan": [1, None],
    "seats": [None, "4", 4.0, 1.5],
    "deep": ["3", None],
}


def _record(rng: random.Random, clean: bool) -> Any:
    if not clean and rng.random() < 0.05:
        return rng.choice([None, "not a record", [1, 2], 7])
    record: dict[str, Any] = {}
    profile: dict[str, Any] = {}
    for name, column in COLUMNS.items():
        if name == "first_tag":
            continue  # read from "tags"
        choices = GOOD[name] if clean or rng.random() < 0.8 else ODD[name]
        if rng.random() < 0.1 and name not in {"id", "seats"}:
            continue  # missing
        value = rng.choice(choices)
        steps = column["path"].split(".")
        if steps[0] != "profile":
            record[steps[0]] = value
        elif len(steps) == 2:
            profile[steps[1]] = value
        else:
            profile.setdefault("limits", {})["max"] = value
    if not clean and rng.random() < 0.1:
        record["profile"] = rng.choice([None, "p", []])
    else:
        record["profile"] = profile
    record["extra"] = {"ignored": [1, 2, {"x": None}]}
    return record


def _loaded(store_raw: bool, **options: Any) -> Any:
    return parse_config(
        config_text(
            "http://127.0.0.1:1",
            pagination=options.pop(
                "pagination", {"style": "page_number", "total_path": "meta.total"}
            ),
            records_path="data.items",
            columns=options.pop("columns", COLUMNS),
            store_raw=store_raw,
            **options,
        ),
        Path("typed.toml"),
        {},
    )


def _comparable(rows: list[tuple[Any, ...]], store_raw: bool) -> list[Any]:
    """Rows as reprs; the raw column (last) as parsed JSON, since its spelling may differ."""
    if not store_raw:
        return [tuple(map(repr, row)) for row in rows]
    return [(tuple(map(repr, row[:-1])), orjson.loads(row[-1])) for row in rows]


@pytest.mark.parametrize("store_raw", [False, True])
def test_same_rows_as_the_python_path_or_the_python_path(store_raw: bool) -> None:
    endpoint = _loaded(store_raw).source.endpoints[0]
    typed = TypedPages(endpoint)
    builder = RowBuilder(endpoint.table)
    rng = random.Random(20261125)
    typed_pages = 0
    for number in range(600):
        clean = number % 2 == 0
        records = [_record(rng, clean) for _ in range(rng.randint(1, 6))]
        page = {"meta": {"total": "600", "page": number}, "data": {"items": records, "n": 1}}
        body = orjson.dumps(page)
        document = typed(body)
        expected = orjson.loads(body)
        rows, rejected = builder.build_many(expected["data"]["items"])
        items = document["data"]["items"]
        if isinstance(items, BuiltRows):
            typed_pages += 1
            assert rejected == [], f"typed path accepted what the Python path rejects: {page}"
            assert _comparable(list(items), store_raw) == _comparable(rows, store_raw), page
            # The paginator's view: the keys it reads, as plain JSON.
            assert document["meta"] == expected["meta"]
        else:
            assert document == expected
    # Clean pages (every other one) all take the fast path; most others do not.
    assert 300 <= typed_pages < 450, typed_pages
    assert typed.typed_pages == typed_pages
    assert typed.fallback_pages == 600 - typed_pages


def test_escaped_nul_and_malformed_pages() -> None:
    endpoint = _loaded(False).source.endpoints[0]
    typed = TypedPages(endpoint)
    good = {"id": 1, "profile": {"seats": 1}}
    nul = orjson.dumps({"data": {"items": [good, {**good, "name": "a\x00"}]}})
    assert typed(nul) == orjson.loads(nul)
    with pytest.raises(orjson.JSONDecodeError):
        typed(b'{"data": {"items": [')


@pytest.mark.parametrize("store_raw", [False, True])
def test_numbers_and_flags_sent_as_strings_stay_on_the_typed_path(store_raw: bool) -> None:
    """The first string in a number column switches the endpoint to the lenient variant."""
    endpoint = _loaded(store_raw).source.endpoints[0]
    typed = TypedPages(endpoint)
    builder = RowBuilder(endpoint.table)
    clean: dict[str, object] = {
        "id": 1,
        "score": 1.5,
        "flag": True,
        "profile": {"seats": 3, "limits": {"max": 9}},
    }
    stringly: dict[str, object] = {
        "id": " 2 ",
        "score": "2.5",
        "flag": "yes",
        "small": "1e3",
        "profile": {"seats": "4", "limits": {"max": "-7"}},
    }
    for records in ([clean], [clean, stringly], [stringly, clean], [{**stringly, "id": "x"}]):
        body = orjson.dumps({"data": {"items": records}})
        items = typed(body)["data"]["items"]
        rows, rejected = builder.build_many(records)
        if records[0].get("id") == "x" or records[-1].get("id") == "x":
            assert not isinstance(items, BuiltRows)  # "x" is a dead letter: the Python path
            assert len(rejected) == 1
            continue
        assert isinstance(items, BuiltRows), records
        assert _comparable(list(items), store_raw) == _comparable(rows, store_raw)
    assert typed.typed_pages == 3
    assert typed.fallback_pages == 1


def test_rests_after_repeated_fallbacks_then_tries_again() -> None:
    endpoint = _loaded(False).source.endpoints[0]
    typed = TypedPages(endpoint)
    bad = orjson.dumps({"data": {"items": [{"id": 1.5, "profile": {"seats": 1}}]}})
    good = orjson.dumps({"data": {"items": [{"id": 1, "profile": {"seats": 1}}]}})
    for _ in range(FALLBACKS_BEFORE_REST):
        typed(bad)
    assert typed.rested_pages == 0
    for _ in range(REST_PAGES):
        assert not isinstance(typed(good)["data"]["items"], BuiltRows)  # resting: orjson
    assert typed.rested_pages == REST_PAGES
    assert isinstance(typed(good)["data"]["items"], BuiltRows)
    assert typed.fallback_pages == FALLBACKS_BEFORE_REST + REST_PAGES


def test_document_keeps_absent_keys_absent() -> None:
    endpoint = _loaded(False).source.endpoints[0]
    typed = TypedPages(endpoint)
    record = {"id": 1, "profile": {"seats": 1}}
    without_meta = typed(orjson.dumps({"data": {"items": [record]}}))
    assert set(without_meta) == {"data"}
    null_meta = typed(orjson.dumps({"meta": None, "data": {"items": [record]}, "other": 1}))
    assert null_meta["meta"] is None
    assert "other" not in null_meta  # the paginator does not read it
    assert isinstance(null_meta["data"]["items"], BuiltRows)


def _incremental(
    cursor_path: str, columns: dict[str, dict[str, str]], **options: Any
) -> tuple[Any, TypedPages]:
    """An incremental endpoint on ``cursor_path`` and its typed decoder (which must exist)."""
    text = config_text("http://127.0.0.1:1", columns=columns, store_raw=False, **options)
    text += f'[endpoints.incremental]\ncursor_path = "{cursor_path}"\nparam = "since"\n'
    endpoint = parse_config(text, Path("typed.toml"), {}).source.endpoints[0]
    typed = typed_pages_for(endpoint)
    assert typed is not None
    return endpoint, typed


def test_top_level_list_and_cursor_values() -> None:
    _, typed = _incremental(
        "updated_at",
        {
            "id": {"path": "id", "type": "bigint"},
            "at": {"path": "updated_at", "type": "timestamptz"},
        },
        pagination={"style": "link_header"},
        records_path="",
    )
    rows = typed(b'[{"id": 1, "updated_at": "2026-01-02T00:00:00Z"}, {"id": 2}]')
    assert isinstance(rows, BuiltRows)
    assert rows.cursor_values == ["2026-01-02T00:00:00Z", None]
    assert [row[0] for row in rows] == [1, 2]


def test_cursor_and_columns_through_a_list_index() -> None:
    endpoint, typed = _incremental(
        "history.-1.at",
        {
            "id": {"path": "id", "type": "bigint"},
            "first": {"path": "history.0.at", "type": "timestamptz"},
            "history": {"path": "history", "type": "jsonb"},
        },
        pagination={"style": "next_url", "next_url_path": "links.0.href"},
        records_path="data",
    )
    records = [
        {"id": 1, "history": [{"at": "2026-01-01T00:00:00Z"}, {"at": "2026-02-01T00:00:00Z"}]},
        {"id": 2, "history": []},
        {"id": 3},
    ]
    body = orjson.dumps({"data": records, "links": [{"href": "/next?page=2"}]})
    document = typed(body)
    assert document["links"] == [{"href": "/next?page=2"}]  # what the paginator reads
    rows = document["data"]
    assert isinstance(rows, BuiltRows)
    assert list(rows) == RowBuilder(endpoint.table).build_many(records)[0]
    assert rows.cursor_values is not None
    assert rows.cursor_values[0] == "2026-02-01T00:00:00Z"
    assert rows.cursor_values[1:] == [MISSING, MISSING]


def test_parent_columns_of_a_child_endpoint() -> None:
    text = shop_config("http://127.0.0.1:1", child_extra='name = { path = "$parent.name" }')
    endpoint = parse_config(text, Path("shop.toml"), {}).source.endpoint("orders")
    assert why_not_typed(endpoint) is None
    typed = TypedPages(endpoint)
    builder = RowBuilder(endpoint.table)
    records = [{"order_id": 1, "total": 2.5}, {"order_id": 2, "total": 3, "extra": True}]
    body = orjson.dumps({"items": records, "has_more": False})
    for parent in ({"id": 7, "name": "Ada"}, {"id": 8, "name": None}):
        items = typed.for_parent(parent)(body)["items"]
        assert isinstance(items, BuiltRows)
        assert list(items) == builder.build_many(records, parent)[0]
    # A parent value the column cannot take: the Python path decides (and dead-letters).
    bad_parent = {"id": "x", "name": "Ada"}
    assert not isinstance(typed.for_parent(bad_parent)(body)["items"], BuiltRows)
    assert len(builder.build_many(records, bad_parent)[1]) == 2


def test_endpoints_the_typed_decoder_leaves_alone() -> None:
    def endpoint(**options: Any) -> Any:
        return _loaded(False, **options).source.endpoints[0]

    assert why_not_typed(endpoint()) is None
    index_first = {**COLUMNS, "odd": {"path": "0.id", "type": "text"}}
    assert "starts with a list index" in (why_not_typed(endpoint(columns=index_first)) or "")
    assert why_not_typed(endpoint(load="server")) == "load is server"
    reads_records = endpoint(
        pagination={"style": "cursor", "cursor_param": "c", "cursor_path": "data.items.-1.id"}
    )
    assert "reads the records" in (why_not_typed(reads_records) or "")
    holder = endpoint(pagination={"style": "page_number", "has_more_path": "data"})
    assert "reads the records" in (why_not_typed(holder) or "")
    overlapping = {**COLUMNS, "profile": {"path": "profile", "type": "jsonb"}}
    assert typed_pages_for(endpoint(columns=overlapping)) is None
    assert typed_pages_for(endpoint(), enabled=False) is None


async def test_pipeline_writes_the_same_tables_either_way(database: str, db: Any) -> None:
    """Messy data end to end: typed decoding on and off land identical rows and dead letters,
    and so do writer processes (typed decoding in another process, the envelope in this one)."""
    rng = random.Random(7)
    records = []
    for index in range(1, 401):
        # Odd pages (of 20) clean, so both paths run: even pages mostly take the Python path.
        record = _record(rng, clean=(index - 1) // 20 % 2 == 0 or rng.random() < 0.9)
        if isinstance(record, dict):
            record["id"] = index  # unique keys, so merge keeps every record
        records.append(record)
    async with serve(page_number_app(records, default_size=20)) as base_url:
        ways = ((True, "typed_on", 0), (False, "typed_off", 0), (True, "typed_writers", 2))
        for typed, table, writers in ways:
            loaded = make_config(
                base_url,
                pagination={"style": "page_number", "page_size_param": "per_page", "page_size": 20},
                records_path="data.items",
                columns=COLUMNS,
                table=table,
                endpoint=table,
                pipeline={"typed_decode": typed, "writer_processes": writers},
            )
            result = await run(loaded, database)
            stats = result.endpoints[table]
            assert stats.pages == 21
            if typed:  # both paths ran
                assert 8 <= stats.typed_pages <= 14, stats.typed_pages
            else:
                assert stats.typed_pages == 0
    columns = ", ".join(f'"{name}"' for name in [*COLUMNS, "_ingest_raw"])
    for first, second in (("typed_on", "typed_off"), ("typed_writers", "typed_on")):
        ahead = f"SELECT {columns} FROM {first} EXCEPT SELECT {columns} FROM {second}"
        behind = f"SELECT {columns} FROM {second} EXCEPT SELECT {columns} FROM {first}"
        assert await db.fetch(ahead) == [] and await db.fetch(behind) == []
    count = await db.fetchval("SELECT count(*) FROM typed_on")
    assert 200 < count < 400
    assert await db.fetchval("SELECT count(*) FROM typed_writers") == count
    dead = await db.fetch(
        "SELECT endpoint, array_agg(error ORDER BY id) AS errors FROM ingest.dead_letters "
        "GROUP BY endpoint ORDER BY 1"
    )
    assert [row["endpoint"] for row in dead] == ["typed_off", "typed_on", "typed_writers"]
    assert [len(row["errors"]) for row in dead] == [400 - count] * 3
    assert dead[0]["errors"] == dead[1]["errors"] == dead[2]["errors"]


def test_arrays_decode_natively_and_strings_in_them_take_the_converter() -> None:
    """Lists of text/bigint/integer/double/boolean are msgspec's (no per-item Python call);
    numbers sent as strings switch to the lenient variant, which converts them item by item."""
    columns = {
        "id": {"path": "id", "type": "bigint"},
        "tags": {"path": "tags", "type": "text[]"},
        "sizes": {"path": "sizes", "type": "bigint[]"},
        "flags": {"path": "flags", "type": "boolean[]"},
        "moments": {"path": "moments", "type": "timestamptz[]"},
    }
    endpoint = make_config(
        "http://127.0.0.1:1", records_path="data", pagination={"style": "single"}, columns=columns
    ).source.endpoints[0]
    typed = TypedPages(endpoint)
    builder = RowBuilder(endpoint.table)
    records = [
        {"id": 1, "tags": ["a", None], "sizes": [1, 2], "flags": [], "moments": None},
        {"id": 2, "tags": [], "sizes": None, "flags": [False], "moments": ["2024-01-02"]},
    ]
    document = typed(orjson.dumps({"data": records}))
    assert typed.typed_pages == 1 and typed.fallback_pages == 0
    assert list(document["data"]) == builder.build_many(records)[0]
    records[0]["sizes"] = ["3", 4]
    document = typed(orjson.dumps({"data": records}))
    assert typed.typed_pages == 2 and typed.fallback_pages == 0
    assert document["data"][0][2] == [3, 4]
    assert list(document["data"]) == builder.build_many(records)[0]
