"""Building configs and running the pipeline from tests."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import asyncpg

from ingest.config import LoadedConfig, parse_config
from ingest.runner import run_source
from ingest.runstate import RunOptions, RunResult
from ingest.secrets import Redactor

DEFAULT_COLUMNS: dict[str, dict[str, str]] = {
    "id": {"path": "id", "type": "bigint"},
    "name": {"path": "name", "type": "text"},
    "score": {"path": "score", "type": "double"},
    "active": {"path": "active", "type": "boolean"},
    "level": {"path": "nested.level", "type": "integer"},
}


def _toml_value(value: Any) -> str:
    if isinstance(value, dict):
        return (
            "{ " + ", ".join(f"{key} = {_toml_value(inner)}" for key, inner in value.items()) + " }"
        )
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml_value(inner) for inner in value) + "]"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value)


def config_text(
    base_url: str,
    *,
    pagination: dict[str, Any],
    records_path: str = "",
    params: dict[str, Any] | None = None,
    table: str = "items",
    mode: str = "merge",
    columns: dict[str, dict[str, str]] | None = None,
    store_raw: bool = True,
    source: dict[str, Any] | None = None,
    http: dict[str, Any] | None = None,
    pipeline: dict[str, Any] | None = None,
    endpoint: str = "items",
    path: str = "/items",
    load: str | None = None,
    endpoint_options: dict[str, Any] | None = None,
) -> str:
    """A one-endpoint source config as TOML text."""
    source_table = {"name": "test", "base_url": base_url, **(source or {})}
    lines = ["[source]"]
    lines += [f"{key} = {_toml_value(value)}" for key, value in source_table.items()]
    if http:
        lines.append("[http]")
        lines += [f"{key} = {_toml_value(value)}" for key, value in http.items()]
    lines.append("[pipeline]")
    pipeline_settings = {"batch_size": 25, "batch_seconds": 0.5, **(pipeline or {})}
    lines += [f"{key} = {_toml_value(value)}" for key, value in pipeline_settings.items()]
    lines += [
        "[[endpoints]]",
        f"name = {_toml_value(endpoint)}",
        f"path = {_toml_value(path)}",
        f"records_path = {_toml_value(records_path)}",
        f"params = {_toml_value(params or {})}",
        f"pagination = {_toml_value(pagination)}",
        *(f"{key} = {_toml_value(value)}" for key, value in (endpoint_options or {}).items()),
        "[endpoints.table]",
        f"name = {_toml_value(table)}",
        f"mode = {_toml_value(mode)}",
        f"store_raw = {_toml_value(store_raw)}",
    ]
    if load is not None:
        lines.append(f"load = {_toml_value(load)}")
    if mode == "merge":
        lines.append('primary_key = ["id"]')
    lines.append("[endpoints.table.columns]")
    for name, column in (columns or DEFAULT_COLUMNS).items():
        lines.append(f"{name} = {_toml_value(column)}")
    return "\n".join(lines) + "\n"


def make_config(
    base_url: str, environ: dict[str, str] | None = None, **options: Any
) -> LoadedConfig:
    return parse_config(config_text(base_url, **options), Path("test.toml"), environ or {})


async def run(
    loaded: LoadedConfig,
    dsn: str,
    *,
    redactor: Redactor | None = None,
    **options: Any,
) -> RunResult:
    return await run_source(loaded, dsn, redactor or Redactor(), RunOptions(**options))


async def table_rows(
    connection: asyncpg.Connection[Any], table: str = "items"
) -> list[dict[str, Any]]:
    rows = await connection.fetch(f'SELECT * FROM "{table}" ORDER BY id')
    return [dict(row) for row in rows]


async def ids(connection: asyncpg.Connection[Any], table: str = "items") -> list[int]:
    return [row["id"] for row in await connection.fetch(f'SELECT id FROM "{table}" ORDER BY id')]


def final_error(stderr: str) -> str:
    """The error a failed CLI run ended with: the ``run_finished`` event's ``error`` in JSON
    logs (a subprocess's stdout is no terminal), else the plain ``ingest: error:`` line's text."""
    last = stderr.strip().splitlines()[-1]
    if last.startswith("{"):
        event = json.loads(last)
        assert event["event"] == "run_finished", last
        return str(event["error"])
    return last.removeprefix("ingest: error: ")
