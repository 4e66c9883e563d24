"""Target tables: create them, and write one batch (COPY, then insert or merge).

The caller owns the transaction: a batch, its dead letters and its checkpoint commit together,
so a crash at any point leaves either all of them or none.

Append mode COPYs straight into the target table. Merge mode COPYs into a temporary staging
table, then one ``INSERT ... SELECT DISTINCT ON (key) ... ON CONFLICT DO UPDATE`` so the last
occurrence of a key within a batch wins and later batches overwrite earlier ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from ingest.config import Table
from ingest.db import Connection
from ingest.errors import SinkError
from ingest.rows import POSTGRES_TYPES

RAW_COLUMN = "_ingest_raw"
LOADED_AT_COLUMN = "_ingest_loaded_at"
SEQ_COLUMN = "_ingest_seq"


def quote(identifier: str) -> str:
    """Quote an identifier already validated by :mod:`ingest.config`."""
    return '"' + identifier.replace('"', '""') + '"'


class TableSink:
    """SQL for one target table, built once from its config."""

    def __init__(self, table: Table) -> None:
        self.table = table
        self.qualified = f"{quote(table.schema_)}.{quote(table.name)}"
        self.columns: tuple[str, ...] = tuple(table.columns) + (
            (RAW_COLUMN,) if table.store_raw else ()
        )
        self.staging_name = f"_ingest_stage_{table.name}"[:63]
        self.staging = quote(self.staging_name)
        column_list = ", ".join(quote(column) for column in self.columns)
        keys = ", ".join(quote(key) for key in table.primary_key)
        updates = ", ".join(
            f"{quote(column)} = EXCLUDED.{quote(column)}"
            for column in self.columns
            if column not in table.primary_key
        )
        updates = f"{updates}, " if updates else ""
        self._merge_sql = (
            f"INSERT INTO {self.qualified} ({column_list}) "
            f"SELECT DISTINCT ON ({keys}) {column_list} FROM {self.staging} "
            f"ORDER BY {keys}, {quote(SEQ_COLUMN)} DESC "
            f"ON CONFLICT ({keys}) DO UPDATE SET {updates}"
            f"{quote(LOADED_AT_COLUMN)} = now()"
        )
        definitions = ", ".join(
            f"{quote(name)} {POSTGRES_TYPES[column.type]}" for name, column in table.columns.items()
        )
        raw = f", {quote(RAW_COLUMN)} jsonb" if table.store_raw else ""
        self._staging_sql = (
            f"CREATE TEMP TABLE {self.staging} ({definitions}{raw}, {quote(SEQ_COLUMN)} bigint) "
            "ON COMMIT DROP"
        )

    def create_sql(self) -> str:
        """``CREATE TABLE IF NOT EXISTS`` for the target (merge tables get the primary key)."""
        lines = []
        for name, column in self.table.columns.items():
            not_null = " NOT NULL" if name in self.table.primary_key or not column.nullable else ""
            lines.append(f"{quote(name)} {POSTGRES_TYPES[column.type]}{not_null}")
        if self.table.store_raw:
            lines.append(f"{quote(RAW_COLUMN)} jsonb")
        lines.append(f"{quote(LOADED_AT_COLUMN)} timestamptz NOT NULL DEFAULT now()")
        if self.table.mode == "merge":
            keys = ", ".join(quote(key) for key in self.table.primary_key)
            lines.append(f"PRIMARY KEY ({keys})")
        return (
            f"CREATE SCHEMA IF NOT EXISTS {quote(self.table.schema_)};\n"
            f"CREATE TABLE IF NOT EXISTS {self.qualified} (\n    " + ",\n    ".join(lines) + "\n)"
        )

    async def ensure(self, connection: Connection) -> None:
        """Create the table if missing; if it exists, check it has every column we write."""
        await connection.execute(self.create_sql())
        present = {
            row["column_name"]
            for row in await connection.fetch(
                "SELECT column_name FROM information_schema.columns "
                "WHERE table_schema = $1 AND table_name = $2",
                self.table.schema_,
                self.table.name,
            )
        }
        missing = [column for column in (*self.columns, LOADED_AT_COLUMN) if column not in present]
        if missing:
            raise SinkError(
                f"table {self.table.schema_}.{self.table.name} exists without column "
                f"{missing[0]}: add it (ALTER TABLE) or point the endpoint at a new table"
            )

    async def write(self, connection: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """Write ``rows`` inside the caller's transaction."""
        if not rows:
            return
        if self.table.mode == "append":
            await connection.copy_records_to_table(
                self.table.name,
                schema_name=self.table.schema_,
                columns=list(self.columns),
                records=rows,
            )
            return
        await self.stage(connection, rows)
        await self.merge(connection)

    async def stage(self, connection: Connection, rows: Sequence[tuple[Any, ...]]) -> None:
        """COPY a merge batch into this transaction's staging table.

        Rows may already end with their sequence number (``RowBuilder(sequence=True)`` adds it
        while building, which saves rebuilding every tuple here); otherwise it is added.
        """
        await connection.execute(self._staging_sql)
        if rows and len(rows[0]) != len(self.columns) + 1:
            rows = [(*row, seq) for seq, row in enumerate(rows)]
        await connection.copy_records_to_table(
            self.staging_name, columns=[*self.columns, SEQ_COLUMN], records=rows
        )

    async def merge(self, connection: Connection) -> None:
        """Upsert the staged batch into the target; the last occurrence of a key wins."""
        await connection.execute(self._merge_sql)
