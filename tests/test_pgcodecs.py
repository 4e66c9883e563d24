"""The timestamptz codec writes and reads exactly what asyncpg's own codec does."""

from __future__ import annotations

import datetime as dt
from typing import Any

import asyncpg
import pytest

from ingest.pgcodecs import install_codecs

UTC = dt.UTC
VALUES: list[Any] = [
    dt.datetime(2026, 1, 2, 3, 4, 5, 123456, tzinfo=UTC),
    dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=5, minutes=30))),
    dt.datetime(2026, 1, 2, 3, 4, 5, tzinfo=dt.timezone(-dt.timedelta(hours=11))),
    dt.datetime(1999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),
    dt.datetime(2000, 1, 1, tzinfo=UTC),
    dt.datetime(1, 1, 1, 0, 0, 1, tzinfo=UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999998, tzinfo=UTC),
    dt.datetime(9999, 12, 31, 23, 59, 59, 999999, tzinfo=UTC),  # asyncpg: infinity
    dt.datetime(1, 1, 1, tzinfo=UTC),  # asyncpg: -infinity
    dt.datetime.max,
    dt.datetime.min,
    dt.datetime(2026, 6, 1, 12, 0),  # naive: local time
    dt.date(2026, 6, 1),  # local midnight
]


async def _stored(dsn: str, custom: bool) -> list[tuple[str, Any]]:
    """Write VALUES by COPY and by a parameter, read them back as text and as Python values."""
    connection = await asyncpg.connect(dsn)
    try:
        if custom:
            await install_codecs(connection)
        table = "codec_custom" if custom else "codec_stock"
        await connection.execute(f"CREATE TABLE {table} (n int, at timestamptz)")
        await connection.copy_records_to_table(table, records=list(enumerate(VALUES)))
        for index, value in enumerate(VALUES):
            await connection.execute(f"INSERT INTO {table} VALUES ($1, $2)", index + 100, value)
        rows = await connection.fetch(f"SELECT at::text AS text, at FROM {table} ORDER BY n")
        return [(row["text"], row["at"]) for row in rows]
    finally:
        await connection.close()


async def test_same_as_asyncpg(database: str) -> None:
    stock = await _stored(database, custom=False)
    custom = await _stored(database, custom=True)
    assert custom == stock
    assert "infinity" in {text for text, _ in stock}
    assert "-infinity" in {text for text, _ in stock}


async def test_rejects_what_asyncpg_rejects_with_its_message(database: str) -> None:
    messages = []
    for custom in (False, True):
        connection = await asyncpg.connect(database)
        try:
            if custom:
                await install_codecs(connection)
            with pytest.raises(asyncpg.DataError) as caught:
                await connection.execute("SELECT $1::timestamptz", "2026-01-01")
            messages.append(str(caught.value))
        finally:
            await connection.close()
    assert messages[0] == messages[1]
