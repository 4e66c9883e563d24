"""Endpoints without ``columns``: columns inferred from the records, kept in
``ingest.inferred_columns``, evolved by the contract (evolve, freeze, discard)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from ingest.config import parse_config
from ingest.deadletters import replay_dead_letters
from ingest.errors import ConfigError
from ingest.evolve import MAX_COLUMNS
from tests.helpers import ids, run
from tests.processes import run_ingest
from tests.servers import make_records, page_number_app, serve

Connection = asyncpg.Connection


def inferred_config(
    base: str,
    *,
    source: str = "test",
    contract: str | None = None,
    depth: int | None = None,
    mode: str = "merge",
    batch_size: int = 10,
) -> str:
    lines = [
        "[source]",
        f'name = "{source}"',
        f'base_url = "{base}"',
        "[pipeline]",
        f"batch_size = {batch_size}",
        "batch_seconds = 0.5",
        "[[endpoints]]",
        'name = "items"',
        'path = "/items"',
        'records_path = "data.items"',
        "params = { per_page = 10 }",
        'pagination = { style = "page_number", total_path = "meta.total" }',
        "[endpoints.table]",
        'name = "items"',
        f'mode = "{mode}"',
    ]
    if mode == "merge":
        lines.append('primary_key = ["id"]')
    if contract:
        lines.append(f'contract = "{contract}"')
    if depth is not None:
        lines.append(f"infer_depth = {depth}")
    return "\n".join(lines) + "\n"


def records_with_extras(count: int) -> list[dict[str, Any]]:
    records = make_records(count)
    for record in records:
        index = record["id"]
        record["updatedAt"] = f"2026-03-{1 + index % 28:02d}T08:30:00+00:00"
        record["tags"] = ["x", f"t{index}"]
        record["items"] = [{"sku": index}]
        record["profile"] = {"plan": "pro", "limits": {"seats": index}}
        record["big"] = str(index)
    return records


async def column_types(db: Connection, table: str = "items") -> dict[str, str]:
    rows = await db.fetch(
        "SELECT column_name, data_type FROM information_schema.columns "
        "WHERE table_schema = 'public' AND table_name = $1",
        table,
    )
    return {row["column_name"]: row["data_type"] for row in rows}


async def decisions(db: Connection) -> list[tuple[str, str, str]]:
    rows = await db.fetch(
        "SELECT column_name, path, type FROM ingest.inferred_columns ORDER BY position"
    )
    return [(row["column_name"], row["path"], row["type"]) for row in rows]


async def test_inferred_columns_take_their_types_from_the_values(
    database: str, db: Connection
) -> None:
    records = records_with_extras(35)
    async with serve(page_number_app(records)) as base:
        loaded = parse_config(inferred_config(base, depth=1), Path("t.toml"), {})
        result = await run(loaded, database)
        again = await run(loaded, database)
    assert result.endpoints["items"].records == 35
    assert again.endpoints["items"].records == 35
    types = await column_types(db)
    assert types == {
        "id": "bigint",
        "name": "text",
        "score": "double precision",
        "active": "boolean",
        "nested__level": "bigint",
        "nested__label": "text",
        "updated_at": "timestamp with time zone",
        "tags": "ARRAY",  # text[], below
        "items": "jsonb",
        "profile__plan": "text",
        "profile__limits": "jsonb",  # deeper than infer_depth = 1
        "big": "text",
        "_ingest_raw": "jsonb",
        "_ingest_loaded_at": "timestamp with time zone",
    }
    tags_type = await db.fetchval(
        "SELECT format_type(atttypid, atttypmod) FROM pg_attribute"
        " WHERE attrelid = 'items'::regclass AND attname = 'tags'"
    )
    assert tags_type == "text[]"  # a list of strings is a PostgreSQL array
    assert len(await decisions(db)) == 12  # decided once, not again by the second run
    rows = await db.fetch("SELECT * FROM items ORDER BY id")
    assert [row["id"] for row in rows] == list(range(1, 36))
    for row, record in zip(rows, records, strict=True):
        assert row["profile__plan"] == "pro"
        assert orjson.loads(row["profile__limits"]) == record["profile"]["limits"]
        assert row["tags"] == record["tags"]
        assert row["updated_at"].isoformat() == record["updatedAt"]
        assert orjson.loads(row["_ingest_raw"]) == record


async def test_evolve_adds_a_column_mid_run_once_in_the_batch_that_carries_it(
    database: str, db: Connection
) -> None:
    records = make_records(60)
    for record in records[35:]:
        record["coupon"] = f"C{record['id']}"
    async with serve(page_number_app(records)) as base:
        loaded = parse_config(inferred_config(base), Path("t.toml"), {})
        result = await run(loaded, database)
        assert result.endpoints["items"].records == 60
        assert result.endpoints["items"].dead_letters == 0
        rows = await db.fetch("SELECT id, coupon FROM items ORDER BY id")
        assert [row["coupon"] for row in rows] == [None] * 35 + [f"C{i}" for i in range(36, 61)]
        for record in records:  # the next run: every record has it
            record["coupon"] = f"C{record['id']}"
        await run(loaded, database)
    assert ("coupon", "coupon", "text") in await decisions(db)
    assert [d[0] for d in await decisions(db)].count("coupon") == 1
    assert (await column_types(db))["coupon"] == "text"
    rows = await db.fetch("SELECT id, coupon FROM items ORDER BY id")
    assert [row["coupon"] for row in rows] == [f"C{i}" for i in range(1, 61)]


async def test_two_processes_landing_in_one_table_agree_on_each_column(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    """Two sources (two `ingest run` processes at once) into one table: a field both carry
    is decided once, the column added once, every record of both lands."""
    first = make_records(40)
    second = make_records(40, start=41)
    for record in first[5:] + second[5:]:
        record["region"] = "eu"
    async with serve(page_number_app(first)) as one, serve(page_number_app(second)) as two:
        configs = []
        for name, base in (("one", one), ("two", two)):
            config = tmp_path / f"{name}.toml"
            config.write_text(inferred_config(base, source=name, batch_size=5))
            configs.append(config)
        outcomes = await asyncio.gather(
            *(run_ingest("run", str(config), env=cli_env) for config in configs)
        )
    for code, out, err in outcomes:
        assert code == 0, out + err
    names = [d[0] for d in await decisions(db)]
    assert sorted(names) == sorted(set(names))
    assert "region" in names
    assert await db.fetchval("SELECT count(*) FROM items") == 80
    assert await db.fetchval("SELECT count(*) FROM items WHERE region = 'eu'") == 70


async def test_freeze_dead_letters_records_with_unknown_fields(
    database: str, db: Connection
) -> None:
    records = make_records(20)
    async with serve(page_number_app(records)) as base:
        await run(parse_config(inferred_config(base), Path("t.toml"), {}), database)
        records[3]["coupon"] = "SPRING"
        records[7]["nested"]["color"] = "red"
        frozen = parse_config(inferred_config(base, contract="freeze"), Path("t.toml"), {})
        result = await run(frozen, database)
    assert result.endpoints["items"].dead_letters == 2
    reasons = [
        row["error"] for row in await db.fetch("SELECT error FROM ingest.dead_letters ORDER BY id")
    ]
    assert reasons == [
        "field 'coupon' is not a column of public.items (table.contract = \"freeze\")",
        "field 'nested.color' is not a column of public.items (table.contract = \"freeze\")",
    ]
    assert "coupon" not in await column_types(db)


async def test_discard_ignores_unknown_fields_and_keeps_them_in_the_raw_record(
    database: str, db: Connection
) -> None:
    records = make_records(20)
    async with serve(page_number_app(records)) as base:
        await run(parse_config(inferred_config(base), Path("t.toml"), {}), database)
        records[3]["coupon"] = "SPRING"
        discard = parse_config(inferred_config(base, contract="discard"), Path("t.toml"), {})
        result = await run(discard, database)
    assert result.endpoints["items"].dead_letters == 0
    assert "coupon" not in await column_types(db)
    raw = await db.fetchval("SELECT _ingest_raw FROM items WHERE id = 4")
    assert orjson.loads(raw)["coupon"] == "SPRING"


async def test_a_value_that_does_not_fit_its_column_is_a_dead_letter_not_a_null(
    database: str, db: Connection
) -> None:
    records = make_records(30)
    records[22]["score"] = "lots"
    async with serve(page_number_app(records)) as base:
        result = await run(parse_config(inferred_config(base), Path("t.toml"), {}), database)
    assert result.endpoints["items"].records == 29
    assert result.endpoints["items"].dead_letters == 1
    error = await db.fetchval("SELECT error FROM ingest.dead_letters")
    assert "column score" in error and "lots" in error
    assert await db.fetchval("SELECT count(*) FROM items WHERE score IS NULL") == 0


async def test_an_api_sending_ever_new_keys_stops_at_the_column_limit(
    database: str, db: Connection
) -> None:
    records = make_records(20)
    for record in records:
        record["by_key"] = {f"k{record['id']}_{n}": n for n in range(30)}  # 600 keys in all
    async with serve(page_number_app(records)) as base:
        result = await run(parse_config(inferred_config(base), Path("t.toml"), {}), database)
    assert result.endpoints["items"].records == 20
    assert len(await decisions(db)) == MAX_COLUMNS
    raw = await db.fetchval("SELECT _ingest_raw FROM items WHERE id = 20")
    assert orjson.loads(raw)["by_key"]["k20_29"] == 29


async def test_init_validate_run_with_columns_left_to_inference(
    tmp_path: Path, cli_env: dict[str, str], db: Connection
) -> None:
    """`ingest validate` and `ingest run` through the CLI on a config without columns."""
    config = tmp_path / "api.toml"
    async with serve(page_number_app(make_records(25))) as base:
        config.write_text(inferred_config(base))
        for command in ("validate", "run"):
            code, out, err = await run_ingest(command, str(config), env=cli_env)
            assert code == 0, out + err
    assert await db.fetchval("SELECT count(*) FROM items") == 25


async def test_replay_applies_the_contract_to_inferred_columns(
    database: str, db: Connection
) -> None:
    """A record frozen out stays a dead letter on replay under freeze; under discard it lands
    (its unknown field in the raw record only)."""
    records = make_records(20)
    async with serve(page_number_app(records)) as base:
        await run(parse_config(inferred_config(base), Path("t.toml"), {}), database)
        records[3]["coupon"] = "SPRING"
        records[3]["name"] = "renamed"
        frozen = parse_config(inferred_config(base, contract="freeze"), Path("t.toml"), {})
        await run(frozen, database)
    (stats,) = await replay_dead_letters(frozen, database)
    assert (stats.replayed, stats.still_failing) == (0, 1)
    discard = parse_config(inferred_config(base, contract="discard"), Path("t.toml"), {})
    (stats,) = await replay_dead_letters(discard, database)
    assert (stats.replayed, stats.still_failing) == (1, 0)
    assert await db.fetchval("SELECT name FROM items WHERE id = 4") == "renamed"
    assert await db.fetchval("SELECT count(*) FROM ingest.dead_letters") == 0


async def test_records_before_the_key_is_ever_seen_are_dead_letters_not_a_failed_run(
    database: str, db: Connection
) -> None:
    records = make_records(30)
    for record in records[:10]:
        record["id"] = None
    async with serve(page_number_app(records)) as base:
        loaded = parse_config(inferred_config(base), Path("t.toml"), {})
        result = await run(loaded, database)
        again = await run(loaded, database)
    assert result.endpoints["items"].records == 20
    assert result.endpoints["items"].dead_letters == 10
    assert again.endpoints["items"].dead_letters == 10
    errors = {row["error"] for row in await db.fetch("SELECT error FROM ingest.dead_letters")}
    # (Whether the key was decided in the batch of those records or only later.)
    assert all(error.startswith("column id: required value is missing") for error in errors)
    assert await ids(db) == list(range(11, 31))


def test_contract_next_to_declared_columns_is_a_config_error() -> None:
    text = inferred_config("http://127.0.0.1:9", contract="freeze") + (
        '[endpoints.table.columns]\nid = { path = "id", type = "bigint" }\n'
    )
    with pytest.raises(ConfigError, match="contract applies to inferred columns only"):
        parse_config(text, Path("t.toml"), {})


async def test_two_endpoints_of_one_run_landing_in_one_table_agree(
    database: str, db: Connection
) -> None:
    """Two endpoints walked at once into one table: one decision and one column per field."""
    halves = {"a": make_records(40), "b": make_records(40, start=41)}
    for records in halves.values():
        for record in records[8:]:
            record["region"] = "eu"
    app = web.Application()
    for route, records in halves.items():
        app.add_subapp(f"/{route}", page_number_app(records))
    async with serve(app) as base:
        text = inferred_config(base, batch_size=5)
        endpoint = text[text.index("[[endpoints]]") :]
        text = text.replace('path = "/items"', 'path = "/a/items"', 1)
        text += endpoint.replace('name = "items"', 'name = "b"', 1).replace(
            'path = "/items"', 'path = "/b/items"', 1
        )
        result = await run(parse_config(text, Path("t.toml"), {}), database)
    assert result.endpoints["items"].records == 40
    assert result.endpoints["b"].records == 40
    names = [d[0] for d in await decisions(db)]
    assert sorted(names) == sorted(set(names))
    assert names.count("region") == 1
    assert await db.fetchval("SELECT count(*) FROM items") == 80
    assert await db.fetchval("SELECT count(*) FROM items WHERE region = 'eu'") == 64
