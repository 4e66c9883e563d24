"""The compiled per-table build loop gives exactly the generic path's rows and errors."""

from __future__ import annotations

from typing import Any

import pytest

from ingest.config import Table
from ingest.rows import RowBuilder, RowError

COLUMNS: dict[str, dict[str, str | bool]] = {
    "id": {"path": "id", "type": "bigint"},
    "name": {"path": "name", "type": "text"},
    "small": {"path": "small", "type": "integer"},
    "score": {"path": "score", "type": "double"},
    "price": {"path": "price", "type": "numeric"},
    "flag": {"path": "flag", "type": "boolean"},
    "at": {"path": "at", "type": "timestamptz"},
    "day": {"path": "day", "type": "date"},
    "tags": {"path": "tags", "type": "jsonb"},
    "plan": {"path": "profile.plan", "type": "text"},
    "seats": {"path": "profile.seats", "type": "integer", "nullable": False},
    "first_tag": {"path": "tags.0", "type": "text"},
}

RECORDS: list[Any] = [
    {
        "id": 1,
        "name": "Zoë 🚀",
        "small": 7,
        "score": 1.5,
        "price": "12.30",
        "flag": True,
        "at": "2026-01-02T03:04:05Z",
        "day": "2026-01-02",
        "tags": ["a", "b"],
        "profile": {"plan": "pro", "seats": 3},
    },
    {
        "id": "2",
        "score": 2,
        "flag": "yes",
        "at": " 2026-01-02T03:04:05 ",
        "profile": {"seats": "4"},
    },
    {"id": 3, "at": "2026-01-02T03:04:05", "profile": {"seats": 4.0}, "name": 12.5},
    {"id": 4, "at": 1_700_000_000_000, "profile": {"seats": 1}, "tags": {"nested": [1, None]}},
    {"id": 5, "profile": {"seats": 1}, "name": True, "tags": None, "small": None},
    {"id": None, "profile": {"seats": 1}},
    {"profile": {"seats": 1}},
    {"id": 6, "profile": {"seats": 2**40}},
    {"id": 2**63, "profile": {"seats": 1}},
    {"id": 7, "profile": {"seats": 1.5}},
    {"id": True, "profile": {"seats": 1}},
    {"id": 8, "name": "nul\x00", "profile": {"seats": 1}},
    {"id": 9, "tags": ["nul\x00"], "profile": {"seats": 1}},
    {"id": 10, "at": "yesterday", "profile": {"seats": 1}},
    {"id": 11, "score": "NaN?", "profile": {"seats": 1}},
    {"id": 12, "profile": None},
    {"id": 13, "profile": "flat", "tags": []},
    {"id": 14, "profile": {"seats": 1}, "tags": ["x"], "day": "2026-13-01"},
    {"id": 15, "profile": {"seats": 1}, "flag": 2},
    [1, 2, 3],
    "a string record",
    None,
]


def _table(store_raw: bool, mode: str = "append") -> Table:
    return Table.model_validate(
        {
            "name": "t",
            "mode": mode,
            "primary_key": ["id"] if mode == "merge" else [],
            "store_raw": store_raw,
            "columns": COLUMNS,
        }
    )


def _generic(builder: RowBuilder, records: list[Any]) -> tuple[list[Any], list[Any]]:
    rows, rejected = [], []
    for record in records:
        try:
            rows.append(builder.build(record))
        except RowError as exc:
            rejected.append((record, str(exc)))
    return rows, rejected


@pytest.mark.parametrize("store_raw", [False, True])
@pytest.mark.parametrize("mode", ["append", "merge"])
def test_compiled_build_many_matches_the_generic_path(store_raw: bool, mode: str) -> None:
    builder = RowBuilder(_table(store_raw, mode))
    rows, rejected = builder.build_many(RECORDS)
    expected_rows, expected_rejected = _generic(builder, RECORDS)
    assert rows == expected_rows
    assert [type(value) for row in rows for value in row] == [
        type(value) for row in expected_rows for value in row
    ]
    assert rejected == expected_rejected
    assert len(rows) + len(rejected) == len(RECORDS)
    assert rows[0][:3] == (1, "Zoë 🚀", 7)
    assert rows[0][8] == '["a","b"]'
    assert ("id" in rejected[0][1]) or ("seats" in rejected[0][1])
