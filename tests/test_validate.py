"""``ingest validate``: every problem on its own line, secrets hidden, nothing written."""

from __future__ import annotations

import asyncio
import socket
import subprocess
from pathlib import Path
from typing import Any

import asyncpg
from aiohttp import web

from ingest.db import describe_dsn
from ingest.migrate import discover
from ingest.secrets import Redactor
from ingest.validate import validate
from tests.conftest import PYTHON
from tests.gated import gated_app, gated_config
from tests.helpers import config_text
from tests.servers import _app, json_response, serve

Connection = asyncpg.Connection
TOKEN = "tok-validate-0123456789-secret"


def _closed_port() -> int:
    """A loopback port nothing listens on (bound, then released)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


async def _snapshot(connection: Connection) -> list[Any]:
    """Every relation outside the system schemas, and the rows of ingest's tables."""
    relations = await connection.fetch(
        "SELECT n.nspname, c.relname, c.relkind FROM pg_class c "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "WHERE n.nspname NOT IN ('pg_catalog', 'information_schema', 'pg_toast') "
        "ORDER BY 1, 2"
    )
    counts = []
    for table in ("runs", "checkpoints", "dead_letters", "schema_migrations"):
        if any(row["nspname"] == "ingest" and row["relname"] == table for row in relations):
            counts.append(await connection.fetchval(f"SELECT count(*) FROM ingest.{table}"))
    return [tuple(row) for row in relations] + counts


def _cli(config: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PYTHON, "-m", "ingest", "validate", str(config), "--timeout", "5"],
        env=env,
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_validate_reports_a_missing_variable_and_an_unreachable_endpoint_one_line_each(
    database: str, db: Connection, cli_env: dict[str, str], tmp_path: Path
) -> None:
    config = tmp_path / "broken.toml"
    config.write_text(
        config_text(
            f"http://127.0.0.1:{_closed_port()}",
            source={"headers": {"Authorization": "Bearer ${INGEST_TEST_MISSING_TOKEN}"}},
            **gated_config(),
        )
    )
    before = await _snapshot(db)
    completed = await asyncio.to_thread(_cli, config, cli_env)
    assert completed.returncode == 2, completed.stderr
    lines = completed.stdout.splitlines()
    assert len(lines) == 2, completed.stdout
    assert lines[0] == (
        f"{config}: source.headers.Authorization: environment variable "
        "INGEST_TEST_MISSING_TOKEN is not set (export INGEST_TEST_MISSING_TOKEN=... before running)"
    )
    assert lines[1].startswith("endpoint items: http://127.0.0.1:")
    assert "/items?page=1: gave up after 1 attempt in" in lines[1]
    assert "connection failed" in lines[1]
    assert completed.stderr.strip().endswith(f"ingest: 2 problem(s) in {config}")
    assert await _snapshot(db) == before


async def test_validate_hides_secrets_and_reports_bad_records_and_auth_failures(
    database: str, db: Connection, tmp_path: Path
) -> None:
    async def echo_auth(request: web.Request) -> web.Response:
        # A careless API that echoes the credential back in its error body.
        return web.Response(status=401, text=f"bad token {request.headers['Authorization']}")

    async def strings(request: web.Request) -> web.Response:
        return json_response({"data": [{"id": "not a number", "name": "x"}], "total": 1})

    app = _app({"/items": echo_auth, "/other": strings})
    async with serve(app) as base:
        text = config_text(
            base,
            source={"headers": {"Authorization": "Bearer ${INGEST_TEST_TOKEN}"}},
            **gated_config(),
        )
        text += (
            text[text.index("[[endpoints]]") :]
            .replace('"items"', '"other"')
            .replace('"/items"', '"/other"')
        )
        config = tmp_path / "secret.toml"
        config.write_text(text)
        before = await _snapshot(db)
        result = await validate(config, database, Redactor(), environ={"INGEST_TEST_TOKEN": TOKEN})
    messages = [str(problem) for problem in result.problems]
    assert len(messages) == 2, messages
    assert messages[0].startswith("endpoint items: http://127.0.0.1:")
    assert messages[0].endswith("/items?page=1: HTTP 401: bad token ***")
    assert messages[1].startswith("endpoint other: ")
    assert "1 of the first 1 records would be dead-lettered" in messages[1]
    assert "column id" in messages[1]
    assert all(TOKEN not in message and TOKEN[4:] not in message for message in messages)
    assert int(result.exit_code) == 2  # a refused token is for a person to fix, as in `run`
    assert await _snapshot(db) == before
    assert await db.fetchval("SELECT to_regclass('public.items')") is None


async def test_validate_reports_an_unmigrated_database_without_creating_the_schema(
    empty_database: str, tmp_path: Path
) -> None:
    async with serve(gated_app(5)) as base:
        config = tmp_path / "ok.toml"
        config.write_text(config_text(base, **gated_config()))
        result = await validate(config, empty_database, Redactor(), environ={})
    pending_names = [f"{migration.version:04d}_{migration.name}" for migration in discover()]
    assert [str(problem) for problem in result.problems] == [
        f"database {describe_dsn(empty_database)}: ingest's schema is not up to date "
        f"(pending: {', '.join(pending_names)}): run `ingest migrate`"
    ]
    connection = await asyncpg.connect(empty_database)
    try:
        assert await connection.fetchval("SELECT to_regnamespace('ingest')") is None
    finally:
        await connection.close()


async def test_validate_passes_a_good_config_with_exit_code_zero(
    database: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    async with serve(gated_app(5)) as base:
        config = tmp_path / "ok.toml"
        config.write_text(config_text(base, **gated_config()))
        completed = await asyncio.to_thread(_cli, config, cli_env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    assert completed.stdout == (
        f"ok: {config}: config valid, 1 endpoint(s) answered, database reachable and migrated\n"
    )


async def test_validate_notes_pages_that_miss_typed_decoding(
    database: str, cli_env: dict[str, str], tmp_path: Path
) -> None:
    """Ids sent as 1.0 convert fine, but on the slower path: a note, still exit code 0."""

    async def items(request: web.Request) -> web.Response:
        return json_response({"data": [{"id": 1.0, "name": "a"}, {"id": 2.0, "name": "b"}]})

    columns = {"id": {"path": "id", "type": "bigint"}, "name": {"path": "name", "type": "text"}}
    async with serve(_app({"/items": items})) as base:
        config = tmp_path / "strings.toml"
        config.write_text(
            config_text(base, pagination={"style": "single"}, records_path="data", columns=columns)
        )
        completed = await asyncio.to_thread(_cli, config, cli_env)
        indexed = tmp_path / "indexed.toml"
        indexed.write_text(
            config_text(
                base,
                pagination={"style": "single"},
                records_path="data",
                columns={**columns, "odd": {"path": "0.id", "type": "text"}},
            )
        )
        completed_indexed = await asyncio.to_thread(_cli, indexed, cli_env)
    assert completed.returncode == 0, completed.stdout + completed.stderr
    lines = completed.stdout.splitlines()
    # With store_raw (the default) each record is decoded on its own: the path is the record's.
    assert lines[0] == (
        f"endpoint items: {base}/items: note: the first page takes the slower Python row path "
        "(Expected `int`, got `float` - at `$.id`); see README, typed decoding"
    )
    assert lines[1].startswith(f"ok: {config}: config valid")
    assert completed_indexed.returncode == 0
    assert (
        "slower Python row path (column path '0.id' starts with a list index)"
        in completed_indexed.stdout
    )
