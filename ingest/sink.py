"""Target tables: create them, and write one batch (COPY, then insert or merge).

The caller owns the transaction: a batch, its dead letters and its checkpoint commit together,
so a crash at any point leaves either all of them or none.

Append mode COPYs straight into the target table. Merge mode keeps only the last occurrence of
each key within a batch (in Python, one set of keys per batch), COPYs the batch into a temporary
staging table, then runs one ``INSERT ... SELECT ... ON CONFLICT DO UPDATE``, so later batches
overwrite earlier ones; while every key a walk sends is new (a first load, a backfill of new
history), a batch is COPYed straight into the target instead (:meth:`TableSink.copy_new`).
Deduplicating before the COPY (instead of ``SELECT DISTINCT ON (key) ... ORDER BY key, seq
DESC`` in the database) spares PostgreSQL a sort of every batch, which spills to disk at the
default ``work_mem`` for large batches; see docs/performance.md.
"""

from __future__ import annotations

import operator
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import asyncpg
import orjson

from ingest.config import Table
from ingest.copyenc import Encode, EncodedBatch, Rows, binary_encoder, decode_rows
from ingest.db import Connection
from ingest.errors import SinkError, one_line
from ingest.rows import POSTGRES_TYPES

#: What a COPY raises for data that cannot be written, as opposed to a lost connection:
#: PostgreSQL's refusals (SQLSTATE classes 22 and 23), and asyncpg's own for a value it cannot
#: encode (ValueError and the like, raised in the middle of the COPY, which then fails).
REFUSALS: tuple[type[Exception], ...] = (
    asyncpg.DataError,
    asyncpg.IntegrityConstraintViolationError,
    ValueError,
    TypeError,
    OverflowError,
)
#: Where :meth:`TableSink.copy_refusing` puts refused rows; None: one plain COPY.
Refused = list[tuple[Any, str]] | None

RAW_COLUMN = "_ingest_raw"
LOADED_AT_COLUMN = "_ingest_loaded_at"


def quote(identifier: str) -> str:
    """Quote an identifier already validated by :mod:`ingest.config`."""
    return '"' + identifier.replace('"', '""') + '"'


async def _once(data: bytes) -> AsyncIterator[bytes]:
    """``data`` as asyncpg's async-iterable COPY source (no executor thread, no copy)."""
    yield data


def refusal_reason(exc: BaseException) -> str:
    """A dead letter's reason for a row PostgreSQL refused: its SQLSTATE and message."""
    state = getattr(exc, "sqlstate", None)
    if state is None:  # asyncpg's encoder, before PostgreSQL saw the value
        return f"the row cannot be encoded for PostgreSQL ({type(exc).__name__}: {one_line(exc)})"
    return f"PostgreSQL refused the row [{state}]: {one_line(exc)}"


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
            f"SELECT {column_list} FROM {self.staging} "
            f"ON CONFLICT ({keys}) DO UPDATE SET {updates}"
            f"{quote(LOADED_AT_COLUMN)} = now()"
        )
        definitions = ", ".join(
            f"{quote(name)} {POSTGRES_TYPES[column.type]}" for name, column in table.columns.items()
        )
        raw = f", {quote(RAW_COLUMN)} jsonb" if table.store_raw else ""
        self._staging_sql = f"CREATE TEMP TABLE {self.staging} ({definitions}{raw}) ON COMMIT DROP"
        self._column_types = [column.type for column in table.columns.values()] + (
            ["jsonb"] if table.store_raw else []
        )
        self._encode: Encode | None = binary_encoder(self._column_types)
        #: The target's column types are the configured ones (None: not checked yet).
        self._target_matches: bool | None = None
        # (An inferred table's key column may not be decided yet: no rows before it is.)
        positions = [self.columns.index(key) for key in table.primary_key if key in self.columns]
        self._key: Callable[[tuple[Any, ...]], Any] = (
            operator.itemgetter(*positions) if positions else operator.itemgetter(slice(0, 0))
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
        """Create the table if missing; if it exists, check it has every column we write.

        ``CREATE TABLE IF NOT EXISTS`` is not safe against a concurrent twin (both may pass the
        check and one fails on the catalog's unique index), so creators of the same table queue
        on a transaction-level advisory lock: backfill workers start many at once.
        """
        async with connection.transaction():
            await connection.execute(
                "SELECT pg_advisory_xact_lock(hashtextextended($1, 0))",
                f"ingest:ddl:{self.table.schema_}.{self.table.name}",
            )
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

    async def write(self, connection: Connection, rows: Rows, refused: Refused = None) -> None:
        """Write ``rows`` inside the caller's transaction (``refused``: see :meth:`stage`)."""
        if not rows:
            return
        if self.table.mode == "append":
            await self._copy_into_target(connection, rows, refused)
            return
        await self.stage(connection, rows, refused)
        await self.merge(connection)

    async def _copy_into_target(
        self, connection: Connection, rows: Rows, refused: Refused = None
    ) -> None:
        matches = await self.target_matches(connection)
        if isinstance(rows, EncodedBatch) and not matches:
            raise RuntimeError("an encoded batch for a target of other column types")
        encode = self._encode if matches else None
        await self._copy(
            connection, self.table.name, self.table.schema_, rows, encode, refused=refused
        )

    async def stage(self, connection: Connection, rows: Rows, refused: Refused = None) -> None:
        """COPY a merge batch, last occurrence of each key only, into the staging table.

        ``refused``: None for one plain COPY (the batch fails as a whole if PostgreSQL refuses
        a value); a list to find the rows PostgreSQL refuses instead, see
        :meth:`copy_refusing`.
        """
        await connection.execute(self._staging_sql)
        await self._copy(
            connection,
            self.staging_name,
            None,
            self.last_per_key(rows),
            self._encode,
            refused=refused,
        )

    async def _copy(
        self,
        connection: Connection,
        name: str,
        schema: str | None,
        rows: Rows,
        encode: Encode | None,
        *,
        refused: Refused = None,
    ) -> None:
        """One COPY of ``rows``: bytes from the C encoders, or asyncpg's when they decline.

        With a ``refused`` list, the rows PostgreSQL refuses go into it and the rest are
        written (:meth:`copy_refusing`).
        """
        if refused is not None:
            await self.copy_refusing(connection, name, schema, rows, encode, refused=refused)
            return
        if isinstance(rows, EncodedBatch):
            data: bytes | None = rows.data
        else:
            data = encode(rows) if encode is not None else None
            if data is None:
                await connection.copy_records_to_table(
                    name, schema_name=schema, columns=list(self.columns), records=rows
                )
                return
        assert data is not None
        await connection.copy_to_table(
            name,
            schema_name=schema,
            columns=list(self.columns),
            source=_once(data),
            format="binary",
        )

    async def copy_refusing(
        self,
        connection: Connection,
        name: str,
        schema: str | None,
        rows: Rows,
        encode: Encode | None,
        *,
        refused: list[tuple[Any, str]],
    ) -> None:
        """COPY ``rows`` in savepoints, halving a part PostgreSQL refuses until the rows it
        refuses are single: those go to ``refused`` as (row as an object, PostgreSQL's reason),
        the rest are written.

        Why: PostgreSQL may refuse a value ingest's converters took (a numeric beyond its
        range, a number in a raw record jsonb cannot hold, a constraint of a table the user
        made), and one such record must not fail every run. Only for a batch a plain COPY
        already failed on (the batch's transaction is then redone this way): a savepoint per
        part costs round trips a batch that loads does not pay. k refused rows of n take
        about 2k log2(n) COPYs.
        """

        async def attempt(part: list[tuple[Any, ...]]) -> None:
            await self._copy(connection, name, schema, part, encode)

        await self._halving(connection, rows, attempt, refused)

    async def merge_refusing(
        self, connection: Connection, rows: Rows, refused: list[tuple[Any, str]]
    ) -> None:
        """Stage and merge a merge batch in parts, halving a part PostgreSQL refuses (at the
        COPY or at the merge: a target the user altered, a ``varchar(n)`` or a ``CHECK``),
        as :meth:`copy_refusing` does; at the batch's turn, since merges go in batch order."""
        await connection.execute(self._staging_sql)

        async def attempt(part: list[tuple[Any, ...]]) -> None:
            await connection.execute(f"TRUNCATE {self.staging}")
            await self._copy(connection, self.staging_name, None, part, self._encode)
            await self.merge(connection)

        await self._halving(connection, self.last_per_key(rows), attempt, refused)

    async def _halving(
        self,
        connection: Connection,
        rows: Rows,
        attempt: Callable[[list[tuple[Any, ...]]], Awaitable[None]],
        refused: list[tuple[Any, str]],
    ) -> None:
        """``attempt`` on all rows, each part in a savepoint; a refused part is halved, and a
        refused single row goes to ``refused`` (after a try with the Python path's raw
        record, see :meth:`_reencoded_raw`)."""
        whole: list[tuple[Any, ...]] = (
            decode_rows(rows, self._column_types) if isinstance(rows, EncodedBatch) else list(rows)
        )
        pending = [whole] if whole else []
        while pending:
            part = pending.pop()
            try:
                async with connection.transaction():
                    await attempt(part)
            except REFUSALS as exc:
                if len(part) == 1:
                    retry = self._reencoded_raw(part[0])
                    if retry is not None:
                        pending.append([retry])
                    else:
                        refused.append((self.row_record(part[0]), refusal_reason(exc)))
                    continue
                middle = len(part) // 2
                pending += [part[middle:], part[:middle]]

    def _reencoded_raw(self, row: tuple[Any, ...]) -> tuple[Any, ...] | None:
        """``row`` with its raw record re-encoded by orjson, as the Python path stores it, when
        that differs from the server's text the typed decoders keep (a number's spelling:
        ``1e-16384`` is 0.0 to orjson and out of jsonb's range to PostgreSQL); else None."""
        if not self.table.store_raw or not isinstance(row[-1], str):
            return None
        try:
            text = orjson.dumps(orjson.loads(row[-1])).decode()
        except (orjson.JSONDecodeError, TypeError):
            return None
        return (*row[:-1], text) if text != row[-1] else None

    def row_record(self, row: tuple[Any, ...]) -> dict[str, Any]:
        """A refused row as its dead letter's record: the columns by name, values as JSON can
        hold them (the raw record column as the record's JSON text, in a string)."""
        return {
            column: value if value is None or type(value) in (str, int, bool, float) else str(value)
            for column, value in zip(self.columns, row, strict=True)
        }

    @property
    def target_checked(self) -> bool:
        """Whether :meth:`target_matches` has looked (or there is no C encoder to look for)."""
        return self._encode is None or self._target_matches is not None

    @property
    def target_matched(self) -> bool:
        """What :meth:`target_matches` found (False before it looked)."""
        return bool(self._target_matches)

    async def target_matches(self, connection: Connection) -> bool:
        """Whether every column of the target has exactly the configured type (once per sink).

        A table ingest created always does; one a user made or altered may not (``varchar``,
        ``numeric`` for a double, a domain), and then asyncpg encodes for the actual types, as
        it always did, instead of the C encoder's bytes for the configured ones.
        """
        if self._encode is None:
            return False
        if self._target_matches is None:
            self._target_matches = bool(
                await connection.fetchval(
                    "SELECT count(*) = cardinality($2::text[]) AND bool_and("
                    "a.atttypid = e.type::regtype) FROM unnest($2::text[], $3::text[]) "
                    "AS e(name, type) JOIN pg_attribute a ON a.attrelid = $1::regclass "
                    "AND a.attname = e.name AND a.attnum > 0 AND NOT a.attisdropped",
                    self.qualified,
                    list(self.columns),
                    [POSTGRES_TYPES[kind] for kind in self._column_types],
                )
            )
        return self._target_matches

    def last_per_key(self, rows: Rows) -> Rows:
        """``rows`` with only the last occurrence of each primary key (usually all of them).

        An encoded batch has distinct keys (:class:`ingest.copyenc.RecordEncoder` declines
        any other).

        Python and PostgreSQL agree on key equality for every column type ingest converts to
        (int, str, Decimal, datetime, date, bool, float except NaN).
        """
        if isinstance(rows, EncodedBatch):
            return rows
        keys = list(map(self._key, rows))
        if len(set(keys)) == len(keys):
            return rows
        return list(dict(zip(keys, rows, strict=True)).values())

    def key_set(self, rows: Rows) -> set[Any]:
        """The primary keys ``rows`` bring (merge tables)."""
        if isinstance(rows, EncodedBatch):
            return rows.key_set
        return set(map(self._key, rows))

    async def merge(self, connection: Connection) -> None:
        """Upsert the staged batch into the target; the last occurrence of a key wins."""
        await connection.execute(self._merge_sql)

    async def copy_new(self, connection: Connection, rows: Rows, refused: Refused = None) -> bool:
        """Merge a batch none of whose keys is in the target yet by one plain COPY into it.

        The same rows as :meth:`stage` then :meth:`merge` when every key is new (an upsert of
        a new key is an insert, ``_ingest_loaded_at`` defaults alike), for a fraction of the
        database's work: no staging table and no conflict check per row. In a savepoint: the
        first key already there undoes it and returns False, and the caller merges the usual way.
        """
        try:
            async with connection.transaction():
                await self._copy_into_target(connection, self.last_per_key(rows), refused)
        except asyncpg.UniqueViolationError:
            return False
        return True
