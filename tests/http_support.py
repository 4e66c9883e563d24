"""Test support for the HTTP tests: log capture and a database-wide secret search."""

from __future__ import annotations

import io
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import asyncpg
import structlog

from ingest.log import configure_logging
from ingest.secrets import Redactor


@contextmanager
def captured_logs(redactor: Redactor) -> Iterator[io.StringIO]:
    """Every structlog event of the block, rendered as the CLI renders it (JSON lines)."""
    buffer = io.StringIO()
    configure_logging(redactor, level="debug", fmt="json", stream=buffer)
    try:
        yield buffer
    finally:
        structlog.reset_defaults()


async def database_text(connection: asyncpg.Connection[Any]) -> str:
    """Everything ingest stored about runs and checkpoints, as one string to search."""
    parts: list[str] = []
    for table in ("ingest.checkpoints", "ingest.runs", "ingest.dead_letters"):
        rows = await connection.fetch(f"SELECT * FROM {table}")
        parts.extend(str(dict(row)) for row in rows)
    return "\n".join(parts)
