"""Merge batches of new keys go straight into the target; the first known key stages the rest.

What a user sees must not change: the table after a merge is the upsert of every batch in
order, whichever way each batch got there.
"""

from __future__ import annotations

import asyncio
from typing import Any

import asyncpg
import orjson
import pytest

from ingest.config import LoadedConfig
from ingest.secrets import Redactor
from tests.helpers import make_config, run
from tests.http_support import captured_logs
from tests.servers import page_number_app, serve

Connection = asyncpg.Connection


def items(ids: list[int], label: str) -> list[dict[str, Any]]:
    return [{"id": i, "name": f"{label} {i}", "score": i / 2, "active": True} for i in ids]


def merge_config(base: str, size: int, **pipeline: Any) -> LoadedConfig:
    """A merge endpoint over ``page_number_app`` pages of ``size``, one page per batch."""
    return make_config(
        base,
        pagination={"style": "page_number", "page_size_param": "per_page", "page_size": size},
        records_path="data.items",
        mode="merge",
        pipeline={"batch_size": size, "consumers": 2, **pipeline},
    )


def events(logs: Any, name: str) -> list[dict[str, Any]]:
    lines = [orjson.loads(line) for line in logs.getvalue().splitlines() if line.strip()]
    return [line for line in lines if line.get("event") == name]


@pytest.mark.parametrize("writers", [0, 2])
async def test_new_keys_copy_straight_in_and_a_known_key_mid_walk_merges_from_then_on(
    database: str, db: Connection, writers: int
) -> None:
    first = items(list(range(1, 31)), "first")
    # The second walk brings new keys, then (in its third batch) key 5 again, then more new.
    second = [
        *items(list(range(31, 51)), "second"),
        *items([5], "again"),
        *items(list(range(51, 70)), "second"),
    ]
    for records, expect_staging in ((first, False), (second, True)):
        async with serve(page_number_app(records, default_size=10)) as base:
            loaded = merge_config(base, 10, writer_processes=writers)
            with captured_logs(Redactor()) as logs:
                result = await run(loaded, database, restart=True)
        assert result.endpoints["items"].records == len(records)
        staged = events(logs, "merge_staged_from_now_on")
        if writers == 0:  # writer processes log in their own process
            assert len(staged) == (1 if expect_staging else 0), staged
    rows = await db.fetch("SELECT id, name, score FROM items ORDER BY id")
    expected = {record["id"]: record for record in [*first, *second]}
    assert [tuple(row) for row in rows] == [
        (key, record["name"], record["score"]) for key, record in sorted(expected.items())
    ]
    assert rows[4]["name"] == "again 5"
    # An upsert's update sets the load time anew; inserts take the default either way.
    loaded_at = await db.fetch("SELECT id, _ingest_loaded_at FROM items WHERE id IN (4, 5, 6)")
    times = {row["id"]: row["_ingest_loaded_at"] for row in loaded_at}
    assert times[5] > times[4] and times[5] > times[6]


async def test_a_key_repeated_across_batches_of_a_first_load_keeps_the_last(
    database: str, db: Connection
) -> None:
    records = [*items(list(range(1, 16)), "early"), *items([3, 7], "late"), *items([16], "more")]
    async with serve(page_number_app(records, default_size=5)) as base:
        await run(merge_config(base, 5), database)
    rows = await db.fetch("SELECT id, name FROM items ORDER BY id")
    assert [row["id"] for row in rows] == list(range(1, 17))
    names = {row["id"]: row["name"] for row in rows}
    assert names[3] == "late 3" and names[7] == "late 7" and names[8] == "early 8"


@pytest.mark.parametrize("consumers", [2, 4])
async def test_batches_in_flight_sharing_keys_neither_wait_forever_nor_lose_the_order(
    database: str, db: Connection, consumers: int
) -> None:
    """A first load whose every batch repeats keys of the two before it, with several batches
    in flight: a batch COPYs before its turn only when no uncommitted earlier batch has one of
    its keys (else an earlier batch could wait on a later one's uncommitted insert forever),
    so the run ends and each key holds its last occurrence."""
    records: list[dict[str, Any]] = []
    for batch in range(40):
        fresh = items(list(range(batch * 10 + 1, batch * 10 + 9)), f"batch {batch}")
        repeats = items([max(1, batch * 10 - 5), max(1, batch * 10 - 15)], f"batch {batch}")
        records += fresh if batch % 3 else [*fresh, *repeats]
    async with serve(page_number_app(records, default_size=10)) as base:
        loaded = merge_config(base, 10, consumers=consumers, queue_size=16)
        result = await asyncio.wait_for(run(loaded, database), timeout=60)
    assert result.endpoints["items"].records == len(records)
    expected = {record["id"]: record["name"] for record in records}
    rows = await db.fetch("SELECT id, name FROM items ORDER BY id")
    assert {row["id"]: row["name"] for row in rows} == expected
