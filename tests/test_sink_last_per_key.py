"""Merge batches keep the last occurrence of each key before they reach PostgreSQL."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ingest.config import Table
from ingest.copyenc import EncodedBatch
from ingest.sink import TableSink


def _sink(primary_key: list[str], extra: bool = False) -> TableSink:
    columns = {"a": {"path": "a"}, "b": {"path": "b", "type": "bigint"}}
    if extra:
        columns["c"] = {"path": "c"}
    return TableSink(
        Table.model_validate(
            {
                "name": "t",
                "mode": "merge",
                "primary_key": primary_key,
                "store_raw": False,
                "columns": columns,
            }
        )
    )


def _last(sink: TableSink, rows: Sequence[tuple[Any, ...]]) -> Sequence[tuple[Any, ...]]:
    result = sink.last_per_key(rows)
    assert not isinstance(result, EncodedBatch)  # rows in, rows out
    return result


def test_unique_keys_pass_through_as_the_same_list() -> None:
    rows = [("x", 1), ("y", 2)]
    assert _sink(["a"]).last_per_key(rows) is rows


def test_last_occurrence_wins_for_single_and_composite_keys() -> None:
    rows = [("x", 1), ("y", 2), ("x", 3), ("x", 1)]
    assert sorted(_last(_sink(["a"]), rows)) == [("x", 1), ("y", 2)]
    assert sorted(_last(_sink(["b"]), rows)) == [("x", 1), ("x", 3), ("y", 2)]
    composite = [("x", 1, "first"), ("x", 2, "other"), ("x", 1, "last")]
    assert sorted(_last(_sink(["a", "b"], extra=True), composite)) == [
        ("x", 1, "last"),
        ("x", 2, "other"),
    ]
