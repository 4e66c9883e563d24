"""Record -> row conversion: lenient where APIs are sloppy, precise about what fails and why."""

from __future__ import annotations

import datetime as dt
from decimal import Decimal
from typing import Any

import asyncpg
import pytest

from ingest.config import Table
from ingest.rows import RowBuilder, RowError
from tests.helpers import make_config, run
from tests.servers import page_number_app, serve


def builder(**columns: dict[str, Any]) -> RowBuilder:
    return RowBuilder(
        Table.model_validate(
            {
                "name": "t",
                "primary_key": ["id"],
                "columns": {"id": {"path": "id", "type": "bigint"}, **columns},
                "store_raw": False,
            }
        )
    )


def test_numbers_as_strings_and_timestamps_convert() -> None:
    rows = builder(
        price={"path": "price", "type": "numeric"},
        seen={"path": "seen", "type": "timestamptz"},
        flag={"path": "flag", "type": "boolean"},
        day={"path": "day", "type": "date"},
        tags={"path": "tags", "type": "jsonb"},
        label={"path": "label", "type": "text"},
    )
    row = rows.build(
        {
            "id": "42",
            "price": "19.90",
            "seen": "2026-03-01T10:00:00Z",
            "flag": "false",
            "day": "2026-03-01",
            "tags": ["a", "b"],
            "label": 7,
        }
    )
    assert row == (
        42,
        Decimal("19.90"),
        dt.datetime(2026, 3, 1, 10, tzinfo=dt.UTC),
        False,
        dt.date(2026, 3, 1),
        '["a","b"]',
        "7",
    )
    assert rows.build({"id": 1, "seen": 1767225600})[2] == dt.datetime(2026, 1, 1, tzinfo=dt.UTC)


@pytest.mark.parametrize(
    ("record", "reason"),
    [
        ({"id": "abc"}, "column id: 'abc' is not an integer"),
        ({"name": "no id"}, "column id: required value is missing"),
        ({"id": 1, "seen": "yesterday"}, "column seen: 'yesterday' is not an ISO 8601 timestamp"),
        ({"id": 1, "label": "nul\x00byte"}, "column label: contains a NUL character"),
        ({"id": 2**70}, "column id: 1180591620717411303424 is out of range"),
    ],
)
def test_bad_records_name_the_column_and_the_reason(record: dict[str, Any], reason: str) -> None:
    rows = builder(
        seen={"path": "seen", "type": "timestamptz"}, label={"path": "label", "type": "text"}
    )
    with pytest.raises(RowError) as caught:
        rows.build(record)
    assert str(caught.value).startswith(reason)


async def test_bad_records_go_to_dead_letters_and_the_run_goes_on(
    database: str, db: asyncpg.Connection
) -> None:
    records: list[dict[str, Any]] = [{"id": i, "name": f"n{i}"} for i in range(1, 21)]
    records[4]["id"] = "five"
    del records[9]["id"]
    async with serve(page_number_app(records)) as base:
        loaded = make_config(
            base,
            records_path="data.items",
            pagination={"style": "page_number", "total_path": "meta.total"},
            columns={"id": {"path": "id", "type": "bigint"}, "name": {"path": "name"}},
        )
        result = await run(loaded, database)
    assert result.endpoints["items"].records == 18
    assert result.endpoints["items"].dead_letters == 2
    letters = await db.fetch(
        "SELECT endpoint, record, error, run_id FROM ingest.dead_letters ORDER BY id"
    )
    assert [(row["endpoint"], row["error"]) for row in letters] == [
        ("items", "column id: 'five' is not an integer"),
        ("items", "column id: required value is missing"),
    ]
    assert all(row["run_id"] == result.run_id for row in letters)
    assert '"name":"n5"' in letters[0]["record"]
