"""`ingest migrate`: each file once, recorded; safe twice and from two processes at once."""

from __future__ import annotations

import asyncio

import asyncpg

from ingest.migrate import discover, migrate, pending
from tests.processes import run_ingest


async def test_migrate_applies_each_file_once_and_is_safe_to_repeat(empty_database: str) -> None:
    connection = await asyncpg.connect(empty_database)
    try:
        names = [f"{m.version:04d}_{m.name}" for m in discover()]
        assert await pending(connection) == names
        assert await migrate(connection) == names
        assert await migrate(connection) == []
        assert await pending(connection) == []
        rows = await connection.fetch("SELECT version FROM ingest.schema_migrations ORDER BY 1")
        assert [row["version"] for row in rows] == [m.version for m in discover()]
    finally:
        await connection.close()


async def test_two_processes_migrating_at_once_both_succeed(
    empty_database: str, cli_env: dict[str, str]
) -> None:
    environment = {**cli_env, "DATABASE_URL": empty_database}

    async def migrate_in_process() -> tuple[int, str]:
        code, out, err = await run_ingest("migrate", env=environment)
        return code, out + err

    results = await asyncio.gather(*(migrate_in_process() for _ in range(3)))
    assert [code for code, _ in results] == [0, 0, 0], results
    outputs = [text for _, text in results]
    assert sum("applied: 0001_core" in text for text in outputs) == 1
    assert sum("schema is up to date" in text for text in outputs) == 2
    connection = await asyncpg.connect(empty_database)
    try:
        assert await connection.fetchval("SELECT count(*) FROM ingest.schema_migrations") == len(
            discover()
        )
    finally:
        await connection.close()
