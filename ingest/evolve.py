"""Inferred columns and their contract, for endpoints that declare no ``columns``.

Why decisions live in PostgreSQL (``ingest.inferred_columns``): a column's type is decided once,
from the first batch that carries a non-null value of the field, and every later run, every
process (workers, a second source landing in the same table) must read the same decision, or
two of them would write one field as ``bigint`` and as ``text``. Decisions are made under the
table's DDL advisory lock (the one :meth:`ingest.sink.TableSink.ensure` takes), in the same
transaction as the batch that first carries the field, together with its ``ALTER TABLE ... ADD
COLUMN``: a batch that rolls back leaves neither the decision nor the column behind.

Why batches of an inferred endpoint are written one at a time (each waits for its turn before it
starts, not only before it commits): ``ALTER TABLE`` needs the table to itself, and a batch that
COPYed into it while waiting for its turn would hold it from the ``ALTER`` of the batch before,
which waits for that one. Only endpoints without ``columns`` pay this; declared ones never reach
this module.

The contract (``table.contract``) says what a field no column holds does once the table has
columns: ``evolve`` adds a column, ``freeze`` makes the record a dead letter, ``discard`` leaves
the field in the raw record only. The first batch of an empty table creates it under every
contract. A value that does not fit its column's type is a dead letter, as for declared columns
(:class:`ingest.rows.RowBuilder`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from ingest.config import Column, Endpoint, Table
from ingest.db import Connection
from ingest.infer import InferredColumn, infer_columns, unique_name
from ingest.rows import POSTGRES_TYPES
from ingest.sink import TableSink, quote

log = structlog.get_logger("ingest.evolve")
#: At most this many inferred columns per table (PostgreSQL's limit is 1600): an API that sends
#: ever new keys (ids as keys, say) must not grow a table without end; the rest stay in the raw
#: record.
MAX_COLUMNS = 400


@dataclass(frozen=True, slots=True)
class Decision:
    """One inferred column: its name, the path it reads and its ingest type."""

    name: str
    path: str
    type: str


def table_with(table: Table, decisions: Sequence[Decision]) -> Table:
    """``table`` with the decided columns (still marked inferred)."""
    columns = {d.name: Column(path=d.path, type=d.type) for d in decisions}  # type: ignore[arg-type]
    return table.model_copy(update={"columns": columns})


def missing_key(table: Table) -> str | None:
    """The first primary-key column not decided yet (no record has carried it)."""
    return next((key for key in table.primary_key if key not in table.columns), None)


async def load_decisions(connection: Connection, table: Table) -> list[Decision]:
    rows = await connection.fetch(
        "SELECT column_name, path, type FROM ingest.inferred_columns "
        "WHERE schema_name = $1 AND table_name = $2 ORDER BY position",
        table.schema_,
        table.name,
    )
    return [Decision(row["column_name"], row["path"], row["type"]) for row in rows]


def _leaves(record: dict[str, Any], depth: int, prefix: str = "", level: int = 0) -> Iterable[str]:
    """The dotted paths of a record's non-null values, flattened as :mod:`ingest.infer` does."""
    for key, value in record.items():
        if value is None or not key or "." in key:
            continue
        path = f"{prefix}.{key}" if prefix else key
        if isinstance(value, dict) and level < depth:
            yield from _leaves(value, depth, path, level + 1)
        else:
            yield path


def covered(path: str, known: set[str]) -> bool:
    """Whether a column reads ``path`` or an object it is part of (``profile`` as jsonb)."""
    if path in known:
        return True
    parts = path.split(".")
    return any(".".join(parts[:end]) in known for end in range(1, len(parts)))


@dataclass(slots=True)
class Scan:
    """A batch's records against the known columns."""

    #: Records to convert.
    records: list[Any]
    #: (record, reason) of records refused before conversion (not objects; freeze).
    rejected: list[tuple[Any, str]]
    #: Fields no column holds yet, with their inferred types (evolve, or an empty table).
    new: list[InferredColumn]


def scan(table: Table, known: Sequence[Decision], records: Sequence[Any]) -> Scan:
    """Split a batch by the contract; infer the columns its new fields need."""
    paths = {decision.path for decision in known}
    kept: list[Any] = []
    rejected: list[tuple[Any, str]] = []
    for record in records:
        if not isinstance(record, dict):
            rejected.append((record, f"record is a {type(record).__name__}, not a JSON object"))
            continue
        if table.contract == "freeze" and known:
            unknown = [p for p in _leaves(record, table.infer_depth) if not covered(p, paths)]
            if unknown:
                rejected.append(
                    (
                        record,
                        f"field {unknown[0]!r} is not a column of {table.schema_}.{table.name} "
                        '(table.contract = "freeze")',
                    )
                )
                continue
        kept.append(record)
    new: list[InferredColumn] = []
    if table.contract == "evolve" or not known:
        new = [
            column
            for column in infer_columns(kept, table.infer_depth)
            if column.values and not covered(column.path, paths)
        ]
    return Scan(kept, rejected, new)


async def evolve(
    connection: Connection,
    endpoint: Endpoint,
    new: Sequence[InferredColumn],
    *,
    source: str,
    run_id: uuid.UUID | None,
) -> list[Decision]:
    """In the caller's transaction: decide ``new`` columns others have not, create or alter the
    table, and return every decision for the table (others' included)."""
    table = endpoint.table
    await connection.execute(
        "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
        f"ingest:ddl:{table.schema_}.{table.name}",
    )
    decisions = await load_decisions(connection, table)
    paths = {decision.path for decision in decisions}
    names = {decision.name for decision in decisions}
    added: list[Decision] = []
    for column in new:
        if covered(column.path, paths):
            continue  # decided by another process since this one last looked
        if len(decisions) + len(added) >= MAX_COLUMNS:
            log.warning(
                "inferred_column_limit",
                endpoint=endpoint.name,
                limit=MAX_COLUMNS,
                field=column.path[:200],
            )
            break  # the fields stay in the raw record
        decision = Decision(unique_name(column.name, names), column.path, column.type)
        paths.add(decision.path)
        added.append(decision)
        await connection.execute(
            "INSERT INTO ingest.inferred_columns "
            "(schema_name, table_name, column_name, path, type, source, endpoint, run_id) "
            "VALUES ($1, $2, $3, $4, $5, $6, $7, $8)",
            table.schema_,
            table.name,
            decision.name,
            decision.path,
            decision.type,
            source,
            endpoint.name,
            run_id,
        )
    decisions += added
    resolved = table_with(table, decisions)
    if missing_key(resolved):
        return decisions  # no table before its key: the batch's records are dead letters
    sink = TableSink(resolved)
    await connection.execute(sink.create_sql())
    for decision in added:
        await connection.execute(
            f"ALTER TABLE {sink.qualified} ADD COLUMN IF NOT EXISTS {quote(decision.name)} "
            f"{POSTGRES_TYPES[decision.type]}"
        )
    return decisions
