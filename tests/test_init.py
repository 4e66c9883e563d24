"""``ingest init``: for every pagination style the test servers speak, init writes a config that
``ingest validate`` passes and ``ingest run`` lands every record of, exactly once."""

from __future__ import annotations

import tomllib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import asyncpg
import orjson
import pytest
from aiohttp import web

from ingest.infer import column_type, infer_columns
from tests.processes import run_ingest
from tests.servers import (
    REQUESTS,
    cursor_app,
    json_response,
    link_header_app,
    make_records,
    next_url_app,
    offset_app,
    page_number_app,
    serve,
)

STYLES: dict[str, tuple[Callable[[list[dict[str, Any]]], web.Application], dict[str, Any]]] = {
    "page_number": (
        page_number_app,
        {"style": "page_number", "page_param": "page", "total_path": "meta.total"},
    ),
    "offset": (
        offset_app,
        {
            "style": "offset",
            "offset_param": "offset",
            "limit_param": "limit",
            "limit": 10,
            "total_path": "count",
        },
    ),
    "cursor": (
        cursor_app,
        {
            "style": "cursor",
            "cursor_path": "next_cursor",
            "cursor_param": "cursor",
            "has_more_path": "has_more",
        },
    ),
    "next_url": (next_url_app, {"style": "next_url", "next_url_path": "links.next"}),
    "link_header": (link_header_app, {"style": "link_header"}),
}
RECORDS_PATH = {
    "page_number": "data.items",
    "offset": "results",
    "cursor": "items",
    "next_url": "data",
    "link_header": "",
}


def user_records(count: int) -> list[dict[str, Any]]:
    """make_records plus a timestamp, a date, tags and a nested profile."""
    records = make_records(count)
    for record in records:
        index = record["id"]
        record["updatedAt"] = f"2026-01-{1 + index % 28:02d}T10:00:{index % 60:02d}Z"
        record["born"] = f"1990-02-{1 + index % 28:02d}"
        record["tags"] = ["a", f"t{index}"]
        record["profile"] = {"plan": "pro" if index % 2 else "free", "seats": index}
    return records


async def _init(
    url: str, directory: Path, env: dict[str, str], *extra: str
) -> tuple[Path, dict[str, Any], str]:
    config = directory / "api.toml"
    code, out, err = await run_ingest("init", url, "--output", str(config), *extra, env=env)
    assert code == 0, out + err
    text = config.read_text()
    return config, tomllib.loads(text), text


@pytest.mark.parametrize("style", list(STYLES))
async def test_init_then_validate_and_run_land_every_record(
    style: str, tmp_path: Path, cli_env: dict[str, str], database: str
) -> None:
    make_app, expected = STYLES[style]
    records = user_records(47)
    async with serve(make_app(records)) as base:
        config, document, text = await _init(f"{base}/items", tmp_path, cli_env)
        endpoint = document["endpoints"][0]
        assert endpoint["pagination"] == expected, text
        assert endpoint["records_path"] == RECORDS_PATH[style]
        table = endpoint["table"]
        assert table["name"] == "items"
        assert (table["mode"], table["primary_key"]) == ("merge", ["id"])
        columns = table["columns"]
        assert columns["id"] == {"path": "id", "type": "bigint"}
        assert columns["name"]["type"] == "text"
        assert columns["score"]["type"] == "double"
        assert columns["active"]["type"] == "boolean"
        assert columns["updated_at"] == {"path": "updatedAt", "type": "timestamptz"}
        assert columns["born"]["type"] == "date"
        assert columns["tags"]["type"] == "text[]"
        assert columns["profile__plan"] == {"path": "profile.plan", "type": "text"}
        assert columns["nested__level"] == {"path": "nested.level", "type": "bigint"}
        assert '# cursor_path = "updatedAt"' in text  # the incremental suggestion, commented

        code, out, err = await run_ingest("validate", str(config), env=cli_env)
        assert code == 0, out + err
        code, out, err = await run_ingest("run", str(config), env=cli_env)
        assert code == 0, out + err
        code, out, err = await run_ingest("run", str(config), env=cli_env)
        assert code == 0, out + err
    connection = await asyncpg.connect(database)
    try:
        rows = await connection.fetch(
            "SELECT id, name, profile__plan, updated_at, _ingest_raw FROM items ORDER BY id"
        )
    finally:
        await connection.close()
    assert [row["id"] for row in rows] == list(range(1, 48))
    for row, record in zip(rows, records, strict=True):
        assert row["name"] == record["name"]
        assert row["profile__plan"] == record["profile"]["plan"]
        assert row["updated_at"].isoformat().replace("+00:00", "Z") == record["updatedAt"]
        assert orjson.loads(row["_ingest_raw"]) == record


async def test_init_sends_headers_writes_variables_and_guesses_honestly(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    """A ${VAR} header is sent resolved and written as ${VAR}; an API without an id-like unique
    field or a second page gets append mode and single style, each with a ``check`` comment."""
    records = [{"name": "same", "value": None}, {"name": "same", "value": None}]

    async def handler(request: web.Request) -> web.Response:
        return json_response({"data": records})

    app = web.Application()
    app[REQUESTS] = []

    @web.middleware
    async def record(request: web.Request, handler: Any) -> Any:
        app[REQUESTS].append(dict(request.headers))
        return await handler(request)

    app.middlewares.append(record)
    app.router.add_get("/v1/things", handler)
    env = {**cli_env, "THINGS_TOKEN": "tok-init-4d2f8a"}
    async with serve(app) as base:
        _, document, text = await _init(
            f"{base}/v1/things?sort=asc",
            tmp_path,
            env,
            "--header",
            "Authorization: Bearer ${THINGS_TOKEN}",
            "--header",
            "X-Api-Key: literal-key",
        )
    assert all(r["Authorization"] == "Bearer tok-init-4d2f8a" for r in app[REQUESTS])
    assert "tok-init-4d2f8a" not in text
    assert document["source"]["headers"] == {
        "Authorization": "Bearer ${THINGS_TOKEN}",
        "X-Api-Key": "literal-key",
    }
    assert "# check: a credential written literally" in text
    endpoint = document["endpoints"][0]
    assert endpoint["path"] == "/v1/things"
    assert endpoint["params"] == {"sort": "asc"}
    assert endpoint["pagination"] == {"style": "single"}
    assert endpoint["table"]["mode"] == "append"
    assert "primary_key" not in endpoint["table"]
    assert endpoint["table"]["columns"]["value"]["type"] == "text"
    assert "# check: no id-like field" in text
    assert "only nulls in the sample" in text
    assert "no second page found" in text


async def test_init_refuses_to_overwrite_and_explains_an_empty_first_page(
    tmp_path: Path, cli_env: dict[str, str]
) -> None:
    existing = tmp_path / "api.toml"
    existing.write_text("# mine\n")
    async with serve(page_number_app([])) as base:
        code, out, err = await run_ingest(
            "init", f"{base}/items", "--output", str(existing), env=cli_env
        )
        assert code == 2 and "already exists" in err, out + err
        code, out, err = await run_ingest(
            "init", f"{base}/items", "--output", str(tmp_path / "new.toml"), env=cli_env
        )
    assert code == 1 and "the first page has no records" in err, out + err
    assert len(err.strip().splitlines()) == 1
    assert existing.read_text() == "# mine\n"
    assert not (tmp_path / "new.toml").exists()


async def test_init_records_path_and_depth_flags(tmp_path: Path, cli_env: dict[str, str]) -> None:
    async with serve(next_url_app(user_records(15), absolute=False)) as base:
        _, document, text = await _init(
            f"{base}/items", tmp_path, cli_env, "--records-path", "data", "--depth", "0"
        )
    endpoint = document["endpoints"][0]
    assert endpoint["records_path"] == "data"
    assert "# given with --records-path" in text
    assert endpoint["pagination"] == {"style": "next_url", "next_url_path": "links.next"}
    columns = endpoint["table"]["columns"]
    assert columns["profile"] == {"path": "profile", "type": "jsonb"}
    assert "profile__plan" not in columns


def test_inference_rules() -> None:
    assert column_type([1, 2]) == ("bigint", "")
    assert column_type([1, 2.5])[0] == "double"
    assert column_type([2**70])[0] == "numeric"
    assert column_type([True])[0] == "boolean"
    assert column_type(["2026-01-01T00:00:00+02:00"])[0] == "timestamptz"
    assert column_type(["2026-01-01"])[0] == "date"
    assert column_type(["2026-01-01", "2026-01-01 10:00"])[0] == "timestamptz"
    assert column_type(["2026-13-01"])[0] == "text"
    assert column_type([1, "x"])[0] == "text"
    assert column_type([[1], {"a": 1}])[0] == "jsonb"
    # Lists of one scalar kind are arrays (NULL items allowed); anything else stays jsonb.
    assert column_type([["a", None], ["b"]])[0] == "text[]"
    assert column_type([[1, 2], [3]])[0] == "bigint[]"
    assert column_type([[1, 2.5]])[0] == "double[]"
    assert column_type([[True, False]])[0] == "boolean[]"
    assert column_type([["2026-01-01T00:00:00Z"]])[0] == "timestamptz[]"
    assert column_type([[2**70, 1]])[0] == "numeric[]"
    assert column_type([[1, "x"]])[0] == "jsonb"
    assert column_type([[{"a": 1}]])[0] == "jsonb"
    assert column_type([[[1]]])[0] == "jsonb"
    assert column_type([["2026-01-01"]])[0] == "jsonb"  # no date[] type
    assert column_type([[], []]) == (
        "jsonb",
        "only empty lists in the sample: jsonb is a guess, an array may fit",
    )
    columns = infer_columns(
        [{"a": {"b": {"c": 1}}, "userId": 3, "x.y": 1, "_ingest_raw": 1}], depth=1
    )
    assert [(c.name, c.path, c.type) for c in columns] == [
        ("a__b", "a.b", "jsonb"),
        ("user_id", "userId", "bigint"),
        ("ingest_raw", "_ingest_raw", "bigint"),
    ]
    flat = infer_columns([{"a": {"b": 1}}, {"a": None}, {"a": {"c": "x"}}], depth=0)
    assert [(c.name, c.type) for c in flat] == [("a", "jsonb")]
